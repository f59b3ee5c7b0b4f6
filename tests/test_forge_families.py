"""The extension on Forge (2.x) for model families beyond SD: a small Flux and SD3 in a real Forge.

Needs LOHA_FORGE_DIR and LOHA_FORGE_PYTHON (as tests/test_forge_e2e.py); skipped without them.

Forge's loader reads the published model sizes only (a Flux is 12B parameters, the T5 both
families use 4.7B), so no small model of theirs can go through its WebUI; tests/forge_families.py
runs the rest of Forge on one: its loader (told the small sizes), engine, patchers and LoRA
merging, the built-in Lora's loading and our extension script. One LoHa per family, in names the
built-in reads: for Flux SimpleTuner's (lycoris-lora: ``lycoris_`` + diffusers paths, whose q/k/v
sit in rows of BFL's fused weights), for SD3 kohya's over the MMDiT's own keys (Forge reads no
diffusers names for SD3); the text encoders under kohya's ``lora_te1_``…``lora_te3_``. Through
ours each gives the weights the built-in Lora gives, to the rounding of each weight's dtype; no
name is left over, and without it the weights are the base's bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import dit_checkpoints as C
import tiny_dit as D

FORGE = os.environ.get("LOHA_FORGE_DIR")
PYTHON = os.environ.get("LOHA_FORGE_PYTHON")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not (FORGE and PYTHON), reason="set LOHA_FORGE_DIR and LOHA_FORGE_PYTHON to test against a real Forge")]
HERE = os.path.dirname(os.path.abspath(__file__))
STRENGTH = 0.8
#: Forge's VAE hard-codes GroupNorm(32 groups), its diffusers-to-LDM conversion the published
#: four levels of two blocks: the smallest VAE it loads whole.
SMALL_VAE = dict(latent_channels=16, block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                 use_quant_conv=False, use_post_quant_conv=False)
#: Where each family's all-in-one file keeps the VAE (huggingface_guess's vae_key_prefix).
VAE_PREFIX = {"flux": "vae.", "sd3": "first_stage_model."}
#: Weights each family's LoHa must change (ends of keys of the diffusion model and the text encoders).
CHANGED = {
    "flux": (".img_attn.qkv.weight", ".txt_attn.qkv.weight", ".linear1.weight", ".linear2.weight"),
    "sd3": (".x_block.attn.qkv.weight", ".x_block.attn2.qkv.weight", ".context_block.attn.qkv.weight",
            ".x_block.mlp.fc1.weight", "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
}
TEXT_CHANGED = ("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")


def _all_in_one(family: str, mmdit_or_bfl: dict, text_parts: dict, folder) -> tuple[str, dict]:
    """The checkpoint file (diffusion model, text encoders, a small VAE) and the configs Forge reads."""
    from diffusers import AutoencoderKL

    checkpoint = {"model.diffusion_model." + k: v for k, v in mmdit_or_bfl.items()}
    configs = {}
    for attr, (kind, _) in D.TEXT_ENCODERS[family].items():
        checkpoint.update(C.text_state(kind, text_parts[attr], C.PREFIXES["checkpoint"][kind]))
        configs[attr] = text_parts[attr].config.to_dict()
    torch.manual_seed(3)
    vae = AutoencoderKL(**SMALL_VAE)
    checkpoint.update({VAE_PREFIX[family] + k: v for k, v in vae.state_dict().items()})
    configs["vae"] = dict(vae.config)
    path = str(folder / f"{family}-small.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in checkpoint.items()}, path)  # T5 ties two names
    return path, configs


def _flux_spec(folder) -> dict:
    parts = D.parts("flux")
    transformer = parts.pop("transformer")
    config = transformer.config
    bfl = C.to_checkpoint("flux", {k: v.clone() for k, v in transformer.state_dict().items()})
    checkpoint, configs = _all_in_one("flux", bfl, parts, folder)
    lora = D.make_file("flux", {"transformer": transformer, **parts}, folder / "flux-loha.safetensors",
                       text_model_level=True)
    # Forge's Flux (backend/nn/flux.py) patchifies 2×2 itself: its in_channels are a quarter of img_in's
    unet_config = dict(in_channels=config.in_channels // 4, vec_in_dim=config.pooled_projection_dim,
                       context_in_dim=config.joint_attention_dim, num_heads=config.num_attention_heads,
                       hidden_size=config.num_attention_heads * config.attention_head_dim,
                       depth=config.num_layers, depth_single_blocks=config.num_single_layers,
                       axes_dim=list(config.axes_dims_rope))
    return {"checkpoint": checkpoint, "lora": lora, "strength": STRENGTH, "unet_config": unet_config,
            "configs": configs}


def _sd3_spec(folder) -> dict:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**D.SMALL_SD3).eval()
    parts = {k: v for k, v in D.parts("sd3").items() if k != "transformer"}
    mmdit = C.to_checkpoint("sd3", {k: v.clone() for k, v in transformer.state_dict().items()})
    checkpoint, configs = _all_in_one("sd3", mmdit, parts, folder)
    lora = D.make_file("sd3", parts, folder / "sd3-loha.safetensors", text_model_level=True,
                       extra=D.kohya_checkpoint_network(mmdit, "joint_blocks."))
    # Forge's detection gives the second attention only to the published SD3.5 medium's size
    unet_config = {"x_block_self_attn_layers": list(D.SMALL_SD3["dual_attention_layers"])}
    return {"checkpoint": checkpoint, "lora": lora, "strength": STRENGTH, "unet_config": unet_config,
            "configs": configs}


def _in_forge(folder, spec: dict) -> tuple[dict, dict]:
    (folder / "spec.json").write_text(json.dumps(spec))
    out = folder / "out"
    out.mkdir()
    run = subprocess.run([PYTHON, os.path.join(HERE, "forge_families.py"), str(folder / "spec.json"), str(out)],
                         cwd=FORGE, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    weights = {label: load_file(str(out / f"{label}.safetensors")) for label in ("base", "builtin", "ours", "again")}
    return json.loads((out / "report.json").read_text()), weights


SPECS = {"flux": _flux_spec, "sd3": _sd3_spec}


@pytest.fixture(scope="module", params=sorted(SPECS))
def forge_run(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"forge-{family}")
    return family, *_in_forge(folder, SPECS[family](folder))


def test_loha_equals_the_builtin_lora(forge_run):
    family, report, weights = forge_run
    base, builtin, ours = weights["base"], weights["builtin"], weights["ours"]
    print("\n".join(report["builtin_log"]))
    assert report["engine"] == {"flux": "Flux", "sd3": "StableDiffusion3"}[family]
    assert any("Loaded" in line for line in report["builtin_log"])
    assert not [line for line in report["builtin_log"] if "unmatched" in line or "mismatch" in line.lower()]
    assert list(report["unmatched"].values()) == [[]]  # every name of the file found its weight
    changed = [k for k in base if not torch.equal(builtin[k], base[k])]
    for where in CHANGED[family] + TEXT_CHANGED:
        assert any(k.endswith(where) for k in changed), where
    for key in base:  # one weight no checkpoint holds (Flux's unused CLIP-L projection) is Forge's empty tensor
        exact = report["dtypes"][key] == "float32"
        torch.testing.assert_close(ours[key], builtin[key], rtol=1e-5 if exact else 1e-3,
                                   atol=1e-6 if exact else 1e-5, equal_nan=True, msg=key)


def test_without_the_loha_the_base_weights_bit_for_bit(forge_run):
    _, _, weights = forge_run
    for key, value in weights["base"].items():
        torch.testing.assert_close(weights["again"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
