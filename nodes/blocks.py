"""LoHa Block Weights: per-block strengths for the loaders, in the WebUI's notation."""

from __future__ import annotations

from loha.keys import blocks
from loha.errors import LohaError

from .loaders import CATEGORY

NO_PRESET = "none"
#: Families a spec is checked against before the model is known (the loader checks the real one).
CHECKED_FAMILIES = ("sd1", "sdxl")


def spec_of(preset: str, weights: str) -> str:
    """The block-weight spec the loaders get: the comma list if given, else the preset."""
    return weights.strip() or ("" if preset == NO_PRESET else preset)


class LohaBlockWeights:
    DESCRIPTION = ("Per-block strengths for LoHa loaders: a preset or a comma list as in the WebUI "
                   "LoRA Block Weight extension (SD1/SD2: 17 or 26 values, SDXL: 12 or 20; BASE first).")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("LOHA_BLOCKS",)
    OUTPUT_TOOLTIPS = ("Block weights for the blocks input of a LoHa loader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "preset": ([NO_PRESET] + blocks.preset_names(), {
                    "tooltip": "A named preset (the extension's: ALL, INS, IND, INALL, MIDD, OUTD, OUTS, "
                               "OUTALL, …); used when weights is empty."}),
                "weights": ("STRING", {"default": "", "multiline": False, "tooltip": (
                    "Comma list of multipliers, BASE (text encoder) first, e.g. "
                    "1,0,0,0,0,1,1,1,1,1,1,1,0,0,0,0,0 for SD1.x; overrides the preset. Blocks a short "
                    "list leaves out get 0, as in the extension.")}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, preset, weights):
        spec = spec_of(preset, weights)
        errors = []
        for family in CHECKED_FAMILIES:
            try:
                blocks.parse(spec, family)
                return True
            except LohaError as exc:
                errors.append(str(exc))
        return " / ".join(errors)

    def build(self, preset, weights):
        return (spec_of(preset, weights),)


NODES = {"LohaBlockWeights": (LohaBlockWeights, "LoHa Block Weights")}
