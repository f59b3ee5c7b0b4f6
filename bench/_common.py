"""Shared bench helpers: seeded random models (no downloads), timing, machine floors."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from loha.models.configs import PUBLISHED  # the bench scripts put the repository on sys.path

#: The published UNets' diffusers configs, as loha.models.configs holds them.
SD15 = PUBLISHED["sd1"]["unet"]
SDXL = PUBLISHED["sdxl"]["unet"]


def random_unet(config: dict, dtype=torch.float32, seed: int = 0):
    """A diffusers UNet2DConditionModel of the given size with seeded random weights.

    Built on the meta device and materialised once, so no time goes to the default
    initialisers; values are N(0, 0.02), which is all a patching benchmark needs.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype=dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return unet.eval().requires_grad_(False)


def random_text_encoder(config: dict, dtype=torch.float32, seed: int = 1):
    """A transformers CLIPTextModel of the given config with seeded random N(0, 0.02) weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    model = model.to(dtype=dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for name, buffer in model.named_buffers():  # to_empty left them uninitialised
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval().requires_grad_(False)


@dataclass
class Layer:
    name: str  # diffusers module path
    module: torch.nn.Module
    lyco: object  # the LyCORIS LohaModule
    a1: torch.Tensor  # canonical fp32 factors, a* (O, R), b* (R, K)
    b1: torch.Tensor
    a2: torch.Tensor
    b2: torch.Tensor
    scale: float  # alpha / rank
    lora_name: str = ""  # the module's name in a file (kohya style)
    dora: torch.Tensor | None = None  # dora_scale, for DoRA networks
    peft: object = None


def lycoris_loha(unet, seed: int = 1, text_encoder=None, dora: bool = False):
    """A LyCORIS LoHa over every targetable UNet (and text-encoder) layer, hada_w2_a randomised.

    Linear and 1×1 layers rank 16, k×k convolutions rank 8, alpha = rank. Returns the
    LyCORIS network and one `Layer` per module (UNet first), named by diffusers path.
    """
    import lycoris.kohya as lk

    # LyCORIS 4.1.3's "full" preset lists TimestepEmbedding as a module and its linears
    # by name too, which makes duplicate names on diffusers UNets: drop the module entry.
    preset = dict(lk.PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    lk.PRESET["loha-bench"] = preset
    net = lk.create_network(
        1.0, 16, 16, None, text_encoder, unet, algo="loha", conv_dim=8, conv_alpha=8, preset="loha-bench",
        warn_on_unmatched=False, dora_wd=dora,
    )
    gen = torch.Generator().manual_seed(seed)
    by_module = {id(m): n for part in (unet, text_encoder) if part is not None for n, m in part.named_modules()}
    layers = []
    with torch.no_grad():
        for m in net.unet_loras + net.text_encoder_loras:
            m.requires_grad_(False)
            for p in (m.hada_w1_a, m.hada_w2_a):  # keep ΔW about 1e-3 of W
                p.normal_(0.0, 0.05, generator=gen)
            for p in (m.hada_w1_b, m.hada_w2_b):
                p.normal_(0.0, 0.05, generator=gen)
            org = m.org_module[0]
            r = m.hada_w1_b.shape[0]
            layers.append(
                Layer(
                    by_module[id(org)],
                    org,
                    m,
                    m.hada_w1_a.detach().float().contiguous(),
                    m.hada_w1_b.detach().float().reshape(r, -1).contiguous(),
                    m.hada_w2_a.detach().float().contiguous(),
                    m.hada_w2_b.detach().float().reshape(r, -1).contiguous(),
                    float(m.scale),
                    m.lora_name,
                    m.dora_scale.detach().float().clone() if dora else None,
                )
            )
    return net, layers


def move_factors(layers, device) -> None:
    """Each Layer's canonical factors onto `device` (they stay fp32)."""
    for l in layers:
        l.a1, l.b1, l.a2, l.b2 = (t.to(device) for t in (l.a1, l.b1, l.a2, l.b2))


def network_of(layers, name: str = "bench"):
    """The layers' LoHa as a loha Network (kohya names, as the file LyCORIS would write)."""
    import loha

    tensors = {}
    for l in layers:
        for attr in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"):
            tensors[f"{l.lora_name}.{attr}"] = getattr(l.lyco, attr).detach().float().clone()
        if l.dora is not None:
            tensors[f"{l.lora_name}.dora_scale"] = l.dora.clone()
    return loha.from_tensors(tensors, name)


def release_freed_memory() -> None:
    """Hand memory freed by the last method back to the OS (glibc; a no-op elsewhere).

    The anchors allocate and free weight-sized temporaries per layer, and glibc keeps
    much of that in its heaps; on a shared machine the run can then be killed for
    memory. Called between timed runs, never inside one (the allocator's behaviour in
    the timed code is left as it is in the hosts).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def median(xs):
    return statistics.median(xs)


def timed(fn) -> float:
    gc.collect()
    release_freed_memory()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def synchronizer(device):
    """What waits for the work queued on `device`: torch.cuda.synchronize on CUDA, nothing elsewhere."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def timed_on(device, fn) -> float:
    """Seconds of fn(), the work queued on `device` waited for before and inside the timed span."""
    sync = synchronizer(device)
    sync()
    return timed(lambda: (fn(), sync()))


def kernel_median(fn, device, reps: int) -> float:
    """Median seconds of `reps` calls of fn() after one untimed call (compiles, start-up):
    CUDA events on a GPU, the wall clock elsewhere."""
    sync = synchronizer(device)
    fn()
    sync()
    ts = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        else:
            ts.append(timed(fn))
    return median(ts)


def stream_bandwidth(nbytes: int = 1 << 29, reps: int = 5) -> dict:
    """Bytes read + written per second: a copy between two buffers, and an in-place pass."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    copy = min(timed(lambda: y.copy_(x)) for _ in range(reps))
    inplace = min(timed(lambda: x.mul_(1.0)) for _ in range(reps))
    return {"copy": 2 * nbytes / copy, "inplace": 2 * nbytes / inplace}


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """fp32 FLOP/s of a square matmul with torch's own threads (the BLAS peak here)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    t = min(timed(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
    return 2 * n**3 / t
