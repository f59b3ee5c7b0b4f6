"""The node pack inside a real ComfyUI, driven over its HTTP API.

Needs LOHA_COMFYUI_DIR (and LOHA_COMFYUI_PYTHON); skipped without them. Uses a
full-size SD1.5-architecture checkpoint of seeded random weights and a LoHa made by
lycoris-lora for it (tests/comfy_assets.py, built once into pytest's cache), 64×64
images and one sampling step, so a graph runs in about a minute on a CPU.

What is shown: our LoHa Loader gives the image the built-in LoraLoader gives at the
same strengths (max pixel difference ≤ 1); after a LoHa graph the base graph gives
the base image bit for bit (ComfyUI unpatched our patches); no name is left
unloaded; the stack, block weights, info node and merge-and-save work in the real
host; the routes refuse names outside the loras folder. The images are written to
each test's output folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse

import numpy as np
import pytest
from safetensors import safe_open

import comfy_host as H

pytestmark = pytest.mark.e2e

CHECKPOINT, LOHA, LOHA_NORM, STRENGTHS = H.CHECKPOINT, H.LOHA, H.LOHA_NORM, H.STRENGTHS
loader, render, diff, save_strip, unloaded_names = H.loader, H.render, H.diff, H.save_strip, H.unloaded_names


@pytest.fixture(scope="module")
def assets(request):
    return H.assets(request)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, assets):
    server = H.Comfy(str(tmp_path_factory.mktemp("comfyui")), {CHECKPOINT: assets["checkpoint"]},
                     {LOHA: assets["loha"]})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(comfy):
    """Reference images by label ("base", "ours"), rendered once per module when first asked for."""
    graphs = {"base": lambda: H.image_graph(CHECKPOINT), "ours": lambda: H.image_graph(CHECKPOINT, loader())}

    class Images(dict):
        def __missing__(self, label):
            self[label] = render(comfy, graphs[label]())
            return self[label]

    return Images()


def test_patch_time_inside_comfyui(assets, tmp_path):
    """Runs first, in a ComfyUI process of its own, before the server holds a model: a LoHa, and one with DoRA."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_patch_time.py")
    for label, lora in (("LoHa", assets["loha"]), ("DoRA LoHa", assets["loha_dora"])):
        done = subprocess.run([H.comfyui_python(), script, H.comfyui_dir(), assets["checkpoint"], lora, "2"],
                              cwd=H.comfyui_dir(), capture_output=True, text=True, timeout=H.RUN_TIMEOUT)
        assert done.returncode == 0, done.stderr[-4000:]
        times = json.loads(done.stdout.strip().splitlines()[-1])
        (tmp_path / f"patch-time-{label.replace(' ', '-')}.json").write_text(json.dumps(times, indent=1))
        builtin, ours = times["LoraLoader"], times["LohaLoader"]
        print(f"\n{label}: patch time inside ComfyUI ({times['threads']} threads, best of 2, {ours['keys']} weights): "
              f"LoraLoader {builtin['patch_s']:.1f} s (ΔW {builtin['calculate_s']:.1f} s, node {builtin['node_s']:.1f} s), "
              f"LoHa Loader {ours['patch_s']:.1f} s (ΔW {ours['calculate_s']:.1f} s, node {ours['node_s']:.1f} s)")
        assert ours["keys"] == builtin["keys"]
        assert ours["calculate_s"] < builtin["calculate_s"], label


def test_same_image_as_lora_loader_and_base_returns(comfy, images, tmp_path):
    ours = render(comfy, H.image_graph(CHECKPOINT, loader()))
    after_ours = render(comfy, H.image_graph(CHECKPOINT))  # same loaded model object, unpatched by ComfyUI
    builtin = render(comfy, H.image_graph(CHECKPOINT, loader("LoraLoader")))
    comfy.free()  # forget every cached output and loaded model: the next base is read from disk
    fresh = render(comfy, H.image_graph(CHECKPOINT))
    images.update(ours=ours, base=fresh)
    save_strip(tmp_path / "base-ours-lora_loader-base_after.png",
               [("fresh base", fresh), ("LoHa Loader", ours), ("LoraLoader", builtin), ("base after ours", after_ours)])

    print(f"max |ours - LoraLoader| = {diff(ours, builtin)}, mean |ours - base| = "
          f"{np.abs(ours.astype(int) - fresh.astype(int)).mean():.1f}")
    assert np.abs(ours.astype(int) - fresh.astype(int)).mean() > 5, "the LoHa must visibly change the image"
    assert diff(ours, builtin) <= 1
    assert np.array_equal(after_ours, fresh), "removing the LoHa must give the base image exactly"
    assert unloaded_names(comfy.log()) == []


