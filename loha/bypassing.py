"""Networks applied in the forward pass: the model's weights are never written.

    handle = loha.bypass(pipe, [(net, 0.8, 0.5)])   # the same inputs as loha.apply
    handle.set_strengths([(1.0, 0.3)])            # instant: read at the next forward
    handle.enabled = False                         # the base model, instantly
    handle.remove()                                # every module exactly as it was

For models whose weights cannot or should not be patched: quantized or fp8 weights
(no exact W+ΔW to store), offloaded or memory-mapped ones (a backup would double
their memory), and models several users share. Each changed Linear or convolution
gets an instance attribute `forward` (no hooks) that computes its output with the
networks applied (`loha.kernels.bypass`): from W' = W + ΔW built tile by tile where
the layer's weight can be read, else as f(x) + ΔW·x beside the layer's own forward.
Outputs equal those of `loha.apply` at fp32 tolerance, for every kind of module a
file may hold (LoHa, Tucker, LoRA, LoKr, full diff, DoRA) and several networks on one
layer (applied in order, as the patcher does). Bypass is for inference: outputs carry
gradients to the input, never to the weights or factors.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import Callable, Iterable

import torch

from .errors import LohaError
from .kernels import bypass as K
from .kernels import dora_scales
from .patch import ModelView, PlannedModule, Use, as_uses, kernel_step, plan_modules

#: layer_weights(module, x) -> (weight, bias) as the layer would use them on input x (x may
#: be None: any device and dtype), or None when the layer's weight cannot be read that way.
LayerWeights = Callable[[torch.nn.Module, torch.Tensor | None], tuple | None]

_TORCH_FORWARDS = {torch.nn.Linear.forward, torch.nn.Conv1d.forward, torch.nn.Conv2d.forward, torch.nn.Conv3d.forward}
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def torch_layer_weights(module: torch.nn.Module, x: torch.Tensor | None):
    """(weight, bias) of torch's own Linear/Conv layers with float weights; None otherwise.

    Layers that override `forward` (casting, quantized, offloading ones) may do more with
    their weight than a plain product, so they run their own forward instead.
    """
    weight = getattr(module, "weight", None)
    if type(module).forward not in _TORCH_FORWARDS or not isinstance(weight, torch.Tensor):
        return None
    if weight.dtype not in _FLOAT or (x is not None and (x.device != weight.device or x.dtype != weight.dtype)):
        return None
    return weight, module.bias


def conv_of(module: torch.nn.Module) -> K.Conv | None:
    """How a convolution layer convolves (None for a linear layer)."""
    if not isinstance(module, torch.nn.modules.conv._ConvNd):
        return None
    padding = module.padding
    return K.Conv(len(module.kernel_size), tuple(module.stride), padding if isinstance(padding, str) else tuple(padding),
                  tuple(module.dilation), module.groups, module.padding_mode,
                  tuple(getattr(module, "_reversed_padding_repeated_twice", ())))


class _Layer:
    """One module's networks (from every handle on it), called in place of its forward."""

    def __init__(self, module: torch.nn.Module, key: str):
        self.module = weakref.ref(module)
        self.key = key
        self.previous = module.__dict__.get("forward")  # an instance forward someone set before us
        self.entries: list[_Entry] = []
        self.conv = conv_of(module)

    def __call__(self, *args, **kwargs):
        module = self.module()
        forward = self.previous or type(module).forward.__get__(module)
        steps_now = [(entry, i, item) for entry in self.entries if entry.handle.enabled
                     for i, item in enumerate(entry.items) if item.use.strength(item.target) != 0]
        if not steps_now or not args or not isinstance(args[0], torch.Tensor):
            return forward(*args, **kwargs)
        x, rest = args[0], args[1:]
        unbatched = self.conv is not None and x.dim() == self.conv.dims + 1

        def base(inputs):  # the layer's own forward, with whatever else it was called with
            out = forward(inputs.squeeze(0) if unbatched else inputs, *rest, **kwargs)
            return out.unsqueeze(0) if unbatched else out

        if unbatched:
            x = x.unsqueeze(0)
        y = self._forward(module, base, x, steps_now, readable=not (rest or kwargs))
        return y.squeeze(0) if unbatched else y

    def _forward(self, module, base, x: torch.Tensor, steps_now, readable: bool) -> torch.Tensor:
        handle = self.entries[0].handle
        steps = [entry.step(i, item, x.device) for entry, i, item in steps_now]
        shape = steps_now[0][2].target.shape
        groups = 1 if self.conv is None else self.conv.groups
        whole = readable and all(item.target.rows is None for _, _, item in steps_now)
        if whole and K.prefer_merged(steps, K.tokens(x, self.conv), shape[0], math.prod(shape[1:]), groups, x.device):
            read = handle.layer_weights(module, x)  # only now: a host's layer may cast or dequantize it
            if read is not None:
                return self._merged(module, x, *read, steps_now)
        y = base(x)
        regions: dict = defaultdict(list)
        for entry, i, item in steps_now:
            regions[item.target.rows].append((entry, i, item))
        for rows, group in regions.items():
            y = self._added(module, base, x, y, rows, group)
        return y

    def _merged(self, module, x, weight, bias, steps_now) -> torch.Tensor:
        """(W + ΔW)·x + b, W' built in tiles from the weight the layer would use."""
        steps = [entry.step(i, item, weight.device) for entry, i, item in steps_now]
        in_scales = None
        if any(step.axis == "in" for step in steps):
            scales = self._dora_scales(module, steps_now, None, weight.device)
            in_scales = {n: c for n, (c, step) in enumerate(zip(scales, steps)) if step.axis == "in"}
        shift = _bias_change(steps_now, weight.device)
        if shift is not None:
            bias = shift.to(weight.dtype) if bias is None else (bias.float() + shift).to(bias.dtype)
        return K.forward_merged(x, weight, bias, steps, self.conv, in_scales)

    def _added(self, module, base, x, y, rows, group) -> torch.Tensor:
        """y with the chain of `group` added to its output channels `rows` (None: all)."""
        steps = [entry.step(i, item, x.device) for entry, i, item in group]
        shape = group[0][2].target.shape
        t = K.tokens(x, self.conv)
        pairs = [_Entry.pair(step, t, self.conv, shape) for step in steps]
        scales = self._dora_scales(module, group, rows, x.device)
        channels = slice(None) if rows is None else slice(*rows)
        bias = getattr(module, "bias", None) if any(s is not None for s in scales) else None
        bias = None if bias is None else bias.detach()[channels]

        def w0x(inputs, out=None):  # W_0·inputs on these channels: fp32, without the bias
            out = _channels(base(inputs) if out is None else out, channels, self.conv).to(torch.float32, copy=True)
            return out if bias is None else _add_bias(out, bias, self.conv, -1)

        region = K.chain_added(x, w0x(x, y), steps, scales, pairs, self.conv, shape, w0x)
        if bias is not None:
            region = _add_bias(region, bias, self.conv, 1)
        shift = _bias_change(group, x.device)  # full-diff modules' diff_b: the bias they add
        if shift is not None:
            region = _add_bias(region, shift, self.conv, 1)
        if rows is None:
            return region.to(y.dtype)
        y = y.clone()
        _channels(y, channels, self.conv).copy_(region)
        return y

    def _dora_scales(self, module, group, rows, device) -> list:
        """The DoRA factors of `group`'s steps, computed from the layer's weight once.

        Again only when the weight changes, or the strengths of steps before the last
        DoRA one (they change the weight that DoRA step normalises).
        """
        if all(item.dora_scale is None for _, _, item in group):
            return [None] * len(group)
        stored = module.weight
        last = max(n for n, (_, _, item) in enumerate(group) if item.dora_scale is not None)
        strengths = tuple(float(item.use.strength(item.target)) for _, _, item in group[:last])
        key = (id(stored), stored._version, device, strengths, rows, tuple(id(item) for _, _, item in group))
        cache = group[0][0].dora_cache
        if cache.get("key") != key:
            read = self.entries[0].handle.layer_weights(module, None)
            with torch.no_grad():
                weight = (read[0] if read is not None else stored).detach()
                region = weight if rows is None else weight[rows[0] : rows[1]]
                steps = [entry.step(i, item, weight.device) for entry, i, item in group]
                scales = dora_scales(region, steps)
            cache["key"], cache["scales"] = key, [None if c is None else c.to(device) for c in scales]
        return cache["scales"]


