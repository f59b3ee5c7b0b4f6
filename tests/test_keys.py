"""Name map tests.

The full-size tests build SD1.5, SD2.1 and SDXL on the meta device (no memory, no
weights) and check that every module lycoris-lora's kohya network would train is
found, under every spelling, as exactly one target of the right shape, in both
layouts.  The LDM layout's truth comes from diffusers' own single-file converters:
the LDM state dicts below are checked to convert back to exactly the diffusers key
sets, and where each diffusers weight lives in the LDM dict (key and rows) is read
off the converters' output, never off loha.keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import toml
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from lycoris.config import FULL_TEXT_ENCODER_MODULES, FULL_UNET_MODULES, FULL_UNET_NAMES
from lycoris.kohya import create_network
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loha.errors import LohaError
from loha.families import family_of_widths
from loha.keys import map_modules, map_state_dict
from loha.models.configs import PUBLISHED

# --------------------------------------------------------------------------- model configs

# (width, layers, heads, activation); the vocabulary is small, nothing depends on it.
CLIP_L = (768, 12, 12, "quick_gelu")
OPENCLIP_H = (1024, 23, 16, "gelu")  # SD2 uses 23 of OpenCLIP-H's 24 layers
OPENCLIP_BIGG = (1280, 32, 20, "gelu")


def clip_config(width, layers, heads, act, vocab=1000, positions=77):
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


@dataclass(frozen=True)
class Encoder:
    attr: str  # pipeline attribute
    component: str
    cls: type
    spec: tuple
    ldm_prefix: str  # where the checkpoint keeps it
    openclip: bool  # checkpoint holds OpenCLIP layout
    prefix: str  # the kohya prefix a file uses for it


SD1_TE = Encoder(
    "text_encoder", "te1", CLIPTextModel, CLIP_L, "cond_stage_model.transformer.", False, "lora_te_"
)
SD2_TE = Encoder(
    "text_encoder", "te1", CLIPTextModel, OPENCLIP_H, "cond_stage_model.model.", True, "lora_te_"
)
SDXL_TE1 = Encoder(
    "text_encoder", "te1", CLIPTextModel, CLIP_L, "conditioner.embedders.0.transformer.", False,
    "lora_te1_",
)
SDXL_TE2 = Encoder(
    "text_encoder_2", "te2", CLIPTextModelWithProjection, OPENCLIP_BIGG,
    "conditioner.embedders.1.model.", True, "lora_te2_",
)
FAMILIES = {
    "sd1": (PUBLISHED["sd1"]["unet"], [SD1_TE]),
    "sd2": (PUBLISHED["sd2"]["unet"], [SD2_TE]),
    "sdxl": (PUBLISHED["sdxl"]["unet"], [SDXL_TE1, SDXL_TE2]),
}
UNET_LDM_PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- the oracle


class Tag:
    """Stands in for a checkpoint tensor and remembers which key (and rows) it is.

    diffusers' converters only pass values through, slice rows off fused q/k/v and
    transpose ``text_projection``; running them on tags tells where every diffusers
    weight lives in the LDM dict.
    """

    def __init__(self, key, shape, rows=None):
        self.key, self.shape, self.rows = key, tuple(shape), rows

    def __getitem__(self, index):
        first = index[0] if isinstance(index, tuple) else index
        start, stop, step = first.indices(self.shape[0])
        assert step == 1 and self.rows is None
        return Tag(self.key, (stop - start, *self.shape[1:]), (start, stop))

    @property
    def T(self):
        return Tag(self.key, self.shape[::-1], self.rows)

    def contiguous(self):
        return self

    clone = detach = contiguous


# The test's own diffusers -> LDM UNet renaming (written independently of
# loha.keys); diffusers' converter checks it below.
LDM_FIXED = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
DIFFUSERS_BLOCK = re.compile(
    r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?"
    r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)"
)


def ldm_unet_key(key: str, config) -> str:
    module, param = key.rsplit(".", 1)
    if module in LDM_FIXED:
        return f"{LDM_FIXED[module]}.{param}"
    area, x, kind, i, rest = DIFFUSERS_BLOCK.fullmatch(key).groups()
    x, i, n = int(x or 0), int(i), config.layers_per_block
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        rest = f"{LDM_RESNET[head]}.{tail}"
    if area == "down_blocks":
        block = {
            "resnets": f"input_blocks.{1 + (n + 1) * x + i}.0",
            "attentions": f"input_blocks.{1 + (n + 1) * x + i}.1",
            "downsamplers": f"input_blocks.{(n + 1) * (x + 1)}.0",
        }[kind]
        rest = rest.replace("conv.", "op.") if kind == "downsamplers" else rest
    elif area == "mid_block":
        block = f"middle_block.{2 * i}" if kind == "resnets" else "middle_block.1"
    else:
        attention = config.up_block_types[x].startswith("CrossAttn")
        block = {
            "resnets": f"output_blocks.{(n + 1) * x + i}.0",
            "attentions": f"output_blocks.{(n + 1) * x + i}.1",
            "upsamplers": f"output_blocks.{(n + 1) * x + n}.{2 if attention else 1}",
        }[kind]
    return f"{block}.{rest}"


OPENCLIP_RENAMES = (
    ("encoder.layers.", "transformer.resblocks."),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("final_layer_norm", "ln_final"),
    ("embeddings.token_embedding", "token_embedding"),
)
QKV = re.compile(r"(.*)\.self_attn\.[qkv]_proj\.(weight|bias)")
QKV_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def openclip_sources(hf_keys, extra_layer: int | None) -> dict[str, list[str]]:
    """OpenCLIP key -> the HF keys it concatenates (in order), for canonical HF keys.

    ``extra_layer`` adds a copy of the last layer under that index, as SD2
    checkpoints hold a 24th layer the diffusers encoder does not use.
    """
    sources = {}
    for key in hf_keys:
        if key == "embeddings.position_embedding.weight":
            ldm = "positional_embedding"
        elif key == "text_projection.weight":
            ldm = "text_projection"
        elif match := QKV.fullmatch(key):
            ldm = f"{match[1]}.attn.in_proj_{match[2]}"
        else:
            ldm = key
        for old, new in OPENCLIP_RENAMES:
            ldm = ldm.replace(old, new)
        sources.setdefault(ldm, []).append(key)
    for hf_keys in sources.values():  # fuse in q, k, v order (modules register k, v, q)
        hf_keys.sort(key=lambda k: QKV_ORDER.get(k.split(".")[-2], 0))
    if extra_layer is not None:
        last = f"transformer.resblocks.{extra_layer - 1}."
        for ldm in [k for k in sources if k.startswith(last)]:
            sources[ldm.replace(last, f"transformer.resblocks.{extra_layer}.")] = sources[ldm]
    return sources


def canonical_hf(key: str) -> str:
    return key.removeprefix("text_model.")


def hf_state(model) -> dict[str, tuple]:
    """Canonical HF key (no ``text_model.``) -> shape, without buffers."""
    state = model.state_dict()
    return {canonical_hf(k): tuple(v.shape) for k, v in state.items() if "position_ids" not in k}


def tag_openclip(encoder: Encoder, model, state: dict) -> dict:
    extra = model.config.num_hidden_layers if encoder.cls is CLIPTextModel else None
    ldm = {}
    for ldm_key, hf_keys in openclip_sources(state, extra).items():
        shapes = [state[k] for k in hf_keys]
        if ldm_key == "text_projection":
            shape = shapes[0][::-1]
        else:
            shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        key = encoder.ldm_prefix + ldm_key
        ldm[key] = Tag(key, shape)
    if "text_projection.weight" not in state:  # SD2's checkpoint has one, its encoder not
        key, width = encoder.ldm_prefix + "text_projection", model.config.hidden_size
        ldm[key] = Tag(key, (width, width))
    return ldm


@dataclass
class Full:
    family: str
    unet: UNet2DConditionModel
    encoders: dict  # Encoder -> model
    ldm: dict  # LDM state dict of Tags
    where: dict  # (component, canonical diffusers/HF key) -> Tag from the converters


def build_full(family: str) -> Full:
    unet_config, encoder_specs = FAMILIES[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        encoders = {e: e.cls(clip_config(*e.spec)) for e in encoder_specs}

    unet_state = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ldm = {}
    for key, shape in unet_state.items():
        ldm_key = UNET_LDM_PREFIX + ldm_unet_key(key, unet.config)
        ldm[ldm_key] = Tag(ldm_key, shape)
    converted = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert_converts_back(converted, unet_state)
    where = {("unet", k): v for k, v in converted.items()}

    for encoder, model in encoders.items():
        state = hf_state(model)
        if encoder.openclip:
            part = tag_openclip(encoder, model, state)
            converted = convert_open_clip_checkpoint(model, part, prefix=encoder.ldm_prefix)
        else:
            part = {}
            for key, shape in state.items():
                ldm_key = f"{encoder.ldm_prefix}text_model.{key}"
                part[ldm_key] = Tag(ldm_key, shape)
            converted = convert_ldm_clip_checkpoint(part)
        converted = {canonical_hf(k): v for k, v in converted.items()}
        assert_converts_back(converted, state)
        where.update({(encoder.component, k): v for k, v in converted.items()})
        ldm.update(part)
    return Full(family, unet, encoders, ldm, where)


def assert_converts_back(converted: dict, expected: dict):
    assert set(converted) == set(expected), (set(converted) ^ set(expected))
    assert {k: v.shape for k, v in converted.items()} == expected


@pytest.fixture(scope="module", params=list(FAMILIES))
def full(request) -> Full:
    return build_full(request.param)


# --------------------------------------------------------------------------- lycoris' targets


def lycoris_targets(root, classes, names) -> dict[str, torch.nn.Module]:
    """Module paths ``LycorisNetworkKohya.create_modules`` wraps (its "full" lists)."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    found = {}
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if isinstance(child, kinds):
                    found[".".join(p for p in (name, child_name) if p)] = child
        elif name in names and isinstance(module, kinds):
            found[name] = module
    return found


