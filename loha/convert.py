"""Conversions: PEFT ↔ LyCORIS/kohya files, and LoHa → LoRA (exact at rank R², or reduced).

    convert.peft_to_kohya("peft_out/", "style.safetensors")
    convert.kohya_to_peft("style.safetensors", "peft_out/")
    report = convert.to_lora([("a.safetensors", 1.0), ("b.safetensors", 0.5)], "ab_lora.safetensors", rank=32)

A rank-R LoHa is exactly a rank-R² LoRA, (a1@b1)⊙(a2@b2) = khatri_rao(a1, a2) @ face_split(b1, b2),
so conversion is lossless at rank R²; several networks (at their strengths) become one
LoRA by stacking their factors. Asked for rank r, each layer's stacked factors are
reduced by a truncated SVD (through QR of the thin factors, so ΔW is never formed) and
the relative Frobenius error ‖ΔW − ΔW_r‖/‖ΔW‖ of every layer is reported.

Every conversion needs the base model's structure, never its weights: a name map gives
the kohya spelling loaders expect (SDXL UNets in LDM paths, text encoders with
``text_model_``), PEFT's module paths, and the conv kernel shapes of LoRA factors. It
comes from `base`: a family name or None (the standard SD1.x/SD2.x/SDXL structure,
built on the meta device), a diffusers model folder (its configs), a checkpoint file
(its header), or live models (a pipeline, {"unet": …} modules, a state dict).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from . import delta as D
from .errors import FormatError, LohaError, UnmatchedError
from .families import BASE_MODEL_VERSION, FAMILIES
from .files.checkpoint import checkpoint_shapes
from .files.network import Network, load
from .files.safetensors_io import dtype_of_name, refuse_existing, save
from .keys import NameMap, map_modules, map_state_dict
from .patch import ModelView, as_uses, plan_modules


def base_names(base, family: str | None = None, diffusers: bool = False) -> NameMap:
    """The name map of the base model (see the module docstring); `diffusers` demands module paths."""
    from .models.structures import folder_modules, standard_modules

    if base is None or (isinstance(base, str) and base in FAMILIES):
        family = base or family
        if family is None:
            raise LohaError("the network's family (SD1.x/SD2.x/SDXL) is unknown: name the base model")
        return map_modules(standard_modules(family), family=family)
    if isinstance(base, (str, os.PathLike)):
        path = os.fspath(base)
        if os.path.isdir(path):
            return map_modules(folder_modules(path))
        if not os.path.isfile(path):
            raise LohaError(f"{path}: the base model is neither a family ({', '.join(FAMILIES)}), a folder nor a file")
        if diffusers:
            raise LohaError(f"{path}: a checkpoint file has LDM names; PEFT needs a diffusers folder or a family")
        return map_state_dict(checkpoint_shapes(path))
    view = ModelView(base)
    if diffusers and not any(t.key.startswith(("unet.", "text_encoder")) for t in view.names.targets):
        raise LohaError("PEFT needs diffusers modules (a pipeline or {'unet': …}) as the base, not a state dict")
    return view.names


def matched(names: NameMap, uses) -> list:
    """Every module of `uses` planned against the base (names, shapes, factors checked); none unmatched."""
    items, unmatched = plan_modules(names, as_uses(uses))
    if unmatched:
        listed = [name for group in unmatched.values() for name in group]
        where = "; ".join(f"{label}: {', '.join(group)}" for label, group in unmatched.items())
        raise UnmatchedError(f"{len(listed)} modules match no weight of the base model ({where})", listed)
    return items


# --------------------------------------------------------------------------- PEFT <-> kohya


def to_kohya(network: Network, out: str | os.PathLike, names: NameMap | None = None, *, overwrite: bool = False) -> str:
    """Write `network` as a LyCORIS/kohya file, each module under the spelling kohya uses for it."""
    out = os.fspath(out)
    refuse_existing(out, overwrite)
    targets = {item.module.name: item.target for item in matched(names, network)} if names is not None else {}
    tensors = {}
    for module in network.modules.values():
        name = names.names(targets[module.name])[0] if targets else module.name
        for suffix, tensor in network.tensors(module).items():
            tensors[f"{name}.{suffix}"] = tensor
    metadata = dict(network.metadata)
    if network.family:
        metadata.setdefault("ss_base_model_version", BASE_MODEL_VERSION[network.family])
    save(tensors, out, metadata, overwrite=overwrite)
    return out


def peft_to_kohya(src, out, base=None, *, overwrite: bool = False) -> str:
    """A PEFT LoHa folder -> a LyCORIS/kohya LoHa file (same tensors, alpha from the config)."""
    network = load(src)
    return to_kohya(network, out, base_names(base, network.family), overwrite=overwrite)


def kohya_to_peft(src, out, base=None, *, overwrite: bool = False) -> list[str]:
    """A LoHa file (or Network) -> a PEFT LoHa folder (unet/, text_encoder/, …); returns the adapter folders."""
    from .files.peft import save_folder

    network = src if isinstance(src, Network) else load(src)
    out = os.fspath(out)
    refuse_existing(out, overwrite)
    return save_folder(network, out, matched(base_names(base, network.family, diffusers=True), network))


# --------------------------------------------------------------------------- LoHa -> LoRA


@dataclass
class LayerReport:
    """One converted layer: its stacked (exact) rank, the rank written, the relative error."""

    name: str
    exact_rank: int
    rank: int
    error: float  # ‖ΔW − ΔW_written‖_F / ‖ΔW‖_F (0 when written exactly)


@dataclass
class LoraReport:
    out: str
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)


def to_lora(networks, out, rank: int | None = None, base=None, *, dtype: str | torch.dtype = torch.float32,
            overwrite: bool = False) -> LoraReport:
    """Write one kohya LoRA file equal to `networks` at their strengths (the forms `loha.apply` uses).

    Without `rank` every layer is exact (rank Σ R² of the LoHa/LoRA modules on it);
    with `rank`, layers above it are reduced by SVD and their error is reported.
    ΔW carries alpha/rank and the strengths; the file's alpha equals each layer's rank.
    """
    uses = as_uses(networks)
    dtype = dtype_of_name(dtype)
    out = os.fspath(out)
    refuse_existing(out, overwrite)
    names = base_names(base, next((u.network.family for u in uses if u.network.family), None))
    items = matched(names, uses)
    stacks: dict = {}
    for item in items:
        strength = item.use.strength(item.target)
        if strength == 0:
            continue
        up, down = _lowrank(item)
        stacks.setdefault(item.target, []).append((up * (item.scale * strength), down))
    report, tensors = LoraReport(out), {}
    for target, factors in stacks.items():
        up = torch.cat([u for u, _ in factors], dim=1)
        down = torch.cat([d for _, d in factors], dim=0)
        name = names.names(target)[0]
        exact_rank = up.shape[1]
        error = 0.0
        if rank is not None and exact_rank > rank:
            up, down, error = reduce_rank(up, down, rank)
        report.layers.append(LayerReport(name, exact_rank, up.shape[1], error))
        tensors.update(_lora_tensors(name, up, down, target.shape, dtype))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max((layer.rank for layer in report.layers), default=0)),
        "ss_network_alpha": str(max((layer.rank for layer in report.layers), default=0)),
        "loha_converted_from": json.dumps([{"name": u.network.name, "unet": u.unet,
                                            "te": u.unet if u.te is None else u.te} for u in uses]),
    }
    if names.family in BASE_MODEL_VERSION:
        metadata["ss_base_model_version"] = BASE_MODEL_VERSION[names.family]
    save(tensors, out, metadata, overwrite=overwrite)
    return report


def _lowrank(item) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (O, ρ), down (ρ, K)) in fp32 with up @ down = the module's unscaled ΔW."""
    if item.dora_scale is not None or item.kind == "dense":
        why = "DoRA (not linear in ΔW)" if item.dora_scale is not None else f"a {item.module.kind} module"
        raise FormatError(f"{item.use.network.label}: module '{item.module.name}' is {why}; a LoRA cannot hold it")
    if item.kind == "lowrank":
        a, b = item.factors
        return a.float(), b.float()
    a1, b1, a2, b2 = (f.float() for f in item.factors)
    return D.khatri_rao(a1, a2), D.face_split(b1, b2)


