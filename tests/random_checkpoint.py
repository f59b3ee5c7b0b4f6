"""Full-size checkpoints of seeded random weights, for tests and benchmarks (nothing downloaded).

The bench scripts import this too (they put the repository on sys.path).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from loha.families import checkpoint_parts
from loha.models.configs import PUBLISHED
from loha.models.structures import build_part
from loha.models.to_ldm import Source, constant, ldm_plan, source_dtype, write_planned


def random_checkpoint(path, family: str = "sd1", seed: int = 0, dtype: torch.dtype = torch.float16,
                      vae: bool = True, metadata: Mapping | None = None, configs: Mapping | None = None) -> str:
    """A checkpoint of ``family`` (its published configs, or ``configs`` per part) with seeded
    random weights, written tensor by tensor.

    Initialised like fresh modules (norms 1/0, embeddings N(0, 0.02), linear and
    conv weights and biases U(±1/√fan_in)) so activations stay finite in fp16.
    Nothing but the tensor being written is held in memory.
    """
    configs = configs or PUBLISHED[family]
    with torch.device("meta"):
        modules = {attr: build_part(attr, configs[attr]) for attr, part in checkpoint_parts(family).items()
                   if vae or part.kind != "vae"}
    sources = ldm_plan({attr: {k: v.shape for k, v in m.state_dict().items()} for attr, m in modules.items()}, family)
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str) -> torch.Tensor:
        source = sources[key]
        if not source.keys:
            return constant(source, dtype)
        module = modules[source.part].get_submodule(source.keys[0].rpartition(".")[0])
        return _random_like(module, source.keys[0].rpartition(".")[2], source.shape, dtype, generator)

    def entry_dtype(source: Source) -> torch.dtype:
        return source_dtype(source, dtype)

    write_planned(path, sources, entry_dtype, tensor, metadata)
    return os.fspath(path)


def _random_like(module: torch.nn.Module, param: str, shape: tuple, dtype, generator) -> torch.Tensor:
    """Drawn directly in ``dtype`` (twice as fast as float32 and a cast, for fp16)."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        return (torch.ones if param == "weight" else torch.zeros)(shape, dtype=dtype)
    if isinstance(module, torch.nn.Embedding):
        return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)
    weight = module.weight  # Linear / Conv: fan_in from the module's own weight
    bound = 1.0 / math.sqrt(max(1, math.prod(weight.shape[1:])))
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=generator)
