"""Hostile PEFT folders: every broken config or weights file is a `FormatError` naming it, and a
pattern from a file never runs unbounded (a catastrophically backtracking one is refused in
well under a second instead of taking minutes)."""

from __future__ import annotations

import json
import pickle
import time

import pytest
import torch
from safetensors.torch import save_file

import hostile as H
import loha
import tiny_models as T
from loha.files import peft as lp

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONFIG = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["to_q"]}


def factors(rank=2, out=32, inner=32):
    g = torch.Generator().manual_seed(0)
    return {f"{lp.PEFT_PREFIX}{PATH}.{s}": torch.randn(shape, generator=g) for s, shape in
            (("hada_w1_a", (out, rank)), ("hada_w1_b", (rank, inner)), ("hada_w2_a", (out, rank)),
             ("hada_w2_b", (rank, inner)))}


def folder(tmp_path, config=CONFIG, weights=None, raw_config: str | None = None):
    """A PEFT adapter folder (unet/) with `config` and `weights` (tensors, or bytes written as they are)."""
    unet = tmp_path / "adapter" / "unet"
    unet.mkdir(parents=True)
    (unet / lp.CONFIG_FILE).write_text(raw_config if raw_config is not None else json.dumps(config))
    weights = factors() if weights is None else weights
    if isinstance(weights, bytes):
        (unet / lp.WEIGHTS_FILE).write_bytes(weights)
    else:
        save_file(weights, unet / lp.WEIGHTS_FILE)
    return tmp_path / "adapter"


_parts = {}


def refused(path, match: str):
    """Loading and patching the folder raise `match`; the model and every file are unchanged."""
    files = {p: H.sha(p) for p in path.rglob("*") if p.is_file()}
    parts = _parts.setdefault("sd1", T.sd1_parts())
    before = H.snapshot(parts)
    with pytest.raises(loha.FormatError, match=match):
        loha.apply(parts, loha.load(path))
    assert H.unchanged(before, parts)
    assert all(H.sha(p) == digest for p, digest in files.items())


BAD_CONFIGS = {
    "a list": ("[1, 2, 3]", "the adapter config is a list, not an object"),
    "nested 100k deep": ('{"peft_type": "LOHA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "unreadable adapter config"),
    "not JSON": ("{peft", "unreadable adapter config"),
    "peft_type a list": (json.dumps({**CONFIG, "peft_type": ["LOHA"]}), r"a PEFT \"\['LOHA'\]\" adapter, not LOHA"),
    "alpha 'abc'": (json.dumps({**CONFIG, "alpha": "abc"}), "alpha is 'abc'; it must be a finite number"),
    "alpha null": (json.dumps({**CONFIG, "alpha": None}), "alpha is 'None'; it must be a finite number"),
    "alpha Infinity": ('{"peft_type": "LOHA", "r": 2, "alpha": Infinity}', "alpha is 'inf'"),
    "r 0": (json.dumps({**CONFIG, "r": 0}), "r is '0'; it must be a positive integer"),
    "r 2.5": (json.dumps({**CONFIG, "r": 2.5}), "r is '2.5'; it must be a positive integer"),
    "an invalid regex": (json.dumps({**CONFIG, "rank_pattern": {"(unclosed": 2}}), r"pattern '\(unclosed' is not a regular expression"),
    "patterns that are a list": (json.dumps({**CONFIG, "alpha_pattern": ["to_q", 2]}), "alpha_pattern is a list, not an object"),
    "a pattern value 'abc'": (json.dumps({**CONFIG, "alpha_pattern": {"to_q": "abc"}}), r"alpha_pattern\['to_q'\] is 'abc'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs(tmp_path, case):
    raw, match = BAD_CONFIGS[case]
    refused(folder(tmp_path, raw_config=raw), f"adapter_config.json.*{match}" if "adapter config" not in match else match)


BAD_WEIGHTS = {
    "a pickle": (pickle.dumps({"x": 1}, protocol=4), "is a pickle"),
    "empty": (b"", "too short"),
    "a header claiming 2^63 bytes": ((2**63).to_bytes(8, "little") + b"{}", "header claims"),
    "a 0-d factor": ({**factors(), f"{lp.PEFT_PREFIX}{PATH}.hada_w1_b": torch.tensor(1.0)}, "no 2-D hada_w1_b"),
    "a 1-D factor": ({**factors(), f"{lp.PEFT_PREFIX}{PATH}.hada_w1_a": torch.ones(32)}, "hada_w1_a must be 2-D"),
    "a rank the config does not say": (factors(rank=3), "the config says rank 2"),
    "a factor that is not LoHa": ({**factors(), f"{lp.PEFT_PREFIX}{PATH}.lora_A.weight": torch.ones(2, 2)}, "not a LoHa factor"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights(tmp_path, case):
    weights, match = BAD_WEIGHTS[case]
    refused(folder(tmp_path, weights=weights), match)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_backtracking_pattern_is_stopped(tmp_path, field):
    """Patterns from files run under the regex engine's time limit: `(a+)+b`, which backtracks
    for ~45 s in Python's re against a 30-character path, ends at once, and one that backtracks
    even there is refused within about a second."""
    long_path = "a" * 40 + "x" * 40
    started = time.perf_counter()
    assert lp.pattern_value({"(a+)+b": 2}, long_path, 1) == 1
    assert time.perf_counter() - started < 1
    evil = "(a|aa)+c" if field == "rank_pattern" else "((a|aa)+)+c"
    config = {**CONFIG, field: {evil: 2}}
    started = time.perf_counter()
    with pytest.raises(loha.FormatError, match="catastrophic backtracking"):
        lp.pattern_value({evil: 2}, long_path, 1)
    assert time.perf_counter() - started < 3
    net = loha.load(folder(tmp_path, config=config))  # against the folder's real paths it simply misses
    assert net.modules


def test_two_adapters_for_one_part_are_refused(tmp_path):
    root = folder(tmp_path)
    other = root / "text_encoder_one"
    other.mkdir()
    for name in (lp.CONFIG_FILE, lp.WEIGHTS_FILE):
        (other / name).write_bytes((root / "unet" / name).read_bytes())
    (root / "text_encoder").mkdir()
    for name in (lp.CONFIG_FILE, lp.WEIGHTS_FILE):
        (root / "text_encoder" / name).write_bytes((root / "unet" / name).read_bytes())
    with pytest.raises(loha.FormatError, match="two adapters for text_encoder"):
        loha.load(root)


def test_diffusers_file_with_hostile_adapter_metadata(tmp_path):
    tensors = {f"unet.{PATH}.{s}": t for s, t in ((k.rsplit(".", 1)[1], v) for k, v in factors().items())}
    for metadata, match in ((json.dumps({"unet.peft_type": "LOHA", "unet.r": "x"}), "r is 'x'"),
                            ("[" * 50_000, "lora_adapter_metadata is not JSON"),
                            (json.dumps(["unet.r", 2]), "not a JSON object")):
        save_file(tensors, tmp_path / lp.DIFFUSERS_WEIGHTS_FILE, metadata={lp.DIFFUSERS_CONFIG_KEY: metadata})
        with pytest.raises(loha.FormatError, match=match):
            loha.load(tmp_path)
