"""A real WebUI (AUTOMATIC1111 or Forge) for the extension's end-to-end tests.

`prepare` fills a data folder (a random-weight SD1.5 checkpoint, networks made by
lycoris-lora, our converted and trained files, the extension as a symlink); `serve`
runs the WebUI on a free loopback port with its API, offline, until the test module
ends; `txt2img` asks it for a 64×64, 2-step image. Nothing is installed or fetched.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = "sd15-random.safetensors"
PROMPT = "a red fox in the snow"
#: A file that is not safetensors, beside good ones in the LoHa folder.
BROKEN = "broken"
START_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(data: str, make_checkpoint) -> str:
    """Checkpoint (made by `make_checkpoint(path)` when missing), networks, a broken file and the extension link."""
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui_assets.py")
    models = os.path.join(data, "models")
    ckpt = os.path.join(models, "Stable-diffusion", CHECKPOINT)
    os.makedirs(os.path.dirname(ckpt), exist_ok=True)
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    lora = os.path.join(models, "Lora")
    if not os.path.exists(os.path.join(lora, "a.safetensors")):
        subprocess.run([sys.executable, assets, "networks", lora], check=True)
    only_loha = os.path.join(models, "LoHa", "tucker-copy.safetensors")
    os.makedirs(os.path.dirname(only_loha), exist_ok=True)
    if not os.path.exists(only_loha):
        shutil.copy(os.path.join(lora, "tucker.safetensors"), only_loha)
    converted = os.path.join(lora, "converted.safetensors")
    if not os.path.exists(converted):  # the exact LoRA form of test.safetensors, for the built-in Lora
        subprocess.run([sys.executable, "-m", "loha", "convert", "--to", "lora", "-o", converted,
                        os.path.join(lora, "test.safetensors")], check=True, cwd=REPO)
    trained = os.path.join(lora, "trained.safetensors")
    if not os.path.exists(trained):  # our trainer on this checkpoint, for the built-in Lora to read
        from huggingface_hub import snapshot_download

        tokenizer = snapshot_download("openai/clip-vit-large-patch14", local_files_only=True)
        subprocess.run([sys.executable, "-m", "loha", "train", "--model", ckpt, "--tokenizer", tokenizer,
                        "-o", trained, "--resolution", "64", "--steps", "4", "--lr", "0.05", "--rank", "4",
                        "--alpha", "4", "--text-encoder", "--seed", "3"], check=True, cwd=REPO)
    with open(os.path.join(models, "LoHa", f"{BROKEN}.safetensors"), "wb") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00{this header is not JSON at all.}")
    link = os.path.join(data, "extensions", "loha")
    if os.path.realpath(link) != os.path.realpath(REPO):  # a kept data folder may link another checkout
        link_extension(data, "loha", REPO)
    return ckpt


@contextlib.contextmanager
def serve(webui_dir: str, python: str, data: str, args: list[str], env: dict | None = None):
    """The WebUI in `webui_dir` on loopback with `args`, from "Startup time:" until the block ends."""
    port = free_port()
    log_path = os.path.join(data, "webui.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    command = [python, "launch.py", "--data-dir", data, "--skip-prepare-environment", "--skip-install",
               "--skip-torch-cuda-test", "--no-download-sd-model", "--api", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=webui_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + START_TIMEOUT
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


def txt2img(server, prompt: str) -> tuple[np.ndarray, str]:
    """The image (H, W, 3 ints) and infotext for `prompt`: 64×64, 2 Euler steps, seed 7."""
    image, info = txt2img_info(server, prompt)
    return image, info["infotexts"][0]


def txt2img_info(server, prompt: str) -> tuple[np.ndarray, dict]:
    """The image and the whole `info` object the API answers with."""
    body = {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
            "cfg_scale": 5}
    request = urllib.request.Request(server["url"] + "/sdapi/v1/txt2img", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    reply = json.load(urllib.request.urlopen(request, timeout=900))
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB"), dtype=int)
    return image, json.loads(reply["info"])


def link_extension(data: str, name: str, source: str | None) -> None:
    """Put another extension (a checkout at `source`) into the test WebUI's extensions, or take it out."""
    link = os.path.join(data, "extensions", name)
    if os.path.lexists(link):
        os.remove(link)
    if source:
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.abspath(source), link)


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


#: The images `check_loha_equals_builtin` compares; each test module's `images` starts with them.
#: Tucker at 0.4: Forge keeps text encoders in fp16, where this random model overflows at 0.5 and
#: 0.8 (NaN latents: both hosts' pictures one black frame, equal whatever the weights).
BUILTIN_COMPARISONS = {
    "base": PROMPT,
    "lora a": f"{PROMPT} <lora:a:1>",
    "loha test": f"{PROMPT} <loha:test:0.8>",
    "lora test": f"{PROMPT} <lora:test:0.8>",
    "loha tucker": f"{PROMPT} <loha:tucker:0.4>",
    "lora tucker": f"{PROMPT} <lora:tucker:0.4>",
}


