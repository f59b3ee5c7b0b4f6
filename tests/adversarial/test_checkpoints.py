"""Hostile checkpoints: `merge CKPT`, `inspect --against CKPT` and the trainer's checkpoint reader
each answer with one `loha:` line (a `LohaError`), write nothing and change no file.

The checkpoints are a tiny SD1 model's state dict whose header is edited by hand: nesting
no parser survives, numbers JSON allows but no count is (Infinity, 1e400), names and
metadata that are not Unicode, 0-d attention weights, a block numbered in the millions,
a FIFO where a file should be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import hostile as H
import tiny_models as T
from loha.app.cli import main
from loha.merge_records import MERGED_KEY
from loha.models.to_ldm import ldm_state_dict

Q_PROJ = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    parts = T.sd1_parts()
    state = {k: v.detach().clone().contiguous() for k, v in ldm_state_dict(parts).items()}
    network = T.make_loha_file(parts, folder / "net.safetensors")
    return {"state": state, "net": network}


def edited(tiny, path, edit=None, metadata=None, raw_header: bytes | None = None):
    """The tiny checkpoint at `path`, its header object passed through `edit` (or replaced outright)."""
    header, data = H.header_of(tiny["state"], metadata)
    if raw_header is not None:
        return H.raw_safetensors(path, raw_header, data)
    if edit is not None:
        edit(header)
    return H.raw_safetensors(path, json.dumps(header, ensure_ascii=True), data)


def with_tensor(key, dtype, shape, offsets=(0, 4)):
    def edit(header):
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
    return edit


def cli_refuses(capsys, args, *, fragment: str) -> str:
    """`loha ARGS` exits 1 with one `loha: …` line naming `fragment`, and no traceback."""
    code = main(list(map(str, args)))
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loha: ") and fragment in lines[0], err
    return lines[0]


HOSTILE = {
    "nesting 100k deep": dict(raw_header=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "Infinity in a shape": dict(edit=lambda h: h[Q_PROJ].update(shape=[float("inf"), 768])),
    "1e400 in an offset": dict(raw_header=b'{"x.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}'),
    "a dtype that is not a string": dict(edit=with_tensor("x.weight", ["F32"], [1])),
    "a dtype that is a number": dict(edit=with_tensor("x.weight", 7, [1])),
    "a negative dimension": dict(edit=with_tensor("x.weight", "F32", [-1], offsets=(4, 0))),
    "a fractional dimension": dict(edit=with_tensor("x.weight", "F32", [1.5])),
    "a tensor name with a lone surrogate": dict(edit=with_tensor("x\ud800.weight", "F32", [1])),
    "metadata with a lone surrogate": dict(metadata={"modelspec.title": "a\udc80b"}),
    "a 0-d q_proj weight": dict(edit=with_tensor(Q_PROJ, "F32", [])),
    "a 0-d fused in_proj_weight": dict(edit=with_tensor(
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "F32", [])),
    "a q/k/v weight whose rows are not three blocks": dict(edit=with_tensor(
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "F32", [1, 1])),
    "a block numbered 3,000,000": dict(edit=with_tensor("model.diffusion_model.input_blocks.3000000.0.conv.weight",
                                                        "F32", [1, 1])),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_merge_and_inspect_against_refuse_a_hostile_checkpoint(tiny, tmp_path, capsys, case):
    ckpt = edited(tiny, tmp_path / "hostile.safetensors", **HOSTILE[case])
    digest, before = H.sha(ckpt), H.listing(tmp_path)
    out = tmp_path / "out.safetensors"
    started = time.perf_counter()
    cli_refuses(capsys, ["merge", ckpt, "--loha", tiny["net"], "-o", out], fragment="hostile.safetensors")
    cli_refuses(capsys, ["inspect", tiny["net"], "--against", ckpt], fragment="hostile.safetensors")
    assert time.perf_counter() - started < 20  # the millions-numbered block took 21 s and 2 GB per call
    assert H.listing(tmp_path) == before and H.sha(ckpt) == digest


@pytest.mark.parametrize("case", ["nesting 100k deep", "a 0-d q_proj weight", "metadata with a lone surrogate"])
def test_the_trainers_checkpoint_reader_refuses_a_hostile_checkpoint(tiny, tmp_path, case):
    from loha import LohaError
    from loha.train.models import from_checkpoint

    ckpt = edited(tiny, tmp_path / "hostile.safetensors", **HOSTILE[case])
    with pytest.raises(LohaError, match="hostile.safetensors"):
        from_checkpoint(str(ckpt))


def test_a_fifo_is_refused_at_once(tiny, tmp_path):
    """Given to --against (or as the checkpoint) a FIFO would block the reader forever."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    for args in (["inspect", tiny["net"], "--against", fifo], ["merge", fifo, "--loha", tiny["net"], "-o", tmp_path / "o.safetensors"],
                 ["inspect", fifo]):
        done = subprocess.run([sys.executable, "-m", "loha", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 1 and "pipe.safetensors: not a regular file" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert H.listing(tmp_path) == ["pipe.safetensors"]


def test_deep_loha_merged_metadata_is_carried_as_text(tiny, tmp_path, capsys):
    """A merged checkpoint's `loha_merged` record nested beyond any parser is kept as the text it is,
    and this merge's record is added after it."""
    deep = "[" * 50_000 + "]" * 50_000
    ckpt = tmp_path / "merged-before.safetensors"
    save_file(tiny["state"], ckpt, metadata={MERGED_KEY: deep})
    assert main(["merge", str(ckpt), "--loha", tiny["net"], "-o", str(tmp_path / "out.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        records = json.loads(f.metadata()[MERGED_KEY])
    assert records[0] == deep and records[1]["name"] == "net.safetensors"


def test_a_network_for_another_family_is_named_as_such(tiny, tmp_path, capsys):
    xl = T.make_loha_file(T.sdxl_parts(), tmp_path / "xl.safetensors")
    ckpt = tmp_path / "sd1.safetensors"
    save_file(tiny["state"], ckpt)
    line = cli_refuses(capsys, ["merge", ckpt, "--loha", xl, "-o", tmp_path / "o.safetensors"], fragment="xl.safetensors")
    assert "the file is for sdxl models, this model is sd1" in line
    main(["inspect", xl, "--against", str(ckpt)])
    assert "the file is for sdxl models" in capsys.readouterr().out
    assert not (tmp_path / "o.safetensors").exists()
