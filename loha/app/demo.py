"""`python -m loha demo`: the whole job on a machine with no models.

Builds a small SD1-architecture model from seeded random weights (a diffusers UNet
with SD1.5's block structure and 768-wide cross-attention, and a CLIP text encoder),
saves it with a small VAE as an LDM-layout checkpoint like the ones people download (it
trains with `loha train --model`), makes a LoHa for
it (with lycoris-lora when installed, else random factors in the same file format),
merges it with the streaming merge, patches the same checkpoint in memory with
`loha.apply`, checks the two agree bit for bit, runs the models before and after,
and draws a picture of the effect. Needs diffusers and transformers
(``pip install loha[diffusers]``); nothing is downloaded.

The checkpoint is written and read back with `loha.models` (diffusers parts <->
LDM layout); the model's configs are `loha.models.configs.DEMO`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Callable, Mapping

import torch

from ..errors import LohaError
from ..families import UNET_STATE_PREFIXES
from ..models.configs import DEMO
from ..models.structures import require_diffusers

#: Where the demo checkpoint's UNet sits.
UNET_PREFIX = UNET_STATE_PREFIXES[0]

#: The weight whose ΔW the picture shows (a square attention projection).
PICTURED_WEIGHT = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"

# lycoris-lora preset for the demo network: attention, feed-forward, resnets, samplers,
# and the text encoder (its default preset leaves out resnets).
_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


# --------------------------------------------------------------------------- the models


def build_parts(seed: int = 0, unet_config: dict = DEMO["unet"], text_config: dict = DEMO["text_encoder"]) -> dict:
    """A seeded diffusers UNet and CLIP text encoder, in eval mode."""
    require_diffusers("the demo")
    import logging

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).eval()
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    return {"unet": unet, "text_encoder": text}


def make_network(parts: dict, path: str, seed: int = 0, dim: int = 8, alpha: float = 4.0,
                 conv_dim: int = 4, conv_alpha: float = 2.0, prefer_lycoris: bool = True) -> str:
    """Write a LoHa for `parts` to `path`; returns who made it.

    With lycoris-lora: its own network, saved by it, with its zero-initialised factor
    (hada_w2_a) randomised so ΔW ≠ 0. Without: the same tensors and metadata from
    seeded random factors, one module per weight lycoris-lora would target.
    """
    if prefer_lycoris:
        try:
            return _lycoris_network(parts, path, seed, dim, alpha, conv_dim, conv_alpha)
        except ImportError:
            pass
    return _own_network(parts, path, seed, dim, alpha, conv_dim, conv_alpha)


def _metadata(dim, alpha, conv_dim, conv_alpha, maker) -> dict[str, str]:
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": "loha", "conv_dim": str(conv_dim), "conv_alpha": str(conv_alpha)}),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": "loha-demo",
        "ss_tag_frequency": json.dumps({"demo": {"watercolor": 12, "landscape": 9, "sunset": 4}}),
        "loha_demo_maker": maker,
    }


def _lycoris_network(parts, path, seed, dim, alpha, conv_dim, conv_alpha) -> str:
    import importlib.metadata
    import logging
    import tempfile

    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its INFO lines would drown the demo's
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(_PRESET)
    hooked = copy.deepcopy(parts)  # apply_to hooks the modules it wraps: keep `parts` clean
    try:
        net = create_network(1.0, dim, alpha, None, hooked["text_encoder"], hooked["unet"], algo="loha",
                             conv_dim=conv_dim, conv_alpha=conv_alpha, preset=f.name)
    finally:
        os.unlink(f.name)
    net.apply_to(hooked["text_encoder"], hooked["unet"], True, True)  # also registers the modules
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in net.unet_loras + net.text_encoder_loras:
            module.hada_w2_a.normal_(std=0.1)
    maker = f"lycoris-lora {importlib.metadata.version('lycoris-lora')}"
    net.save_weights(path, torch.float32, _metadata(dim, alpha, conv_dim, conv_alpha, maker))
    return maker


def _own_network(parts, path, seed, dim, alpha, conv_dim, conv_alpha) -> str:
    from ..files.safetensors_io import save
    from ..keys import map_modules

    names = map_modules(parts)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in names.targets:
        if target.component == "unet" and not _lycoris_would_target(target.path):
            continue
        conv = len(target.shape) > 2 and math.prod(target.shape[2:]) > 1
        r, a = (conv_dim, conv_alpha) if conv else (dim, alpha)
        o, k = target.shape[0], math.prod(target.shape[1:])
        name = names.names(target)[0]
        tensors[f"{name}.hada_w1_a"] = torch.randn(o, r, generator=g) * 0.1
        tensors[f"{name}.hada_w1_b"] = torch.randn(r, k, generator=g)
        tensors[f"{name}.hada_w2_a"] = torch.randn(o, r, generator=g) * 0.1
        tensors[f"{name}.hada_w2_b"] = torch.randn(r, k, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(a))
    maker = "loha's own writer (random factors)"
    save(tensors, path, _metadata(dim, alpha, conv_dim, conv_alpha, maker))
    return maker


def _lycoris_would_target(path: str) -> bool:
    """The demo preset's UNet modules: everything but the time embedding."""
    return not path.startswith(("time_embedding", "add_embedding"))