def check_loha_equals_builtin(images: dict, name: str) -> None:
    """`<loha:name:…>` (ours) gives the image of `<lora:name:…>` (the host's built-in reading the LoHa)."""
    loha_image, lora_image, base = images[f"loha {name}"][0], images[f"lora {name}"][0], images["base"][0]
    print(f"{name}: loha vs lora max {diff(loha_image, lora_image)}, loha vs base mean "
          f"{np.abs(loha_image - base).mean():.1f}, built-in's std {lora_image.std():.1f}")
    assert lora_image.std() > 5  # a picture, not the flat frame NaN latents decode to
    assert np.abs(loha_image - base).mean() > 5  # the network does change the picture
    assert diff(loha_image, lora_image) <= 1


def check_not_applied_reported(server, images: dict) -> None:
    """A broken file and a missing name beside a good LoHa: the good one's image, both named with why
    (infotext, API), no hash for them; the next prompt without LoHa gives the base and says nothing."""
    image, info = txt2img_info(server, f"{PROMPT} <loha:{BROKEN}:1> <loha:nosuchfile:1> <loha:test:0.8>")
    said = info["extra_generation_params"].get("LoHa not applied", "")
    print(f"broken + missing + test vs test: max {diff(image, images['loha test'][0])}; the API says: {said}")
    assert diff(image, images["loha test"][0]) <= 1
    assert f"{BROKEN}: not a readable safetensors file" in said and "nosuchfile: no such file" in said
    assert "LoHa not applied: " in info["infotexts"][0] and server["data"] not in said
    hashes = info["extra_generation_params"]["LoHa hashes"]
    assert "test: " in hashes and BROKEN not in hashes
    image, info = txt2img_info(server, PROMPT)
    assert "LoHa not applied" not in info["infotexts"][0] and "LoHa hashes" not in info["infotexts"][0]
    assert diff(image, images["base"][0]) == 0


def fetch(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server["url"] + path, timeout=300) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get(server, path: str) -> str:
    status, body = fetch(server, path)
    assert status == 200, (path, status, body[:300])
    return body.decode()


def check_card(server) -> None:
    """The LoHa page's card: preview, description and preferred weight from the sidecar, the LoHa folder listed."""
    card = json.loads(get(server, "/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name=test"))["html"]
    assert "test.preview.png" in card
    assert "A plain LoHa made by lycoris-lora" in card  # from test.json
    assert "&lt;loha:test:0.8&gt;" in card  # the click inserts the preferred weight from test.json
    listed = get(server, "/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name=tucker-copy")
    assert "tucker-copy" in json.loads(listed)["html"]  # --loha-dir (models/LoHa) is listed too


def check_previews(server, tmp_path) -> None:
    """The thumb route with `..`, absolute paths, symlinks out and URL-encoded forms serves nothing outside."""
    quote = urllib.parse.quote
    models = os.path.join(server["data"], "models")
    loha_dir = os.path.join(models, "LoHa")
    secret = b"\x89PNG\r\n\x1a\n secret outside the model folders"
    (tmp_path / "secret.png").write_bytes(secret)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "secret.png").write_bytes(secret)
    links = {os.path.join(loha_dir, "escape.png"): tmp_path / "secret.png",
             os.path.join(loha_dir, "escape-dir"): tmp_path / "inner"}
    for link, target in links.items():
        os.symlink(target, link)
    up = os.path.relpath(tmp_path, loha_dir)  # ../../…/tmp_path, from the LoHa folder
    try:
        preview = os.path.join(models, "Lora", "test.preview.png")
        status, body = fetch(server, f"/sd_extra_networks/thumb?filename={quote(preview)}")
        assert status == 200 and body == open(preview, "rb").read()

        hostile = [
            quote(os.path.join(loha_dir, up, "secret.png")),  # `..` out of a registered folder
            quote(os.path.join(loha_dir, "escape.png")),  # a symlinked file leading out
            quote(os.path.join(loha_dir, "escape-dir", "secret.png")),  # a symlinked folder leading out
            quote(str(tmp_path / "secret.png")),  # absolute, elsewhere
            "/etc/passwd",
            "".join(f"%{byte:02X}" for byte in os.path.join(loha_dir, up, "secret.png").encode()),  # all encoded
            quote(loha_dir) + "/%252e%252e/secret.png",  # double-encoded: a name that does not exist
            quote(os.path.join(loha_dir, "..", "Lora", "..", "..", "..")),
        ]
        for filename in hostile:
            status, body = fetch(server, f"/sd_extra_networks/thumb?filename={filename}")
            assert status == 404 and secret not in body, (filename, status, body[:200])
        for name in (quote(os.path.join(up, "secret")), "escape", "..%2F..%2Fsecret"):
            status, body = fetch(server, f"/sd_extra_networks/get-single-card?page=loha&tabname=txt2img&name={name}")
            assert secret not in body and b"secret.png" not in body, (name, status)
            status, body = fetch(server, f"/sd_extra_networks/metadata?page=loha&item={name}")
            assert secret not in body, (name, status)
    finally:
        for link in links:
            os.remove(link)
