"""LoHa modules on the target Linear/Conv layers of a model, named as files name them,
and (LyCORIS ``train_norm``) scale and shift changes on its norm layers.

The targets come from `loha.keys` (the same map every loader uses), so a module's
name is exactly the kohya name a file carries (``lora_unet_…``, ``lora_te_…``) and a
saved file loads everywhere. A module does not replace its layer in the model tree:
it swaps the layer's ``forward`` (as LyCORIS does), so code that inspects the model
still sees a plain ``nn.Linear``/``nn.Conv2d``, and `detach()` puts it back.

Both model layouts work: diffusers/transformers modules (``{"unet": …,
"text_encoder": …}``) and LDM-layout modules whose state dict `keys.map_state_dict`
reads (ComfyUI's ``BaseModel``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LohaError
from ..families import TEXT_COMPONENTS
from ..keys import NameMap, Target, map_modules, map_state_dict
from .autograd import _Op, loha_layer, scaled_delta

#: UNet targets per preset, as regular expressions over the diffusers path. Names and
#: reach follow lycoris-lora's presets: "attn-mlp" is all of Transformer2DModel (its
#: default), "full" adds resnets, samplers, conv_in/conv_out and the time embedding.
_ATTENTION = r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
PRESETS = {
    "attn-only": (_ATTENTION,),
    "attn-mlp": (_ATTENTION, _TRANSFORMER),
    "full": (r".*",),
}
#: Norm layers ``train_norm`` trains per preset: as LyCORIS's NormModule, every GroupNorm/LayerNorm
#: inside the blocks the preset targets (Transformer2DModel for "attn-mlp", and ResnetBlock2D for
#: "full"), so never ``conv_norm_out``, which sits outside them; "attn-only" targets attention
#: modules, which hold none.
_TRANSFORMER_NORMS = r".*attentions\.\d+\.(norm|transformer_blocks\.\d+\.norm[123])"
NORM_PRESETS = {
    "attn-only": (),
    "attn-mlp": (_TRANSFORMER_NORMS,),
    "full": (_TRANSFORMER_NORMS, r".*resnets\.\d+\.norm[12]"),
}
PRESET_HELP = {
    "attn-only": "attention projections only",
    "attn-mlp": "attention + feed-forward + proj_in/out (lycoris-lora's default)",
    "full": "everything incl. resnets, up/down samplers, conv_in/out, time embedding",
}


@dataclass(frozen=True)
class NetworkSpec:
    """What to train: which layers, at which rank/alpha, and how conv layers are factored."""

    preset: str = "attn-mlp"
    rank: int = 8
    alpha: float = 4.0
    conv_rank: int = 4
    conv_alpha: float = 2.0
    use_tucker: bool = False
    text_encoder: bool = False
    #: LyCORIS's regularisers, as its LohaModule applies them while training: each step a module
    #: is left out with probability `module_dropout`, and each output row of ΔW with `rank_dropout`.
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    #: DoRA (LyCORIS ``dora_wd``): W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output row, m trained from ‖W0‖.
    dora_wd: bool = False
    #: LyCORIS ``train_norm``: the preset's norm layers learn a change of their scale and shift
    #: (``w_norm``, ``b_norm``), beside the LoHa factors.
    train_norm: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise LohaError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if self.rank < 1 or self.conv_rank < 1:
            raise LohaError(f"ranks must be ≥ 1 (rank {self.rank}, conv_rank {self.conv_rank})")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise LohaError(f"{name} {getattr(self, name)} must be in [0, 1)")

    def wants(self, target: Target) -> bool:
        if target.component in TEXT_COMPONENTS:
            return self.text_encoder
        return any(re.fullmatch(p, target.path) for p in PRESETS[self.preset])

    def wants_norm(self, target: Target) -> bool:
        """Whether ``train_norm`` trains this norm layer (an extra target of the name map)."""
        return (self.train_norm and target.component == "unet"
                and any(re.fullmatch(p, target.path) for p in NORM_PRESETS[self.preset]))


class _LayerModule(nn.Module):
    """What every trained module does to its layer: swap the layer's ``forward`` for its own
    (`attach`), put it back (`detach`), and step aside when module dropout skips it."""

    #: The tensors of a file this module writes (those it has), after its name.
    FILE_SUFFIXES: tuple[str, ...] = ()

    def __init__(self, name: str, layer: nn.Module):
        super().__init__()
        self.name = name
        self._layer = [layer]  # a list, so the frozen layer is not a submodule of the network
        self._original_forward = None
        self.skip = False  # module dropout, drawn per step by LohaNetwork.draw_dropout
        self.row_mask: torch.Tensor | None = None  # rank dropout: (O,) 0/1 per output row (channel)

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def _original(self, x, *args, **kwargs):
        return (self._original_forward or type(self.layer).forward.__get__(self.layer))(x, *args, **kwargs)

    def attach(self) -> None:
        if self._original_forward is None:
            self._original_forward = self.layer.__dict__.get("forward")
            self.layer.forward = self.forward

    def detach(self) -> None:
        if self._original_forward is None:
            del self.layer.forward
        else:
            self.layer.forward = self._original_forward
        self._original_forward = None

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """This module's tensors as a LyCORIS file holds them."""
        return {f"{self.name}.{suffix}": getattr(self, suffix).detach().to("cpu", dtype).contiguous()
                for suffix in self.FILE_SUFFIXES if hasattr(self, suffix)}


