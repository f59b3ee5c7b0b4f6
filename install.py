"""Install the requirements a host lacks, through the host's own Python.

Run by the WebUI at start-up (through its `launch.run_pip`) and by ComfyUI-Manager.
Only missing packages are installed, and never torch: the host owns its torch build.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")


def requirements() -> list[str]:
    with open(REQUIREMENTS, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def missing() -> list[str]:
    """Requirements whose distribution is not installed at all (versions are the host's call)."""
    out = []
    for spec in requirements():
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(spec)
    return out


def main() -> None:
    todo = missing()
    if not todo:
        return
    try:
        import launch  # the WebUI's installer helpers
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *todo])
        return
    for spec in todo:
        launch.run_pip(f'install "{spec}"', f"loha requirement: {spec}")


main()