def expected_block(ldm_path: str, last_out: int) -> str:
    if match := re.match(r"input_blocks\.(\d+)\.", ldm_path):
        return f"IN{int(match[1]):02d}"
    if match := re.match(r"output_blocks\.(\d+)\.", ldm_path):
        return f"OUT{int(match[1]):02d}"
    if ldm_path.startswith("middle_block."):
        return "MID"
    if ldm_path == "out.2":
        return f"OUT{last_out:02d}"
    assert ldm_path.split(".")[0] in ("time_embed", "label_emb"), ldm_path
    return "BASE"


TEXT_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "mlp.fc1", "mlp.fc2")


def expected_spellings(family: str, component: str, path: str, ldm_path: str | None, prefix):
    """(spellings a file may use, the one kohya writes) for a module path."""
    if component == "unet":
        under = path.replace(".", "_")
        spellings = ["lora_unet_" + under, "lora_unet_" + ldm_path.replace(".", "_"),
                     "lycoris_" + under]
        return spellings, spellings[1] if family == "sdxl" else spellings[0]
    under = canonical_hf(path).replace(".", "_")
    spellings = [prefix + "text_model_" + under, prefix + under]
    return spellings, spellings[0]


@pytest.mark.parametrize("layout", ["modules", "ldm"])
def test_full_size_coverage(full: Full, layout: str):
    if layout == "modules":
        name_map = map_modules({"unet": full.unet, **{e.attr: m for e, m in full.encoders.items()}})
    else:
        name_map = map_state_dict(full.ldm)
    assert name_map.family == full.family
    outputs = UNET_LDM_PREFIX + "output_blocks."
    last_out = max(int(k[len(outputs):].split(".")[0]) for k in full.ldm if k.startswith(outputs))

    jobs = [("unet", "unet", full.unet, FULL_UNET_MODULES, FULL_UNET_NAMES, None)]
    for e, model in full.encoders.items():
        jobs.append((e.component, e.attr, model, FULL_TEXT_ENCODER_MODULES, [], e.prefix))
    hit = set()
    for component, attr, model, classes, names, te_prefix in jobs:
        found = lycoris_targets(model, classes, names)
        assert found
        for path, module in found.items():
            canonical = canonical_hf(path)
            tag = full.where[(component, f"{canonical}.weight")]
            ldm_path = tag.key.removeprefix(UNET_LDM_PREFIX).removesuffix(".weight")
            spellings, kohya = expected_spellings(full.family, component, path, ldm_path, te_prefix)
            block = expected_block(ldm_path, last_out) if component == "unet" else "BASE"

            targets = {name_map.lookup(s) for s in spellings}
            assert len(targets) == 1 and None not in targets, (path, targets)
            target = targets.pop()
            if layout == "modules":
                assert (target.key, target.rows) == (f"{attr}.{path}.weight", None)
            else:
                assert (target.key, target.rows) == (tag.key, tag.rows)
            assert target.shape == tuple(module.weight.shape) == tag.shape
            assert (target.component, target.path, target.block) == (component, canonical, block)
            assert name_map.names(target)[0] == kohya
            assert set(spellings) <= set(name_map.names(target))
            assert target not in hit, path
            hit.add(target)

    # Every target is one lycoris trains, except SD2's unused 24th OpenCLIP layer.
    extra = {(t.component, t.path) for t in name_map.targets if t not in hit}
    if layout == "ldm" and full.family == "sd2":
        assert extra == {("te1", f"encoder.layers.23.{part}") for part in TEXT_PARTS}
    else:
        assert extra == set()


