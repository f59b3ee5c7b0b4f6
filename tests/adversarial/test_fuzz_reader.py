"""Property-based fuzz of the file reader: whatever the bytes, loha.load either returns a
network or raises a LohaError — never another exception, never a hang or a blow-up.

Longer coverage-guided runs use atheris on the same entry point (see fuzz/reader.py).
"""

import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import loha
import tiny_models as T

SUFFIXES = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale",
            "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lokr_w1", "lokr_w2", "lokr_w1_a",
            "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "weird"]
# Mostly names that match the tiny model, so the patch path is exercised, not just the reader.
NAMES = ["lora_unet_conv_in", "lora_unet_conv_in", "lora_unet_conv_in", "lora_te_encoder_layers_0_mlp_fc1", "x"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_bytes(tmp_path, data: bytes):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        return loha.load(path)
    except loha.LohaError:
        return None


@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(tmp_path_factory, data):
    load_bytes(tmp_path_factory.mktemp("b"), data)


@FUZZ
@given(header=st.binary(max_size=256), claimed=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_arbitrary_header(tmp_path_factory, header, claimed, tail):
    load_bytes(tmp_path_factory.mktemp("h"), struct.pack("<Q", claimed) + header + tail)


KIND_SUFFIXES = [
    ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"],
    ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"],
    ["lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"],
    ["diff", "diff_b"],
    SUFFIXES,
]


@st.composite
def tensor_entries(draw):
    """A few modules, each a random subset of one kind's suffixes with random shapes/dtypes."""
    entries = {}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NAMES))
        suffixes = draw(st.lists(st.sampled_from(draw(st.sampled_from(KIND_SUFFIXES))), min_size=1, max_size=8))
        for suffix in suffixes:
            shape = draw(st.lists(st.sampled_from([1, 2, 3, 4, 32, 0]), max_size=4))
            entries[f"{name}.{suffix}"] = (shape, draw(st.sampled_from(DTYPES)))
    return entries


@FUZZ
@given(entries=tensor_entries())
def test_wellformed_files_with_arbitrary_contents(tmp_path_factory, entries):
    """Valid safetensors, any names, shapes and dtypes: load and patch only raise loha errors."""
    tensors = {key: torch.ones(shape, dtype=dtype) for key, (shape, dtype) in entries.items()}
    net = load_bytes(tmp_path_factory.mktemp("w"), save(tensors))
    if net is None:
        return
    parts = _parts()
    before = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    try:
        handle = loha.apply(parts, net)
    except loha.LohaError:
        after = parts["unet"].state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        return
    handle.restore()
    after = parts["unet"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_real_file(tmp_path_factory, flips):
    data = bytearray(_real_file())
    for position, value in flips:
        data[position % len(data)] = value
    load_bytes(tmp_path_factory.mktemp("c"), bytes(data))


_cache = {}


def _parts():
    if "parts" not in _cache:
        _cache["parts"] = T.sd1_parts()
    return _cache["parts"]


def _real_file() -> bytes:
    if "file" not in _cache:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = T.make_loha_file(_parts(), f"{d}/real.safetensors")
            _cache["file"] = open(path, "rb").read()
    return _cache["file"]
