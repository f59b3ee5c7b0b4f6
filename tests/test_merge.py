"""The streaming merge: equal to `loha.patch` on the same state dict, safe with files.

The reference for every merged file is `loha.patch` applied to the checkpoint's state
dict in memory: bit for bit for fp32, and for fp16/bf16 outputs the fp32 result
rounded once.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loha
import tiny_models as T
from loha import merge as M
from loha.app.specs import parse_spec
from loha.merge_records import MERGED_KEY
from loha.files import safetensors_io
from loha.models.to_ldm import ldm_state_dict


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def patched(state, networks, dtype=None):
    """The reference: loha.patch on an fp32 copy of `state`, rounded once to `dtype`."""
    work = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    handle = loha.apply(work, networks)
    assert handle.unmatched == {}
    out = {}
    for k, v in work.items():
        target = dtype if dtype is not None else state[k].dtype
        out[k] = v.to(target) if v.is_floating_point() else v
    return out


def ldm_checkpoint(parts) -> dict:
    """The LDM checkpoint state dict of tiny diffusers parts (own memory, contiguous)."""
    return {k: v.detach().clone().contiguous() for k, v in ldm_state_dict(parts).items()}


def assert_same(merged: dict, expected: dict):
    assert merged.keys() == expected.keys()
    for k in expected:
        assert merged[k].dtype == expected[k].dtype, k
        assert torch.equal(merged[k], expected[k]), k


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 checkpoint (fp32, LDM layout) and two LyCORIS networks for it."""
    d = tmp_path_factory.mktemp("sd1")
    parts = T.sd1_parts()
    state = ldm_checkpoint(parts)
    ckpt = str(d / "model.safetensors")
    save_file(state, ckpt, metadata={"modelspec.title": "tiny", "format": "pt"})
    plain = T.make_loha_file(parts, d / "plain.safetensors", seed=1)
    tucker = T.make_loha_file(parts, d / "tucker.safetensors", seed=2, use_tucker=True, dora_wd=True,
                              alpha=1.0, conv_alpha=8.0)
    return {"dir": d, "state": state, "ckpt": ckpt, "plain": plain, "tucker": tucker, "parts": parts}


