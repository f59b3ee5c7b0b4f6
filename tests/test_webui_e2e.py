"""The extension in a real Stable Diffusion WebUI (AUTOMATIC1111 1.8), through its HTTP API.

Needs LOHA_WEBUI_DIR (a WebUI checkout with its repositories/) and LOHA_WEBUI_PYTHON
(the Python it runs with), and the CLIP tokenizer in the Hugging Face cache of the
environment (it runs with HF_HUB_OFFLINE=1). LOHA_WEBUI_DATA keeps the WebUI data folder
(random-weight SD1.5 checkpoint, networks) between runs; without it a temporary one is
built. The WebUI listens on 127.0.0.1 only. With LOHA_NODE_MODULES (a node_modules
holding playwright-core) and Chromium, the cards page and the tab are also checked in a
headless browser, with screenshots in LOHA_WEBUI_SCREENSHOTS (default: the data folder).
With LOHA_LBW_DIR (a checkout of github hako-mikan/sd-webui-lora-block-weight, the owner of
the block-weight notation) that extension is linked into the test WebUI's extensions, and
`<loha:…:lbw=…>` is compared with `<lora:…:lbw=…>` for every preset and list length.
Each image is 64×64 with 2 steps; on 2 CPU cores the module takes about 10 minutes
(20 more with the block-weight extension).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from webui_host import (BROKEN, BUILTIN_COMPARISONS, PROMPT, check_card, check_loha_equals_builtin,
                        check_not_applied_reported, check_previews, diff, fetch, get, link_extension, prepare, serve,
                        txt2img)

from loha.keys.blocks import PRESETS

WEBUI = os.environ.get("LOHA_WEBUI_DIR")
PYTHON = os.environ.get("LOHA_WEBUI_PYTHON")
LBW = os.environ.get("LOHA_LBW_DIR")
needs_lbw = pytest.mark.skipif(not LBW, reason="set LOHA_LBW_DIR to a checkout of the LoRA Block Weight extension")
#: Lists of every length the extension reads, BASE and OUT11 ≠ 1 among them (the e2e networks touch the
#: text encoder, IN00–IN03, OUT09–OUT11 and the blocks-free time embedding and conv_out).
LBW_LISTS = {
    "17": "0.5,1,0.3,1,1,1,1,1,1,1,1,1,1,1,0.6,1,0",
    "17 BASE=0": ",".join(["0"] + ["1"] * 16),
    "17 OUT11=0": ",".join(["1"] * 16 + ["0"]),
    "26": ",".join(["0.25", "0.5", "1", "0", "0.7"] + ["1"] * 18 + ["0.4", "1", "2"]),
    "12": ",".join(["0.5"] + ["1"] * 11),
    "20": ",".join(["1.5", "0.2", "1", "-0.5", "0"] + ["1"] * 15),
}
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
    link_extension(data, "sd-webui-lora-block-weight", LBW)
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


def test_a_file_replaced_on_disk_gives_the_new_files_image_at_once(webui, images):
    """The same prompt text, another file under the name: the UNet and the text encoder's conditioning
    (which the WebUI caches by prompt text) both follow the new file."""
    lora, swap = os.path.join(webui["data"], "models", "Lora"), os.path.join(webui["data"], "models", "LoHa", "swap.safetensors")
    shutil.copy(os.path.join(lora, "test.safetensors"), swap)
    try:
        first = txt2img(webui, f"{PROMPT} <loha:swap:0.8>")[0]
        shutil.copy(os.path.join(lora, "tucker.safetensors"), swap + ".new")
        os.replace(swap + ".new", swap)
        second = txt2img(webui, f"{PROMPT} <loha:swap:0.8>")[0]
    finally:
        os.remove(swap)
    tucker = txt2img(webui, f"{PROMPT} <loha:tucker:0.8>")[0]  # `images` has it at 0.4 (Forge's fp16 limit)
    print(f"swap: before vs test {diff(first, images['loha test'][0])}, after vs tucker "
          f"{diff(second, tucker)}, before vs after {diff(first, second)}")
    assert diff(first, images["loha test"][0]) <= 1
    assert diff(second, tucker) <= 1 and diff(first, second) > 1


def test_a_broken_file_next_to_a_good_one_gives_the_good_ones_image_and_a_message(webui, images):
    check_not_applied_reported(webui, images)


def test_cards_list_what_the_page_is_for_and_mark_unreadable_files(webui):
    card = json.loads(get(webui, f"/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name={BROKEN}"))["html"]
    assert "Cannot be read" in card and "not a readable safetensors file" in card
    for plain_lora in ("a", "converted"):  # the Lora page's files, not LoHa
        status, body = fetch(webui, f"/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name={plain_lora}")
        assert status != 200 or f'data-name="{plain_lora}"' not in body.decode(), plain_lora
    assert "tucker" in json.loads(get(webui, "/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name=tucker"))["html"]


@pytest.fixture(scope="module")
def lbw_images(webui):
    """`<lora:test:1:lbw=…>` (the extension) and `<loha:test:1:lbw=…>` (ours) for every preset and list."""
    specs = {**{name: name for name in PRESETS}, **LBW_LISTS}
    made = {"loha plain": txt2img(webui, f"{PROMPT} <loha:test:1>")}
    for label, spec in specs.items():
        for kind in ("lora", "loha"):
            made[(kind, label)] = txt2img(webui, f"{PROMPT} <{kind}:test:1:lbw={spec}>")
    return made


@needs_lbw
@pytest.mark.parametrize("label", [*PRESETS, *LBW_LISTS])
def test_block_weights_equal_the_extensions(lbw_images, label):
    ours, theirs = lbw_images[("loha", label)][0], lbw_images[("lora", label)][0]
    print(f"lbw {label}: loha vs lora max {diff(ours, theirs)}, vs without block weights "
          f"{diff(ours, lbw_images['loha plain'][0])}")
    assert diff(ours, theirs) <= 1
    assert diff(ours, lbw_images["loha plain"][0]) > 1  # the block weights did change the picture
