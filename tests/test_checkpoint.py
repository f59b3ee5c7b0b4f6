"""Whole-model conversion between diffusers parts and LDM checkpoints (loha.models.to_ldm / from_ldm).

Truth comes from outside loha: diffusers' own single-file converters must turn our
LDM dicts back into exactly the original diffusers state dicts (tiny models, real
values) and accept our full-size key sets with nothing missing or left over (meta
device); the models rebuilt from our LDM dicts must compute the same outputs; and
a LoHa made by lycoris-lora must patch the LDM dict exactly as it patches the
diffusers modules.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import loha
from loha.errors import LohaError
from loha.models.configs import PUBLISHED
from loha.models.from_ldm import diffusers_parts
from loha.models.to_ldm import ldm_state_dict, save_checkpoint
from random_checkpoint import random_checkpoint
from tiny_models import clip_text, make_loha_file, run_parts, sd1_parts, sd1_unet, sdxl_parts

# What the tiny models' weights cannot tell (heads, norm groups, activation).
TINY = {
    "unet": {"attention_head_dim": 8, "norm_num_groups": 8},
    "text_encoder": {"num_attention_heads": 4, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"num_attention_heads": 4, "hidden_act": "quick_gelu"},
    "vae": {"norm_num_groups": 4},
}
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
OPENCLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}


def tiny_vae(seed: int = 0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def sd2_parts(seed: int = 0) -> dict:
    """SD2-like: 1024-wide cross-attention with linear projections, an encoder the
    checkpoint holds in OpenCLIP layout."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(sd1_unet(seed).config, cross_attention_dim=1024,
                                       use_linear_projection=True)).eval()
    return {"unet": unet, "text_encoder": clip_text(seed=seed + 1)}


TINY_FAMILIES = {
    "sd1": lambda: {**sd1_parts(), "vae": tiny_vae()},
    "sd2": sd2_parts,
    "sdxl": lambda: {**sdxl_parts(), "vae": tiny_vae()},
}


def canonical(state) -> dict:
    """Text-encoder keys without transformers' ``text_model.`` level, buffers dropped."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def assert_same_state(got: dict, want: dict):
    got, want = canonical(got), canonical(want)
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for key in want:
        assert torch.equal(got[key], want[key]), key


def diffusers_converted(ldm: dict, family: str, parts: dict) -> dict:
    """What diffusers' converters make of our LDM dict, per part."""
    out = {"unet": convert_ldm_unet_checkpoint(ldm, parts["unet"].config)}
    if "vae" in parts:
        out["vae"] = convert_ldm_vae_checkpoint(ldm, parts["vae"].config)
    for attr, prefix in TEXT_PREFIXES[family].items():
        part = {k: v for k, v in ldm.items() if k.startswith(prefix)}
        if (family, attr) in OPENCLIP:
            out[attr] = convert_open_clip_checkpoint(parts[attr], part, prefix=prefix)
        else:
            out[attr] = convert_ldm_clip_checkpoint(part)
    return out


@pytest.fixture(scope="module", params=list(TINY_FAMILIES))
def tiny(request):
    return request.param, TINY_FAMILIES[request.param]()


# --------------------------------------------------------------------------- tiny models, real values


def test_diffusers_converters_give_back_the_original_weights(tiny):
    family, parts = tiny
    ldm = ldm_state_dict(parts)
    for attr, state in diffusers_converted(ldm, family, parts).items():
        assert_same_state(state, parts[attr].state_dict())


def test_round_trip_is_exact_in_weights_and_outputs(tiny):
    family, parts = tiny
    back = diffusers_parts(ldm_state_dict(parts), overrides=TINY)
    assert set(back) == set(parts)
    for attr in parts:
        assert type(back[attr]) is type(parts[attr])
        assert_same_state(back[attr].state_dict(), parts[attr].state_dict())
    want, got = run_parts(parts), run_parts(back)
    for attr in want:
        assert torch.equal(got[attr], want[attr]), attr
    if "vae" in parts:
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(back["vae"](x).sample, parts["vae"](x).sample)


def test_checkpoint_holds_what_real_ones_hold(tiny):
    family, parts = tiny
    ldm = ldm_state_dict(parts)
    for attr, prefix in TEXT_PREFIXES[family].items():
        if (family, attr) in OPENCLIP:
            assert ldm[prefix + "logit_scale"].shape == ()
            width = parts[attr].config.hidden_size
            projection = ldm[prefix + "text_projection"]
            if "text_projection.weight" in parts[attr].state_dict():  # stored transposed
                assert torch.equal(projection, parts[attr].state_dict()["text_projection.weight"].t())
            else:
                assert torch.equal(projection, torch.eye(width))
            q = parts[attr].state_dict()[_text_key(parts[attr], "encoder.layers.1.self_attn.q_proj.weight")]
            assert torch.equal(ldm[prefix + "transformer.resblocks.1.attn.in_proj_weight"][:width], q)
        else:
            ids = ldm[prefix + "text_model.embeddings.position_ids"]
            assert ids.dtype == torch.int64 and ids.tolist() == [list(range(ids.shape[1]))]
    if "vae" in parts:  # mid attention as 1×1 convs
        assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4


def _text_key(model, name: str) -> str:
    return name if name in model.state_dict() else "text_model." + name