# --------------------------------------------------------------------------- running it


def _inputs(unet_config: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = unet_config["sample_size"]
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    pattern = torch.stack([torch.sin(3 * x), torch.cos(3 * y), x * y, torch.sin(2 * (x + y))])[None]
    sample = pattern + 0.3 * torch.randn(1, 4, size, size, generator=g)
    ids = torch.tensor([[0, 17, 101, 256, 512, 42, 2]])
    return sample, ids


def _forward(parts: dict, sample, ids) -> torch.Tensor:
    with torch.no_grad():
        context = parts["text_encoder"](ids).last_hidden_state
        return parts["unet"](sample, torch.tensor([500]), encoder_hidden_states=context).sample


def run(out_dir: str = "loha-demo", seed: int = 0, strength: tuple[float, float] = (1.0, 1.0),
        echo: Callable[[str], None] = print, prefer_lycoris: bool = True) -> dict:
    """Run the demo into `out_dir`; returns what it measured (also echoed line by line)."""
    require_diffusers("the demo")
    demo = _Demo(out_dir, seed, strength, echo)
    echo(f"loha demo: everything goes to {out_dir}/ (seed {seed})")
    demo.checkpoint()
    demo.network(prefer_lycoris)
    demo.merge()
    demo.patch()
    demo.check()
    demo.effect()
    demo.picture()
    return demo.finish()


class _Demo:
    """The demo's steps, in order; each adds to `report` and prints one line."""

    def __init__(self, out_dir: str, seed: int, strength: tuple[float, float], echo: Callable[[str], None]):
        os.makedirs(out_dir, exist_ok=True)
        self.paths = {k: os.path.join(out_dir, f) for k, f in (("checkpoint", "demo-sd1.safetensors"),
                                                                 ("network", "demo-loha.safetensors"),
                                                                 ("merged", "demo-merged.safetensors"))}
        self.seed, self.strength, self.echo = seed, strength, echo
        self.report: dict = {"paths": self.paths, "seconds": {}}
        self._start = self._clock = time.perf_counter()

    def _lap(self, name: str) -> float:
        now = time.perf_counter()
        self.report["seconds"][name] = now - self._clock
        self._clock = now
        return self.report["seconds"][name]

    def _uses(self) -> list:
        from ..files.network import load

        return [(load(self.paths["network"]), *self.strength)]

    def checkpoint(self) -> None:
        from ..models.to_ldm import save_checkpoint

        from ..train.models import demo_model

        model = demo_model(self.seed)  # build_parts' UNet and text encoder, and a VAE: a complete checkpoint
        self.parts = model.parts()
        path = self.paths["checkpoint"]
        save_checkpoint(path, {**self.parts, "vae": model.vae},
                        metadata={"modelspec.title": "loha demo SD1-architecture model"})
        n_unet = sum(p.numel() for p in self.parts["unet"].parameters())
        n_text = sum(p.numel() for p in self.parts["text_encoder"].parameters())
        self.echo(f"  1. checkpoint  SD1.5's UNet structure at small widths ({n_unet / 1e6:.1f}M params) + a "
                  f"CLIP-L-wide text encoder ({n_text / 1e6:.1f}M) + a small VAE, seeded random weights, LDM layout, "
                  "fp32: "
                  f"{_name(path)} {_mb(path)} ({self._lap('checkpoint'):.2f} s)")

    def network(self, prefer_lycoris: bool) -> None:
        from ..files.network import load
        from ..summary import summarize

        path = self.paths["network"]
        maker = make_network(self.parts, path, self.seed, prefer_lycoris=prefer_lycoris)
        summary = self.report["network"] = summarize(load(path))
        counts = ", ".join(f"{part} {n}" for part, n in summary["modules_by_part"].items())
        self.echo(f"  2. network     LoHa made by {maker}: {summary['module_count']} modules ({counts}), "
                  f"rank {_joined(summary['ranks'])}, alpha {_joined(summary['alphas'])}: "
                  f"{_name(path)} {_mb(path)} ({self._lap('network'):.2f} s)")

    def merge(self) -> None:
        from ..merge import merge

        p, (unet_s, te_s) = self.paths, self.strength
        result = self.report["merge"] = merge(p["checkpoint"], self._uses(), p["merged"], overwrite=True)
        self.echo(f"  3. merge       streamed {result.tensors} tensors, changed {len(result.changed)}: "
                  f"{_name(p['merged'])} {_mb(p['merged'])} ({self._lap('merge'):.2f} s)")
        self.echo(f"                 = python -m loha merge {p['checkpoint']} --loha {p['network']}:{unet_s:g}:{te_s:g} "
                  f"-o {p['merged']}")

    def patch(self) -> None:
        from ..files.safetensors_io import read_all
        from ..patch import apply

        self.state = read_all(self.paths["checkpoint"])[0]
        handle = apply(self.state, self._uses())
        self.echo(f"  4. patch       loha.apply on the checkpoint's state dict in memory: "
                  f"{len(handle.patched_keys)} weights changed ({self._lap('patch'):.2f} s)")

    def check(self) -> None:
        from ..files.safetensors_io import read_all

        state, merged = self.state, read_all(self.paths["merged"])[0]
        same = sum(torch.equal(merged[k], state[k]) and merged[k].dtype == state[k].dtype for k in state)
        self.report["identical"] = (same, len(state))
        if merged.keys() != state.keys() or same != len(state):
            raise LohaError(f"demo check failed: only {same} of {len(state)} merged tensors equal the patched ones")
        self.merged = merged
        self.echo(f"  5. check       merged file == patched state dict: {same}/{len(state)} tensors bit-identical "
                  f"({self._lap('check'):.2f} s)")

    def effect(self) -> None:
        from ..models.from_ldm import diffusers_parts
        from ..patch import apply

        sample, ids = _inputs(DEMO["unet"], self.seed)
        self.before = _forward(self.parts, sample, ids)
        self.after = _forward(diffusers_parts(self.merged, overrides=DEMO), sample, ids)
        # The same network patched onto the diffusers modules (the other name layout) agrees.
        apply(self.parts, self._uses())
        live = _forward(self.parts, sample, ids)
        change = (self.after - self.before).abs()
        layouts = (self.after - live).abs().max().item()
        self.report["effect"] = {"max": change.max().item(), "mean": change.mean().item(),
                                 "diffusers_vs_merged": layouts}
        self.echo(f"  6. effect      UNet output (text encoder → UNet, one step) changes by mean {change.mean():.3g}, "
                  f"max {change.max():.3g}; merged checkpoint vs the network patched onto diffusers modules: "
                  f"max difference {layouts:.2g} ({self._lap('effect'):.2f} s)")
        if layouts > 1e-3 * max(1.0, self.before.abs().max().item()):
            raise LohaError(f"demo check failed: merged and diffusers-patched outputs differ by {layouts}")

    def picture(self) -> None:
        from ..files.safetensors_io import read_all
        from ..keys import unet_key_map

        key = UNET_PREFIX + unet_key_map(self.parts["unet"].state_dict(), from_ldm=False)[PICTURED_WEIGHT]
        base = read_all(self.paths["checkpoint"])[0][key]
        picture = self.report["picture"] = draw(self.paths, self.before[0], self.after[0], base, self.merged[key])
        self.echo(f"  7. picture     {picture}: UNet output before | after | difference (top); "
                  f"{key.removeprefix(UNET_PREFIX)} W | W+ΔW | ΔW (bottom) ({self._lap('picture'):.2f} s)")

    def finish(self) -> dict:
        self.report["seconds"]["total"] = time.perf_counter() - self._start
        self.echo(f"done in {self.report['seconds']['total']:.1f} s")
        return self.report


def _name(path: str) -> str:
    return os.path.basename(path)


def _mb(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


def _joined(counts: Mapping) -> str:
    return "/".join(str(k) for k in counts)


# --------------------------------------------------------------------------- the picture


def _diverging(values: torch.Tensor, scale: float) -> torch.Tensor:
    """(H, W) values -> (H, W, 3) uint8: blue below 0, white at 0, red above."""
    v = (values.float() / max(scale, 1e-12)).clamp(-1, 1)
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-1)
    return (rgb * 255).round().to(torch.uint8)


def _mosaic(channels: torch.Tensor) -> torch.Tensor:
    """(4, H, W) -> (2H, 2W): the four latent channels as a 2×2 mosaic."""
    top = torch.cat([channels[0], channels[1]], dim=1)
    bottom = torch.cat([channels[2], channels[3]], dim=1)
    return torch.cat([top, bottom], dim=0)


def _fit(panel: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W, 3) panel to (size, size, 3)."""
    h, w = panel.shape[:2]
    rows = torch.arange(size) * h // size
    cols = torch.arange(size) * w // size
    return panel[rows][:, cols]


def draw(paths: dict, before: torch.Tensor, after: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor,
         size: int = 192, gap: int = 6) -> str:
    """A 3×2 grid (PNG with Pillow, else a dependency-free PPM); returns its path."""
    out_scale = max(before.abs().max().item(), after.abs().max().item())
    diff = after - before
    w0, w1 = w0.reshape(w0.shape[0], -1), w1.reshape(w1.shape[0], -1)
    w_scale = max(w0.abs().max().item(), w1.abs().max().item())
    panels = [
        [_diverging(_mosaic(before), out_scale), _diverging(_mosaic(after), out_scale),
         _diverging(_mosaic(diff), diff.abs().max().item())],
        [_diverging(w0, w_scale), _diverging(w1, w_scale), _diverging(w1 - w0, (w1 - w0).abs().max().item())],
    ]
    white = torch.full((size, gap, 3), 255, dtype=torch.uint8)
    rows = []
    for row in panels:
        cells = []
        for panel in row:
            cells += [_fit(panel, size), white]
        rows.append(torch.cat(cells[:-1], dim=1))
        rows.append(torch.full((gap, rows[-1].shape[1], 3), 255, dtype=torch.uint8))
    image = torch.cat(rows[:-1], dim=0).contiguous()
    folder = os.path.dirname(paths["checkpoint"])
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        path = os.path.join(folder, "demo.ppm")
        with open(path, "wb") as f:
            f.write(b"P6\n%d %d\n255\n" % (image.shape[1], image.shape[0]))
            f.write(image.numpy().tobytes())
        return path
    picture = Image.fromarray(image.numpy(), "RGB")
    labelled = Image.new("RGB", (picture.width, picture.height + 2 * LABEL_HEIGHT), "white")
    pen = ImageDraw.Draw(labelled)
    for r, labels in enumerate(LABELS):
        top = r * (size + gap + LABEL_HEIGHT)
        labelled.paste(picture.crop((0, r * (size + gap), picture.width, r * (size + gap) + size)), (0, top + LABEL_HEIGHT))
        for c, text in enumerate(labels):
            pen.text((c * (size + gap) + 2, top + 3), text, fill="black")
    path = os.path.join(folder, "demo.png")
    labelled.save(path)
    return path


LABEL_HEIGHT = 16
LABELS = (("UNet output, base", "merged", "difference"), ("attn1.to_q W", "W + dW (merged)", "dW"))
