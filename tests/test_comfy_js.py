"""The js front end in headless Chromium against a real ComfyUI page.

Needs LOHA_COMFYUI_DIR (and LOHA_COMFYUI_PYTHON), Python's playwright package and a
Chromium (LOHA_CHROMIUM, default /usr/bin/chromium); skipped without them. A LoHa
Loader is added to the graph, a file without a preview is chosen, then one with a
preview: the node must show the summary (family, rank/alpha, modules, base model,
top tags) and then the preview image. The screenshot is saved in the test's output
folder.
"""

from __future__ import annotations

import os
import shutil

import pytest

import comfy_host as H
from tiny_models import make_loha_file, sd1_parts

pytestmark = pytest.mark.e2e

WITH_PREVIEW = "styles/painted.safetensors"
WITHOUT_PREVIEW = "plain.safetensors"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    H.comfyui_dir()
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (its browsers are not needed)")
    root = tmp_path_factory.mktemp("comfyui-js")
    net = make_loha_file(sd1_parts(), root / "net.safetensors",
                         metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1",
                                   "ss_tag_frequency": '{"5_painted": {"oil painting": 12, "brush strokes": 7}}'})
    server = H.Comfy(str(root), {}, {WITH_PREVIEW: net, WITHOUT_PREVIEW: net})
    from PIL import Image, ImageDraw

    preview = Image.new("RGB", (96, 96), (30, 60, 160))
    ImageDraw.Draw(preview).ellipse((18, 18, 78, 78), fill=(240, 200, 40))
    preview.save(os.path.join(server.base, "models", "loras", "styles", "painted.preview.png"))
    server.request("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
    yield server
    server.stop()


def chromium() -> str:
    path = os.environ.get("LOHA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.isfile(path):
        pytest.skip("no Chromium: set LOHA_CHROMIUM")
    return path


ADD_NODE = """() => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const node = window.LiteGraph.createNode("LohaLoader");
  node.pos = [60, 60];
  app.graph.add(node);
  window.lohaNode = node;
  return node.widgets.map((w) => w.name);
}"""
CHOOSE = """(name) => {
  const widget = window.lohaNode.widgets.find((w) => w.name === "lora_name");
  widget.value = name;
  widget.callback(name);
}"""
SUMMARY = "() => document.querySelector('.loha-summary')?.innerText ?? ''"
PREVIEW = """() => { const img = document.querySelector('.loha-preview');
  return img && img.style.display !== 'none' && img.complete ? img.naturalWidth : 0; }"""


def test_loader_node_shows_summary_and_preview(comfy, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(  # a fresh profile folder
            str(tmp_path / "profile"), executable_path=chromium(), args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 700})
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(comfy.url)
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=90_000)
            page.wait_for_timeout(2000)  # extensions register after the graph exists
            widgets = page.evaluate(ADD_NODE)
            assert "lora_name" in widgets and "loha_info" in widgets

            page.evaluate(CHOOSE, WITHOUT_PREVIEW)
            page.wait_for_function(f"() => ({SUMMARY})().includes('SD 1.x')", timeout=30_000)
            summary = page.evaluate(SUMMARY)
            assert page.evaluate(PREVIEW) == 0

            page.evaluate(CHOOSE, WITH_PREVIEW)
            page.wait_for_function(f"() => ({PREVIEW})() > 0", timeout=30_000)
            preview_width = page.evaluate(PREVIEW)
            page.wait_for_timeout(500)
            shot = tmp_path / "loha-loader-node.png"
            page.screenshot(path=str(shot))
            print(f"\nscreenshot: {shot}\nsummary:\n{summary}")
        finally:
            browser.close()
    for expected in ("family: SD 1.x", "rank: 4", "alpha: 2", "modules: ", "unet", "te1", "base model: sd_v1",
                     "top tags: oil painting, brush strokes"):
        assert expected in summary, (expected, summary)
    assert preview_width == 96
    assert not [e for e in errors if "loha" in e.lower()], errors