def _bias_change(steps_now, device) -> torch.Tensor | None:
    """Σ s·diff_b of the full-diff modules among `steps_now` (what the patcher adds to the bias), fp32."""
    shift = None
    for _, _, item in steps_now:
        if item.bias is not None:
            part = item.bias.to(device=device, dtype=torch.float32) * float(item.use.strength(item.target))
            shift = part if shift is None else shift + part
    return shift


def _channels(y: torch.Tensor, channels: slice, conv) -> torch.Tensor:
    return y[..., channels] if conv is None else y[:, channels]


def _add_bias(y: torch.Tensor, bias: torch.Tensor, conv, sign: int) -> torch.Tensor:
    b = bias.to(device=y.device, dtype=torch.float32)
    return y.add_(b if conv is None else b.view(-1, *([1] * conv.dims)), alpha=sign)


class _Entry:
    """One handle's items on one module, with their factors prepared per device."""

    def __init__(self, handle: BypassHandle, items: list[PlannedModule]):
        self.handle = handle
        self.items = items
        self._steps: dict = {}  # (item index, device) -> Step
        self.dora_cache: dict = {}

    def step(self, i: int, item: PlannedModule, device):
        """The item as a kernel `Step` with factors on `device`, at its strength now."""
        key = (i, device)
        prepared = self._steps.get(key)
        if prepared is None:
            prepared = self._steps[key] = kernel_step(item, device)
        return prepared._replace(strength=float(item.use.strength(item.target)))

    @staticmethod
    def pair(step, t: int, conv, shape) -> K.Pair | None:
        """The step's thin pair where that is its cheaper form for `t` positions, else None.

        Made at each call, not kept: R1·R2·(O+K) elements, 8× the factors at rank 16, and
        building them costs 1/t of using them.
        """
        o, k = shape[0], math.prod(shape[1:])
        device = step.tensors[0].device
        if K.choose_added(step, t, o, k, 1 if conv is None else conv.groups, device) != K.KHATRI_RAO:
            return None
        return K.pair_of(step)