def test_full_size_block_ids(full: Full):
    name_map = map_state_dict(full.ldm)
    blocks = {t.path: t.block for t in name_map.targets if t.component == "unet"}
    assert blocks["conv_in"] == "IN00"
    assert blocks["conv_out"] == {"sd1": "OUT11", "sd2": "OUT11", "sdxl": "OUT08"}[full.family]
    assert blocks["time_embedding.linear_1"] == "BASE"
    assert blocks["down_blocks.0.downsamplers.0.conv"] == "IN03"
    assert blocks["mid_block.resnets.1.conv2"] == "MID"
    assert blocks["up_blocks.0.upsamplers.0.conv"] == "OUT02"
    if full.family == "sdxl":
        assert blocks["add_embedding.linear_2"] == "BASE"
        assert blocks["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == "IN08"
    assert {t.block for t in name_map.targets if t.component != "unet"} == {"BASE"}


# --------------------------------------------------------------------------- small real checks


def tiny_clip(cls=CLIPTextModel, width=16, layers=2, seed=0):
    torch.manual_seed(seed)
    return cls(clip_config(width, layers, 2, "gelu", vocab=64, positions=8)).eval()


def tiny_unet(sdxl: bool):
    torch.manual_seed(0)
    if sdxl:
        levels = dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64,
        )
    else:
        levels = dict(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
        **levels,
    ).eval()