def test_train_norm_file_gives_lora_loaders_image(comfy, assets, images, tmp_path):
    """lycoris train_norm modules (w_norm/b_norm on norm layers) are applied, as Load LoRA applies them."""
    link = os.path.join(comfy.base, "models", "loras", LOHA_NORM)
    os.symlink(assets["loha_norm"], link)
    try:
        ours = render(comfy, H.image_graph(CHECKPOINT, loader(name=LOHA_NORM)))
        builtin = render(comfy, H.image_graph(CHECKPOINT, loader("LoraLoader", name=LOHA_NORM)))
    finally:
        os.remove(link)
    save_strip(tmp_path / "train_norm-ours-lora_loader.png", [("LoHa Loader", ours), ("LoraLoader", builtin)])
    print(f"train_norm: max |ours - LoraLoader| = {diff(ours, builtin)}, vs the same file without norms "
          f"{diff(ours, images['ours'])}")
    assert diff(ours, builtin) <= 1
    assert diff(ours, images["ours"]) > 1, "the norm modules must change the picture"
    assert unloaded_names(comfy.log()) == []


def test_stack_block_weights_and_model_only(comfy, images, tmp_path):
    stack = {"class_type": "LohaStack", "inputs": {"model": H.CKPT_MODEL, "clip": H.CKPT_CLIP}}
    for i, (name, sm, sc) in enumerate([(LOHA, 0.5, 0.6), (LOHA, 0.3, 0.0), ("None", 1.0, 1.0), ("None", 1.0, 1.0)], 1):
        stack["inputs"].update({f"lora_{i}": name, f"strength_model_{i}": sm, f"strength_clip_{i}": sc})
    stacked = render(comfy, H.image_graph(CHECKPOINT, stack))

    blocks = {"blocks": {"class_type": "LohaBlockWeights", "inputs": {"preset": "NONE", "weights": ""}}}
    model_only = loader("LohaLoaderModelOnly", blocks=["blocks", 0])
    del model_only["inputs"]["clip"], model_only["inputs"]["strength_clip"]
    nothing = render(comfy, H.image_graph(CHECKPOINT, model_only), blocks)
    blocks["blocks"]["inputs"] = {"preset": "none", "weights": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"}
    outs_only = render(comfy, H.image_graph(CHECKPOINT, model_only), blocks)
    save_strip(tmp_path / "stack-none-outall.png",
               [("stack 0.5+0.3", stacked), ("model only, NONE", nothing), ("model only, OUTALL list", outs_only)])

    # The time embedding and conv_out belong to no block (as in the LoRA Block Weight extension):
    # NONE leaves exactly them, so it gives the image of a file holding only those modules.
    from safetensors.torch import load_file, save_file

    unblocked_name = "loha-sd15-unblocked.safetensors"
    unblocked_path = os.path.join(comfy.base, "models", "loras", unblocked_name)
    save_file({k: v for k, v in load_file(os.path.join(comfy.base, "models", "loras", LOHA)).items()
               if k.startswith(("lora_unet_time_embedding_", "lora_unet_conv_out."))}, unblocked_path)
    try:
        unblocked_only = loader("LohaLoaderModelOnly", name=unblocked_name)
        del unblocked_only["inputs"]["clip"], unblocked_only["inputs"]["strength_clip"]
        unblocked = render(comfy, H.image_graph(CHECKPOINT, unblocked_only))
    finally:
        os.remove(unblocked_path)

    assert diff(stacked, images["ours"]) <= 1, "0.5 + 0.3 of one LoHa is 0.8 of it"
    assert np.array_equal(nothing, unblocked), "every block at 0 leaves only the layers in no block"
    assert diff(outs_only, images["base"]) > 1 and diff(outs_only, images["ours"]) > 1
    assert unloaded_names(comfy.log()) == []


def test_merge_and_save_bakes_the_loha(comfy, images, tmp_path):
    ours = images["ours"]
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "loader": loader(),
        "save": {"class_type": "LohaMergeSave", "inputs": {
            "model": ["loader", 0], "clip": ["loader", 1], "vae": H.CKPT_VAE, "filename_prefix": "checkpoints/merged"}},
    }
    entry = comfy.run(graph)
    path = entry["outputs"]["save"]["text"][0]
    assert os.path.isfile(path) and os.path.dirname(path) == os.path.join(comfy.base, "output", "checkpoints")
    with safe_open(path, "pt") as f:
        records = json.loads(f.metadata()["loha_merged"])
        keys = set(f.keys())
    assert [(r["name"], r["unet"], r["te"]) for r in records] == [(LOHA, *STRENGTHS)]
    assert any(k.startswith("first_stage_model.") for k in keys) and any(k.startswith("model.diffusion_model.") for k in keys)

    merged_name = "merged-" + os.path.basename(path)
    os.symlink(path, os.path.join(comfy.base, "models", "checkpoints", merged_name))
    comfy.free()  # let go of the first model before a second full one is loaded
    merged = render(comfy, H.image_graph(merged_name))
    save_strip(tmp_path / "loader-merged.png", [("LoHa Loader", ours), ("merged checkpoint", merged)])
    assert diff(merged, ours) <= 1
    comfy.free()
    os.remove(os.path.join(comfy.base, "models", "checkpoints", merged_name))
    os.remove(path)