class LohaModule(_LayerModule):
    """The four (six with Tucker) factors of one layer and the forward that uses them.

    Initialised as lycoris-lora does: b factors N(0, 1), w1_a N(0, 0.1), w2_a zero,
    so ΔW = 0 at step 0 while every factor still gets a gradient.
    """

    FILE_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "dora_scale")

    def __init__(self, name: str, layer: nn.Module, rank: int, alpha: float, tucker: bool,
                 generator: torch.Generator, dora: bool = False):
        super().__init__(name, layer)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        out_dim, in_dim, *kernel = layer.weight.shape
        self.tucker = tucker and math.prod(kernel) > 1
        self.op = _Op.of(layer)
        if self.tucker:
            a_shape, b_shape = (rank, out_dim), (rank, in_dim)
        else:
            a_shape, b_shape = (out_dim, rank), (rank, in_dim * math.prod(kernel))
        normal = lambda shape, std: nn.Parameter(torch.randn(shape, generator=generator) * std)  # noqa: E731
        if self.tucker:
            self.hada_t1 = normal((rank, rank, *kernel), 0.1)
            self.hada_t2 = normal((rank, rank, *kernel), 0.1)
        self.hada_w1_b = normal(b_shape, 1.0)
        self.hada_w1_a = normal(a_shape, 0.1)
        self.hada_w2_b = normal(b_shape, 1.0)
        self.hada_w2_a = nn.Parameter(torch.zeros(a_shape))
        if dora:  # ‖W0‖ per output row, in fp32, shaped (O, 1, …) as LyCORIS stores it
            norm = layer.weight.detach().float().reshape(out_dim, -1).norm(dim=1)
            self.dora_scale = nn.Parameter(norm.reshape(out_dim, *[1] * (layer.weight.dim() - 1)).cpu())
        self.dora = dora

    def factors(self) -> tuple:
        """The factors this step uses: rank dropout scales rows of w1_a, which are rows of ΔW."""
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        w1a = self.hada_w1_a
        if self.row_mask is not None:
            w1a = w1a * (self.row_mask[None, :] if self.tucker else self.row_mask[:, None])
        return (w1a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, t1, t2)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.skip:
            return self._original(x, *args, **kwargs)
        if self.dora:
            return self.op(x, self.dora_weight(), self.layer.bias)
        return loha_layer(x, self.layer, self.factors(), self.scale, self.op)

    def dora_weight(self) -> torch.Tensor:
        """m ⊙ (W0 + s·ΔW) / ‖W0 + s·ΔW‖ (per output row, +eps), as LyCORIS's weight_decompose.

        Plain autograd over one merged weight: the norm needs the whole W0 + ΔW, so DoRA keeps it
        until backward as LyCORIS does (ΔW itself still comes from the factor-only autograd)."""
        weight = self.layer.weight
        merged = weight.to(self.dora_scale.dtype) + scaled_delta(self.factors(), self.scale).reshape(weight.shape)
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(self.dora_scale.shape)
        return (merged * (self.dora_scale / (norm + torch.finfo(merged.dtype).eps))).to(weight.dtype)

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The factors, after the module's alpha (kept in fp32, whatever `dtype`)."""
        return {f"{self.name}.alpha": torch.tensor(self.alpha), **super().file_tensors(dtype)}


class NormModule(_LayerModule):
    """LyCORIS's train_norm on one GroupNorm/LayerNorm: the layer normalises with scale
    W + w_norm and shift b + b_norm, both changes zero at step 0 (no alpha: a file holds the
    changes themselves, as lycoris-lora's NormModule writes them)."""

    FILE_SUFFIXES = ("w_norm", "b_norm")

    def __init__(self, name: str, layer: nn.Module):
        if not isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
            raise LohaError(f"train_norm: {name} is a {type(layer).__name__}, not a GroupNorm or LayerNorm")
        super().__init__(name, layer)
        self.w_norm = nn.Parameter(torch.zeros(layer.weight.shape))
        if layer.bias is not None:
            self.b_norm = nn.Parameter(torch.zeros(layer.bias.shape))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.skip:
            return self._original(x, *args, **kwargs)
        layer = self.layer
        weight = self._changed(layer.weight, self.w_norm)
        bias = self._changed(layer.bias, getattr(self, "b_norm", None))
        if isinstance(layer, nn.GroupNorm):
            return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)

    def _changed(self, original: torch.Tensor | None, change: torch.Tensor | None) -> torch.Tensor | None:
        """original + change (rank dropout: on the channels kept), rounded once to the layer's dtype."""
        if change is None:
            return original
        if self.row_mask is not None:
            change = change * self.row_mask
        return (original.to(change.dtype) + change).to(original.dtype)