def test_writer_is_byte_identical_to_the_reference(tmp_path):
    tensors = {"b": torch.randn(3, 5).half(), "a": torch.randn(2, 3), "c": torch.arange(5), "d": torch.randn(7).bfloat16(),
               "e": torch.tensor(1.5), "f": torch.zeros(0, 3), "g": torch.tensor([True, False, True]),
               "h": torch.randn(4, 4)[:, 1]}  # non-contiguous
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors")
    safetensors_io.save(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # With metadata the reference orders its keys by hash (differently per process): compare parsed.
    meta = {"z": "1", "ü": "é", "a": json.dumps({"x": [1, 2]})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata=meta)
    safetensors_io.save(tensors, tmp_path / "ours.safetensors", metadata=meta)
    for name in ("ref", "ours"):
        with safetensors_io.Reader(tmp_path / f"{name}.safetensors") as r:
            assert r.metadata == meta
            for k in tensors:
                assert torch.equal(r.read(k), tensors[k]) and r.read(k).dtype == tensors[k].dtype
    ours, _ = read(tmp_path / "ours.safetensors")
    assert all(torch.equal(ours[k], tensors[k]) for k in tensors)  # read back by safetensors itself


def test_reader_refuses_bad_headers(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x02")
    (tmp_path / "huge").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    save_file({"a": torch.zeros(100)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    for name in ("short", "huge", "cut.safetensors"):
        with pytest.raises(loha.FormatError, match=name):
            safetensors_io.Reader(tmp_path / name)


def test_fp32_merge_equals_patch_bit_for_bit(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    nets = [(sd1["plain"], 0.7, 0.3), (sd1["tucker"], 1.0)]
    before = sha256(sd1["ckpt"]), sha256(sd1["plain"]), sha256(sd1["tucker"])
    result = M.merge(sd1["ckpt"], nets, out)
    merged, meta = read(out)
    assert_same(merged, patched(sd1["state"], nets))
    assert (sha256(sd1["ckpt"]), sha256(sd1["plain"]), sha256(sd1["tucker"])) == before  # inputs untouched
    assert result.streamed and result.unmatched == {} and result.tensors == len(sd1["state"])
    assert len(result.changed) == len(set(result.changed)) > 100
    changed = {k for k in merged if not torch.equal(merged[k], sd1["state"][k])}
    assert changed == set(result.changed)  # every planned tensor changed, no other
    # metadata: the input's, plus what was merged
    assert meta["modelspec.title"] == "tiny" and meta["format"] == "pt"
    records = json.loads(meta[MERGED_KEY])
    assert [r["name"] for r in records] == ["plain.safetensors", "tucker.safetensors"]
    assert records[0]["sha256"] == sha256(sd1["plain"]) and records[0]["autov2"] == sha256(sd1["plain"])[:10]
    assert records[0]["sshs_model_hash"] == loha.load(sd1["plain"]).metadata["sshs_model_hash"]  # LyCORIS's
    assert (records[0]["unet"], records[0]["te"], records[1]["unet"], records[1]["te"]) == (0.7, 0.3, 1.0, 1.0)
    header = (tmp_path / "out.safetensors").read_bytes()
    n = int.from_bytes(header[:8], "little")
    assert records[1]["model_hash"] == hashlib.sha256(open(sd1["tucker"], "rb").read()[
        8 + int.from_bytes(open(sd1["tucker"], "rb").read(8), "little"):]).hexdigest()
    assert n % 8 == 0


def test_merging_again_appends_to_the_record(sd1, tmp_path):
    once, twice = tmp_path / "once.safetensors", tmp_path / "twice.safetensors"
    calls = []
    M.merge(sd1["ckpt"], (sd1["plain"], 0.5), once, on_progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == len(sd1["state"]) and calls[-1][0] == calls[-1][1] == sum(
        v.numel() * v.element_size() for v in sd1["state"].values())
    M.merge(once, (sd1["plain"], 0.5), twice)
    records = json.loads(read(twice)[1][MERGED_KEY])
    assert [(r["name"], r["unet"]) for r in records] == [("plain.safetensors", 0.5)] * 2


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_output_is_the_fp32_result_rounded_once(sd1, tmp_path, dtype):
    out = tmp_path / "out.safetensors"
    nets = [(sd1["plain"], 0.8, 0.5)]
    M.merge(sd1["ckpt"], nets, out, dtype=dtype)
    merged, _ = read(out)
    torch_dtype = safetensors_io.DTYPE_NAMES[dtype]
    assert_same(merged, patched(sd1["state"], nets, torch_dtype))
    ids = merged["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64  # integers are never cast


def test_half_checkpoint_keeps_its_dtype_and_rounds_once(sd1, tmp_path):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd1["state"].items()}
    save_file(half, tmp_path / "half.safetensors")
    out = tmp_path / "out.safetensors"
    M.merge(tmp_path / "half.safetensors", [(sd1["plain"], 0.6)], out)
    merged, _ = read(out)
    assert_same(merged, patched(half, [(sd1["plain"], 0.6)]))
    assert {v.dtype for v in merged.values()} == {torch.float16, torch.int64}


def test_sdxl_fused_openclip_rows(tmp_path):
    parts = T.sdxl_parts()
    state = ldm_checkpoint(parts)
    save_file(state, tmp_path / "xl.safetensors")
    net = T.make_loha_file(parts, tmp_path / "n.safetensors", dtype=torch.float16)
    result = M.merge(tmp_path / "xl.safetensors", [(net, 1.0, 0.5)], tmp_path / "out.safetensors")
    merged, _ = read(tmp_path / "out.safetensors")
    assert_same(merged, patched(state, [(net, 1.0, 0.5)]))
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert fused in result.changed  # q, k and v rows of one tensor, from three modules


def test_full_diff_with_bias(sd1, tmp_path):
    conv = sd1["state"]["model.diffusion_model.input_blocks.0.0.weight"]
    g = torch.Generator().manual_seed(3)
    net = loha.from_tensors({"lora_unet_conv_in.diff": torch.randn(conv.shape, generator=g),
                             "lora_unet_conv_in.diff_b": torch.randn(conv.shape[0], generator=g)}, name="full")
    result = M.merge(sd1["ckpt"], [(net, 0.5)], tmp_path / "out.safetensors")
    merged, meta = read(tmp_path / "out.safetensors")
    assert_same(merged, patched(sd1["state"], [(net, 0.5)]))
    assert set(result.changed) == {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.0.0.bias"}
    assert json.loads(meta[MERGED_KEY])[0]["name"] == "full"  # in-memory network: no file, no hash


def test_pickled_checkpoint_is_loaded_weights_only(sd1, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd1["state"], "global_step": 10}, ckpt)
    result = M.merge(ckpt, (sd1["plain"], 0.9), tmp_path / "out.safetensors")
    assert not result.streamed and result.dropped == ["global_step"]
    assert_same(read(tmp_path / "out.safetensors")[0], patched(sd1["state"], (sd1["plain"], 0.9)))


def test_pickle_with_code_is_refused(tmp_path, sd1):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(loha.FormatError, match="weights-only"):
        M.merge(tmp_path / "evil.ckpt", sd1["plain"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def extra_names(src, dst):
    tensors = load_file(src)
    for s, shape in (("hada_w1_a", (4, 2)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (4, 2)), ("hada_w2_b", (2, 4))):
        tensors[f"lora_unet_no_such_block.{s}"] = torch.ones(shape)
        tensors[f"lora_te_no_such_layer.{s}"] = torch.ones(shape)
    save_file(tensors, dst)
    return str(dst)


def test_unmatched_names_fail_unless_allowed(sd1, tmp_path):
    net = extra_names(sd1["plain"], tmp_path / "extra.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(loha.UnmatchedError) as err:
        M.merge(sd1["ckpt"], net, out)
    assert sorted(err.value.names) == ["lora_te_no_such_layer", "lora_unet_no_such_block"]
    assert "extra.safetensors" in str(err.value) and "lora_unet_no_such_block" in str(err.value)
    assert os.listdir(tmp_path) == ["extra.safetensors"]  # nothing written

    result = M.merge(sd1["ckpt"], net, out, allow_unmatched=True)
    assert {k: sorted(v) for k, v in result.unmatched.items()} == {net: ["lora_te_no_such_layer", "lora_unet_no_such_block"]}
    assert_same(read(out)[0], patched(sd1["state"], sd1["plain"]))


def test_refuses_to_overwrite_its_inputs(sd1, tmp_path):
    before = sha256(sd1["ckpt"])
    link = tmp_path / "link.safetensors"
    os.symlink(sd1["ckpt"], link)
    hard = tmp_path / "hard.safetensors"
    os.link(sd1["ckpt"], hard)
    for out in (sd1["ckpt"], link, hard):
        with pytest.raises(loha.LohaError, match="refusing to overwrite the input"):
            M.merge(sd1["ckpt"], sd1["plain"], out, overwrite=True)
    with pytest.raises(loha.LohaError, match="refusing to overwrite a network"):
        M.merge(sd1["ckpt"], sd1["plain"], sd1["plain"], overwrite=True)
    (tmp_path / "exists.safetensors").write_bytes(b"old")
    with pytest.raises(loha.LohaError, match="already exists"):
        M.merge(sd1["ckpt"], sd1["plain"], tmp_path / "exists.safetensors")
    assert (tmp_path / "exists.safetensors").read_bytes() == b"old"
    with pytest.raises(loha.LohaError, match="safetensors only"):
        M.merge(sd1["ckpt"], sd1["plain"], tmp_path / "out.ckpt")
    assert sha256(sd1["ckpt"]) == before


def test_no_cuda_is_a_clear_error(sd1, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(loha.LohaError, match="no CUDA device"):
        M.merge(sd1["ckpt"], sd1["plain"], tmp_path / "out.safetensors", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu(sd1, tmp_path):
    M.merge(sd1["ckpt"], sd1["plain"], tmp_path / "gpu.safetensors", device="cuda")
    M.merge(sd1["ckpt"], sd1["plain"], tmp_path / "cpu.safetensors")
    gpu, cpu = read(tmp_path / "gpu.safetensors")[0], read(tmp_path / "cpu.safetensors")[0]
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)


class Boom(Exception):
    pass


@pytest.mark.parametrize("unnamed", [True, False], ids=["o_tmpfile", "named-temp"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_failure_mid_stream_leaves_no_output(sd1, tmp_path, monkeypatch, unnamed, existing):
    out = tmp_path / "out.safetensors"
    if existing:
        out.write_bytes(b"previous")
    if not unnamed:
        monkeypatch.setattr(safetensors_io, "tmpfile_works", lambda folder: False)
    calls = []
    real = safetensors_io.Writer.write

    def failing(self, key, tensor):
        calls.append(key)
        if len(calls) == 50:
            raise Boom("disk on fire")
        real(self, key, tensor)

    monkeypatch.setattr(safetensors_io.Writer, "write", failing)
    with pytest.raises(Boom):
        M.merge(sd1["ckpt"], sd1["plain"], out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == (["out.safetensors"] if existing else [])
    if existing:
        assert out.read_bytes() == b"previous"


KILLABLE = textwrap.dedent("""
    import signal, sys, time
    # A pytest run in the background starts its children with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the merge must see Ctrl-C as a terminal would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from loha.files import safetensors_io
    from loha.app.cli import main
    if sys.argv[1] == "named":
        safetensors_io.tmpfile_works = lambda folder: False
    real, count = safetensors_io.Writer.write, [0]
    def slow(self, key, tensor):
        real(self, key, tensor)
        count[0] += 1
        if count[0] == 40:
            self._file.flush()
            open(sys.argv[2], "w").close()   # tell the test we are mid-stream
            time.sleep(60)
    safetensors_io.Writer.write = slow
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("how", ["SIGKILL-o_tmpfile", "SIGTERM-named-temp", "SIGINT-named-temp"])
def test_killed_merge_leaves_no_output(sd1, tmp_path, how):
    sig, mode = how.split("-", 1)
    folder = tmp_path / "outdir"
    folder.mkdir()
    if mode == "o_tmpfile" and not safetensors_io.tmpfile_works(str(folder)):
        pytest.skip("no O_TMPFILE here: a SIGKILLed merge leaves its hidden .part file")
    marker = tmp_path / "marker"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    out = folder / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), "named" if mode == "named-temp" else "unnamed", str(marker),
                             "merge", sd1["ckpt"], "--loha", sd1["plain"], "-o", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the merge never reached the middle"
            time.sleep(0.05)
        if mode == "named-temp":
            assert len(os.listdir(folder)) == 1  # the hidden temporary file, mid-stream
        else:
            assert os.listdir(folder) == []  # O_TMPFILE: nothing has a name yet
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert os.listdir(folder) == [], err
    if sig != "SIGKILL":
        assert b"Traceback" not in err


def test_file_hashes(sd1):
    data = open(sd1["plain"], "rb").read()
    n = int.from_bytes(data[:8], "little")
    hashes = safetensors_io.file_hashes(sd1["plain"])
    assert hashes["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashes["model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_model_hash_of_tensors_is_the_hash_of_the_file_they_make(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).half(), "a": torch.randn(7, generator=g),
               "empty": torch.zeros(0, 4), "c": torch.randint(0, 9, (2, 2), generator=g)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"ss_network_dim": "4"})
    hashes = safetensors_io.file_hashes(str(tmp_path / "reference.safetensors"))
    assert safetensors_io.model_hash(tensors) == hashes["model_hash"]


@pytest.mark.parametrize("spec, expected", [
    ("a.safetensors", ("a.safetensors", 1.0, None)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5, None)),
    ("a.safetensors:0.5:-1", ("a.safetensors", 0.5, -1.0)),
    ("dir/x:y.safetensors:1:0", ("dir/x:y.safetensors", 1.0, 0.0)),
    (r"C:\models\a.safetensors:0.8", (r"C:\models\a.safetensors", 0.8, None)),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected
