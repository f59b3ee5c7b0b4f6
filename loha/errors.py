"""One exception family for everything the library refuses.

Messages name the file, the key and the shapes involved, so a host can show them
to a user as they are (ComfyUI and the WebUI turn them into their own UI errors,
the CLI prints them without a traceback).
"""


class LohaError(Exception):
    """Base of every error loha raises on purpose."""


class FormatError(LohaError):
    """A network file is unreadable, malformed, or holds tensors that disagree."""


class ShapeError(LohaError):
    """A module's ΔW does not fit the weight its name maps to."""


class UnmatchedError(LohaError):
    """Names in a network match no weight of the model (listed in ``names``)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names