def test_text_encoder_layouts_transformers_5_and_4():
    te1, te2 = tiny_clip(), tiny_clip(CLIPTextModelWithProjection)
    assert not any(n.startswith("text_model.") for n, _ in te1.named_modules())  # transformers 5
    name_map = map_modules({"text_encoder": te1, "text_encoder_2": te2}, family="sdxl")
    q1 = name_map.lookup("lora_te1_text_model_encoder_layers_1_self_attn_q_proj")
    assert q1 is name_map.lookup("lora_te1_encoder_layers_1_self_attn_q_proj")
    path = "encoder.layers.1.self_attn.q_proj"
    assert (q1.component, q1.path, q1.key) == ("te1", path, f"text_encoder.{path}.weight")
    fc2 = name_map.lookup("lora_te2_encoder_layers_0_mlp_fc2")
    assert fc2 is name_map.lookup("lora_te2_text_model_encoder_layers_0_mlp_fc2")
    assert (fc2.component, fc2.key, fc2.shape) == (
        "te2", "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.weight", (16, 64)
    )
    assert len(name_map.targets) == 2 * 2 * 6  # no text_projection, embeddings or norms

    class Transformers4(torch.nn.Module):  # transformers 4's CLIPTextModel had text_model
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    name_map = map_modules({"text_encoder": Transformers4(tiny_clip())}, family="sd1")
    target = name_map.lookup("lora_te_text_model_encoder_layers_0_self_attn_out_proj")
    assert target is name_map.lookup("lora_te_encoder_layers_0_self_attn_out_proj")
    assert target.key == "text_encoder.text_model.encoder.layers.0.self_attn.out_proj.weight"
    assert name_map.names(target)[0] == "lora_te_text_model_encoder_layers_0_self_attn_out_proj"


@pytest.mark.parametrize(
    "family,prefix,component,name_prefix",
    [
        ("sd2", "cond_stage_model.model.", "te1", "lora_te_"),
        ("sdxl", "conditioner.embedders.1.model.", "te2", "lora_te2_"),
    ],
)
def test_openclip_qkv_rows(family, prefix, component, name_prefix):
    model = tiny_clip(width=8)
    state = {canonical_hf(k): v for k, v in model.state_dict().items()}
    checkpoint = {
        prefix + ldm: torch.cat([state[k] for k in hf_keys])
        for ldm, hf_keys in openclip_sources(state, None).items()
    }
    name_map = map_state_dict(checkpoint, family=family)
    fused = prefix + "transformer.resblocks.1.attn.in_proj_weight"
    for third, letter in enumerate("qkv"):
        name = f"{name_prefix}text_model_encoder_layers_1_self_attn_{letter}_proj"
        target = name_map.lookup(name)
        rows = (8 * third, 8 * third + 8)
        assert (target.component, target.key, target.rows) == (component, fused, rows)
        assert target.shape == (8, 8)
        weight = state[f"encoder.layers.1.self_attn.{letter}_proj.weight"]
        assert torch.equal(checkpoint[fused][rows[0] : rows[1]], weight)
    for hf, ldm in [
        ("mlp_fc1", "mlp.c_fc"), ("mlp_fc2", "mlp.c_proj"), ("self_attn_out_proj", "attn.out_proj")
    ]:
        target = name_map.lookup(f"{name_prefix}encoder_layers_0_{hf}")
        assert (target.key, target.rows) == (f"{prefix}transformer.resblocks.0.{ldm}.weight", None)


