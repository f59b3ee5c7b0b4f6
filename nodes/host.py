"""The ComfyUI services the nodes use, imported when first called.

The node modules import without ComfyUI (tests, CI, other hosts); only calling these
needs it. Everything a node reads from disk comes through the "loras" folders here.
"""

from __future__ import annotations

import os

LORA_FOLDER = "loras"


def lora_names() -> list[str]:
    """Network files ComfyUI lists in its "loras" folders (relative names)."""
    import folder_paths

    return folder_paths.get_filename_list(LORA_FOLDER)


def lora_path(name: str) -> str:
    """Full path of a listed network file (ComfyUI raises for unknown names)."""
    import folder_paths

    return folder_paths.get_full_path_or_raise(LORA_FOLDER, name)


def lora_roots() -> list[str]:
    """The "loras" folders: the only places the routes read files from."""
    import folder_paths

    return folder_paths.get_folder_paths(LORA_FOLDER)


def lora_key_map(model, clip) -> dict:
    """ComfyUI's own LoRA key map for a MODEL and/or CLIP (either may be None), as Load LoRA builds it."""
    import comfy.lora

    key_map: dict = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def progress(total: int):
    """ComfyUI's progress bar for the running node (shown on the node and in the queue)."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def save_path(filename_prefix: str, extension: str) -> str:
    """A new file name in ComfyUI's output folder for `filename_prefix`, as its savers number them."""
    import folder_paths

    folder, filename, counter, _, _ = folder_paths.get_save_image_path(
        filename_prefix, folder_paths.get_output_directory()
    )
    return os.path.join(folder, f"{filename}_{counter:05}_{extension}")


def load_patched(patchers) -> None:
    """Have ComfyUI load the patchers with every patch baked into the weights (as its savers do)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(list(patchers), force_patch_weights=True)


def metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata (no prompt/workflow in saved files)."""
    from comfy.cli_args import args

    return not args.disable_metadata


def server_routes():
    """The route table of ComfyUI's server (custom routes are added before it starts)."""
    from server import PromptServer

    return PromptServer.instance.routes
