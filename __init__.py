"""ComfyUI entry point of the loha node pack (the library itself is the `loha` package).

ComfyUI imports this file as a package under a name of its own, with nothing of the
repository on sys.path. So the nodes are imported only inside ComfyUI (importing
this anywhere else, as pytest may, gives empty mappings), and the `loha` package
beside this file is made importable as ``loha`` first, unless that name already
is this very package (an editable install).
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./js"
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
CORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loha")


def _inside_comfyui() -> bool:
    return "comfy.model_patcher" in sys.modules and "folder_paths" in sys.modules


def _import_core() -> None:
    """Make ``import loha`` give the core next to these nodes."""
    found = importlib.util.find_spec("loha")
    if found is not None and found.origin and os.path.dirname(os.path.realpath(found.origin)) == os.path.realpath(CORE):
        return
    spec = importlib.util.spec_from_file_location("loha", os.path.join(CORE, "__init__.py"),
                                                  submodule_search_locations=[CORE])
    module = importlib.util.module_from_spec(spec)
    sys.modules["loha"] = module
    spec.loader.exec_module(module)


if _inside_comfyui():
    _import_core()
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import host as _host
    from .nodes.routes import register as _register_routes

    _register_routes(_host.server_routes())

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