@pytest.mark.parametrize(
    "family,unet_prefix,te_prefix,openclip",
    [
        ("sd1", "diffusion_model.", "clip_l.transformer.text_model.", False),  # ComfyUI
        ("sd2", "diffusion_model.", "clip_h.transformer.text_model.", False),  # ComfyUI
        ("sd1", "model.diffusion_model.", "cond_stage_model.wrapped.transformer.", False),  # WebUI
        ("sd2", "model.diffusion_model.", "cond_stage_model.wrapped.model.", True),  # WebUI
    ],
)
def test_live_host_layouts(family, unet_prefix, te_prefix, openclip):
    unet, te = tiny_unet(sdxl=False), tiny_clip()
    live = {unet_prefix + ldm_unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    te_state = {canonical_hf(k): v for k, v in te.state_dict().items()}
    if openclip:
        live.update({te_prefix + ldm: torch.cat([te_state[k] for k in hf_keys])
                     for ldm, hf_keys in openclip_sources(te_state, None).items()})
    else:
        live.update({te_prefix + k: v for k, v in te_state.items()})
    name_map = map_state_dict(live, family=family)
    up = name_map.lookup("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert up.key == unet_prefix + "output_blocks.2.1.conv.weight"
    fc1 = name_map.lookup("lora_te_text_model_encoder_layers_1_mlp_fc1")
    if openclip:
        assert fc1.key == te_prefix + "transformer.resblocks.1.mlp.c_fc.weight"
    else:
        assert fc1.key == te_prefix + "encoder.layers.1.mlp.fc1.weight"


def test_unknown_names_return_none():
    name_map = map_modules({"text_encoder": tiny_clip()}, family="sd1")
    for name in [
        "lora_te_text_model_encoder_layers_9_self_attn_q_proj",  # no such layer
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",  # SD1 has one encoder
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj_extra",
        "lora_te_text_model_embeddings_token_embedding",  # embeddings are not patched
        "lora_unet_down_blocks_0_attentions_0_proj_in",  # no UNet given
        "",
    ]:
        assert name_map.lookup(name) is None, name


def test_detect_family():
    assert family_of_widths(768, {}) == "sd1"
    assert family_of_widths(1024, {"te1": 1024}) == "sd2"
    assert family_of_widths(2048, {}) == "sdxl"
    assert family_of_widths(None, {"te1": 768}) == "sd1"
    assert family_of_widths(None, {"te1": 1024}) == "sd2"
    assert family_of_widths(None, {"te1": 768, "te2": 1280}) == "sdxl"
    with pytest.raises(LohaError):
        family_of_widths(1280, {})  # e.g. the SDXL refiner: not supported
    with pytest.raises(LohaError):
        family_of_widths(None, {})
    to_k = UNET_LDM_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    for width, family in [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")]:
        assert map_state_dict({to_k: (320, width)}).family == family
    with pytest.raises(LohaError, match="unknown model family 'sd9'"):  # sd3 has become a family
        map_modules({"text_encoder": tiny_clip()}, family="sd9")


# --------------------------------------------------------------------------- against lycoris itself


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lycoris_network_names(family, tmp_path):
    unet = tiny_unet(sdxl=family == "sdxl")
    encoders = {"text_encoder": tiny_clip(seed=1)}
    if family == "sdxl":
        encoders["text_encoder_2"] = tiny_clip(CLIPTextModelWithProjection, seed=2)
        text_encoder = list(encoders.values())
    else:
        text_encoder = encoders["text_encoder"]
    # lycoris' own "full" preset lists both TimestepEmbedding and time_embedding.linear_*
    # and dies on the duplicate name; this is the same target set without the duplicate.
    preset = tmp_path / "full.toml"
    preset.write_text(toml.dumps({
        "enable_conv": True,
        "unet_target_module": FULL_UNET_MODULES,
        "unet_target_name": ["conv_in", "conv_out"],
        "text_encoder_target_module": FULL_TEXT_ENCODER_MODULES,
        "text_encoder_target_name": [],
    }))
    network = create_network(
        1.0, 4, 1.0, None, text_encoder, unet,
        algo="loha", conv_dim=4, conv_alpha=1.0, preset=str(preset), warn_on_unmatched=False,
    )
    name_map = map_modules({"unet": unet, **encoders}, family=family)
    assert len(network.loras) == len(name_map.targets)
    for lora in network.loras:
        target = name_map.lookup(lora.lora_name)
        assert target is not None, lora.lora_name
        assert target.shape == tuple(lora.org_module[0].weight.shape), lora.lora_name
    assert {name_map.lookup(lora.lora_name) for lora in network.loras} == set(name_map.targets)
