"""Stable Diffusion WebUI (AUTOMATIC1111 1.8+, Forge) extension: `<loha:…>`, a "LoHa" cards page and tab.

The WebUI imports this file at start-up with the extension folder on `sys.path`, so
the `loha` package next to it is importable. Everything that does not need the
WebUI lives in `loha.hosts.webui` (prompt arguments, files, the active set patched in
place on AUTOMATIC1111), `loha.hosts.forge` (patches on Forge's own patchers) and
`loha.app.ui` (the tab's Gradio blocks); this file only registers them with the WebUI.
"""

import logging
import os
import re

from modules import extra_networks, hashes, paths, script_callbacks, scripts, shared, ui_extra_networks

from loha import LohaError
from loha.hosts.forge import PATCH_TYPE, ForgeActive, is_forge, weight_calculator
from loha.hosts.safepaths import real_file_inside
from loha.hosts.webui import (ActiveSet, NetworkFiles, card_files, card_metadata, list_networks, not_applied_text,
                              parse_request, preferred_weight)

log = logging.getLogger("loha")
NAME = "loha"  # the prompt syntax: <loha:name:…>; `lora` and `lyco` stay the built-in's
INFOTEXT_KEY = "LoHa hashes"
#: Infotext entry naming the LoHa of the prompt that were not applied, and why (the API answer carries it).
NOT_APPLIED_KEY = "LoHa not applied"
#: The conditioning caches of the WebUI's processing objects (keyed on the prompt text only).
COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")
THUMB_ROUTE = "/sd_extra_networks/thumb"


def network_folders() -> list[str]:
    """--loha-dir first (default models/LoHa), then the Lora folder."""
    lora = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    loha = getattr(shared.cmd_opts, "loha_dir", None) or os.path.join(paths.models_path, "LoHa")
    return [loha, lora]


def forget_cached_conditioning(p) -> None:
    """Empty the WebUI's conditioning caches: they are keyed on the prompt text, so after a
    LoHa's file or the active set changed they would hand back the old text encoder's output."""
    for name in COND_CACHES:
        cache = getattr(p, name, None)
        if isinstance(cache, list) and len(cache) == 2:
            cache[0] = cache[1] = None  # the list is shared with the class: clear it in place


class Files:
    """Name -> path of every network file, refreshed when a name is not found."""

    def __init__(self):
        self.paths: dict[str, str] = {}

    def refresh(self) -> dict[str, str]:
        self.paths = list_networks(network_folders())
        return self.paths

    def find(self, name: str) -> str | None:
        if name not in self.paths:
            self.refresh()
        return self.paths.get(name)


files = Files()
networks = NetworkFiles()  # what the cards page read, per file version
active = ActiveSet(_files=networks)


def forge_key_map(unet, clip) -> dict:
    """Forge's own LoRA key map for its UNet and CLIP patchers, as its built-in Lora builds it."""
    from backend.patcher.lora import model_lora_keys_clip, model_lora_keys_unet

    return {**model_lora_keys_unet(unet.model, {}), **model_lora_keys_clip(clip.cond_stage_model, {})}


forge_active = ForgeActive(forge_key_map)


def shorthash(name: str, path: str, compute: bool) -> str:
    """The short hash the built-in Lora shows (kohya's hash of the tensor data, 12 digits)."""
    read = hashes.sha256 if compute else hashes.sha256_from_cache
    value = read(path, f"{NAME}/{name}", use_addnet_hash=True)
    return value[:12] if value else ""


