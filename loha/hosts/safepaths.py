"""Whether a path a browser named is a file inside the model folders, symlinks followed.

Both hosts serve preview images by path; the check is made on real paths, so `..`
parts, absolute paths elsewhere and symlinks that lead out of a folder all fail it,
while a model folder that is itself a symlink still works.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def real_file_inside(path: str, roots: Iterable[str]) -> str | None:
    """The real path of `path` if it is a file whose real path lies inside one of `roots`' real paths."""
    if not path or "\x00" in path:
        return None
    candidate = os.path.realpath(path)
    if not os.path.isfile(candidate):
        return None
    for root in roots:
        real_root = os.path.realpath(root)
        if candidate != real_root and os.path.commonpath([candidate, real_root]) == real_root:
            return candidate
    return None
