"""Hostile values inside well-formed files, bad strengths, broken outputs and misused handles:
each is a clean `LohaError` that names what is wrong and changes nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import hostile as H
import loha
import tiny_models as T
from loha import merge as M
from loha.app.cli import main
from loha.files import safetensors_io
from loha.models.to_ldm import ldm_state_dict


@pytest.fixture(scope="module")
def parts():
    return T.sd1_parts()


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    ckpt = folder / "model.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in ldm_state_dict(parts).items()}, ckpt)
    net = T.make_loha_file(parts, folder / "net.safetensors", seed=1)
    other = T.make_loha_file(parts, folder / "other.safetensors", seed=2)
    return {"ckpt": str(ckpt), "net": net, "other": other, "dir": folder}


def refused_everywhere(parts, ckpt, network_path, match, tmp_path, capsys):
    """`loha.apply` and `loha merge` both refuse the file (matching `match`) and change nothing."""
    before, digest = H.snapshot(parts), H.sha(network_path)
    with pytest.raises(loha.LohaError, match=match):
        loha.apply(parts, str(network_path))
    assert H.unchanged(before, parts)
    out = tmp_path / "merged.safetensors"
    listing = H.listing(tmp_path)
    assert main(["merge", ckpt, "--loha", str(network_path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loha: ") and "Traceback" not in err, err
    assert H.listing(tmp_path) == listing and H.sha(network_path) == digest


# --------------------------------------------------------------------------- full-diff biases


def full_diff(rows: int = 4, cols: int = 4, bias=None):
    tensors = {"lora_unet_conv_in.diff": torch.zeros(32, 4, 3, 3)}
    if bias is not None:
        tensors["lora_unet_conv_in.diff_b"] = bias
    return tensors


@pytest.mark.parametrize("bias, match", [
    (torch.tensor([float("nan")] * 32), "holds NaN or Inf"),
    (torch.tensor([float("inf")] + [0.0] * 31), "holds NaN or Inf"),
    (torch.ones(1), r"diff_b must hold one value per output row, shape \(32,\)"),  # was broadcast
    (torch.ones(31), "diff_b must hold one value per output row"),  # was a RuntimeError
    (torch.ones(4, 8), "diff_b must hold one value per output row"),
])
def test_bad_diff_b(parts, files, tmp_path, capsys, bias, match):
    save_file(full_diff(bias=bias), tmp_path / "bias.safetensors")
    refused_everywhere(parts, files["ckpt"], tmp_path / "bias.safetensors", match, tmp_path, capsys)


def test_diff_b_on_a_layer_without_bias(parts, files, tmp_path, capsys):
    """`patch` raised AttributeError, `merge` dropped the bias and exited 0: both refuse it now."""
    tensors = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff": torch.zeros(32, 32),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.diff_b": torch.ones(32)}
    nobias = T.clip_text(seed=1)
    for layer in nobias.text_model.encoder.layers if hasattr(nobias, "text_model") else nobias.encoder.layers:
        layer.self_attn.q_proj.bias = None
    path = tmp_path / "nobias.safetensors"
    save_file(tensors, path)
    model = {"text_encoder": nobias}
    before = H.snapshot(model)
    with pytest.raises(loha.ShapeError, match="changes a bias, but .*q_proj.weight' has no bias"):
        loha.apply(model, str(path), family="sd1")
    assert H.unchanged(before, model)
    state = {k: v.clone().contiguous() for k, v in ldm_state_dict({"unet": parts["unet"], "text_encoder": nobias}).items()}
    save_file(state, tmp_path / "nobias-model.safetensors")
    assert main(["merge", str(tmp_path / "nobias-model.safetensors"), "--loha", str(path), "-o",
                 str(tmp_path / "out.safetensors")]) == 1
    assert "has no bias" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- LoKr


def test_lokr_size_is_checked_before_delta_is_built(parts, files, tmp_path, capsys, monkeypatch):
    """A 120 KB module whose Kronecker product is ~2 GB: refused from its shapes, ΔW never built."""
    tensors = {"lora_unet_conv_in.lokr_w1_a": torch.ones(15000, 1), "lora_unet_conv_in.lokr_w1_b": torch.ones(1, 15000),
               "lora_unet_conv_in.lokr_w2": torch.ones(2, 2)}
    save_file(tensors, tmp_path / "lokr.safetensors")
    built = []
    monkeypatch.setattr("loha.delta.lokr_delta", lambda *a: built.append(a))
    refused_everywhere(parts, files["ckpt"], tmp_path / "lokr.safetensors", r"makes ΔW of 30000 rows", tmp_path, capsys)
    assert built == []


# --------------------------------------------------------------------------- strengths


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "abc"])
def test_bad_strengths_in_the_library(parts, files, value):
    before = H.snapshot(parts)
    with pytest.raises(loha.LohaError, match="strength"):
        loha.apply(parts, (files["net"], value))
    with pytest.raises(loha.LohaError, match="strength"):
        loha.apply(parts, (files["net"], 1.0, value))
    handle = loha.apply(parts, files["net"])
    with pytest.raises(loha.LohaError, match="strength"):
        handle.set_strengths([value])
    handle.restore()
    assert H.unchanged(before, parts)


@pytest.mark.parametrize("suffix, message", [
    (":nan", "UNet strength is nan; strengths must be finite"),
    (":1:inf", "text-encoder strength is inf"),
    (":abc", "UNet strength 'abc' is not a number"),  # was "no such file"
    (":0.5:abc", "text-encoder strength 'abc' is not a number"),
])
def test_bad_strengths_on_the_command_line(files, tmp_path, capsys, suffix, message):
    assert main(["merge", files["ckpt"], "--loha", files["net"] + suffix, "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert message in err and "net.safetensors" in err
    assert H.listing(tmp_path) == []


def test_fp16_overflow_is_detected_and_names_the_weight(files, tmp_path, capsys):
    """Finite factors and strengths that take an fp16 weight beyond 65504 are refused, naming it."""
    parts = {k: v.half() for k, v in T.sd1_parts().items()}
    tensors = load_file(files["net"])
    tensors["lora_unet_conv_in.hada_w1_a"] *= 1e5
    path = tmp_path / "hot.safetensors"
    save_file(tensors, path)
    before = H.snapshot(parts)
    with pytest.raises(loha.LohaError, match=r"'unet\.conv_in\.weight' would overflow its float16 range with .*hot"):
        loha.apply(parts, (str(path), 40.0))
    assert H.unchanged(before, parts)
    loha.apply(parts, (str(path), 1e-6)).restore()  # the same file at a sane strength is fine
    assert H.unchanged(before, parts)
    state = {k: v.detach().clone().contiguous() for k, v in ldm_state_dict(parts).items()}
    save_file(state, tmp_path / "half.safetensors")
    assert main(["merge", str(tmp_path / "half.safetensors"), "--loha", f"{path}:40", "-o",
                 str(tmp_path / "out.safetensors")]) == 1
    assert "input_blocks.0.0.weight' would overflow its float16 range" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- the command line's output


def test_a_read_only_folder_is_one_line(files, capsys):
    """/proc takes no new files, even from root."""
    assert main(["merge", files["ckpt"], "--loha", files["net"], "-o", "/proc/loha-out.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loha: /proc/loha-out.safetensors: cannot write") and "Traceback" not in err


def test_a_full_disk_is_one_line(files, tmp_path, capsys, monkeypatch):
    def full(self, key, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors_io.Writer, "write", full)
    assert main(["merge", files["ckpt"], "--loha", files["net"], "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "o.safetensors: cannot write (No space left on device); nothing was written" in err
    assert H.listing(tmp_path) == []


def test_two_merges_onto_one_output_never_replace_each_other(files, tmp_path):
    """The second merge to finish finds the name taken (it was free when both started) and fails."""
    out = tmp_path / "out.safetensors"
    second_done = []

    def race(done_bytes, total):
        if done_bytes == total and not second_done:  # the first merge has written everything
            second_done.append(M.merge(files["ckpt"], [(files["other"], 1.0)], out))

    with pytest.raises(loha.LohaError, match="already exists .*nothing was replaced") as info:
        M.merge(files["ckpt"], [(files["net"], 1.0)], out, on_progress=race)
    assert info.value.option == "overwrite"
    assert second_done and H.sha(out) == H.sha(second_done[0].out)
    assert [r["name"] for r in load_metadata_records(out)] == ["other.safetensors"]
    assert H.listing(tmp_path) == ["out.safetensors"]


def load_metadata_records(path):
    import json

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["loha_merged"])


KILLED_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys
    from loha.files import safetensors_io
    from loha.app.cli import main
    safetensors_io.tmpfile_works = lambda folder: sys.argv[1] == "unnamed"
    os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)   # killed between naming and renaming
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("mode", ["unnamed", "named"])
def test_a_kill_before_the_rename_leaves_a_part_the_next_write_removes(files, tmp_path, mode):
    folder = tmp_path / "outdir"
    folder.mkdir()
    out = folder / "out.safetensors"
    out.write_bytes(b"previous")
    if mode == "unnamed" and not safetensors_io.tmpfile_works(str(folder)):
        pytest.skip("no O_TMPFILE here")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BEFORE_RENAME)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), mode, "merge", files["ckpt"], "--loha", files["net"], "-o",
                           str(out), "--force"], env=env, capture_output=True, timeout=300)
    assert done.returncode == -9
    left = [name for name in H.listing(folder) if name != "out.safetensors"]
    assert len(left) == 1 and left[0].startswith(".out.safetensors.") and left[0].endswith(".part")
    assert out.read_bytes() == b"previous"
    assert main(["merge", files["ckpt"], "--loha", files["net"], "-o", str(out), "--force"]) == 0
    assert H.listing(folder) == ["out.safetensors"]  # the dead writer's .part is gone


def test_without_force_the_output_is_never_named_twice(files, tmp_path, monkeypatch):
    """A new output is linked straight to its name: no intermediate name a kill could leave."""
    names = []
    real = os.link

    def recording(src, dst, *args, **kwargs):
        names.append(os.path.basename(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", recording)
    M.merge(files["ckpt"], files["net"], tmp_path / "new.safetensors")
    assert [n for n in names if not n.startswith(".loha-probe")] in ([], ["new.safetensors"])
    assert H.listing(tmp_path) == ["new.safetensors"]


# --------------------------------------------------------------------------- handles and files on disk


def test_restore_in_any_order_is_exact(files):
    model = T.sd1_parts()
    base = H.snapshot(model)
    a = loha.apply(model, (files["net"], 0.7))
    b = loha.apply(model, (files["other"], 0.9, 0.4))
    a.restore()  # older first: was W0 + ΔA left behind
    only_b = T.sd1_parts()
    loha.apply(only_b, (files["other"], 0.9, 0.4))
    assert H.unchanged(H.snapshot(only_b), model)
    a = loha.apply(model, (files["net"], 0.7))
    b.set_strengths([(0.2, 1.0)])  # under a newer handle
    both = T.sd1_parts()
    loha.apply(both, (files["other"], 0.2, 1.0)), loha.apply(both, (files["net"], 0.7))
    assert H.unchanged(H.snapshot(both), model)
    b.restore()
    a.restore()
    assert H.unchanged(base, model)


TRUNCATED = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    import loha, tiny_models as T
    parts = T.sd1_parts()
    net = loha.load(sys.argv[1])
    loha.apply(parts, net).restore()
    os.truncate(sys.argv[1], int(sys.argv[2]))      # cut on disk after the load
    before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    try:
        loha.apply(parts, net)
    except loha.LohaError as exc:
        print("refused:", exc)
    after = parts["unet"].state_dict()
    print("unchanged:", all((before[k] == after[k]).all() for k in before))
""")