class ExtraNetworkLoha(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__(NAME)

    def activate(self, p, params_list):
        """Apply every LoHa of the prompt that can be applied; name the others, with the reason,
        in the UI (comments), in the infotext the API returns, and in the console."""
        wanted, problems = [], {}
        for params in params_list:
            name = str(params.positional[0]).strip() if params.positional else "?"
            try:
                request = parse_request(params.positional, params.named, shared.opts.extra_networks_default_multiplier)
            except LohaError as exc:
                problems[name] = str(exc)
                continue
            path = files.find(request.name)
            if path is None:
                problems[request.name] = "no such file in the LoHa or Lora folders"
            else:
                wanted.append((request, path))
        if is_forge(shared.sd_model):  # applied and reported once every extra network is active (LohaForgeScript)
            forge_active.wanted, forge_active.unresolved = wanted, problems
            return
        if active.update(shared.sd_model, wanted, keep_going=True):
            forget_cached_conditioning(p)
            warn_unmatched(active.unmatched, active.handle.unknown_keys if active.handle else {})
        report(p, {**problems, **active.failed}, wanted)

    def deactivate(self, p):
        pass  # weights stay patched until the set changes, as the built-in Lora keeps its own


def warn_unmatched(unmatched: dict[str, list[str]], unknown_keys: dict[str, list[str]] | None = None) -> None:
    """What the files hold that this model does not get, in the console."""
    for label, names in unmatched.items():
        if names:
            log.warning("loha: %s: %d names match no weight of this model and were not applied: %s", label,
                        len(names), ", ".join(names))
    for label, keys in (unknown_keys or {}).items():
        log.warning("loha: %s: %d keys are of no known kind and were not applied: %s", label, len(keys),
                    ", ".join(keys))


def report(p, problems: dict[str, str], wanted: list) -> None:
    """After the LoHa went on the model: name those not applied, and record the hashes of the others."""
    report_not_applied(p, problems, {r.name: path for r, path in wanted})
    applied = [(r, path) for r, path in wanted if r.name not in problems]
    if applied and shared.opts.data.get("loha_add_hashes_to_infotext", True):
        listed = [f"{r.name.replace(':', '').replace(',', '')}: {shorthash(r.name, path, True)}" for r, path in applied]
        p.extra_generation_params[INFOTEXT_KEY] = ", ".join(listed)


def report_not_applied(p, problems: dict[str, str], paths: dict[str, str]) -> None:
    """Name the LoHa not applied where the user and an API client look: comments, infotext, console."""
    if not problems:
        return
    text = not_applied_text(problems, paths)
    p.comment(f"{NOT_APPLIED_KEY}: {text}")
    p.extra_generation_params[NOT_APPLIED_KEY] = text
    log.warning("loha: %s: %s", NOT_APPLIED_KEY, text)


class LohaForgeScript(scripts.Script):
    """On Forge, puts the LoHa on its patchers after every extra network (the built-in Lora too) is active."""

    def title(self):
        return "LoHa"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_extra_networks_activate(self, p, *args, **kwargs):
        if not is_forge(shared.sd_model):
            return
        if forge_active.apply(shared.sd_model):
            forget_cached_conditioning(p)
        warn_unmatched(forge_active.unmatched, forge_active.unknown_keys)
        report(p, {**forge_active.unresolved, **forge_active.failed}, forge_active.wanted)


class ExtraNetworksPageLoha(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("LoHa")

    def refresh(self):
        files.refresh()

    def list_items(self):
        cards.refresh()
        for index, name in enumerate(list(cards.listed)):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def create_item(self, name, index=None, enable_filter=True):
        """A card; one for a file that cannot be read says so in its description and metadata."""
        path, error = cards.find(name)
        if path is None:
            return None
        network = None if error else networks.read(path)[0]
        metadata = {"error": error} if error else card_metadata(network)
        stem = os.path.splitext(path)[0]
        weight = preferred_weight(path, shared.opts.extra_networks_default_multiplier)
        short = "" if error else shorthash(name, path, False)
        description = self.find_description(stem)
        if error:
            description = f"⚠ Cannot be read, not applied: {error.replace(path, os.path.basename(path))}"
        return {
            "name": name,
            "filename": path,
            "shorthash": short,  # 1.8's tree view reads it from every item
            "preview": self.find_preview(stem),
            "description": description,
            "search_terms": [self.search_terms_from_path(path), metadata.get("tags", ""), short],
            "local_preview": f"{stem}.{shared.opts.samples_format}",
            "metadata": metadata,
            "sort_keys": {"default": index, **self.get_sort_keys(path)},
            "prompt": ui_extra_networks.quote_js(f"<{NAME}:{name}:{weight:g}>"),
        }

    def allowed_directories_for_previews(self):
        return [d for d in network_folders() if os.path.isdir(d)]


class Cards:
    """The cards page's files: all of the LoHa folder, LoHa-holding and unreadable ones of the Lora folder."""

    def __init__(self):
        self.listed: dict[str, tuple[str, str | None]] = {}

    def refresh(self) -> None:
        own, lora = network_folders()
        self.listed = card_files([own], [lora], networks)

    def find(self, name: str) -> tuple[str | None, str | None]:
        if name not in self.listed:
            self.refresh()
        return self.listed.get(name, (None, None))


cards = Cards()


re_loha = re.compile(r"<loha:([^:>]+)")


def infotext_pasted(infotext, params):
    """Pasted infotext names LoHa by hash too: rename ones whose file is here under another name."""
    listed = params.get(INFOTEXT_KEY)
    if not listed:
        return
    wanted = dict(x.strip().rsplit(":", 1) for x in listed.split(",") if ":" in x)
    wanted = {k.strip(): v.strip() for k, v in wanted.items()}
    by_hash = {shorthash(n, p, False): n for n, p in files.refresh().items()}

    def rename(m):
        name = by_hash.get(wanted.get(m.group(1), ""))
        return f"<loha:{name}" if name else m.group(0)

    params["Prompt"] = re_loha.sub(rename, params.get("Prompt", ""))


def before_ui():
    ui_extra_networks.register_page(ExtraNetworksPageLoha())
    extra_networks.register_extra_network(ExtraNetworkLoha())


def loaded_checkpoint() -> str | None:
    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return getattr(info, "filename", None)


def on_ui_tabs():
    from loha.app.ui import Folders, build

    folders = Folders(
        checkpoints=[os.path.join(paths.models_path, "Stable-diffusion")],
        networks=network_folders(),
        output=os.path.join(paths.models_path, "Stable-diffusion"),
        current_checkpoint=loaded_checkpoint,  # the Train tab starts on the model the WebUI has loaded
    )
    return [(build(folders), "LoHa", "loha")]


def guard_previews(_demo, app):
    """Serve the cards' preview images only from inside the model folders, symlinks followed.

    The WebUI's own thumb route (1.8) compares unnormalised paths, so `Lora/../../x.png`
    and symlinks out of a folder pass it. This route goes first on the same path, turns
    away what lies outside the registered preview folders, and hands the rest to it.
    """
    from fastapi import HTTPException

    host_fetch = ui_extra_networks.fetch_file

    def thumb(filename: str = ""):
        if real_file_inside(filename, ui_extra_networks.allowed_dirs) is None:
            raise HTTPException(status_code=404, detail="File not found")
        return host_fetch(filename)

    app.add_api_route(THUMB_ROUTE, thumb, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())  # routes match in order: ours first


def on_model_loaded(sd_model):
    active.forget()  # new weights were loaded over the patched ones: nothing to restore


def on_unloaded():
    if is_forge(shared.sd_model):
        forge_active.clear(shared.sd_model)
    else:
        active.clear(shared.sd_model)


shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
    "loha_add_hashes_to_infotext": shared.OptionInfo(True, "Add LoHa hashes to infotext"),
}))

try:  # Forge: its weight merging hands our patches to our kernels
    from backend.patcher import lora as forge_lora

    forge_lora.extra_weight_calculators[PATCH_TYPE] = weight_calculator
except ImportError:  # AUTOMATIC1111: no Forge backend, weights are patched in place
    pass
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(guard_previews)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_script_unloaded(on_unloaded)
script_callbacks.on_infotext_pasted(infotext_pasted)
