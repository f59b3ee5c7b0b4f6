"""The LoHa Loader on every model family a real ComfyUI (0.3.68) loads.

Needs LOHA_COMFYUI_DIR and LOHA_COMFYUI_PYTHON; skipped without them.

1. Key maps, on the meta device: for each family ComfyUI's ``model_lora_keys_unet``/
   ``_clip`` handles, built at full size from ComfyUI's own classes or loaded from
   diffusers' by ComfyUI's own loader code (tests/comfy_keymaps.py), every (name -> key,
   rows) pair ComfyUI accepts is accepted by the LoHa Loader with the same target; where
   loha has its own map for the family, the names its map lacks are listed below with why
   (the loader takes those from ComfyUI's map).
2. End to end: a small SD3 (MMDiT: fused q/k/v, SD3.5 medium's second attention,
   swapped modulation halves) loaded by UNETLoader, LoHa files in SimpleTuner's and
   kohya's naming: the weights the LoHa Loader makes ComfyUI save equal Load LoRA's to
   fp32 rounding, and no "lora key not loaded".
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy_host as H
import dit_checkpoints as C
import tiny_dit as D
from loha.models.structures import published_transformer, standard_modules

pytestmark = pytest.mark.e2e
HERE = os.path.dirname(os.path.abspath(__file__))

#: Diffusion models given to ComfyUI in diffusers format (its loader converts them).
NATIVE = ["wan2.1-t2v-1.3b", "hunyuan-video", "hunyuan-dit", "mochi", "hidream", "ace-step", "omnigen2",
          "stable-cascade-c"]
CLIPS = ["sd1", "sd2", "sdxl", "sd3", "flux", "pixart", "wan"]
#: Models loha has its own map for (no ComfyUI needed): every ComfyUI name not in it must be here.
OWN = {"sd1", "sd2", "sdxl", "flux-dev", "sd3.5-large", "sd3.5-medium", "qwen-image", *(f"clip:{c}" for c in CLIPS)}
#: ComfyUI names loha's own map does not have, and why (the LoHa Loader takes them from ComfyUI's map).
EXCEPTIONS = {
    r"(lora_unet_|lycoris_|unet\.)?class_embedding[._]linear_\d":
        "SDXL's label_emb under the class-embedding name of other UNets; SDXL files say add_embedding",
    r"diffusion_model\.single_blocks\.\d+\.linear1_qkv":
        "ComfyUI's own name for the q/k/v rows of Flux's linear1 (loha names q, k and v apart)",
    r"diffusion_model\.[\w.]*?(pos_embed|modulation|scale_shift_table|pos_bias_[uv]|text_embedding_padding|"
    r"positional_embedding|image_index_embedding)":
        "parameters that are no layer's weight (embeddings, modulation tables): ComfyUI maps every key",
    r"text_encoders\..*\.(embeddings\.(token|position)_embedding|text_projection|shared|relative_attention_bias)|"
    r"lora_(prior_)?te\d?_(text_projection|shared|encoder_block_\d+_layer_0_SelfAttention_relative_attention_bias)":
        "text-encoder embeddings and projections: loha maps the attention/MLP projections trainers target",
}


def _diffusers_shapes() -> dict:
    import diffusers

    shapes = {}
    with torch.device("meta"):
        for family in ("sd1", "sd2", "sdxl"):
            shapes[family] = standard_modules(family)["unet"].state_dict()
        for name in ("flux-dev", "sd3.5-large", "sd3.5-medium", "qwen-image"):
            shapes[name] = published_transformer(name)["transformer"].state_dict()
        shapes["pixart-sigma"] = diffusers.PixArtTransformer2DModel(
            sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
            out_channels=8, cross_attention_dim=1152, caption_channels=4096, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2).state_dict()
        shapes["auraflow"] = diffusers.AuraFlowTransformer2DModel().state_dict()
    return {name: {k: list(v.shape) for k, v in state.items()} for name, state in shapes.items()}


@pytest.fixture(scope="module")
def key_maps(tmp_path_factory):
    comfy_dir = H.comfyui_dir()
    folder = tmp_path_factory.mktemp("keymaps")
    spec, out = folder / "spec.json", folder / "out.json"
    spec.write_text(json.dumps({"diffusers": _diffusers_shapes(), "native": NATIVE, "clip": CLIPS}))
    run = subprocess.run([H.comfyui_python(), os.path.join(HERE, "comfy_keymaps.py"), str(spec), str(out)],
                         cwd=comfy_dir, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_comfyui_key_maps_are_contained_in_the_loha_loaders(key_maps):
    assert not {name: r["error"] for name, r in key_maps.items() if "error" in r}
    rows, unexplained = [], {}
    for name, result in key_maps.items():
        assert result["different"] == [], f"{name}: loha maps ComfyUI's names elsewhere: {result['different'][:5]}"
        assert result["union_wrong"] == [], f"{name}: the LoHa Loader misses: {result['union_wrong'][:5]}"
        why = collections.Counter()
        for missing in result["missing"]:
            reason = next((r for r in EXCEPTIONS if re.fullmatch(r, missing)), None)
            if reason is None and name in OWN:
                unexplained.setdefault(name, []).append(missing)
            why[EXCEPTIONS.get(reason, "from ComfyUI's map (loha has no layout for this family)")] += 1
        rows.append(f"{name:18} {result['class']:16} {result['family'] or '-':14} ComfyUI {result['comfy']:5}  "
                    f"loha's own {result['same']:5}  from ComfyUI's map {len(result['missing']):4}  "
                    + "; ".join(f"{n}: {w}" for w, n in why.items()))
    print("\n" + "\n".join(rows))
    assert unexplained == {}
    assert {"sd1", "sdxl", "flux-dev", "sd3.5-large", "qwen-image", "pixart-sigma", "wan2.1-t2v-1.3b"} <= set(key_maps)
    # families with a layout of loha's: everything but the listed exceptions is loha's own
    for name in ("flux-dev", "sd3.5-large", "sd3.5-medium", "qwen-image", "sd1", "sd2"):
        assert key_maps[name]["same"] >= key_maps[name]["comfy"] - 40, name


# --------------------------------------------------------------------------- end to end

SD3_CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                  pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,),
                  qk_norm="rms_norm")
STRENGTH = 0.8


def _assets(folder) -> dict:
    """A small SD3 diffusion model file (MMDiT layout, as ComfyUI's UNETLoader reads) and two LoHa
    files for it: SimpleTuner's (``lycoris_`` + diffusers paths) and kohya-style (checkpoint paths)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD3_CONFIG).eval()
    checkpoint = C.to_checkpoint("sd3", {k: v.clone() for k, v in model.state_dict().items()})
    paths = {"model": str(folder / "sd3-small.safetensors")}
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, paths["model"])
    net = D.simpletuner_network(model, ["Attention", "FeedForward", *D.BLOCKS["sd3"]], seed=1)
    paths["simpletuner"] = str(folder / "sd3-simpletuner.safetensors")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, paths["simpletuner"])
    g = torch.Generator().manual_seed(2)
    kohya = {}
    for key, value in checkpoint.items():
        if key.startswith("joint_blocks.") and key.endswith(".weight") and value.dim() == 2:
            name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            for i in "12":
                kohya[f"{name}.hada_w{i}_a"] = torch.randn(value.shape[0], 4, generator=g) * 0.1
                kohya[f"{name}.hada_w{i}_b"] = torch.randn(4, value.shape[1], generator=g)
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    paths["kohya"] = str(folder / "sd3-kohya.safetensors")
    save_file(kohya, paths["kohya"])
    return paths