class LohaNetwork(nn.Module):
    """Every LoHa module of one model, keyed by file name (and, with ``train_norm``, every norm
    module in `norms`); attach/detach them together."""

    def __init__(self, model: Mapping | nn.Module, spec: NetworkSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        self.names, root = _name_map(model)
        generator = torch.Generator().manual_seed(seed)
        modules = {}
        for target in self.names.targets:
            if not spec.wants(target):
                continue
            if target.rows is not None:
                raise LohaError(f"cannot train {target.key} rows {target.rows}: a fused q/k/v weight "
                                "(OpenCLIP layout); load the text encoder in HF layout")
            layer = _layer(root, target)
            conv = layer.weight.dim() > 2 and math.prod(layer.weight.shape[2:]) > 1
            rank, alpha = (spec.conv_rank, spec.conv_alpha) if conv else (spec.rank, spec.alpha)
            name = self.names.names(target)[0]
            modules[name] = LohaModule(name, layer, rank, alpha, spec.use_tucker, generator, spec.dora_wd)
        if not modules:
            raise LohaError(f"preset {spec.preset!r} selects no layer of this model "
                            f"({len(self.names.targets)} candidates)")
        self.loha = nn.ModuleDict(modules)
        norms = {self.names.names(t)[0]: t for t in self.names.extra_targets if spec.wants_norm(t)}
        self.norms = nn.ModuleDict({name: NormModule(name, _layer(root, t)) for name, t in norms.items()})
        device = next(iter(modules.values())).layer.weight.device
        self.to(device)

    @property
    def family(self) -> str:
        return self.names.family

    def layer_modules(self) -> list[_LayerModule]:
        """The LoHa modules, then the norm modules."""
        return [*self.loha.values(), *self.norms.values()]

    def attach(self) -> "LohaNetwork":
        for module in self.layer_modules():
            module.attach()
        return self

    def detach(self) -> None:
        for module in self.layer_modules():
            module.detach()

    def file_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for module in self.layer_modules():
            out.update(module.file_tensors(dtype))
        return out

    def load_file_tensors(self, tensors: Mapping[str, torch.Tensor], label: str = "network") -> None:
        """Take the factors of a file this network wrote (resume, continue training)."""
        with torch.no_grad():
            for module in self.layer_modules():
                for suffix, param in module.named_parameters():
                    key = f"{module.name}.{suffix}"
                    if key not in tensors:
                        raise LohaError(f"{label}: lacks '{key}' (shape {tuple(param.shape)})")
                    if tuple(tensors[key].shape) != tuple(param.shape):
                        raise LohaError(f"{label}: '{key}' has shape {tuple(tensors[key].shape)}, "
                                        f"this network needs {tuple(param.shape)}")
                    param.copy_(tensors[key])

    def draw_dropout(self, generator: torch.Generator | None) -> None:
        """This step's module and rank dropout (LyCORIS's, drawn from `generator` so a step's
        draw is a function of the run's seed and the step); None turns dropout off (samples).

        Norm modules take both as LyCORIS's NormModule does, rank dropout per channel; each
        channel is kept with probability 1 - rank_dropout, as in every other module
        (lycoris-lora 4.1.3's NormModule alone keeps it with probability rank_dropout)."""
        spec = self.spec
        for module in self.layer_modules():
            module.skip, module.row_mask = False, None
            if generator is None:
                continue
            if spec.module_dropout and torch.rand((), generator=generator) < spec.module_dropout:
                module.skip = True
            elif spec.rank_dropout:
                weight = module.layer.weight
                keep = torch.rand(weight.shape[0], generator=generator) > spec.rank_dropout
                module.row_mask = keep.to(weight.device, torch.float32)

    def counts(self) -> dict[str, int]:
        """LoHa modules per component (unet, te1, te2), and the norm modules (``norms``) if any."""
        out: dict[str, int] = {}
        for target in self.names.targets:
            if self.names.names(target)[0] in self.loha:
                out[target.component] = out.get(target.component, 0) + 1
        if self.norms:
            out["norms"] = len(self.norms)
        return out


def _name_map(model: Mapping | nn.Module) -> tuple[NameMap, nn.Module]:
    """The name map of a model and the module its targets' keys are paths in.

    A mapping of diffusers/transformers parts (``{"unet": …, "text_encoder": …}``) is
    read with `map_modules`; a single module with an LDM-layout state dict (ComfyUI's
    model, a CompVis LatentDiffusion) with `map_state_dict`.
    """
    if isinstance(model, Mapping):
        return map_modules(model), nn.ModuleDict({k: v for k, v in model.items() if isinstance(v, nn.Module)})
    return map_state_dict({k: v.shape for k, v in model.state_dict(keep_vars=True).items()}), model


def _layer(root: nn.Module, target: Target) -> nn.Module:
    """A target's live layer."""
    return root.get_submodule(target.key.removesuffix(".weight"))
