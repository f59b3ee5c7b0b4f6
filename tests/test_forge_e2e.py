"""The extension in a real Stable Diffusion WebUI Forge (2.x), through its HTTP API.

Needs LOHA_FORGE_DIR (a Forge checkout with its repositories/, huggingface_guess among
them) and LOHA_FORGE_PYTHON (the Python it runs with); LOHA_FORGE_DATA keeps its data
folder between runs (without it a temporary one is built: a random-weight SD1.5
checkpoint from `random_checkpoint`, networks from lycoris-lora). Forge runs on the CPU
(`--always-cpu`), on 127.0.0.1 only, offline.

Forge patches through its own ModelPatchers, so the extension adds LoHa there as
patches its weight merging hands to our kernels (`loha/hosts/forge.py`). Shown here: the
same images as Forge's built-in Lora reading the same LoHa, alone and mixed with a
LoRA in either order; the built-in's network alone again, and the base again, bit
for bit; infotext hashes; a broken file and a missing name named beside a good LoHa (and
forgotten by the next prompt); the card and the preview route.
"""

from __future__ import annotations

import os

import pytest

from webui_host import (BUILTIN_COMPARISONS, PROMPT, check_card, check_loha_equals_builtin, check_not_applied_reported,
                        check_previews, diff, prepare, serve, txt2img)

FORGE = os.environ.get("LOHA_FORGE_DIR")
PYTHON = os.environ.get("LOHA_FORGE_PYTHON")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not (FORGE and PYTHON), reason="set LOHA_FORGE_DIR and LOHA_FORGE_PYTHON to test against a real Forge")]


def _checkpoint(path: str) -> None:
    from random_checkpoint import random_checkpoint

    random_checkpoint(path, "sd1", seed=1234)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data = os.environ.get("LOHA_FORGE_DATA") or str(tmp_path_factory.mktemp("forge-data"))
    ckpt = prepare(data, _checkpoint)
    with serve(FORGE, PYTHON, data, ["--always-cpu", "--skip-version-check", "--ckpt", ckpt]) as server:
        yield server


@pytest.fixture(scope="module")
def images(forge):
    """Every image the checks compare, in one order that moves the active sets back and forth."""
    prompts = {
        **BUILTIN_COMPARISONS,
        "loha split": f"{PROMPT} <loha:test:0.3:1>",
        "lora split": f"{PROMPT} <lora:test:0.3:1>",
        "lora a+test": f"{PROMPT} <lora:a:1> <lora:test:1>",
        "lora a+loha test": f"{PROMPT} <lora:a:1> <loha:test:1>",
        "lora a again": f"{PROMPT} <lora:a:1>",
        "loha test+lora a": f"{PROMPT} <loha:test:1> <lora:a:1>",
        "base again": PROMPT,
    }
    return {name: txt2img(forge, prompt) for name, prompt in prompts.items()}


@pytest.mark.parametrize("name", ["test", "tucker"])
def test_loha_prompt_equals_the_builtin_lora(images, name):
    check_loha_equals_builtin(images, name)


def test_text_encoder_and_unet_strengths_apart(images):
    """`<loha:name:te:unet>` puts each strength on its own patcher, as the built-in reads `<lora:name:te:unet>`."""
    ours, builtin = images["loha split"][0], images["lora split"][0]
    print(f"te 0.3, unet 1: ours vs built-in max {diff(ours, builtin)}, vs te=unet=0.8 max {diff(ours, images['loha test'][0])}")
    assert diff(ours, builtin) <= 1
    assert diff(ours, images["loha test"][0]) > 1


def test_mixed_prompt_in_either_order_equals_the_builtin_applying_both(images):
    both = images["lora a+test"][0]
    print("mixed: max", diff(images["lora a+loha test"][0], both), diff(images["loha test+lora a"][0], both))
    assert diff(images["lora a+loha test"][0], both) <= 1
    assert diff(images["loha test+lora a"][0], both) <= 1


def test_leaving_the_prompt_gives_the_previous_images_bit_for_bit(images):
    assert diff(images["lora a again"][0], images["lora a"][0]) == 0  # the LoHa left, the LoRA stayed
    assert diff(images["base again"][0], images["base"][0]) == 0


def test_infotext_records_the_loha_hashes(images):
    assert 'LoHa hashes: "test: ' in images["loha test"][1]
    assert "LoHa hashes" not in images["base again"][1]


def test_a_broken_file_next_to_a_good_one_gives_the_good_ones_image_and_a_message(forge, images):
    check_not_applied_reported(forge, images)


def test_card_and_previews(forge, images, tmp_path):
    check_card(forge)
    check_previews(forge, tmp_path)
