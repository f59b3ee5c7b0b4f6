"""ComfyUI nodes: thin translations of sockets and widgets into calls into loha.

Each module in NODE_MODULES lists its nodes as NODES = {class name: (class, display
name)}; registering a new module is adding its name there.
"""

from importlib import import_module

NODE_MODULES = ("loaders", "blocks", "save", "info", "train")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _name in NODE_MODULES:
    for _class_name, (_cls, _display) in import_module(f".{_name}", __name__).NODES.items():
        NODE_CLASS_MAPPINGS[_class_name] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_class_name] = _display
