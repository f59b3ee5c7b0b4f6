"""LoHa on diffusers pipelines: load, change strengths, unload exactly.

    from loha.hosts.pipelines import load_loha, set_loha_strength, unload_loha
    load_loha(pipe, "style.safetensors", strength=0.8, te_strength=0.5)   # adapter "style"
    load_loha(pipe, "peft_adapter/", adapter_name="subject")             # PEFT folders too
    set_loha_strength(pipe, "style", 1.0)
    unload_loha(pipe)                                                      # every weight back, bit for bit
    load_loha(pipe, "style.safetensors", bypass=True)   # in the forward pass: no weight changes
    disable_loha(pipe); enable_loha(pipe)                # instant in bypass mode

diffusers' own loader refuses ``hada_*`` keys; this patches the pipeline's UNet and
text encoders through `loha.apply` (SD1.x, SD2.x, SDXL), or applies them in the forward
pass through `loha.bypass` (for quantized, offloaded or shared models; strengths and
on/off then change instantly). Nothing here imports diffusers: any object with those
attributes works. The networks loaded on a pipeline are kept on it, by adapter name,
as one patch: every change applies the current set at once (reusing the memory of the
last patch), so a weight touched by several networks is rounded once, and unloading
any of them leaves exactly what the others alone would give.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ..bypassing import BypassHandle, bypass as bypass_networks
from ..errors import LohaError, UnmatchedError
from ..files.network import Network, load
from ..patch import ModelView, PatchHandle, Use, apply, plan_modules, release_memory

#: Attribute of the pipeline that holds its loaded networks.
STATE_ATTR = "_loha_state"


@dataclass
class _State:
    uses: dict[str, Use] = field(default_factory=dict)  # adapter name -> network and strengths
    handle: PatchHandle | BypassHandle | None = None
    bypass: bool = False  # how the networks are applied: in the forward pass, or patched
    enabled: bool = True


def _state(pipe) -> _State:
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        state = _State()
        object.__setattr__(pipe, STATE_ATTR, state)  # not a pipeline component
    return state


def _reapply(pipe, state: _State) -> None:
    """Apply every loaded network at once, in the pipeline's mode (or none while disabled)."""
    uses = list(state.uses.values()) if state.enabled or state.bypass else []
    if isinstance(state.handle, PatchHandle) and uses and not state.bypass:
        state.handle.reapply(uses)  # the originals and the patched memory are kept
        return
    if state.handle is not None:
        state.handle.restore()
        state.handle = None
    if uses:
        state.handle = (bypass_networks if state.bypass else apply)(pipe, uses)
        if state.bypass:
            state.handle.enabled = state.enabled


def load_loha(pipe, network, strength: float = 1.0, te_strength: float | None = None, *,
              adapter_name: str | None = None, blocks: dict[str, float] | None = None, strict: bool = True,
              bypass: bool | None = None) -> str:
    """Apply a LoHa (file, PEFT folder or Network) to `pipe`; returns its adapter name.

    `te_strength` defaults to `strength`; `blocks` maps block ids (``IN04``, ``MID``,
    ``OUT02``, ``BASE``…) to multipliers. Names that match no weight of the pipeline
    raise `UnmatchedError` (nothing changes) unless `strict` is False, which warns.
    Loading under an adapter name already loaded replaces that network. `bypass=True`
    applies every network of the pipeline in the forward pass from now on, weights
    untouched (`loha.bypass`); False patches them again; None keeps the current way.
    """
    net = network if isinstance(network, Network) else load(network)
    name = adapter_name or net.name
    use = Use(net, strength, te_strength, dict(blocks or {}))
    view = ModelView(pipe)
    _, unmatched = plan_modules(view.names, [use], shape_of=view.shape_of)  # check before touching the weights
    if unmatched:
        names = unmatched[net.label]
        message = f"{net.label}: {len(names)} names match no weight of the pipeline: {', '.join(names)}"
        if strict:
            raise UnmatchedError(message, names)
        warnings.warn(message, stacklevel=2)
    if net.unknown_keys:
        warnings.warn(f"{net.label}: {len(net.unknown_keys)} keys are of no known kind and were not applied: "
                      + ", ".join(net.unknown_keys), stacklevel=2)
    state = _state(pipe)
    previous, previous_mode = state.uses.get(name), state.bypass
    if bypass is not None and bypass != state.bypass and state.handle is not None:
        state.handle.restore()  # switching ways: nothing of the other one may stay
        state.handle = None
    state.uses[name] = use
    state.bypass = state.bypass if bypass is None else bypass
    try:
        _reapply(pipe, state)
    except BaseException:
        if previous is None:
            del state.uses[name]
        else:
            state.uses[name] = previous
        if state.bypass != previous_mode and state.handle is not None:
            state.handle.restore()
            state.handle = None
        state.bypass = previous_mode
        _reapply(pipe, state)
        raise
    return name


def set_loha_strength(pipe, adapter_name: str | None = None, strength: float = 1.0,
                      te_strength: float | None = None) -> None:
    """New strengths for one loaded adapter (or all of them, when `adapter_name` is None)."""
    state = _state(pipe)
    for name in _names(state, adapter_name):
        state.uses[name].unet, state.uses[name].te = strength, te_strength
    if state.handle is not None:
        state.handle.set_strengths([(u.unet, u.te) for u in state.uses.values()])


def unload_loha(pipe, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all): the weights become exactly what the rest alone give.

    With none left, the memory the patches used is let go too (`loha.release_memory`).
    """
    state = _state(pipe)
    for name in _names(state, adapter_name):
        del state.uses[name]
    _reapply(pipe, state)
    if not state.uses:
        release_memory(pipe)


def disable_loha(pipe) -> None:
    """The base model until `enable_loha`: instant in bypass mode, else the weights are restored."""
    _set_enabled(pipe, False)


def enable_loha(pipe) -> None:
    """The loaded networks again after `disable_loha`."""
    _set_enabled(pipe, True)


def _set_enabled(pipe, enabled: bool) -> None:
    state = _state(pipe)
    state.enabled = enabled
    if isinstance(state.handle, BypassHandle):
        state.handle.enabled = enabled
    else:
        _reapply(pipe, state)


def loaded_loha(pipe) -> dict[str, tuple[float, float | None]]:
    """{adapter name: (strength, te_strength)} of the networks on `pipe`."""
    return {name: (use.unet, use.te) for name, use in _state(pipe).uses.items()}


def _names(state: _State, adapter_name: str | None) -> list[str]:
    if adapter_name is None:
        return list(state.uses)
    if adapter_name not in state.uses:
        raise LohaError(f"no LoHa adapter {adapter_name!r} on this pipeline (loaded: {', '.join(state.uses) or 'none'})")
    return [adapter_name]


__all__ = ["disable_loha", "enable_loha", "load_loha", "loaded_loha", "set_loha_strength", "unload_loha"]
