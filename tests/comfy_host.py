"""A real ComfyUI for the host tests: started on loopback in a folder of its own, driven over HTTP.

Where ComfyUI is comes from the environment (nothing is installed or fetched here):

- ``LOHA_COMFYUI_DIR``: a ComfyUI checkout (the folder with ``main.py``);
- ``LOHA_COMFYUI_PYTHON``: the interpreter to run it with (default: this one).

`Comfy` gives ComfyUI a fresh base directory whose ``custom_nodes`` holds this
repository (as a symlink) and whose model folders hold the files a test puts there,
runs it with ``--cpu`` on a free loopback port, and talks to it the way the browser
does: POST /prompt, poll /history, fetch /view.
"""

from __future__ import annotations

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
START_TIMEOUT = 180
RUN_TIMEOUT = 900


def comfyui_dir() -> str:
    """The ComfyUI checkout to test against, or skip the test saying why."""
    path = os.environ.get("LOHA_COMFYUI_DIR")
    if not path:
        pytest.skip("set LOHA_COMFYUI_DIR to a ComfyUI checkout (and LOHA_COMFYUI_PYTHON to its "
                    "interpreter) to run the real-ComfyUI tests")
    if not os.path.isfile(os.path.join(path, "main.py")):
        pytest.skip(f"LOHA_COMFYUI_DIR={path} has no main.py")
    return path


def comfyui_python() -> str:
    return os.environ.get("LOHA_COMFYUI_PYTHON", sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    """One ComfyUI server process with its own base directory under `root`."""

    def __init__(self, root: str, checkpoints: dict[str, str], loras: dict[str, str], extra_args=(),
                 diffusion_models: dict[str, str] | None = None):
        self.root = root
        self.base = os.path.join(root, "comfy")
        for folder in ("custom_nodes", "models/checkpoints", "models/diffusion_models", "models/loras", "output",
                       "input", "user", "temp"):
            os.makedirs(os.path.join(self.base, folder), exist_ok=True)
        _link(REPO, os.path.join(self.base, "custom_nodes", "loha"))
        models = [("checkpoints", checkpoints), ("diffusion_models", diffusion_models or {})]
        for folder, files in models:  # big: linked (read by ComfyUI's loaders only)
            for name, path in files.items():
                _link(path, os.path.join(self.base, "models", folder, name))
        for name, path in loras.items():  # copied: our routes serve nothing outside the folder
            target = os.path.join(self.base, "models", "loras", name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                shutil.copyfile(path, target)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(root, "comfyui.log")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", self.base, "--disable-auto-launch", *extra_args],
            cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    # ------------------------------------------------------------------ lifecycle

    def _wait_ready(self) -> None:
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer in {START_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    # ------------------------------------------------------------------ HTTP

    def request(self, path: str, data: dict | None = None) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get_json(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:500]!r}")
        return json.loads(body)

    def free(self) -> None:
        """Unload every model and forget every cached node output (as the UI's "free" button).

        ComfyUI's queue worker acts on this when it next wakes (the request wakes it);
        the pause keeps a prompt queued right after from overtaking it.
        """
        self.request("/free", {"unload_models": True, "free_memory": True})
        time.sleep(3)

    def run(self, graph: dict) -> dict:
        """Queue `graph` (API format), wait for it, return its history entry; raises on errors."""
        status, body = self.request("/prompt", {"prompt": graph, "client_id": "loha-tests"})
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the graph: {body.decode(errors='replace')}")
        prompt_id = json.loads(body)["prompt_id"]
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    messages = json.dumps(entry["status"].get("messages"), indent=1)[-4000:]
                    raise RuntimeError(f"graph failed:\n{messages}\nlog:\n{self.log()[-4000:]}")
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"graph did not finish in {RUN_TIMEOUT} s")

    def images(self, entry: dict):
        """The images a finished graph saved, as uint8 arrays (H, W, C), fetched through /view."""
        import numpy as np
        from PIL import Image

        out = []
        for node_output in entry["outputs"].values():
            for image in node_output.get("images", []):
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                status, body = self.request(f"/view?{query}")
                assert status == 200, (status, body[:200])
                out.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
        return out


def _link(source: str, target: str) -> None:
    if not os.path.lexists(target):
        os.symlink(source, target)


# ---------------------------------------------------------------------- graphs


#: The files `comfy_assets` builds, as the tests name them in ComfyUI's folders, and the strengths used.
CHECKPOINT = "sd15-random.safetensors"
LOHA = "loha-sd15.safetensors"
LOHA_NORM = "loha-sd15-norm.safetensors"
STRENGTHS = (0.8, 0.6)


def assets(request) -> dict[str, str]:
    """The files of `comfy_assets`, built once into pytest's cache (skips without a ComfyUI)."""
    import comfy_assets

    comfyui_dir()
    return comfy_assets.ensure(str(request.config.cache.mkdir("loha-comfy-assets")))


#: Outputs of the checkpoint loader, for wiring a loader node's inputs.
CKPT_MODEL, CKPT_CLIP, CKPT_VAE = ["ckpt", 0], ["ckpt", 1], ["ckpt", 2]


def image_graph(checkpoint: str, loader: dict | None = None, steps: int = 1, size: int = 64, seed: int = 7,
                cfg: float = 1.0, prefix: str = "loha_test") -> dict:
    """Checkpoint -> (optional loader node) -> prompts -> KSampler -> VAE decode -> SaveImage.

    `loader` is one node in API format wired to CKPT_MODEL (and CKPT_CLIP when it takes
    a clip); its output 0 feeds the sampler, its output 1 (if it takes a clip) the prompts.
    """
    model, clip = CKPT_MODEL, CKPT_CLIP
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    if loader is not None:
        graph["loader"] = loader
        model = ["loader", 0]
        if "clip" in loader["inputs"]:
            clip = ["loader", 1]
    graph.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor of a lighthouse", "clip": clip}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": CKPT_VAE}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    })
    return graph


# ---------------------------------------------------------------------- nodes and images


def loader(cls=None, strengths=STRENGTHS, blocks=None, name=LOHA):
    node = {"class_type": cls or "LohaLoader",
            "inputs": {"model": CKPT_MODEL, "clip": CKPT_CLIP, "lora_name": name,
                       "strength_model": strengths[0], "strength_clip": strengths[1]}}
    if blocks is not None:
        node["inputs"]["blocks"] = blocks
    return node


def render(comfy, graph, extra_nodes=None):
    if extra_nodes:
        graph.update(extra_nodes)
    return comfy.images(comfy.run(graph))[0]


def diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def save_strip(path, labelled):
    from PIL import Image

    strip = np.concatenate([image for _, image in labelled], axis=1)
    Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(path)
    print(f"\n{path}: " + " | ".join(label for label, _ in labelled))


def unloaded_names(log: str) -> list[str]:
    return [line for line in log.splitlines() if "lora key not loaded" in line or "match no weight" in line]
