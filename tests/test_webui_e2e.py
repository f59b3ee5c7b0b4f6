"""The extension in a real Stable Diffusion WebUI (AUTOMATIC1111 1.8), through its HTTP API.

Needs LOHA_WEBUI_DIR (a WebUI checkout with its repositories/) and LOHA_WEBUI_PYTHON
(the Python it runs with), and the CLIP tokenizer in the Hugging Face cache of the
environment (it runs with HF_HUB_OFFLINE=1). LOHA_WEBUI_DATA keeps the WebUI data folder
(random-weight SD1.5 checkpoint, networks) between runs; without it a temporary one is
built. The WebUI listens on 127.0.0.1 only. With LOHA_NODE_MODULES (a node_modules
holding playwright-core) and Chromium, the cards page and the tab are also checked in a
headless browser, with screenshots in LOHA_WEBUI_SCREENSHOTS (default: the data folder).
Each image is 64×64 with 2 steps; on 2 CPU cores the module takes about 10 minutes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

WEBUI = os.environ.get("LOHA_WEBUI_DIR")
PYTHON = os.environ.get("LOHA_WEBUI_PYTHON")
pytestmark = pytest.mark.skipif(
    not (WEBUI and PYTHON), reason="set LOHA_WEBUI_DIR and LOHA_WEBUI_PYTHON to test against a real WebUI")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = "sd15-random.safetensors"
PROMPT = "a red fox in the snow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(data: str) -> None:
    """Checkpoint, networks and the extension link in a WebUI data folder."""
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_assets.py")
    models = os.path.join(data, "models")
    ckpt = os.path.join(models, "Stable-diffusion", CHECKPOINT)
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    if not os.path.exists(ckpt):
        subprocess.run([sys.executable, assets, "checkpoint", WEBUI, PYTHON, ckpt], check=True)
    if not os.path.exists(os.path.join(models, "Lora", "a.safetensors")):
        subprocess.run([sys.executable, assets, "networks", os.path.join(models, "Lora")], check=True)
    only_loha = os.path.join(models, "LoHa", "tucker-copy.safetensors")
    os.makedirs(os.path.dirname(only_loha), exist_ok=True)
    if not os.path.exists(only_loha):
        shutil.copy(os.path.join(models, "Lora", "tucker.safetensors"), only_loha)
    link = os.path.join(data, "extensions", "loha")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(REPO, link)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    data = os.environ.get("LOHA_WEBUI_DATA") or str(tmp_path_factory.mktemp("webui-data"))
    _prepare(data)
    port = _free_port()
    log_path = os.path.join(data, "webui.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [PYTHON, "launch.py", "--data-dir", data, "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--no-download-sd-model", "--use-cpu", "all", "--no-half", "--api",
            "--port", str(port), "--ckpt", os.path.join(data, "models", "Stable-diffusion", CHECKPOINT)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=WEBUI, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while "Startup time:" not in open(log_path).read():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the WebUI did not start; see {log_path}")
            time.sleep(2)
        yield {"url": f"http://127.0.0.1:{port}", "data": data, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def txt2img(webui, prompt: str) -> tuple[np.ndarray, str]:
    body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
            "cfg_scale": 5}
    request = urllib.request.Request(webui["url"] + "/sdapi/v1/txt2img", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    reply = json.load(urllib.request.urlopen(request, timeout=900))
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB"), dtype=int)
    return image, json.loads(reply["info"])["infotexts"][0]


@pytest.fixture(scope="module")
def images(webui):
    """Every image the checks compare, made in one order that moves the active sets back and forth."""
    prompts = {
        "base": PROMPT,
        "lora a": f"{PROMPT} <lora:a:1>",
        "loha test": f"{PROMPT} <loha:test:0.8>",
        "lora test": f"{PROMPT} <lora:test:0.8>",
        "loha tucker": f"{PROMPT} <loha:tucker:0.8>",
        "lora tucker": f"{PROMPT} <lora:tucker:0.8>",
        "lora a+test": f"{PROMPT} <lora:a:1> <lora:test:1>",
        "lora a+loha test": f"{PROMPT} <lora:a:1> <loha:test:1>",
        "lora a again": f"{PROMPT} <lora:a:1>",
        "lora a+loha test again": f"{PROMPT} <lora:a:1> <loha:test:1>",
        "base again": PROMPT,
    }
    return {name: txt2img(webui, prompt) for name, prompt in prompts.items()}


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


@pytest.mark.parametrize("name", ["test", "tucker"])
def test_loha_prompt_equals_the_builtin_lora(images, name):
    loha_image, lora_image, base = images[f"loha {name}"][0], images[f"lora {name}"][0], images["base"][0]
    print(f"{name}: loha vs lora max {diff(loha_image, lora_image)}, loha vs base mean "
          f"{np.abs(loha_image - base).mean():.1f}")
    assert np.abs(loha_image - base).mean() > 5  # the network does change the picture
    assert diff(loha_image, lora_image) <= 1


def test_mixed_prompt_equals_the_builtin_applying_both(images):
    print("mixed: max", diff(images["lora a+loha test"][0], images["lora a+test"][0]),
          diff(images["lora a+loha test again"][0], images["lora a+test"][0]),
          "; lora a again vs lora a:", diff(images["lora a again"][0], images["lora a"][0]))
    assert diff(images["lora a+loha test"][0], images["lora a+test"][0]) <= 1
    assert diff(images["lora a+loha test again"][0], images["lora a+test"][0]) <= 1
    assert diff(images["lora a again"][0], images["lora a"][0]) == 0  # the LoHa left, the LoRA stayed


def test_removing_both_gives_the_base_image_bit_for_bit(images):
    assert diff(images["base again"][0], images["base"][0]) == 0


def test_infotext_records_the_loha_hashes(webui, images):
    from loha.merge import file_hashes

    short = file_hashes(os.path.join(webui["data"], "models", "Lora", "test.safetensors"))["model_hash"][:12]
    assert f"LoHa hashes: \"test: {short}\"" in images["loha test"][1]
    assert "LoHa hashes" not in images["base again"][1]


def get(webui, path: str) -> str:
    return urllib.request.urlopen(webui["url"] + path, timeout=300).read().decode()


def test_card_has_preview_description_weight_and_hash(webui, images):
    card = get(webui, "/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name=test")
    card = json.loads(card)["html"]
    assert "test.preview.png" in card
    assert "A plain LoHa made by lycoris-lora" in card  # from test.json
    assert "&lt;loha:test:0.8&gt;" in card  # the click inserts the preferred weight from test.json
    listed = get(webui, "/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name=tucker-copy")
    assert "tucker-copy" in json.loads(listed)["html"]  # --loha-dir (models/LoHa) is listed too


@pytest.mark.skipif(not os.environ.get("LOHA_NODE_MODULES") or not shutil.which("chromium"),
                    reason="set LOHA_NODE_MODULES (with playwright-core) and install chromium for the browser check")
def test_cards_page_and_tab_in_a_browser(webui, images):
    shots = os.environ.get("LOHA_WEBUI_SCREENSHOTS") or webui["data"]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_browser.js")
    env = {**os.environ, "NODE_PATH": os.environ["LOHA_NODE_MODULES"]}
    run = subprocess.run(["node", script, webui["url"], shots], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["prompt"].endswith("<loha:test:0.8>")
    assert "red fox (12)" in result["metadata"]
    assert {"Merge", "Inspect"} <= set(result["tabs"])
    assert "SD 1.x" in result["inspect"]
