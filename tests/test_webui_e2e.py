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

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from webui_host import BUILTIN_COMPARISONS, PROMPT, check_card, check_loha_equals_builtin, check_previews, diff, prepare, serve, txt2img

WEBUI = os.environ.get("LOHA_WEBUI_DIR")
PYTHON = os.environ.get("LOHA_WEBUI_PYTHON")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not (WEBUI and PYTHON), reason="set LOHA_WEBUI_DIR and LOHA_WEBUI_PYTHON to test against a real WebUI")]


def _checkpoint(path: str) -> None:
    """Made in the WebUI's own Python from its SD1.5 config, so the layout is exactly what it loads."""
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_assets.py")
    subprocess.run([sys.executable, assets, "checkpoint", WEBUI, PYTHON, path], check=True)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    data = os.environ.get("LOHA_WEBUI_DATA") or str(tmp_path_factory.mktemp("webui-data"))
    ckpt = prepare(data, _checkpoint)
    with serve(WEBUI, PYTHON, data, ["--use-cpu", "all", "--no-half", "--ckpt", ckpt]) as server:
        yield server


@pytest.fixture(scope="module")
def images(webui):
    """Every image the checks compare, made in one order that moves the active sets back and forth."""
    prompts = {
        **BUILTIN_COMPARISONS,
        "lora converted": f"{PROMPT} <lora:converted:0.8>",
        "lora trained": f"{PROMPT} <lora:trained:1>",
        "loha trained": f"{PROMPT} <loha:trained:1>",
        "lora a+test": f"{PROMPT} <lora:a:1> <lora:test:1>",
        "lora a+loha test": f"{PROMPT} <lora:a:1> <loha:test:1>",
        "lora a again": f"{PROMPT} <lora:a:1>",
        "lora a+loha test again": f"{PROMPT} <lora:a:1> <loha:test:1>",
        "base again": PROMPT,
    }
    return {name: txt2img(webui, prompt) for name, prompt in prompts.items()}


@pytest.mark.parametrize("name", ["test", "tucker"])
def test_loha_prompt_equals_the_builtin_lora(images, name):
    check_loha_equals_builtin(images, name)


def test_loha_converted_to_lora_gives_the_same_image_in_the_builtin(images):
    converted, loha_image = images["lora converted"][0], images["loha test"][0]
    print(f"converted LoRA (built-in) vs LoHa (ours) max {diff(converted, loha_image)}, vs the built-in reading "
          f"the LoHa max {diff(converted, images['lora test'][0])}")
    assert diff(converted, loha_image) <= 1
    assert diff(converted, images["lora test"][0]) <= 1


def test_a_file_our_trainer_wrote_gives_the_same_image_in_the_builtin(images):
    builtin, ours, base = images["lora trained"][0], images["loha trained"][0], images["base"][0]
    print(f"trained: built-in vs ours max {diff(builtin, ours)}, vs base mean {np.abs(builtin - base).mean():.1f}")
    assert np.abs(builtin - base).mean() > 1  # four steps at this rate change the picture
    assert diff(builtin, ours) <= 1


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
    from loha.files.safetensors_io import file_hashes

    short = file_hashes(os.path.join(webui["data"], "models", "Lora", "test.safetensors"))["model_hash"][:12]
    assert f"LoHa hashes: \"test: {short}\"" in images["loha test"][1]
    assert "LoHa hashes" not in images["base again"][1]


def test_card_has_preview_description_weight_and_hash(webui, images):
    check_card(webui)


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




def test_previews_are_served_from_the_model_folders_only(webui, tmp_path):
    check_previews(webui, tmp_path)
