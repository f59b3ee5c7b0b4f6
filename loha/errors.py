"""One exception family for everything the library refuses.

Messages name the file, the key and the shapes involved, so a host can show them
to a user as they are (ComfyUI and the WebUI turn them into their own UI errors,
the CLI prints them without a traceback). They never name a host's controls: where
an argument of the call would have accepted what was refused, `option` names that
argument (``"overwrite"``, ``"allow_unmatched"``, ``"tokenizer"``) and each front end
says it in its own words (the CLI: ``pass --force``).
"""

from __future__ import annotations


class LohaError(Exception):
    """Base of every error loha raises on purpose."""

    def __init__(self, message: str, *, option: str | None = None):
        super().__init__(message)
        self.option = option


class FormatError(LohaError):
    """A network file is unreadable, malformed, or holds tensors that disagree."""


class FamilyError(LohaError):
    """A network made for another model family (an SDXL file on an SD1.x model, …)."""


class ShapeError(LohaError):
    """A module's ΔW does not fit the weight its name maps to."""


class UnmatchedError(LohaError):
    """Names in a network match no weight of the model (listed in ``names``)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message, option="allow_unmatched")
        self.names = names
