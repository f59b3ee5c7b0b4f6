"""The floors of ARCHITECTURE.md, enforced: a module of `loha` imports only its own floor and
those below it, and nothing in `loha` imports a host (ComfyUI, the WebUI, Forge)."""

from __future__ import annotations

import ast
import os

LOHA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "loha")

#: Lowest floor first; a module belongs to the floor of its longest listed prefix.
FLOORS = (
    ("facts", ("loha.errors", "loha.families")),
    ("math", ("loha.delta", "loha.kernels")),
    ("files", ("loha.files",)),
    ("names", ("loha.keys", "loha.models")),
    ("state", ("loha.patch", "loha.bypassing", "loha.keyed", "loha.merge", "loha.merge_records", "loha.convert",
               "loha.summary")),
    ("trainer", ("loha.train",)),
    ("host halves", ("loha.hosts",)),
    ("apps", ("loha.app",)),
    ("package", ("loha", "loha.__main__")),
)
#: Top-level modules of the hosts: ComfyUI's, the WebUI's, Forge's.
HOST_MODULES = {"comfy", "comfy_extras", "folder_paths", "server", "nodes", "execution", "modules", "ldm_patched",
                "backend", "scripts"}


def floor(module: str) -> int:
    best, length = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} is on no floor: add it to FLOORS and to ARCHITECTURE.md"
    return best


def imports():
    """(importing module, imported module) for every import in loha/, relative ones resolved."""
    for folder, _, files in os.walk(LOHA):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(LOHA))[:-3].split(os.sep)
            package = parts[:-1]
            module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield module, alias.name
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = ".".join(package[: len(package) - node.level + 1])
                        targets = [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
                    else:
                        targets = [node.module]
                    for target in targets:
                        yield module, target


ALL = list(imports())


def test_every_module_is_on_a_floor():
    for module, _ in ALL:
        floor(module)


def test_no_module_imports_a_floor_above_its_own():
    upward = [f"{m} ({FLOORS[floor(m)][0]}) imports {t} ({FLOORS[floor(t)][0]})"
              for m, t in ALL if t.split(".")[0] == "loha" and floor(t) > floor(m)]
    assert not upward, upward


def test_the_library_imports_no_host():
    offending = [(m, t) for m, t in ALL if t.split(".")[0] in HOST_MODULES]
    assert not offending, offending