class BypassHandle:
    """What `bypass()` returns: the same handle as `loha.apply`'s, its weights untouched.

    `layers` maps weight keys to their module and the planned items that change it
    (`bypass()` and the hosts' adapters build it); the layers are changed at once.
    """

    def __init__(self, uses: list[Use], layers: dict[str, tuple[torch.nn.Module, list[PlannedModule]]],
                 unmatched: dict | None = None, skipped: dict | None = None,
                 layer_weights: LayerWeights | None = None):
        self.uses = uses
        self.unmatched = unmatched or {}
        self.skipped = skipped or {}
        self.enabled = True
        self.layer_weights = layer_weights or torch_layer_weights
        self._layers: list[_Layer] = []
        self._entries: list[_Entry] = []
        for key, (module, items) in layers.items():
            entry = _Entry(self, items)
            layer = _install(module, key)
            layer.entries.append(entry)
            self._layers.append(layer)
            self._entries.append(entry)

    @property
    def bypassed_keys(self) -> list[str]:
        return [layer.key for layer in self._layers]

    @property
    def patched_keys(self) -> list[str]:
        """The keys whose layers this handle changes (as `PatchHandle.patched_keys`)."""
        return self.bypassed_keys

    def set_strengths(self, strengths: Iterable) -> None:
        """New (unet[, te]) strengths per use, in order; used from the next forward on."""
        for use, value in zip(self.uses, strengths, strict=True):
            unet, *te = value if isinstance(value, tuple) else (value,)
            use.unet, use.te = unet, (te[0] if te else None)

    def remove(self) -> None:
        """Take this handle's networks out; a module left with none gets its forward back."""
        for layer, entry in zip(self._layers, self._entries):
            layer.entries.remove(entry)
            if not layer.entries:
                _uninstall(layer)
        self._layers, self._entries = [], []

    restore = remove  # the name `PatchHandle` uses, so code can hold either


