"""Hostile and broken network files: each gives a clear loha error and changes nothing.

Every file here is built by the test. "Changes nothing" is checked on a real model: a
failed load or patch leaves every weight bit-identical and the file itself unmodified.
"""

import hashlib
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import loha
import tiny_models as T
from loha.files.safetensors_io import MAX_HEADER_BYTES


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real lycoris-lora LoHa for the tiny SD1 model, and its tensors."""
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    T.make_loha_file(T.sd1_parts(), path)
    return str(path), load_file(str(path))


@pytest.fixture()
def parts():
    return T.sd1_parts()


def snapshot(parts):
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def unchanged(before, parts):
    after = snapshot(parts)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def raw_file(path, header: bytes, data: bytes = b"", claimed: int | None = None):
    n = len(header) if claimed is None else claimed
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def refused(path, parts, match, error=loha.LohaError):
    """Loading/patching `path` raises `error` matching `match`; model and file untouched."""
    before, digest = snapshot(parts), sha(path)
    with pytest.raises(error, match=match):
        loha.apply(parts, str(path))
    assert unchanged(before, parts)
    assert sha(path) == digest


def test_empty_file(tmp_path, parts):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", parts, r"empty\.safetensors.*too short", loha.FormatError)


def test_pickle_disguised_as_safetensors(tmp_path, parts):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"lora_unet_conv_in.hada_w1_a": [1.0]}, protocol=4))
    refused(path, parts, r"evil\.safetensors.*pickle", loha.FormatError)


def test_torch_zip_disguised_as_safetensors(tmp_path, parts):
    path = tmp_path / "zip.safetensors"
    torch.save({"x": torch.ones(2)}, path)
    refused(path, parts, r"zip\.safetensors.*pickle", loha.FormatError)


def test_header_length_beyond_file(tmp_path, parts):
    path = raw_file(tmp_path / "long.safetensors", b'{"a":1}', claimed=10_000)
    refused(path, parts, r"long\.safetensors.*header claims 10000 bytes", loha.FormatError)


def test_enormous_claimed_header_is_refused_unread(tmp_path, parts, monkeypatch):
    path = raw_file(tmp_path / "huge.safetensors", b"{}", claimed=2**62)
    parsed = []
    monkeypatch.setattr("loha.files.safetensors_io.Reader._parse", lambda *a, **k: parsed.append(a))
    refused(path, parts, r"header claims", loha.FormatError)
    assert parsed == []  # refused before the header parser was asked to read anything


def test_header_just_over_the_limit(tmp_path, parts):
    path = raw_file(tmp_path / "big.safetensors", b" " * 16, claimed=MAX_HEADER_BYTES + 1)
    refused(path, parts, r"limit", loha.FormatError)


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2, 3]", b'{"x": {"dtype": "F32"}}', b"\xff\xfe\x00"])
def test_invalid_header_json(tmp_path, parts, header):
    path = raw_file(tmp_path / "badjson.safetensors", header)
    refused(path, parts, r"badjson\.safetensors.*not a readable safetensors", loha.FormatError)


def test_truncated_data(tmp_path, parts, good):
    data = open(good[0], "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) - 100])
    refused(path, parts, r"cut\.safetensors", loha.FormatError)


def test_offsets_outside_the_data(tmp_path, parts):
    header = json.dumps({"lora_unet_conv_in.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 400]}}).encode()
    path = raw_file(tmp_path / "offsets.safetensors", header, b"\0" * 4)
    refused(path, parts, r"offsets\.safetensors", loha.FormatError)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_wrong_factor_dtype(tmp_path, parts, good, dtype):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_unet_conv_in.hada_w1_b"] = tensors["lora_unet_conv_in.hada_w1_b"].to(dtype)
    save_file(tensors, tmp_path / "dtype.safetensors")
    refused(tmp_path / "dtype.safetensors", parts, r"lora_unet_conv_in\.hada_w1_b.*dtype", loha.FormatError)


def test_factors_disagree_with_each_other(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_unet_conv_in.hada_w2_a"] = torch.randn(32, 3)
    save_file(tensors, tmp_path / "disagree.safetensors")
    refused(tmp_path / "disagree.safetensors", parts, r"lora_unet_conv_in.*hada_w2_a", loha.FormatError)


def test_factors_disagree_with_target(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    r = tensors["lora_unet_conv_out.hada_w1_a"].shape[1]
    for i in "12":
        tensors[f"lora_unet_conv_out.hada_w{i}_a"] = torch.randn(5, r)
    save_file(tensors, tmp_path / "target.safetensors")
    refused(tmp_path / "target.safetensors", parts, r"lora_unet_conv_out.*conv_out\.weight.*\(4, 32, 3, 3\)", loha.ShapeError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_factor(tmp_path, parts, good, value):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_te_encoder_layers_1_mlp_fc2.hada_w1_b"][0, 1] = value
    save_file(tensors, tmp_path / "nonfinite.safetensors")
    refused(tmp_path / "nonfinite.safetensors", parts, r"lora_te_encoder_layers_1_mlp_fc2.*NaN or Inf", loha.FormatError)


def test_non_finite_alpha(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_unet_conv_in.alpha"] = torch.tensor(float("nan"))
    save_file(tensors, tmp_path / "alpha.safetensors")
    refused(tmp_path / "alpha.safetensors", parts, r"lora_unet_conv_in\.alpha.*nan", loha.FormatError)


def test_non_scalar_alpha(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_unet_conv_in.alpha"] = torch.ones(4)
    save_file(tensors, tmp_path / "alpha.safetensors")
    refused(tmp_path / "alpha.safetensors", parts, r"lora_unet_conv_in\.alpha.*scalar.*\(4,\)", loha.FormatError)


def test_same_module_under_two_naming_styles(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    # down_blocks.0.resnets.0 is input_blocks.1.0 in the LDM layout
    for key in [k for k in tensors if k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.")]:
        tensors[key.replace("down_blocks_0_resnets_0_conv1", "input_blocks_1_0_in_layers_2")] = tensors[key].clone()
    save_file(tensors, tmp_path / "twice.safetensors")
    refused(tmp_path / "twice.safetensors", parts, r"twice\.safetensors.*two naming styles", loha.FormatError)


def test_names_with_path_characters_match_nothing(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    for name in ("lora_unet_../../etc/passwd", "/abs/path", "lora_te_..\\..\\x"):
        tensors[f"{name}.hada_w1_a"] = torch.ones(2, 1)
        tensors[f"{name}.hada_w1_b"] = torch.ones(1, 2)
        tensors[f"{name}.hada_w2_a"] = torch.ones(2, 1)
        tensors[f"{name}.hada_w2_b"] = torch.ones(1, 2)
    save_file(tensors, tmp_path / "paths.safetensors")
    handle = loha.apply(parts, str(tmp_path / "paths.safetensors"))
    assert sorted(handle.unmatched[str(tmp_path / "paths.safetensors")]) == sorted(
        ["lora_unet_../../etc/passwd", "/abs/path", "lora_te_..\\..\\x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paths.safetensors"]


def test_one_bad_module_can_be_skipped(tmp_path, parts, good):
    tensors = {k: v.clone() for k, v in good[1].items()}
    tensors["lora_unet_conv_out.hada_w2_b"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "onebad.safetensors")
    before = snapshot(parts)
    with pytest.warns(UserWarning, match="skipping a bad module.*lora_unet_conv_out"):
        handle = loha.apply(parts, str(tmp_path / "onebad.safetensors"), skip_bad=True)
    (skipped,) = handle.skipped.values()
    assert len(skipped) == 1 and "lora_unet_conv_out" in skipped[0]
    assert torch.equal(parts["unet"].conv_out.weight, before["unet.conv_out.weight"])
    assert not torch.equal(parts["unet"].conv_in.weight, before["unet.conv_in.weight"])
    handle.restore()
    assert unchanged(before, parts)


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path, length):
    """0x80 0x02–0x05 is how pickles start, and how those lengths are written (found by the fuzzer)."""
    body = json.dumps({"__metadata__": {"pad": ""}, "x.weird": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}})
    body = body.replace('"pad": ""', '"pad": "' + "p" * (length - len(body)) + '"')
    path = raw_file(tmp_path / "lucky.safetensors", body.encode(), b"\0" * 4)
    assert open(path, "rb").read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    assert loha.load(path).unknown_keys == ["x.weird"] and loha.load(path).metadata["pad"].startswith("p")
