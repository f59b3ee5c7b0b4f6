"""The chain of steps (several networks, DoRA) and the bypass products, against dense references.

The reference is the plain definition: ΔW formed in fp32, the steps applied one after the
other with `loha.delta.dora_merge` for DoRA, the layer run with the resulting weight.
"""

import pytest
import torch
import torch.nn.functional as F

from loha import delta as D
from loha import kernels
from loha.kernels import bypass as B
from loha.kernels import steps as S
from kernel_cases import DEVICE, assert_rounded_once, gen, rand

HADAMARD, MATMUL, DENSE = kernels.HADAMARD, kernels.MATMUL, kernels.DENSE


def make_step(kind, o, k, g, strength, dora=None, r=3, scale=0.5):
    """A Step of `kind` for an (o, k) weight and its dense fp32 ΔW (scale included)."""
    if kind == HADAMARD:
        t = (rand(o, r, g=g, scale=0.3), rand(r, k, g=g, scale=0.3), rand(o, r + 1, g=g, scale=0.3), rand(r + 1, k, g=g, scale=0.3))
        delta = D.hadamard_delta(*t)
    elif kind == MATMUL:
        t = (rand(o, r, g=g, scale=0.3), rand(r, k, g=g, scale=0.3))
        delta = t[0] @ t[1]
    else:
        t = (rand(o, k, g=g, scale=0.1),)
        delta = t[0]
    magnitude = None
    if dora == "out":
        magnitude = rand(o, 1, g=g).abs() + 0.5
    elif dora == "in":
        magnitude = rand(1, k, g=g).abs() + 0.5
    return kernels.step(kind, t, scale, strength, (o, k), DEVICE, magnitude), scale * delta, magnitude


def reference(w0, made):
    w = w0.float()
    for step, delta, magnitude in made:
        w = w + step.strength * delta if magnitude is None else D.dora_merge(w, delta, magnitude, step.strength)
    return w


