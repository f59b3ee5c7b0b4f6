"""The ΔW autograd: LoHa factors -> ΔW (or a whole layer's output) without keeping ΔW.

A LoHa layer computes y = op(x, W0 + s·ΔW) with ΔW = B1 ⊙ B2, each branch B = a @ b
(or, with a Tucker core, B[p, r, …] = Σ_ij a[i, p]·t[i, j, …]·b[j, r]). Plain
autograd would keep B1, B2 and W0 + s·ΔW alive until backward: three O×K tensors per
layer. Here only the factors (and the layer input, which any layer keeps) are saved;
backward rebuilds the branches from the factors, which costs two rank-R products
per layer and no memory between forward and backward.

Factor layouts are the file's (see loha.files.network): plain a (O, R), b (R, K) with
K = I·k·k; Tucker a (R, O), b (R, I), t (R, R, k, k).

The Tucker gradients of `a` are those of lycoris-lora 4.1.3's fixed HadaWeightTucker
(earlier LyCORIS, ComfyUI, PEFT and kohya contracted the wrong branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Factors = tuple  # (w1a, w1b, w2a, w2b, t1, t2), t* None without Tucker


# --------------------------------------------------------------------------- pure math


def branch(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """One Hadamard branch: a @ b (O, K), or the Tucker rebuild (O, I, k, …)."""
    if t is None:
        return a @ b
    return torch.einsum("ir...,ip->pr...", torch.einsum("ij...,jr->ir...", t, b), a)


def unscaled_delta(factors: Factors) -> torch.Tensor:
    """ΔW = B1 ⊙ B2 (unscaled); (O, K) plain, (O, I, k, …) Tucker."""
    w1a, w1b, w2a, w2b, t1, t2 = factors
    return branch(w1a, w1b, t1) * branch(w2a, w2b, t2)


def _branch_grads(grad: torch.Tensor, a, b, t):
    """Gradients of a, b (and t) of one branch, given the gradient of that branch."""
    if t is None:
        return grad @ b.t(), a.t() @ grad, None
    folded = torch.einsum("ij...,jr->ir...", t, b)  # core folded into b: (R, I, k…)
    grad_a = torch.einsum("pr...,ir...->ip", grad, folded)
    pulled = torch.einsum("ip,pr...->ir...", a, grad)  # grad pulled through a: (R, I, k…)
    grad_b = torch.einsum("ir...,ij...->jr", pulled, t)
    grad_t = torch.einsum("ir...,jr->ij...", pulled, b)
    return grad_a, grad_b, grad_t


def delta_grads(grad: torch.Tensor, factors: Factors, needs=(True,) * 6, branches=None) -> tuple:
    """Gradients of (w1a, w1b, w2a, w2b, t1, t2) given grad of ΔW (ΔW's layout);
    `branches` (B1, B2) when the caller has them already. One O×K temporary at a time."""
    w1a, w1b, w2a, w2b, t1, t2 = factors
    b1, b2 = branches or (branch(w1a, w1b, t1), branch(w2a, w2b, t2))
    out = [None] * 6
    pulled = torch.mul(grad, b2)
    if any(needs[i] for i in (0, 1, 4)):
        out[0], out[1], out[4] = _branch_grads(pulled, w1a, w1b, t1)
    if any(needs[i] for i in (2, 3, 5)):
        out[2], out[3], out[5] = _branch_grads(torch.mul(grad, b1, out=pulled), w2a, w2b, t2)
    return tuple(g if need else None for g, need in zip(out, needs))


# --------------------------------------------------------------------------- ΔW alone


class _ScaledDelta(torch.autograd.Function):
    """scale·ΔW from the factors, saving only the factors (for merges, tests, DoRA)."""

    @staticmethod
    def forward(ctx, scale: float, w1a, w1b, w2a, w2b, t1=None, t2=None):
        factors = (w1a, w1b, w2a, w2b, t1, t2)
        ctx.save_for_backward(*factors)
        ctx.scale = scale
        return unscaled_delta(factors) * scale

    @staticmethod
    def backward(ctx, grad):
        factors = ctx.saved_tensors
        grads = delta_grads(grad * ctx.scale, factors, ctx.needs_input_grad[1:])
        return (None, *grads)


def scaled_delta(factors: Factors, scale: float = 1.0) -> torch.Tensor:
    """scale·ΔW of factors in the file's layouts, differentiable, keeping only the factors."""
    return _ScaledDelta.apply(scale, *factors)


# --------------------------------------------------------------------------- whole layers


class _Op:
    """How a layer applies its weight, and the two gradients of that application."""

    def __init__(self, kind: str, stride=1, padding=0, dilation=1, groups=1):
        self.kind, self.stride, self.padding, self.dilation, self.groups = kind, stride, padding, dilation, groups

    @classmethod
    def of(cls, layer: torch.nn.Module) -> "_Op":
        if isinstance(layer, torch.nn.Linear):
            return cls("linear")
        return cls(f"conv{layer.weight.dim() - 2}d", layer.stride, layer.padding, layer.dilation, layer.groups)

    def __call__(self, x, weight, bias):
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, x, weight, grad, need_input: bool):
        """(grad of x or None, grad of the weight)."""
        if self.kind == "linear":
            flat_grad = grad.reshape(-1, grad.shape[-1])
            grad_w = flat_grad.t() @ x.reshape(-1, x.shape[-1])
            return (grad @ weight if need_input else None), grad_w
        dims = int(self.kind[4])
        pair = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, pair(self.stride), pair(self.padding), pair(self.dilation),
            False, (0,) * dims, self.groups, (need_input, True, False),
        )
        return grad_x, grad_w