def _save_graph(loader: str | None, lora: str | None, prefix: str) -> dict:
    graph = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3-small.safetensors",
                                                             "weight_dtype": "default"}}}
    model = ["unet", 0]
    if loader is not None:
        name = "lora_name"
        graph["lora"] = {"class_type": loader, "inputs": {"model": model, name: lora, "strength_model": STRENGTH}}
        model = ["lora", 0]
    graph["save"] = {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": prefix}}
    return graph


def test_sd3_loha_loader_equals_load_lora(tmp_path_factory):
    H.comfyui_dir()
    folder = tmp_path_factory.mktemp("comfy-sd3")
    paths = _assets(folder)
    loras = {os.path.basename(paths[k]): paths[k] for k in ("simpletuner", "kohya")}
    server = H.Comfy(str(folder), {}, loras, diffusion_models={"sd3-small.safetensors": paths["model"]})
    try:
        saved = {}
        for label, loader, lora in [("base", None, None),
                                    ("builtin-simpletuner", "LoraLoaderModelOnly", "sd3-simpletuner.safetensors"),
                                    ("ours-simpletuner", "LohaLoaderModelOnly", "sd3-simpletuner.safetensors"),
                                    ("builtin-kohya", "LoraLoaderModelOnly", "sd3-kohya.safetensors"),
                                    ("ours-kohya", "LohaLoaderModelOnly", "sd3-kohya.safetensors")]:
            server.run(_save_graph(loader, lora, label))
            (found,) = [f for f in os.listdir(os.path.join(server.base, "output")) if f.startswith(label + "_")]
            saved[label] = load_file(os.path.join(server.base, "output", found))
        log = server.log()
    finally:
        server.stop()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    assert "names match no weight" not in log
    for naming in ("simpletuner", "kohya"):
        builtin, ours, base = saved[f"builtin-{naming}"], saved[f"ours-{naming}"], saved["base"]
        assert builtin.keys() == ours.keys() == base.keys()
        changed = [k for k in base if not torch.equal(builtin[k], base[k])]
        assert any(k.endswith("x_block.attn.qkv.weight") for k in changed), naming
        assert any(k.endswith("context_block.adaLN_modulation.1.weight") for k in changed) or naming == "kohya"
        for key in base:
            torch.testing.assert_close(ours[key], builtin[key], rtol=1e-5, atol=1e-6, msg=f"{naming}: {key}")