CHAINS = {
    "plain-mix": [(HADAMARD, 0.7, None), (MATMUL, -0.4, None), (DENSE, 1.0, None)],
    "dora-out": [(HADAMARD, 0.8, "out")],
    "dora-in": [(HADAMARD, 0.6, "in")],
    "plain-then-dora": [(MATMUL, 0.5, None), (HADAMARD, 0.9, "out"), (HADAMARD, 1.2, "in"), (DENSE, 0.3, None)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_apply_steps_equals_the_reference(monkeypatch, dtype, chain):
    monkeypatch.setattr(kernels.tuning, "CPU_TILE_ELEMS", 300)  # several row tiles
    monkeypatch.setattr(kernels.tuning, "CUDA_TILE_ELEMS", 300)  # the same on a GPU (LOHA_TEST_DEVICE)
    g = gen(3)
    o, k = 45, 61
    w0 = rand(o, k, g=g).to(dtype)
    made = [make_step(kind, o, k, g, s, dora) for kind, s, dora in CHAINS[chain]]
    want = reference(w0, made)
    w = w0.clone()
    kernels.apply_steps_(w, [m[0] for m in made])
    assert_rounded_once(w, torch.zeros_like(w0), want, 1.0)
    into = torch.empty_like(w0)  # out of place: the source is only read
    kernels.apply_steps_(into, [m[0] for m in made], source=w0)
    assert torch.equal(into, w)


def test_dora_scales_match_the_reference_norms():
    g = gen(4)
    o, k = 20, 33
    w0 = rand(o, k, g=g)
    made = [make_step(kind, o, k, g, s, dora) for kind, s, dora in CHAINS["plain-then-dora"]]
    scales = kernels.dora_scales(w0, [m[0] for m in made])
    assert scales[0] is None and scales[3] is None
    before = reference(w0, made[:1])
    merged = before + made[1][1]
    torch.testing.assert_close(scales[1], made[1][2].flatten() / (merged.norm(dim=1) + torch.finfo().eps))
    before = reference(w0, made[:2])
    merged = before + made[2][1]
    torch.testing.assert_close(scales[2], made[2][2].flatten() / (merged.norm(dim=0) + torch.finfo().eps))


# ---- the bypass products -----------------------------------------------------------------------


def linear_ref(x, w0, bias, made):
    return F.linear(x.float(), reference(w0, made), None if bias is None else bias.float())


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_linear_merged_and_added(monkeypatch, tokens, chain):
    monkeypatch.setattr(kernels.tuning, "BYPASS_TILE_ELEMS", 500)  # several output tiles
    monkeypatch.setattr(kernels.tuning, "CUDA_TILE_ELEMS", 500)  # the same on a GPU (LOHA_TEST_DEVICE)
    g = gen(5)
    o, k = 40, 24
    w0, bias, x = rand(o, k, g=g), rand(o, g=g), rand(2, tokens, k, g=g)
    made = [make_step(kind, o, k, g, s, dora) for kind, s, dora in CHAINS[chain]]
    steps = [m[0] for m in made]
    want = linear_ref(x, w0, bias, made)
    scales = kernels.dora_scales(w0, steps)
    in_scales = {i: c for i, (c, st) in enumerate(zip(scales, steps)) if st.axis == "in"}
    merged = B.forward_merged(x, w0, bias, steps, None, in_scales)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
    for pairs in ([None if st.kind == DENSE else B.pair_of(st) for st in steps], [None] * len(steps)):

        def w0x(inputs):
            return F.linear(inputs.float(), w0)

        added = B.chain_added(x, w0x(x), steps, scales, pairs, w0x=w0x) + bias
        torch.testing.assert_close(added, want, rtol=1e-5, atol=1e-5)


CONVS = {  # (dims, in, out, kernel, layer keywords)
    "1x1": (2, 8, 12, 1, {}),
    "3x3-pad": (2, 8, 12, 3, {"padding": 1}),
    "stride-dilation": (2, 6, 10, 3, {"stride": 2, "dilation": 2, "padding": 2}),
    "groups": (2, 8, 12, 3, {"groups": 4, "padding": 1}),
    "depthwise": (2, 8, 8, 3, {"groups": 8, "padding": "same"}),
    "reflect": (2, 6, 10, 3, {"padding": 1, "padding_mode": "reflect"}),
    "circular-groups": (2, 8, 12, 3, {"padding": 2, "padding_mode": "circular", "groups": 2}),
    "conv1d": (1, 6, 10, 5, {"padding": 2, "stride": 3}),
    "conv3d": (3, 4, 6, 3, {"padding": 1}),
}


@pytest.mark.parametrize("chain", ["plain-mix", "dora-out", "dora-in"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_layers(monkeypatch, case, chain):
    monkeypatch.setattr(kernels.tuning, "BYPASS_TILE_ELEMS", 100)  # several output tiles where groups allow
    monkeypatch.setattr(kernels.tuning, "CUDA_TILE_ELEMS", 100)  # the same on a GPU (LOHA_TEST_DEVICE)
    dims, cin, cout, ks, kw = CONVS[case]
    layer = getattr(torch.nn, f"Conv{dims}d")(cin, cout, ks, **kw).to(DEVICE)
    g = gen(6)
    shape = tuple(layer.weight.shape)
    o, k = shape[0], layer.weight[0].numel()
    made = [make_step(kind, o, k, g, s, dora) for kind, s, dora in CHAINS[chain]]
    if chain == "dora-in":  # a convolution's input-axis magnitude is per input channel of a group
        step, delta, _ = made[0]
        magnitude = rand(1, shape[1], *([1] * dims), g=g).abs() + 0.5
        made = [(step._replace(dora=magnitude.flatten()), delta, magnitude)]
    steps = [m[0] for m in made]
    x = rand(2, cin, *([9] * dims), g=g)
    with torch.no_grad():
        w0 = layer.weight.detach()
        weight = _reference_conv_weight(w0, made)
        want = layer._conv_forward(x, weight, layer.bias)
        conv = B.Conv(dims, tuple(layer.stride), layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                      tuple(layer.dilation), layer.groups, layer.padding_mode, tuple(layer._reversed_padding_repeated_twice))
        scales = kernels.dora_scales(w0, steps)
        in_scales = {i: c for i, (c, st) in enumerate(zip(scales, steps)) if st.axis == "in"}
        merged = B.forward_merged(x, w0, layer.bias, steps, conv, in_scales)
        torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)

        def w0x(inputs):
            return layer._conv_forward(inputs, w0, None)

        for pairs in ([None if st.kind == DENSE else B.pair_of(st) for st in steps], [None] * len(steps)):
            added = B.chain_added(x, w0x(x), steps, scales, pairs, conv, shape, w0x)
            torch.testing.assert_close(added + layer.bias.view(-1, *([1] * dims)), want, rtol=1e-5, atol=1e-5)


def _reference_conv_weight(w0, made):
    """The chain on a convolution weight, with DoRA norms over every axis but the magnitude's."""
    w = w0.float()
    for step, delta, magnitude in made:
        delta = delta.reshape(w.shape)
        w = w + step.strength * delta if magnitude is None else D.dora_merge(w, delta, magnitude.reshape(
            (w.shape[0], *([1] * (w.dim() - 1))) if step.axis == "out" else (1, w.shape[1], *([1] * (w.dim() - 2)))), step.strength)
    return w


def test_the_cheaper_form_is_chosen_by_token_count():
    """A small layer at a large rank product: thin pairs for a few tokens, ΔW rebuilt for many."""
    g = gen(7)
    step, _, _ = make_step(HADAMARD, 64, 64, g, 1.0, r=16)
    assert B.low_rank(step) == 16 * 17
    assert B.choose_added(step, 1, 64, 64, 1, "cpu") == B.KHATRI_RAO
    assert B.choose_added(step, 4096, 64, 64, 1, "cpu") == B.TILES
    assert B.prefer_merged([step], 4096, 64, 64, 1, "cpu")  # building W' beats pairs for many tokens
    small, _, _ = make_step(HADAMARD, 1280, 1280, g, 1.0, r=2)
    assert not B.prefer_merged([small], 4, 1280, 1280, 1, "cpu")  # a few tokens: the pairs are cheaper
    lora, _, _ = make_step(MATMUL, 64, 64, g, 1.0)
    assert B.choose_added(lora, 4096, 64, 64, 1, "cpu") == B.KHATRI_RAO  # a LoRA is its own thin pair