def reduce_rank(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of up @ down and the relative Frobenius error of dropping the rest.

    QR of the thin factors leaves a ρ×ρ core whose SVD is that of ΔW; computed in fp64.
    The kept singular values are split evenly between the factors (fp16-friendly).
    """
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().t())
    u, s, vh = torch.linalg.svd(r_up @ r_down.t())
    rank = min(rank, s.shape[0])  # ΔW is at most min(O, K) wide
    total = torch.linalg.vector_norm(s)
    error = float(torch.linalg.vector_norm(s[rank:]) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    new_up = (q_up @ u[:, :rank]) * root
    new_down = root[:, None] * (vh[:rank] @ q_down.t())
    return new_up.float(), new_down.float(), error


def _lora_tensors(name: str, up, down, shape: tuple, dtype) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors; conv factors as loaders build them: down (ρ, I, k, k), up (O, ρ, 1, 1)."""
    rho = up.shape[1]
    if len(shape) > 2:
        down = down.reshape(rho, *shape[1:])
        up = up.reshape(*up.shape, *([1] * (len(shape) - 2)))
    return {
        f"{name}.lora_up.weight": up.to(dtype).contiguous(),
        f"{name}.lora_down.weight": down.to(dtype).contiguous(),
        f"{name}.alpha": torch.tensor(float(rho)),
    }
