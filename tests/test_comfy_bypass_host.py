"""LoHa Loader (bypass) inside a real ComfyUI, on fp16 and fp8 UNets.

Needs LOHA_COMFYUI_DIR (and LOHA_COMFYUI_PYTHON); skipped without them. The server runs
with ``--fp16-unet`` (the checkpoint's UNet kept in fp16; on the CPU ComfyUI computes
in fp32 from it), and the same file is also loaded by "Load Diffusion Model" with
``weight_dtype fp8_e4m3fn``. On each, the bypass node must give the image Load LoRA
gives at the same strengths (max pixel difference ≤ 2: Load LoRA rounds W+ΔW to the
weight's dtype, stochastically; bypass adds ΔW·x in fp32).

On fp8 that rounding is the whole difference: Load LoRA writes W+ΔW back into fp8 (3
mantissa bits: ΔW survives only as stochastic one-ulp flips), which bypass exists to
avoid. So on fp8 Load LoRA is given the same fp8 weight values held in fp16 (a file of
them, `comfy_assets`), which it patches without requantizing; the two bases must agree
exactly. Load LoRA's requantized fp8 image is printed beside it. The stack's bypass
switch must give the bypass node's image, and a graph sampling the base model and its
bypassed clone side by side must give the base image for the base: clones of one model
stay apart. On ComfyUI's low-VRAM path (each layer cast in its own forward, the built-in's
patches as weight functions; `comfy_lowvram_bypass.py`, in a process of its own) the bypass
must give what it gives fully loaded, and what the built-in gives there.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

import comfy_host as H
from comfy_host import CHECKPOINT, LOHA, STRENGTHS, diff, loader, render, save_strip, unloaded_names

pytestmark = pytest.mark.e2e

UNET = "sd15-random-unet.safetensors"  # the checkpoint again, read by Load Diffusion Model
FP8_VALUES = "sd15-random-fp8-values.safetensors"  # its UNet's fp8 values, in fp16


@pytest.fixture(scope="module")
def assets(request):
    return H.assets(request)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, assets):
    server = H.Comfy(str(tmp_path_factory.mktemp("comfyui-bypass")), {CHECKPOINT: assets["checkpoint"]},
                     {LOHA: assets["loha"]}, extra_args=("--fp16-unet",),
                     diffusion_models={UNET: assets["checkpoint"], FP8_VALUES: assets["fp8_values"]})
    yield server
    server.stop()


def graph_on(unet_dtype: str, node: dict | None, unet: str = UNET) -> dict:
    """image_graph with its model from the checkpoint (fp16) or from Load Diffusion Model (`unet_dtype`)."""
    graph = H.image_graph(CHECKPOINT, node)
    if unet_dtype != "fp16":
        graph["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": unet_dtype}}
        target = graph["loader"] if node is not None else graph["sample"]
        target["inputs"]["model"] = ["unet", 0]
    return graph


def stack(bypass: bool) -> dict:
    inputs = {"model": H.CKPT_MODEL, "clip": H.CKPT_CLIP, "bypass": bypass}
    for i in range(1, 5):
        inputs.update({f"lora_{i}": LOHA if i == 1 else "None", f"strength_model_{i}": STRENGTHS[0],
                       f"strength_clip_{i}": STRENGTHS[1]})
    return {"class_type": "LohaStack", "inputs": inputs}


@pytest.mark.parametrize("unet_dtype", ["fp16", "fp8_e4m3fn"])
def test_bypass_gives_load_loras_image(comfy, unet_dtype, tmp_path):
    ours = render(comfy, graph_on(unet_dtype, loader("LohaLoaderBypass")))
    after = render(comfy, graph_on(unet_dtype, None))  # the same loaded model, the bypass ejected
    builtin = render(comfy, graph_on(unet_dtype, loader("LoraLoader")))
    comfy.free()  # forget cached outputs and models: the base below is computed afresh
    base = render(comfy, graph_on(unet_dtype, None))
    labelled = [("base", base), ("LoraLoader", builtin), ("LoHa Loader (bypass)", ours), ("base after", after)]
    if unet_dtype != "fp16":  # Load LoRA on the same fp8 values, unrounded: the reference
        requantized = builtin
        builtin = render(comfy, graph_on("default", loader("LoraLoader"), FP8_VALUES))
        same_base = render(comfy, graph_on("default", None, FP8_VALUES))
        assert np.array_equal(same_base, base), "the fp8 values in fp16 must be the fp8 model"
        labelled.insert(2, ("LoraLoader, fp8 values in fp16", builtin))
        print(f"{unet_dtype}: max |bypass - LoraLoader requantizing to fp8| = {diff(ours, requantized)}, mean "
              f"{np.abs(ours.astype(int) - requantized.astype(int)).mean():.2f}")
    save_strip(tmp_path / f"{unet_dtype}-{'-'.join(label.replace(' ', '_') for label, _ in labelled)}.png", labelled)
    print(f"{unet_dtype}: max |bypass - LoraLoader| = {diff(ours, builtin)}, "
          f"mean |bypass - base| = {np.abs(ours.astype(int) - base.astype(int)).mean():.1f}")
    assert np.abs(ours.astype(int) - base.astype(int)).mean() > 5, "the LoHa must visibly change the image"
    assert diff(ours, builtin) <= 2
    assert np.array_equal(after, base), "the base model must run without the LoHa once the bypass is gone"
    if unet_dtype == "fp16":
        assert np.array_equal(render(comfy, graph_on("fp16", stack(bypass=True))), ours)
    assert unloaded_names(comfy.log()) == []


def test_base_and_bypassed_clone_sampled_in_one_graph(comfy):
    """Both share one loaded model: ComfyUI ejects the bypass whenever it loads the base clone."""
    alone_base = render(comfy, graph_on("fp16", None))
    alone_ours = render(comfy, graph_on("fp16", loader("LohaLoaderBypass")))
    comfy.free()  # nothing cached: every node of the graph below runs
    graph = graph_on("fp16", loader("LohaLoaderBypass"))
    for prompt in ("pos", "neg"):
        graph[f"{prompt}_base"] = {**graph[prompt], "inputs": {**graph[prompt]["inputs"], "clip": H.CKPT_CLIP}}
    graph["sample_base"] = {**graph["sample"], "inputs": {**graph["sample"]["inputs"], "model": H.CKPT_MODEL,
                                                          "positive": ["pos_base", 0], "negative": ["neg_base", 0]}}
    graph["decode_base"] = {**graph["decode"], "inputs": {**graph["decode"]["inputs"], "samples": ["sample_base", 0]}}
    graph["save_base"] = {**graph["save"], "inputs": {**graph["save"]["inputs"], "images": ["decode_base", 0],
                                                      "filename_prefix": "loha_test_base"}}
    entry = comfy.run(graph)
    images = {node: comfy.images({"outputs": {node: entry["outputs"][node]}})[0] for node in ("save", "save_base")}
    assert np.array_equal(images["save_base"], alone_base)
    assert np.array_equal(images["save"], alone_ours)


def test_low_vram_path(assets):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_lowvram_bypass.py")
    done = subprocess.run([H.comfyui_python(), script, H.comfyui_dir(), assets["checkpoint"], assets["loha"]],
                          cwd=H.comfyui_dir(), capture_output=True, text=True, timeout=H.RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nlow-VRAM path: {result}")
    scale = result["scale"]
    assert result["layers_cast_in_forward"] > 100
    assert result["lora_change"] > 1e-3 * scale, "the LoHa must change the output"
    assert result["bypass_low_vs_full"] <= 1e-5 * scale
    assert result["bypass_low_vs_builtin_low"] <= 1e-3 * result["lora_change"] + 1e-5 * scale
    assert result["base_after_vs_base"] == 0
