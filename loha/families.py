"""The model families and what each calls things: one table of facts, and the rules
that tell families apart.

Every other module asks here: the network reader (which part a file name addresses,
which family a file is for), the name map (which prefixes a family's files use), the
checkpoint converters (where each part sits in a family's checkpoint), the writers
(`ss_base_model_version`). It imports nothing of loha but its errors, so every layer
can use it.

Names of model parts:

- a *component* is what a network file's prefix addresses: ``unet``, ``te1``, ``te2``;
- a *pipeline attribute* is where diffusers keeps the part: ``unet``, ``text_encoder``,
  ``text_encoder_2`` (and ``vae``, which no network patches).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import LohaError

# --------------------------------------------------------------------------- families

#: Model families, told apart by the UNet's cross-attention context width.
FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: Without a UNet: the width of a single text encoder (two encoders mean SDXL).
FAMILY_BY_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
FAMILIES = tuple(FAMILY_BY_CONTEXT_DIM.values())
#: How people write the family names.
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
#: kohya's `ss_base_model_version` and modelspec's architecture per family.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                          "sdxl": "stable-diffusion-xl-v1-base"}
#: Substrings of a file's `ss_base_model_version`/`modelspec.architecture` -> family, in order.
_FAMILY_BY_METADATA = (("sdxl", "sdxl"), ("v2", "sd2"), ("sd_v1", "sd1"), ("v1", "sd1"))

# --------------------------------------------------------------------------- parts and prefixes

#: diffusers pipeline attribute -> component, for the parts networks patch.
PIPELINE_COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
COMPONENT_ATTRIBUTES = {component: attr for attr, component in PIPELINE_COMPONENTS.items()}
TEXT_COMPONENTS = ("te1", "te2")

#: kohya's UNet prefix, and the LyCORIS wrapper's (SimpleTuner's) prefix for diffusers paths.
UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"
#: kohya's text-encoder prefixes: one encoder, or the first/second of two.
SINGLE_TEXT_PREFIX = "lora_te_"
TEXT_PREFIX = {"te1": "lora_te1_", "te2": "lora_te2_"}
#: Text-encoder prefixes per family and component, the one kohya writes first.
#: Like ComfyUI, the first encoder also answers to the other single/first prefix.
TEXT_PREFIXES = {
    "sd1": {"te1": (SINGLE_TEXT_PREFIX, TEXT_PREFIX["te1"])},
    "sd2": {"te1": (SINGLE_TEXT_PREFIX, TEXT_PREFIX["te1"])},
    "sdxl": {"te1": (TEXT_PREFIX["te1"], SINGLE_TEXT_PREFIX), "te2": (TEXT_PREFIX["te2"],)},
}
#: Files write text-encoder paths with and without transformers' ``text_model`` level
#: (transformers 5 dropped it from ``CLIPTextModel``).
TEXT_MODEL_LEVEL = "text_model."
#: Which UNet path kohya writes per family (the first spelling of a UNet target).
KOHYA_UNET_LAYOUT = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}

#: Prefix of a file module name -> the component it patches (longer prefixes first).
_COMPONENT_OF_PREFIX = (
    (UNET_PREFIX, "unet"),
    (LYCORIS_PREFIX, "unet"),
    (TEXT_PREFIX["te1"], "te1"),
    (TEXT_PREFIX["te2"], "te2"),
    (SINGLE_TEXT_PREFIX, "te1"),
)


def component_of(name: str) -> str | None:
    """"unet", "te1", "te2" from a kohya/LyCORIS module name's prefix, else None."""
    for prefix, component in _COMPONENT_OF_PREFIX:
        if name.startswith(prefix):
            return component
    return None


def kohya_prefix(component: str, single_text: bool) -> str:
    """The prefix kohya writes for a component (``lora_te_`` when there is one encoder)."""
    if component == "unet":
        return UNET_PREFIX
    return SINGLE_TEXT_PREFIX if component == "te1" and single_text else TEXT_PREFIX[component]


# --------------------------------------------------------------------------- checkpoint layout


@dataclass(frozen=True)
class CheckpointPart:
    """Where and how one diffusers part sits in a family's LDM checkpoint."""

    prefix: str
    kind: str  # "unet", "clip" (HF CLIP names), "openclip" (resblocks, fused q/k/v), "vae"
    depth: int | None = None  # OpenCLIP layers the checkpoint holds when diffusers keeps one fewer


