"""LoHa Info: what a network file holds, as the text `loha inspect` prints."""

from __future__ import annotations

import loha
from loha.summary import render, summarize

from . import host
from .loaders import CATEGORY, lora_in


def summary_text(path: str) -> str:
    return render(summarize(loha.load(path)))


class LohaInfo:
    DESCRIPTION = "Shows a LoHa file's family, modules, rank/alpha, training metadata and top tags."
    CATEGORY = CATEGORY
    FUNCTION = "info"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    OUTPUT_TOOLTIPS = ("The summary as text.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": lora_in()}}

    def info(self, lora_name):
        text = summary_text(host.lora_path(lora_name))
        return {"ui": {"text": [text]}, "result": (text,)}


NODES = {"LohaInfo": (LohaInfo, "LoHa Info")}