def test_info_node_and_tooltips(comfy):
    entry = comfy.run({"info": {"class_type": "LohaInfo", "inputs": {"lora_name": LOHA}}})
    text = entry["outputs"]["info"]["text"][0]
    assert re.search(r"family +sd1", text) and "rank" in text and "random weights (3)" in text

    info = comfy.get_json("/object_info")
    ours = {name: spec for name, spec in info.items() if spec["python_module"].startswith("custom_nodes.")
            and name.startswith("Loha") and name != "LohaTrain"}
    assert set(ours) == {"LohaLoader", "LohaLoaderModelOnly", "LohaLoaderBypass", "LohaStack", "LohaBlockWeights",
                         "LohaMergeSave", "LohaInfo"}
    for name, spec in ours.items():
        assert spec["category"] == "loaders/loha", name
        for group in ("required", "optional"):
            for input_name, input_spec in spec["input"].get(group, {}).items():
                assert input_spec[1].get("tooltip"), f"{name}.{input_name}"
    assert info["LohaLoader"]["input"]["required"]["lora_name"][0] == [LOHA]


def test_routes_read_only_inside_the_loras_folder(comfy, tmp_path):
    loras = os.path.join(comfy.base, "models", "loras")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG secret")
    os.symlink(outside / "secret.png", os.path.join(loras, "escape.preview.png"))
    with open(os.path.join(loras, LOHA), "rb") as src, open(os.path.join(loras, "escape.safetensors"), "wb") as dst:
        dst.write(src.read())
    preview = os.path.join(loras, LOHA.replace(".safetensors", ".preview.png"))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(preview)
    try:
        for prefix in ("", "/api"):
            status, body = comfy.request(f"{prefix}/loha/info?name={urllib.parse.quote(LOHA)}")
            payload = json.loads(body)
            assert status == 200 and payload["summary"]["family"] == "sd1" and payload["preview"] is True
            assert comfy.base not in body.decode()
            status, body = comfy.request(f"{prefix}/loha/preview?name={LOHA}")
            assert status == 200 and body == open(preview, "rb").read()
        for name, status in [("../user/comfy.settings.json", 400), ("%2e%2e%2fuser", 400), ("/etc/passwd", 400),
                             ("%2Fetc%2Fpasswd", 400), ("%252e%252e%252fuser", 404), ("..%5Cuser", 400),
                             ("nothing.safetensors", 404)]:
            for route in ("info", "preview"):
                got, body = comfy.request(f"/loha/{route}?name={name}")
                assert got == status, (route, name, got, body)
        status, body = comfy.request("/loha/preview?name=escape.safetensors")  # its preview links out
        assert status == 404 and body != b"\x89PNG secret"
    finally:
        for path in (preview, os.path.join(loras, "escape.preview.png"), os.path.join(loras, "escape.safetensors")):
            os.remove(path)


def test_train_node_writes_a_loha_every_loader_reads(comfy, images, tmp_path):
    """Train LoHa on the loaded checkpoint inside ComfyUI; the model it trained on stays untouched."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "train": {"class_type": "LohaTrain", "inputs": {
            "model": H.CKPT_MODEL, "clip": H.CKPT_CLIP, "vae": H.CKPT_VAE, "folder": "", "name": "trained",
            "preset": "attn-mlp", "rank": 4, "alpha": 4.0, "steps": 6, "learning_rate": 0.05, "batch_size": 1,
            "resolution": 64, "seed": 3}},
    }
    entry = comfy.run(graph)
    path = entry["outputs"]["train"]["text"][0].split(" (")[0]
    assert path == os.path.join(comfy.base, "models", "loras", "trained.safetensors") and os.path.isfile(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["ss_network_args"])["algo"] == "loha" and meta["ss_steps"] == "6"
    assert keys and all(k.startswith("lora_unet_") for k in keys)

    base_after = render(comfy, H.image_graph(CHECKPOINT))  # the same cached model the trainer wrapped
    trained = "trained.safetensors"
    ours = render(comfy, H.image_graph(CHECKPOINT, loader(strengths=(1.0, 1.0), name=trained)))
    builtin = render(comfy, H.image_graph(CHECKPOINT, loader("LoraLoader", strengths=(1.0, 1.0), name=trained)))
    save_strip(tmp_path / "base-trained_ours-trained_lora_loader.png",
               [("base after training", base_after), ("LoHa Loader", ours), ("LoraLoader", builtin)])
    print(f"trained LoHa: max |ours - base| = {diff(ours, base_after)}, max |ours - LoraLoader| = {diff(ours, builtin)}")
    assert np.array_equal(base_after, images["base"]), "training must leave the model it trained on unchanged"
    assert diff(ours, base_after) > 1, "six steps at this rate must change the image"
    assert diff(ours, builtin) <= 1
    assert unloaded_names(comfy.log()) == []
    os.remove(path)