#: Where the UNet sits in an LDM state dict: checkpoints, ComfyUI's live model.
UNET_STATE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_UNET = CheckpointPart(UNET_STATE_PREFIXES[0], "unet")
_VAE = CheckpointPart("first_stage_model.", "vae")
#: family -> pipeline attribute -> where the part sits in its checkpoints.
CHECKPOINT_PARTS = {
    "sd1": {"unet": _UNET, "text_encoder": CheckpointPart("cond_stage_model.transformer.", "clip"), "vae": _VAE},
    # SD2 runs OpenCLIP-H to its penultimate layer; diffusers drops the 24th, checkpoints keep it.
    "sd2": {"unet": _UNET, "text_encoder": CheckpointPart("cond_stage_model.model.", "openclip", depth=24),
            "vae": _VAE},
    "sdxl": {
        "unet": _UNET,
        "text_encoder": CheckpointPart("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": CheckpointPart("conditioner.embedders.1.model.", "openclip"),
        "vae": _VAE,
    },
}
#: The text encoders diffusers builds with a projection (SD2's has none, though its checkpoint does).
PROJECTED_TEXT_ENCODERS = ("text_encoder_2",)


def checkpoint_parts(family: str) -> dict[str, CheckpointPart]:
    if family not in CHECKPOINT_PARTS:
        raise LohaError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    return CHECKPOINT_PARTS[family]


# --------------------------------------------------------------------------- telling families apart

_CONTEXT_KEY = "attn2.to_k.weight"  # UNet cross-attention key projection: input width = context width
_TOKEN_EMBEDDING = "embeddings.token_embedding.weight"


def family_of_widths(context_dim: int | None, text_widths: Mapping[str, int]) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the shapes that tell them apart.

    ``context_dim`` is the UNet's cross-attention context width (``attn2.to_k`` input
    features), None without a UNet; ``text_widths`` maps present text-encoder
    components (``"te1"``, ``"te2"``) to their hidden widths.
    """
    if context_dim is not None:
        if context_dim in FAMILY_BY_CONTEXT_DIM:
            return FAMILY_BY_CONTEXT_DIM[context_dim]
        raise LohaError(
            f"unknown model family: UNet cross-attention context width {context_dim} "
            f"(known: {FAMILY_BY_CONTEXT_DIM})"
        )
    if "te2" in text_widths:
        return "sdxl"
    if text_widths.get("te1") in FAMILY_BY_TEXT_WIDTH:
        return FAMILY_BY_TEXT_WIDTH[text_widths["te1"]]
    raise LohaError(
        f"unknown model family: no UNet cross-attention and text encoder widths {dict(text_widths)}"
    )


def family_of_network(modules: Mapping, metadata: Mapping[str, str]) -> str | None:
    """SD1.x / SD2.x / SDXL of a network file from its names and shapes; metadata breaks ties.

    `modules` maps file module names to `loha.files.network.Module`s; None when nothing tells.
    """
    if any(component_of(n) == "te2" for n in modules) or any("input_blocks_7_1_transformer_blocks_1" in n
                                                             for n in modules):
        return "sdxl"
    for name, module in modules.items():
        if component_of(name) == "unet" and name.endswith("attn2_to_k") and module.kind in ("loha", "lora"):
            width = module.delta_numel // module.out_features
            if width in FAMILY_BY_CONTEXT_DIM:
                return FAMILY_BY_CONTEXT_DIM[width]
    for name, module in modules.items():
        if component_of(name) == "te1" and name.endswith("self_attn_q_proj") and module.kind in ("loha", "lora"):
            return FAMILY_BY_TEXT_WIDTH.get(module.out_features)
    hint = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return next((family for needle, family in _FAMILY_BY_METADATA if needle in hint), None)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def family_of_checkpoint(state: Mapping) -> str:
    """The family of an LDM state dict (keys -> tensors or shapes): from where its text
    encoders sit, else from its UNet."""
    for family in ("sdxl", "sd2", "sd1"):
        text = [part.prefix for attr, part in CHECKPOINT_PARTS[family].items() if attr.startswith("text_encoder")]
        if all(any(key.startswith(prefix) for key in state) for prefix in text):
            return family
    context = next((_shape(v)[1] for k, v in state.items()
                    if k.startswith(_UNET.prefix) and k.endswith(_CONTEXT_KEY)), None)
    return family_of_widths(context, {})


def family_of_parts(states: Mapping[str, Mapping]) -> str:
    """The family of diffusers parts given as {pipeline attribute: state dict}."""
    unet = states.get("unet", {})
    context = next((_shape(v)[1] for k, v in unet.items() if k.endswith(_CONTEXT_KEY)), None)
    widths = {}
    for attr in ("text_encoder", "text_encoder_2"):
        state = states.get(attr)
        if state is None:
            continue
        embedding = next((state[k] for k in (_TOKEN_EMBEDDING, TEXT_MODEL_LEVEL + _TOKEN_EMBEDDING) if k in state), None)
        if embedding is None:
            raise LohaError(f"text encoder state dict has no '{_TOKEN_EMBEDDING}'")
        widths[PIPELINE_COMPONENTS[attr]] = _shape(embedding)[1]
    return family_of_widths(context, widths)
