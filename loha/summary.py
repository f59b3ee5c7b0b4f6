"""What a network file holds, as a plain dict and as text.

`summarize(network)` reads only names, shapes and metadata (never the factors), so it
is cheap enough for file lists; `render(summary)` turns it into the text `loha inspect`
prints. `against(network, checkpoint)` says which names match nothing in a checkpoint
(only the checkpoint's header is read). The ComfyUI info node and the WebUI cards use
the same dict.
"""

from __future__ import annotations

import math
import os
from collections import Counter

from .errors import LohaError
from .families import FAMILY_NAMES, component_of
from .files.checkpoint import checkpoint_shapes
from .files.network import Network, parse_json_metadata
from .keys import map_state_dict
from .patch import Use, plan_modules

#: Training metadata worth showing: summary key -> metadata key (kohya / modelspec).
TRAINING_KEYS = {
    "network_module": "ss_network_module",
    "network_dim": "ss_network_dim",
    "network_alpha": "ss_network_alpha",
    "base_model": "ss_base_model_version",
    "sd_model_name": "ss_sd_model_name",
    "output_name": "ss_output_name",
    "resolution": "ss_resolution",
    "epochs": "ss_num_epochs",
    "steps": "ss_max_train_steps",
    "steps_trained": "ss_steps",
    "images": "ss_num_train_images",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "started_at": "ss_training_started_at",
    "finished_at": "ss_training_finished_at",
    "title": "modelspec.title",
    "architecture": "modelspec.architecture",
}
#: Training keys that hold Unix seconds (kohya writes them so), shown as local dates.
DATE_KEYS = ("started_at", "finished_at")
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
PART_ORDER = ("unet", "te1", "te2", "te3", "other")
TOP_TAGS = 10


def readable_date(value: str) -> str:
    """Unix seconds as "YYYY-MM-DD HH:MM:SS" local time; anything else as it is."""
    import time

    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(value)))
    except (ValueError, OverflowError, OSError):
        return value


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _counts(values) -> dict[str, int]:
    """Value -> count, keys as strings (JSON-safe), in increasing value order."""
    counter = Counter(values)
    ordered = sorted(counter, key=lambda v: (v is None, v if v is not None else 0))
    return {_shown(v) if not isinstance(v, str) else v: counter[v] for v in ordered}


