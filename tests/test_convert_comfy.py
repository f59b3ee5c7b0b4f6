"""A LoRA converted from a LoHa, loaded by a real ComfyUI's built-in LoraLoader.

Needs LOHA_COMFYUI_DIR (and LOHA_COMFYUI_PYTHON); skipped without them. Uses the
full-size SD1.5-architecture random checkpoint and lycoris-lora LoHa of
tests/comfy_assets.py. The exact (rank R²) LoRA, made with the checkpoint file as the
base, must give the image ComfyUI's own LoHa support gives for the original file, with
no key left unloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

import comfy_assets
import comfy_host as H
from loha.convert import to_lora

pytestmark = pytest.mark.e2e

CHECKPOINT, LOHA, LORA = "sd15-random.safetensors", "loha-sd15.safetensors", "lora-from-loha.safetensors"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, request):
    H.comfyui_dir()
    assets = comfy_assets.ensure(str(request.config.cache.mkdir("loha-comfy-assets")))
    lora = tmp_path_factory.mktemp("lora") / LORA
    report = to_lora(assets["loha"], lora, base=assets["checkpoint"])
    assert report.max_error == 0
    server = H.Comfy(str(tmp_path_factory.mktemp("comfyui")), {CHECKPOINT: assets["checkpoint"]},
                     {LOHA: assets["loha"], LORA: str(lora)})
    yield server
    server.stop()


def lora_loader(name: str) -> dict:
    return {"class_type": "LoraLoader", "inputs": {"model": H.CKPT_MODEL, "clip": H.CKPT_CLIP, "lora_name": name,
                                                   "strength_model": 0.8, "strength_clip": 0.6}}


def test_converted_lora_gives_the_loha_image_in_comfyui(comfy):
    from_loha = comfy.images(comfy.run(H.image_graph(CHECKPOINT, lora_loader(LOHA))))[0]
    from_lora = comfy.images(comfy.run(H.image_graph(CHECKPOINT, lora_loader(LORA))))[0]
    base = comfy.images(comfy.run(H.image_graph(CHECKPOINT)))[0]
    unloaded = [line for line in comfy.log().splitlines() if "lora key not loaded" in line]
    print(f"\nmax |LoRA - LoHa| = {int(np.abs(from_lora.astype(np.int16) - from_loha.astype(np.int16)).max())}, "
          f"mean |LoHa - base| = {np.abs(from_loha.astype(int) - base.astype(int)).mean():.1f}")
    assert unloaded == []
    assert np.abs(from_loha.astype(int) - base.astype(int)).mean() > 5, "the LoHa must visibly change the image"
    assert int(np.abs(from_lora.astype(np.int16) - from_loha.astype(np.int16)).max()) <= 1