def layer_module(found: tuple[torch.nn.Module, str] | None, key: str, items: list[PlannedModule]) -> torch.nn.Module:
    """The Linear/Conv module owning `key` (`found`: it and the attribute), or a LohaError saying why not."""
    if found is None:
        raise LohaError(f"cannot bypass '{key}': the model is a state dict (bypass needs its modules; "
                        "loha.apply patches state dicts)")
    module, attr = found
    conv = isinstance(module, torch.nn.modules.conv._ConvNd)
    if attr != "weight" or not (isinstance(module, torch.nn.Linear) or conv or _looks_linear(module)):
        raise LohaError(f"cannot bypass '{key}': it is the {attr!r} of a {type(module).__name__}, not the weight "
                        "of a Linear or convolution layer (loha.apply can patch it)")
    if conv and getattr(module, "transposed", False):
        raise LohaError(f"cannot bypass '{key}': transposed convolutions are not supported (loha.apply can patch it)")
    if conv and any(item.target.rows is not None for item in items):
        raise LohaError(f"cannot bypass '{key}': a row slice of a convolution weight")
    return module


def _looks_linear(module: torch.nn.Module) -> bool:
    """Layers of other packs that compute x·Wᵀ + b without subclassing torch.nn.Linear."""
    return hasattr(module, "in_features") and hasattr(module, "out_features")


_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, _Layer]" = weakref.WeakKeyDictionary()


def _install(module: torch.nn.Module, key: str) -> _Layer:
    layer = _LAYERS.get(module)
    if layer is None:
        layer = _LAYERS[module] = _Layer(module, key)
        module.forward = layer
    return layer


def _uninstall(layer: _Layer) -> None:
    module = layer.module()
    if module is None:
        return
    _LAYERS.pop(module, None)
    if module.__dict__.get("forward") is layer:
        if layer.previous is None:
            del module.forward
        else:
            module.forward = layer.previous


def bypass(model, networks, skip_bad: bool = False, family: str | None = None,
           layer_weights: LayerWeights | None = None) -> BypassHandle:
    """Apply networks in the forward pass of `model`'s layers; returns a `BypassHandle`.

    Takes what `loha.apply` takes (a pipeline, a mapping of modules, a diffusers /
    transformers model or an LDM-layout module — not a bare state dict), and the same
    `networks`; `handle.unmatched` and `handle.skipped` mean the same. `layer_weights`
    tells how a host's layers read their weight (see `LayerWeights`); without it, torch's
    own Linear/Conv layers are read directly and every other layer runs its own forward.
    """
    view = ModelView(model, family)
    uses = as_uses(networks)
    skipped: dict[str, list[str]] = {}
    items, unmatched = plan_modules(view.names, uses, skip_bad, skipped)
    by_key: dict[str, list[PlannedModule]] = defaultdict(list)
    for item in items:
        by_key[item.target.key].append(item)
    layers = {key: (layer_module(view.module_of(key), key, group), group) for key, group in by_key.items()}
    return BypassHandle(uses, layers, unmatched, skipped, layer_weights)
