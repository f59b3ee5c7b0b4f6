"""File names that come from the browser, resolved only ever inside the model folders.

A name is a path relative to one of the folders ComfyUI lists networks from (as its
file lists show them, ``/`` or ``\\`` between parts). Absolute names, drive letters,
``..`` parts and NUL bytes are refused outright (HTTP 400); a name whose real path
(symlinks followed) is not a file inside the folder it was looked up in is not
found (404), so a symlink that leads out of the folder serves nothing. Names arrive
URL-decoded once by the server; a still-encoded ``%2e%2e`` is then a literal file
name, which does not exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from loha.hosts.safepaths import real_file_inside

#: Preview images beside a network file, in the order they are looked for.
PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg",
                    ".preview.webp", ".webp")
#: Content type of each preview suffix.
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class Refused(Exception):
    """A name the routes must not serve; `status` is the HTTP status to answer with."""

    status = 400


class NotFound(Refused):
    status = 404


def _parts(name: str) -> list[str]:
    if not name or "\x00" in name or os.path.isabs(name) or _DRIVE.match(name) or name[0] in "/\\":
        raise Refused(f"not a relative file name: {name!r}")
    parts = _SEPARATORS.split(name)
    if any(part in ("", ".", "..") for part in parts):
        raise Refused(f"empty, '.' or '..' part in {name!r}")
    return parts


def resolve(name: str, roots: Iterable[str]) -> str:
    """The real path of the file `name` inside one of `roots` (first match wins)."""
    parts = _parts(name)
    for root in roots:
        found = real_file_inside(os.path.join(root, *parts), [root])
        if found:
            return found
    raise NotFound(f"no such file: {name!r}")


def preview(name: str, roots: Iterable[str]) -> str | None:
    """The real path of the preview image of network file `name`, or None.

    ``style.safetensors`` looks for ``style.preview.png``, ``style.png``, … beside it,
    under the same rules as `resolve` (a preview is never looked for outside).
    """
    roots = list(roots)
    stem = os.path.splitext(name)[0]
    _parts(stem)
    for suffix in PREVIEW_SUFFIXES:
        try:
            return resolve(stem + suffix, roots)
        except NotFound:
            continue
    return None


def relative_to_roots(message: str, roots: Iterable[str]) -> str:
    """`message` with the model folders' paths taken out, so files are named as the browser
    knows them (relative to their folder) and no server path leaves the machine."""
    for root in roots:
        for form in {os.path.abspath(root), os.path.realpath(root)}:
            message = message.replace(form.rstrip(os.sep) + os.sep, "").replace(form, "<loras>")
    return message


def content_type(path: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
