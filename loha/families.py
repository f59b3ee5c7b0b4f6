"""The model families and what each calls things: one table of facts, and the rules
that tell families apart.

Every other module asks here: the network reader (which part a file name addresses,
which family a file is for), the name map (which prefixes name which part), the
checkpoint converters (where each part sits in a family's checkpoint), the writers
(`ss_base_model_version`). It imports nothing of loha but its errors, so every layer
can use it.

Names of model parts:

- a *component* is what a network file's prefix addresses: ``unet`` (the diffusion
  model, UNet or transformer: kohya writes ``lora_unet_`` for both), ``te1``, ``te2``,
  ``te3`` (text encoders);
- a *pipeline attribute* is where diffusers keeps the part: ``unet``, ``transformer``,
  ``prior``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` (and ``vae``,
  which no network patches).

No family is needed to patch a model: names are generated from module paths (see
`loha.keys.namemap`). Families matter for SD's block ids, for checkpoint layouts whose
keys are not module paths (`loha.keys.layouts`), and for telling the user what a file
or a model is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import LohaError

# --------------------------------------------------------------------------- families

#: Model families, told apart by the UNet's cross-attention context width.
FAMILY_BY_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: Without a UNet: the width of a single text encoder (two encoders mean SDXL).
FAMILY_BY_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
FAMILIES = tuple(FAMILY_BY_CONTEXT_DIM.values())
#: Families whose checkpoints fuse weights diffusers keeps apart (`loha.keys.layouts`).
LAYOUT_FAMILIES = ("flux", "sd3")
#: Every family a name map can be told to use (`family=`).
KNOWN_FAMILIES = (*FAMILIES, *LAYOUT_FAMILIES)
#: How people write the family names (the ones told apart only for display too).
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "Flux.1", "sd3": "SD3/3.5",
                "auraflow": "AuraFlow", "hidream": "HiDream", "qwen-image": "Qwen-Image",
                "hunyuan-video": "HunyuanVideo", "wan": "Wan", "sana": "Sana", "pixart": "PixArt"}
#: kohya's `ss_base_model_version` and modelspec's architecture per family.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                          "sdxl": "stable-diffusion-xl-v1-base"}
#: Substrings of a file's `ss_base_model_version`/`modelspec.architecture` -> family, in order.
_FAMILY_BY_METADATA = (("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("diffusion-v3", "sd3"),
                       ("sdxl", "sdxl"),
                       ("v2", "sd2"), ("sd_v1", "sd1"), ("v1", "sd1"))
#: Patterns at the root of a diffusion transformer's module paths that give its family
#: away, first match wins. Matched against file names and model paths alike, with every
#: "." as "_" and the part's prefix taken off; they name the family for the user only,
#: nothing is patched differently because of them. (HunyuanVideo's attention and MLP
#: names are Flux's: only its modulation names tell it apart.)
_FAMILY_SIGNS = (
    ("hunyuan-video", r"(double_blocks_\d+_(img|txt)_mod_linear|single_blocks_\d+_modulation_linear|"
                      r"txt_in_individual_token_refiner)"),
    ("flux", r"double_blocks_\d+_(img|txt)_attn_qkv|single_transformer_blocks_\d+_proj_mlp"),
    ("sd3", r"joint_blocks_\d+_(x|context)_block|transformer_blocks_\d+_(ff_context_net|norm1_context_linear)"),
    ("auraflow", r"(joint|single)_transformer_blocks_\d+_(attn|ff)|(double|single)_layers_\d+_(attn|mlp)"),
    ("hidream", r"double_stream_blocks_\d+"),
    ("qwen-image", r"transformer_blocks_\d+_(img|txt)_(mlp|mod)"),
    ("sana", r"transformer_blocks_\d+_ff_conv_inverted"),
    ("pixart", r"transformer_blocks_\d+_attn2_to_|blocks_\d+_(attn_qkv|cross_attn_(q|kv)_linear)$"),
    ("wan", r"blocks_\d+_(ffn|self_attn|cross_attn)_"),
)

# --------------------------------------------------------------------------- parts and prefixes

#: diffusers pipeline attribute -> component, for every part networks patch.
PART_COMPONENTS = {"unet": "unet", "transformer": "unet", "prior": "unet",
                   "text_encoder": "te1", "text_encoder_2": "te2", "text_encoder_3": "te3"}
#: The parts of SD1.x/SD2.x/SDXL pipelines (their structures, folders and PEFT adapters).
PIPELINE_COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
TEXT_COMPONENTS = ("te1", "te2", "te3")
#: The text-encoder attribute of each text component.
TEXT_ATTRIBUTES = {component: attr for attr, component in PART_COMPONENTS.items() if component != "unet"}

#: kohya's UNet prefix, and the LyCORIS wrapper's (SimpleTuner's) prefix for diffusers paths.
UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"
#: Prefixes of the diffusion model's names, each + a module path with "." -> "_":
#: kohya (and musubi-tuner), the LyCORIS wrapper (SimpleTuner), OneTrainer.
DENOISER_PREFIXES = (UNET_PREFIX, LYCORIS_PREFIX, "lora_transformer_")
#: Prefixes + a module path as it is: PEFT's saved adapters, ComfyUI's own layout
#: (its generic rule; also diffusion-pipe and musubi-tuner files). The pipeline
#: attribute (``transformer.``, ``unet.``: diffusers, ai-toolkit) is a third.
PEFT_PREFIX = "base_model.model."
COMFY_DENOISER_PREFIX = "diffusion_model."
#: kohya's text-encoder prefixes: one encoder, or the first/second/third of several.
SINGLE_TEXT_PREFIX = "lora_te_"
TEXT_PREFIX = {"te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}
#: kohya names T5 `lora_te3_` in SD3 and Flux alike (OneTrainer: by position, `lora_te2_` in Flux).
T5_PREFIX = TEXT_PREFIX["te3"]
#: Files write text-encoder paths with and without transformers' ``text_model`` level
#: (transformers 5 dropped it from ``CLIPTextModel``).
TEXT_MODEL_LEVEL = "text_model."
#: Which UNet path kohya writes per family (the first spelling of a UNet target).
KOHYA_UNET_LAYOUT = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}

#: Prefix of a file module name -> the component it patches (longer prefixes first).
_COMPONENT_OF_PREFIX = (
    *((prefix, "unet") for prefix in (*DENOISER_PREFIXES, COMFY_DENOISER_PREFIX)),
    *((attr + ".", component) for attr, component in sorted(PART_COMPONENTS.items(), key=lambda kv: -len(kv[0]))),
    *((prefix, component) for component, prefix in TEXT_PREFIX.items()),
    (SINGLE_TEXT_PREFIX, "te1"),
)


def component_of(name: str) -> str | None:
    """"unet", "te1", "te2", "te3" from a module name's prefix (kohya, LyCORIS, OneTrainer,
    diffusers-style attribute), else None (PEFT's and bare paths do not say)."""
    for prefix, component in _COMPONENT_OF_PREFIX:
        if name.startswith(prefix):
            return component
    return None


def kohya_prefix(component: str, single_text: bool) -> str:
    """The prefix kohya writes for a component (``lora_te_`` when there is one encoder)."""
    if component == "unet":
        return UNET_PREFIX
    return SINGLE_TEXT_PREFIX if component == "te1" and single_text else TEXT_PREFIX[component]


def text_prefixes(component: str, single_text: bool, t5: bool = False) -> tuple[str, ...]:
    """Every kohya-style prefix of a text encoder, the one kohya writes first.

    Like ComfyUI, the first encoder answers to both ``lora_te_`` and ``lora_te1_``; a T5
    answers to kohya's ``lora_te3_`` as well as to its position (OneTrainer's).
    """
    prefixes = [kohya_prefix(component, single_text)]
    if component == "te1":
        prefixes.append(TEXT_PREFIX["te1"] if single_text else SINGLE_TEXT_PREFIX)
    if t5 and T5_PREFIX not in prefixes:
        prefixes.insert(0, T5_PREFIX)
    return tuple(prefixes)


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


def sd_family(context_dim: int | None, text_widths: Mapping[str, int]) -> str | None:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the shapes that tell them apart, else None.

    ``context_dim`` is the UNet's cross-attention context width (``attn2.to_k`` input
    features), None without a UNet; ``text_widths`` maps present text-encoder
    components (``"te1"``, ``"te2"``) to their hidden widths.
    """
    if context_dim is not None:
        return FAMILY_BY_CONTEXT_DIM.get(context_dim)
    if "te2" in text_widths and "te3" not in text_widths:
        return "sdxl"
    if set(text_widths) == {"te1"}:
        return FAMILY_BY_TEXT_WIDTH.get(text_widths["te1"])
    return None


def family_of_widths(context_dim: int | None, text_widths: Mapping[str, int]) -> str:
    """`sd_family`, raising where the shapes fit no SD family (callers that need one)."""
    family = sd_family(context_dim, text_widths)
    if family is not None:
        return family
    if context_dim is not None:
        raise LohaError(
            f"unknown model family: UNet cross-attention context width {context_dim} "
            f"(known: {FAMILY_BY_CONTEXT_DIM})"
        )
    raise LohaError(
        f"unknown model family: no UNet cross-attention and text encoder widths {dict(text_widths)}"
    )


def family_of_names(names: Iterable[str]) -> str | None:
    """The diffusion-transformer family that module names (file names or model paths) give away."""
    roots = [_denoiser_root(name) for name in names]
    for family, sign in _FAMILY_SIGNS:
        pattern = re.compile(sign)
        if any(root is not None and pattern.match(root) for root in roots):
            return family
    return None


#: Prefixes before a diffusion model's module path in names and state-dict keys.
_DENOISER_ROOTS = ("model.diffusion_model.", *DENOISER_PREFIXES, COMFY_DENOISER_PREFIX, PEFT_PREFIX,
                   *(attr + "." for attr, component in PART_COMPONENTS.items() if component == "unet"))


def _denoiser_root(name: str) -> str | None:
    """A name's module path ("." as "_") without its diffusion-model prefix; None for text encoders."""
    if component_of(name) not in (None, "unet"):
        return None
    root = next((name[len(p):] for p in _DENOISER_ROOTS if name.startswith(p)), name)
    return root.replace(".", "_")


def family_of_network(modules: Mapping, metadata: Mapping[str, str]) -> str | None:
    """The family of a network file from its names and shapes; metadata breaks ties.

    `modules` maps file module names to `loha.files.network.Module`s; None when nothing
    tells. Diffusion transformers are told by names (the training metadata first: SD3
    and Flux share their diffusers block names), SD families by shapes.
    """
    hint = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    by_metadata = next((family for needle, family in _FAMILY_BY_METADATA if needle in hint), None)
    if by_metadata in LAYOUT_FAMILIES:
        return by_metadata
    by_names = family_of_names(modules)
    if by_names is not None or any(component_of(n) == "te3" for n in modules):
        return by_names
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
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return by_metadata


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