def top_tags(metadata: dict[str, str], n: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent caption tags over all datasets of `ss_tag_frequency`."""
    freq = parse_json_metadata(metadata, "ss_tag_frequency")
    total: Counter = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)):
                        total[str(tag).strip()] += int(count)
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def summarize(network: Network) -> dict:
    """Family, parts, module kinds, ranks, alphas, Tucker/DoRA, dtypes, size, training metadata."""
    modules = list(network.modules.values())
    by_part: Counter = Counter()
    kinds: dict[str, Counter] = {}
    for m in modules:
        part = component_of(m.name) or "other"
        by_part[part] += 1
        kinds.setdefault(part, Counter())[m.kind] += 1
    order = [p for p in PART_ORDER if p in by_part]
    meta = network.metadata
    training = {key: meta[src] for key, src in TRAINING_KEYS.items() if meta.get(src)}
    for key in DATE_KEYS:
        if key in training:
            training[key] = readable_date(training[key])
    args = parse_json_metadata(meta, "ss_network_args")
    if isinstance(args, dict):
        training["network_args"] = args
    path = network.path
    return {
        "file": path,
        "name": network.name,
        "size_bytes": os.path.getsize(path) if path and os.path.isfile(path) else None,
        "family": network.family,
        "text_encoders": sorted(network.text_encoders),
        "module_count": len(modules),
        "modules_by_part": {p: by_part[p] for p in order},
        "kinds": {p: dict(sorted(kinds[p].items())) for p in order},
        "ranks": _counts(m.rank for m in modules),
        "alphas": _counts(m.alpha for m in modules),
        "tucker": sum(m.tucker for m in modules),
        "dora": sum(m.dora for m in modules),
        "dtypes": sorted(network.dtypes()),
        "params": sum(math.prod(s) for m in modules for s in m.shapes.values()),
        "unknown_keys": list(network.unknown_keys),
        "training": training,
        "top_tags": [list(t) for t in top_tags(meta)],
        "hashes": {k: meta[k] for k in HASH_KEYS if meta.get(k)},
    }


def against(network: Network, checkpoint: str | os.PathLike) -> dict:
    """Which of the network's names match nothing in `checkpoint` (its header only is read).

    "error" holds the first shape disagreement, if any (a merge would refuse it).
    """
    checkpoint = os.fspath(checkpoint)
    names = map_state_dict(checkpoint_shapes(checkpoint))
    unmatched = [name for name in network.modules if names.lookup(name) is None]
    error = None
    try:
        plan_modules(names, [Use(network)])
    except LohaError as exc:
        error = str(exc)
    return {
        "checkpoint": checkpoint,
        "family": names.family,
        "matched": len(network.modules) - len(unmatched),
        "unmatched": unmatched,
        "error": error,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "in memory"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _parts_phrase(by_part: dict[str, int]) -> str:
    """"the diffusion model (20) and text encoders te1 (6), te2 (6)" for a module count per part."""
    phrases = []
    if "unet" in by_part:
        phrases.append(f"the diffusion model ({by_part['unet']})")
    encoders = [f"{part} ({n})" for part, n in by_part.items() if part.startswith("te")]
    if encoders:
        phrases.append(f"text encoder{'s' if len(encoders) > 1 else ''} {', '.join(encoders)}")
    if "other" in by_part:
        phrases.append(f"names of no known part ({by_part['other']})")
    return " and ".join(phrases) or "no parts"


def _listed(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counts.items()) or "none"


def render(summary: dict, against_result: dict | None = None) -> str:
    """The text `loha inspect` prints for a summary (and an `against` result)."""
    s = summary
    family = s["family"]
    lines = [f"{s['file'] or s['name']}  ({_size(s['size_bytes'])}, {', '.join(s['dtypes']) or 'no tensors'})"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<15} {text}")

    if family:
        row("family", f"{family} ({FAMILY_NAMES.get(family, family)})")
    else:
        row("family", f"unknown: {s['module_count']} modules over {_parts_phrase(s['modules_by_part'])}")
    parts = ", ".join(
        f"{part} {n}" + ("" if set(s["kinds"][part]) == {"loha"} else
                         " [" + ", ".join(f"{k} {c}" for k, c in s["kinds"][part].items()) + "]")
        for part, n in s["modules_by_part"].items()
    )
    all_kinds = sorted({k for kinds in s["kinds"].values() for k in kinds})
    row("modules", f"{s['module_count']} {'/'.join(all_kinds) or ''}: {parts}".replace(" :", ":"))
    row("text encoders", ", ".join(s["text_encoders"]) or "none")
    row("rank", _listed(s["ranks"]))
    row("alpha", _listed(s["alphas"]))
    row("tucker / dora", f"{s['tucker']} / {s['dora']} modules")
    row("parameters", f"{s['params']:,}")
    t = dict(s["training"])
    if t:
        args = t.pop("network_args", None)
        row("training", " · ".join(f"{k.replace('_', ' ')} {v}" for k, v in t.items()))
        if args:
            row("network args", " ".join(f"{k}={v}" for k, v in args.items()))
    if s["top_tags"]:
        row("top tags", ", ".join(f"{tag} ({n})" for tag, n in s["top_tags"]))
    for key, value in s["hashes"].items():
        row(key, value)
    if s["unknown_keys"]:
        shown = ", ".join(s["unknown_keys"][:10]) + (" …" if len(s["unknown_keys"]) > 10 else "")
        row("unknown keys", f"{len(s['unknown_keys'])}: {shown}")
    if against_result is not None:
        a = against_result
        lines.append(f"against {a['checkpoint']} ({a['family'] or 'family unknown'}): "
                     f"{a['matched']} of {s['module_count']} names match")
        if a["unmatched"]:
            lines.append(f"  {len(a['unmatched'])} match nothing:")
            lines += [f"    {name}" for name in a["unmatched"]]
        if a["error"]:
            lines.append(f"  error: {a['error']}")
    return "\n".join(lines)
