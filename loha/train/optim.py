"""Optimizers and learning-rate schedules by kohya's names, from the libraries that own them.

`OPTIMIZERS` maps sd-scripts' ``optimizer_type`` names to their classes; all but AdamW are
optional extras, imported only when chosen, and a missing one is one line that says what
to install. Schedules are `diffusers.optimization.get_scheduler`'s (sd-scripts uses the
same), so ``lr_scheduler`` takes its names.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass

import torch

from ..errors import LohaError


@dataclass(frozen=True)
class OptimizerKind:
    module: str
    name: str
    package: str | None  # what to pip install (None: comes with torch)
    defaults: tuple = ()  # keyword arguments sd-scripts users set for LoHa/LoRA training


OPTIMIZERS = {
    "AdamW": OptimizerKind("torch.optim", "AdamW", None),
    "AdamW8bit": OptimizerKind("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Prodigy": OptimizerKind("prodigyopt", "Prodigy", "prodigyopt"),
    "Lion": OptimizerKind("lion_pytorch", "Lion", "lion-pytorch"),
    # Adafactor with the learning rate given (its own relative-step schedule off), as the
    # sd-scripts docs recommend for networks: scale_parameter=False relative_step=False warmup_init=False.
    "Adafactor": OptimizerKind("transformers.optimization", "Adafactor", "transformers",
                               (("scale_parameter", False), ("relative_step", False), ("warmup_init", False))),
}
#: diffusers' SchedulerType values (what `get_scheduler` takes).
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def optimizer_class(name: str):
    """The class of a kohya ``optimizer_type`` (case-insensitive), or a one-line LohaError."""
    kind = OPTIMIZERS.get(canonical_optimizer(name))
    try:
        return getattr(importlib.import_module(kind.module), kind.name)
    except ImportError:
        raise LohaError(f"optimizer {kind.name} needs the {kind.package} package: pip install {kind.package}",
                        option="optimizer") from None


def canonical_optimizer(name: str) -> str:
    for known in OPTIMIZERS:
        if known.lower() == (name or "").lower():
            return known
    raise LohaError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}", option="optimizer")


def parse_arguments(items) -> dict:
    """sd-scripts' ``optimizer_args`` (["key=value", …] or a dict) as keyword arguments."""
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            raise LohaError(f"optimizer argument {item!r} is not key=value", option="optimizer_args")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def make_optimizer(name: str, groups: list[dict], weight_decay: float, arguments: dict) -> torch.optim.Optimizer:
    """The optimizer over parameter groups that each carry their "lr"; the first group's is also
    the default (diffusers' polynomial schedule reads it as the initial rate)."""
    cls = optimizer_class(name)
    kind = OPTIMIZERS[canonical_optimizer(name)]
    return cls(groups, **{"lr": groups[0]["lr"], "weight_decay": weight_decay, **dict(kind.defaults), **arguments})


def describe(optimizer: torch.optim.Optimizer, weight_decay: float, arguments: dict) -> str:
    """``ss_optimizer`` as sd-scripts writes it: the class path and its arguments."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in {"weight_decay": weight_decay, **arguments}.items())
    return f"{cls.__module__}.{cls.__name__}({args})"


def make_scheduler(name: str, optimizer, warmup: int, total: int, cycles: int = 1, power: float = 1.0):
    """`diffusers.optimization.get_scheduler` with sd-scripts' arguments."""
    if name not in SCHEDULERS:
        raise LohaError(f"lr_scheduler {name!r} is not one of {', '.join(SCHEDULERS)}", option="lr_scheduler")
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # diffusers' "constant" ignores warm-up steps
    try:
        from diffusers.optimization import get_scheduler
    except ImportError:  # hosts without diffusers (ComfyUI) still train at a constant rate, as diffusers would
        if name != "constant":
            raise LohaError(f"lr_scheduler {name} needs diffusers: pip install diffusers",
                            option="lr_scheduler") from None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    extra = {"num_cycles": cycles} if name == "cosine_with_restarts" else {}
    extra |= {"power": power} if name == "polynomial" else {}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total, **extra)
