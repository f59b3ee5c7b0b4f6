"""The js front end in headless Chromium against a real ComfyUI page.

Needs LOHA_COMFYUI_DIR (and LOHA_COMFYUI_PYTHON), Python's playwright package and a
Chromium (LOHA_CHROMIUM, default /usr/bin/chromium); skipped without them. A LoHa
Loader is added to the graph, a file without a preview is chosen, then one with a
preview: the node must show the summary (family, rank/alpha, modules, base model,
top tags) and then the preview image. Then a graph of the LoHa Loader and the LoHa
Loader (bypass) and the LoHa Stack (bypass on) on the full-size SD1.5 checkpoint of
tests/comfy_assets.py, with a file holding a name no layer has, is queued from the page,
twice (the second time at another strength): each loader must show that name as not
applied, once. The screenshots are saved in the test's output folder.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from safetensors.torch import load_file, save_file

import comfy_host as H
from tiny_models import make_loha_file, sd1_parts

pytestmark = pytest.mark.e2e

WITH_PREVIEW = "styles/painted.safetensors"
WITHOUT_PREVIEW = "plain.safetensors"
#: The comfy_assets LoHa plus a module under a name no layer of the model has.
STRAY, STRAY_NAME = "stray.safetensors", "lora_unet_no_such_layer"
LOADERS = ("LohaLoader", "LohaLoaderBypass", "LohaStack")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, request):
    H.comfyui_dir()
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (its browsers are not needed)")
    assets = H.assets(request)
    root = tmp_path_factory.mktemp("comfyui-js")
    net = make_loha_file(sd1_parts(), root / "net.safetensors",
                         metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1",
                                   "ss_tag_frequency": '{"5_painted": {"oil painting": 12, "brush strokes": 7}}'})
    tensors = load_file(assets["loha"])
    module = next(k.rpartition(".")[0] for k in sorted(tensors) if k.startswith("lora_unet_"))
    stray = {k.replace(module, STRAY_NAME): v.clone() for k, v in tensors.items() if k.startswith(module + ".")}
    save_file({**tensors, **stray}, str(root / "stray.safetensors"))
    server = H.Comfy(str(root), {H.CHECKPOINT: assets["checkpoint"]},
                     {WITH_PREVIEW: net, WITHOUT_PREVIEW: net, STRAY: str(root / "stray.safetensors")})
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


QUEUE_LOADERS = """async ([checkpoint, file, loaders]) => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const add = (type, x, y) => {
    const node = window.LiteGraph.createNode(type);
    node.pos = [x, y];
    app.graph.add(node);
    return node;
  };
  const ckpt = add("CheckpointLoaderSimple", 20, 40);
  ckpt.widgets.find((w) => w.name === "ckpt_name").value = checkpoint;
  const ids = {};
  loaders.forEach((type, i) => {
    const loader = add(type, 360, 40 + 330 * i);
    loader.widgets.find((w) => w.name === "lora_name" || w.name === "lora_1").value = file;
    const bypass = loader.widgets.find((w) => w.name === "bypass");
    if (bypass) bypass.value = true;
    ckpt.connect(0, loader, 0);
    ckpt.connect(1, loader, 1);
    loader.connect(0, add("PreviewAny", 780, 40 + 330 * i), 0);
    ids[type] = loader.id;
  });
  await app.queuePrompt(0);
  return ids;
}"""
REQUEUE = """async (ids) => {  // another strength on each loader: they run again
  const app = window.comfyAPI.app.app;
  for (const id of ids) {
    app.graph.getNodeById(id).widgets.find((w) => w.name.startsWith("strength_model")).value = 0.5;
  }
  await app.queuePrompt(0);
}"""
NOTICES = """(id) => [...(window.comfyAPI.app.app.graph.getNodeById(id)?.lohaView?.table
  ?.querySelectorAll('.loha-not-applied') ?? [])].map((row) => row.textContent)"""


def wait_until_idle(comfy) -> None:
    """Until the queue holds nothing (the graph the page queued ran); raises with the log when it failed."""
    deadline = time.time() + H.RUN_TIMEOUT
    while time.time() < deadline:
        queue = comfy.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            history = comfy.get_json("/history")
            failed = [e for e in history.values() if e.get("status", {}).get("status_str") != "success"]
            assert not failed, (failed, comfy.log()[-4000:])
            return
        time.sleep(0.5)
    raise AssertionError(f"the graph did not finish in {H.RUN_TIMEOUT} s")


def test_loaders_show_what_was_not_applied(comfy, tmp_path):
    """The names a file holds that the model lacks reach the loader node that ran, patching or bypassing."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium(), args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 760})
        try:
            page = browser.new_page()
            page.goto(comfy.url)
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=90_000)
            page.wait_for_timeout(2000)
            ids = page.evaluate(QUEUE_LOADERS, [H.CHECKPOINT, STRAY, list(LOADERS)])
            wait_until_idle(comfy)
            page.evaluate(REQUEUE, list(ids.values()))
            wait_until_idle(comfy)
            page.wait_for_timeout(1000)  # the last messages of the run reach the page
            notices = {loader: page.evaluate(NOTICES, node_id) for loader, node_id in ids.items()}
            page.screenshot(path=str(tmp_path / "loaders-not-applied.png"))
            print(f"\nscreenshot: {tmp_path / 'loaders-not-applied.png'}\nnotices: {notices}")
        finally:
            browser.close()
    for loader in LOADERS:
        assert len(notices[loader]) == 1, (loader, notices)
        assert f"{STRAY}: not applied: 1 names match no weight" in notices[loader][0], (loader, notices)
        assert STRAY_NAME in notices[loader][0], (loader, notices)