def test_a_network_truncated_on_disk_after_load_is_refused(files, tmp_path):
    """Was SIGBUS at the next patch (the file was memory-mapped)."""
    path = tmp_path / "cut.safetensors"
    path.write_bytes(open(files["net"], "rb").read())
    script = tmp_path / "truncated.py"
    script.write_text(TRUNCATED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script), str(path), str(os.path.getsize(path) // 2), tests],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and "changed on disk since it was read" in done.stdout
    assert "unchanged: True" in done.stdout


# --------------------------------------------------------------------------- metadata inspect shows

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("metadata", [
    {"ss_tag_frequency": DEEP},
    {"ss_network_args": '{"a": ' * 100_000 + "1" + "}" * 100_000},
    {"ss_network_args": "[" * 900 + "]" * 900},  # parses, but re-encoding it would exhaust the recursion
    {"ss_tag_frequency": '{"1_x": {"fox": Infinity, "snow": 2}}'},
    {"ss_tag_frequency": '{"1_x": {"fox": NaN, "snow": 2}}'},
    {"ss_tag_frequency": '{"1_x": {"fox": 1e400, "snow": 2}}'},
    {"ss_tag_frequency": '{"1_x": {"fox": true, "snow": 2}}'},
])
def test_hostile_training_metadata_is_shown_without_error(files, tmp_path, capsys, metadata):
    """inspect (and the ComfyUI info route and WebUI cards, which use the same summary) show what
    they can: a value nested beyond reason or a count that is not a finite number is left out."""
    from loha.hosts.webui import card_metadata
    from loha.summary import render, summarize

    path = tmp_path / "meta.safetensors"
    save_file(load_file(files["net"]), path, metadata=metadata)
    summary = summarize(loha.load(path))
    assert summary["top_tags"] in ([], [["snow", 2]])
    json.dumps(summary, allow_nan=False)
    render(summary)
    card_metadata(loha.load(path))
    assert main(["inspect", str(path), "--json"]) == 0 and main(["inspect", str(path)]) == 0
    capsys.readouterr()


def test_a_strength_raised_from_zero_under_a_newer_handle_is_ordered_too(files):
    """A's UNet strength is 0 while B patches the UNet; raising it later still orders A under B."""
    model = T.sd1_parts()
    base = H.snapshot(model)
    a = loha.apply(model, (files["net"], 0.0, 1.0))
    b = loha.apply(model, (files["other"], 1.0, 0.0))
    a.set_strengths([(1.0, 1.0)])  # b is unwound, a applied anew, b applied again on top
    b.restore()
    only_a = T.sd1_parts()
    loha.apply(only_a, (files["net"], 1.0, 1.0))
    assert H.unchanged(H.snapshot(only_a), model)
    a.restore()
    assert H.unchanged(base, model)
