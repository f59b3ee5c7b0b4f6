"""loha: read, apply, merge and train LoHa (LyCORIS low-rank Hadamard) networks.

    net = loha.load("style.safetensors")
    handle = loha.apply(pipe_or_state_dict, [(net, 0.8, 0.5)])   # UNet 0.8, text encoders 0.5
    handle.restore()                                              # every weight back, bit for bit
    handle = loha.bypass(pipe, [(net, 0.8, 0.5)])                 # in the forward pass, weights untouched
    handle.remove()                                               # every module as it was

The package's map is ARCHITECTURE.md beside it in the repository.
"""

from .errors import FamilyError, FormatError, LohaError, ShapeError, UnmatchedError
from .files.network import Module, Network, from_tensors, load
from .bypassing import BypassHandle, bypass
from .patch import PatchHandle, Use, apply, release_memory

__all__ = [
    "BypassHandle",
    "FamilyError",
    "FormatError",
    "LohaError",
    "Module",
    "Network",
    "PatchHandle",
    "ShapeError",
    "UnmatchedError",
    "Use",
    "apply",
    "bypass",
    "from_tensors",
    "load",
    "release_memory",
]