def test_transformers_4_layout_converts_the_same():
    """State dicts with the ``text_model.`` level and a persistent position_ids buffer."""
    parts = sdxl_parts()
    te = parts["text_encoder"].state_dict()
    old = {"text_model." + k: v for k, v in te.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    got, want = ldm_state_dict({**parts, "text_encoder": old}), ldm_state_dict(parts)
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


def test_sd1_checkpoint_without_text_model_level_loads():
    """Some SD1 checkpoints in the wild keep CLIP keys without ``text_model.``."""
    parts = sd1_parts()
    ldm = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm_state_dict(parts).items()}
    back = diffusers_parts(ldm, overrides=TINY)
    assert_same_state(back["text_encoder"].state_dict(), parts["text_encoder"].state_dict())


def test_missing_and_left_over_keys_are_named():
    ldm = ldm_state_dict(sd1_parts())
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    with pytest.raises(LohaError, match=re.escape(key)):
        diffusers_parts({k: v for k, v in ldm.items() if k != key}, overrides=TINY)
    stray = "cond_stage_model.transformer.text_model.encoder.layers.0.extra.weight"
    with pytest.raises(LohaError, match=re.escape(stray)):
        diffusers_parts({**ldm, stray: torch.zeros(2)}, overrides=TINY)


def test_save_checkpoint_writes_the_state_dict(tmp_path):
    parts = {**sd1_parts(), "vae": tiny_vae()}
    path = save_checkpoint(tmp_path / "m.safetensors", parts, dtype=torch.float16, metadata={"a": "b"})
    want = ldm_state_dict(parts)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"a": "b"}
        assert set(f.keys()) == set(want)
        for key in want:
            got = f.get_tensor(key)
            expected = want[key] if key.endswith("position_ids") else want[key].half()
            assert got.dtype == expected.dtype and torch.equal(got, expected), key


def test_non_standard_model_needs_what_weights_cannot_tell():
    ldm = ldm_state_dict(sd1_parts())
    with pytest.raises(LohaError, match="attention_head_dim"):
        diffusers_parts(ldm)


# --------------------------------------------------------------------------- both layouts patch alike


@pytest.mark.parametrize("make", [sd1_parts, sdxl_parts], ids=["sd1", "sdxl"])
def test_loha_patches_ldm_dict_like_diffusers_modules(make, tmp_path):
    parts = make()
    path = make_loha_file(parts, tmp_path / "net.safetensors")
    base = ldm_state_dict(parts)
    ldm = {k: v.clone() for k, v in base.items()}  # copied tensors share storage with the parts
    patched_parts = copy.deepcopy(parts)
    assert not loha.apply(patched_parts, path).unmatched
    handle = loha.apply(ldm, path)
    assert not handle.unmatched
    want = ldm_state_dict(patched_parts)
    changed = [k for k in ldm if not torch.equal(ldm[k], base[k])]
    assert len(changed) > 50  # the network touched UNet and text encoders, in_proj included
    assert any("in_proj_weight" in k for k in changed) == (make is sdxl_parts)
    for key in want:
        assert torch.equal(ldm[key], want[key]), key


# --------------------------------------------------------------------------- full size, meta device


def meta_parts(family: str) -> dict:
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**PUBLISHED[family]["unet"]),
                 "vae": AutoencoderKL(**PUBLISHED[family]["vae"])}
        for attr in TEXT_PREFIXES[family]:
            cls = CLIPTextModelWithProjection if attr == "text_encoder_2" else CLIPTextModel
            parts[attr] = cls(CLIPTextConfig(**PUBLISHED[family][attr]))
    return parts


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_key_sets_match_diffusers_converters(family):
    parts = meta_parts(family)
    ldm = ldm_state_dict(parts)
    for attr, state in diffusers_converted(ldm, family, parts).items():
        want = {k: tuple(v.shape) for k, v in canonical(parts[attr].state_dict()).items()}
        assert {k: tuple(v.shape) for k, v in canonical(state).items()} == want, attr
    if family == "sd2":  # the 24th OpenCLIP-H layer real checkpoints keep
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm
    rebuilt = diffusers_parts(ldm, device="meta")  # published configs, nothing passed
    for attr, model in parts.items():
        assert {k: v.shape for k, v in rebuilt[attr].state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}, attr
        config = rebuilt[attr].config
        for key, value in PUBLISHED[family][attr].items():
            got = getattr(config, key)
            assert (tuple(got) if isinstance(got, list) else got) == value, (attr, key)


def test_random_checkpoint_is_seeded_and_complete(tmp_path):
    """A full-size SD1.5 checkpoint is ~2 GB; the same code path on smaller configs."""
    small = copy.deepcopy(PUBLISHED["sd1"])
    small["unet"] = dict(small["unet"], block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
    small["text_encoder"] = dict(small["text_encoder"], num_hidden_layers=2, vocab_size=1000)
    small["vae"] = dict(small["vae"], block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
    a = random_checkpoint(tmp_path / "a.safetensors", seed=1, configs=small)
    b = random_checkpoint(tmp_path / "b.safetensors", seed=1, configs=small)
    assert open(a, "rb").read() == open(b, "rb").read()
    with safe_open(a, "pt") as f:
        ldm = {k: f.get_tensor(k) for k in f.keys()}
    assert all(v.dtype == torch.float16 for k, v in ldm.items() if not k.endswith("position_ids"))
    parts = diffusers_parts(ldm, overrides={"unet": {"attention_head_dim": 8, "norm_num_groups": 8},
                                            "text_encoder": {"num_attention_heads": 12},
                                            "vae": {"norm_num_groups": 4}})
    assert set(ldm_state_dict(parts)) == set(ldm)
    norm = ldm["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    with torch.no_grad():
        out = parts["unet"].float()(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 768)).sample
    assert torch.isfinite(out).all()
