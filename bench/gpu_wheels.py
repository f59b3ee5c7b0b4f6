"""Install, from a folder of wheels and without any index, the packages this Python lacks.

    python3 bench/gpu_wheels.py --wheels bench/wheels --target DIR

For `bench/gpu.sh` on a machine that reaches no package registry: every distribution with
a wheel in the folder that this Python cannot find (on its path plus DIR) is installed into
DIR (`pip install --no-deps --no-index --target`; without pip, the wheel is unpacked, which
is what installing a pure-Python wheel amounts to). Of several wheels of one distribution
(Pillow's per Python version) the one whose tags this interpreter accepts best is taken.
Nothing already installed is replaced, unless a package installed here requires a version
it does not satisfy and the folder has one that does. Put DIR on PYTHONPATH afterwards.

pip's own resolver cannot do this job: with `--no-deps` it installs what it is told, and
without it, it would want an index for everything already installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def best_wheels(folder: Path) -> dict[str, tuple[Version, Path]]:
    """Per distribution, its newest wheel in `folder` that this interpreter can install."""
    rank = {tag: i for i, tag in enumerate(sys_tags())}  # earlier is better
    best: dict[str, tuple[Version, int, Path]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        fit = min((rank[t] for t in tags if t in rank), default=None)
        if fit is None:
            continue
        key = canonicalize_name(name)
        if key not in best or (version, -fit) > (best[key][0], -best[key][1]):
            best[key] = (version, fit, path)
    return {k: (v, p) for k, (v, _, p) in best.items()}


def installed(target: Path) -> dict[str, Version]:
    """Distributions visible to this interpreter with `target` first on its path."""
    found: dict[str, Version] = {}
    for dist in md.distributions(path=[str(target), *sys.path]):
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in found:
            found[name] = Version(dist.version)
    return found


def install(wheel: Path, target: Path) -> str:
    """Install one wheel into `target`: pip when it is there, else unpack it."""
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode == 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--no-compile", "--disable-pip-version-check", "--upgrade", "--target", str(target),
                        str(wheel)], check=True, env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
        return "pip"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return "unpacked (no pip)"


def unmet(target: Path, names: set[str]) -> list[tuple[str, Requirement]]:
    """(distribution, requirement) pairs of `names` that the installed versions do not satisfy."""
    have = installed(target)
    out = []
    seen = set()
    for dist in md.distributions(path=[str(target), *sys.path]):
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name not in names or name in seen:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            got = have.get(canonicalize_name(req.name))
            if got is None or not req.specifier.contains(got, prereleases=True):
                out.append((name, req))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True)
    args = p.parse_args(argv)
    args.target.mkdir(parents=True, exist_ok=True)
    wheels = best_wheels(args.wheels)
    if not wheels:
        print(f"no installable wheels in {args.wheels} (see bench/gpu.sh: fetch)")
        return 1
    have = installed(args.target)
    ours: set[str] = set()
    for name, (version, path) in sorted(wheels.items()):
        if name in have:
            print(f"  present    {name} {have[name]}")
            continue
        how = install(path, args.target)
        ours.add(name)
        print(f"  installed  {name} {version} ({how})")
    for _ in range(3):  # a package installed here may need a newer one than the machine has
        fixes = [(n, r) for n, r in unmet(args.target, ours)
                 if canonicalize_name(r.name) in wheels
                 and r.specifier.contains(wheels[canonicalize_name(r.name)][0], prereleases=True)
                 and canonicalize_name(r.name) not in ours]
        if not fixes:
            break
        for name, req in fixes:
            dep = canonicalize_name(req.name)
            version, path = wheels[dep]
            how = install(path, args.target)
            ours.add(dep)
            print(f"  installed  {dep} {version} ({how}; {name} requires {req})")
    missing = unmet(args.target, ours)
    for name, req in missing:
        print(f"  unmet      {name} requires {req}")
    print(f"{len(ours)} installed into {args.target}; {len(missing)} requirements unmet (by the metadata: "
          f"whether the code runs is what the steps after this one show)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