class LohaLayerFunction(torch.autograd.Function):
    """y = op(x, W0 + scale·ΔW) + bias, keeping x and the factors only.

    ΔW is computed in the factors' dtype (fp32 when training in mixed precision) and
    rounded once to W0's dtype; its gradient comes back in the factors' dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op: _Op, scale: float, w1a, w1b, w2a, w2b, t1=None, t2=None):
        factors = (w1a, w1b, w2a, w2b, t1, t2)
        ctx.save_for_backward(x, weight, *factors)
        ctx.op, ctx.scale = op, scale
        b1, b2 = branch(w1a, w1b, t1), branch(w2a, w2b, t2)
        return op(x, _merged(weight, b1, b2, scale), bias)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()  # gradients often arrive as views (expanded, permuted): GEMMs want rows
        x, weight, *factors = ctx.saved_tensors
        w1a, w1b, w2a, w2b, t1, t2 = factors
        b1, b2 = branch(w1a, w1b, t1), branch(w2a, w2b, t2)
        need_x = ctx.needs_input_grad[0]
        merged = _merged(weight, b1, b2, ctx.scale) if need_x else weight
        grad_x, grad_w = ctx.op.backward(x, merged, grad, need_x)
        del merged
        grad_dw = grad_w.to(w1a.dtype).reshape(b1.shape).mul_(ctx.scale)
        del grad_w
        grads = delta_grads(grad_dw, factors, ctx.needs_input_grad[5:], (b1, b2))
        return (grad_x, None, None, None, None, *grads)


def _merged(weight: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + scale·(B1 ⊙ B2) in W0's shape: one fused pass, or ΔW rounded once to W0's dtype."""
    if b1.dtype == weight.dtype:
        return torch.addcmul(weight, b1.view(weight.shape), b2.view(weight.shape), value=scale)
    return weight + (b1 * b2 * scale).view(weight.shape).to(weight.dtype)


def loha_layer(x, layer: torch.nn.Module, factors: Factors, scale: float, op: _Op | None = None):
    """A Linear/Conv layer's output with its weight W0 + scale·ΔW (W0 and bias frozen)."""
    return LohaLayerFunction.apply(x, layer.weight, layer.bias, op or _Op.of(layer), scale, *factors)
