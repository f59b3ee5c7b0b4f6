"""Names: which weight of a model a network file's module name means, and block ids.

- `namemap`: the name map, built forward from a model (state dict or modules);
- `unet`: the SD UNet's diffusers and LDM paths, and its block ids;
- `text`: text-encoder layouts (HF CLIP, OpenCLIP's fused q/k/v) and where they sit;
- `blocks`: per-block strengths in the LoRA Block Weight notation.

The family facts all of them use are `loha.families`'.
"""

from .namemap import NameMap, Target, bias_key, map_modules, map_state_dict
from .unet import unet_key_map

__all__ = ["NameMap", "Target", "bias_key", "map_modules", "map_state_dict", "unet_key_map"]
