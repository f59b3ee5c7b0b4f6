"""Property-based fuzz beyond network files: checkpoints (through `merge` and `inspect --against`),
PEFT folders, and the metadata `inspect` shows. Whatever the input, only `LohaError` escapes
(the command line answers 0 or 1, never a traceback), the model and the input files are
unchanged, and a failed merge leaves no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import hostile as H
import loha
import tiny_models as T
from loha.app.cli import main
from loha.files import peft as lp
from loha.models.to_ldm import ldm_state_dict
from loha.summary import render, summarize

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
_cache: dict = {}


def _fixture() -> dict:
    """A small checkpoint (a text encoder and one cross-attention weight: enough for a family) and a
    LoHa for it, built once, in a folder of their own."""
    if not _cache:
        folder = tempfile.mkdtemp(prefix="loha-fuzz-")
        parts = T.sd1_parts()
        state = {k: v.detach().clone().contiguous() for k, v in ldm_state_dict(parts).items()
                 if k.startswith("cond_stage_model.") or k.endswith("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")}
        net = T.make_loha_file({"unet": parts["unet"], "text_encoder": parts["text_encoder"]},
                               os.path.join(folder, "net.safetensors"))
        _cache.update(state=state, net=net, net_sha=H.sha(net), parts={"text_encoder": parts["text_encoder"]})
    return _cache


def _run(args) -> int:
    code = main([str(a) for a in args])
    assert code in (0, 1)
    return code


# --------------------------------------------------------------------------- checkpoints


@st.composite
def hostile_headers(draw):
    """The small checkpoint's header with entries replaced by arbitrary JSON, extra entries, metadata."""
    base = _fixture()
    header, data = H.header_of(base["state"])
    keys = list(header)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        if field is None or not isinstance(header[key], dict):
            header[key] = draw(JSON)
        else:
            header[key][field] = draw(JSON)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["model.diffusion_model.input_blocks.{}.0.in_layers.2.weight",
                                     "cond_stage_model.transformer.text_model.encoder.layers.{}.mlp.fc1.weight",
                                     "cond_stage_model.model.transformer.resblocks.{}.attn.in_proj_weight",
                                     "model.diffusion_model.output_blocks.{}.1.conv.weight"]))
        header[name.format(draw(st.integers(0, 10**7)))] = {
            "dtype": draw(st.sampled_from(["F32", "F16", "I64", "BOOL", "X"])),
            "shape": draw(st.lists(st.integers(0, 4), max_size=3)), "data_offsets": [0, draw(st.integers(0, 64))]}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), JSON_SCALARS | st.just("[" * 3000), max_size=3))
    text = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    return text, data


@FUZZ
@given(header=hostile_headers())
def test_hostile_checkpoints_through_merge_and_inspect(tmp_path_factory, header):
    base = _fixture()
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = H.raw_safetensors(folder / "c.safetensors", *header)
    digest = H.sha(ckpt)
    if _run(["merge", ckpt, "--loha", base["net"], "-o", folder / "out.safetensors", "--allow-unmatched"]) == 1:
        assert H.listing(folder) == ["c.safetensors"]
    _run(["inspect", base["net"], "--against", ckpt])
    assert H.sha(ckpt) == digest and H.sha(base["net"]) == base["net_sha"]


# --------------------------------------------------------------------------- PEFT folders

PEFT_PATHS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1", "x"]
PATTERN_TEXT = st.text(alphabet="abx()[]+*?|.^$\\{}0123_", max_size=10)


@st.composite
def peft_folders(draw):
    config = {"peft_type": draw(st.sampled_from(["LOHA", "LOHA", "LORA", 3])),
              "r": draw(st.sampled_from([2, 2, 0, -1, "2", 2.5, None])),
              "alpha": draw(st.sampled_from([4, 1.5, "abc", None, float("inf")]) | JSON_SCALARS)}
    for field in ("rank_pattern", "alpha_pattern"):
        if draw(st.booleans()):
            config[field] = draw(st.dictionaries(PATTERN_TEXT, st.sampled_from([1, 2, 3, "x", 2.5]), max_size=3)
                                 | JSON)
    if draw(st.booleans()):
        config = draw(JSON)
    tensors = {}
    for path in draw(st.lists(st.sampled_from(PEFT_PATHS), min_size=1, max_size=2, unique=True)):
        for suffix in draw(st.lists(st.sampled_from(lp.LOHA_SUFFIXES), min_size=1, max_size=6)):
            shape = draw(st.lists(st.sampled_from([0, 1, 2, 32]), max_size=3))
            tensors[f"{lp.PEFT_PREFIX}{path}.{suffix}"] = torch.ones(shape, dtype=draw(st.sampled_from(
                [torch.float32, torch.float16, torch.int64])))
    return json.dumps(config, allow_nan=True), tensors


@FUZZ
@given(adapter=peft_folders())
def test_hostile_peft_folders(tmp_path_factory, adapter):
    config, tensors = adapter
    root = tmp_path_factory.mktemp("peft")
    sub = root / "text_encoder"
    sub.mkdir()
    (sub / lp.CONFIG_FILE).write_text(config)
    save_file(tensors, sub / lp.WEIGHTS_FILE)
    files = {p: H.sha(p) for p in sub.iterdir()}
    parts = _fixture()["parts"]
    before = H.snapshot(parts)
    try:
        loha.apply(parts, loha.load(root), family="sd1").restore()
    except loha.LohaError:
        pass
    assert H.unchanged(before, parts)
    assert {p: H.sha(p) for p in sub.iterdir()} == files


# --------------------------------------------------------------------------- metadata inspect shows

META_KEYS = ["ss_tag_frequency", "ss_network_args", "loha_merged", "ss_network_dim", "modelspec.title", "sshs_model_hash"]


@st.composite
def metadata_texts(draw):
    """JSON texts as kohya writes them, with NaN/Infinity counts, nesting past any parser, or no JSON at all."""
    kind = draw(st.sampled_from(["json", "deep", "tags", "raw"]))
    if kind == "json":
        return json.dumps(draw(JSON), allow_nan=True)
    if kind == "deep":
        depth = draw(st.sampled_from([20, 900, 5000, 200_000]))
        return draw(st.sampled_from(["[", '{"a":'])) * depth + "1" + draw(st.sampled_from(["]", "}"])) * depth
    if kind == "tags":
        count = draw(st.sampled_from(["Infinity", "-Infinity", "NaN", "1e400", "3", "true", "[1]", '"x"']))
        return f'{{"1_x": {{"tag": {count}, "other": 2}}, "2_y": {count}}}'
    return draw(st.text(max_size=40))


@FUZZ
@given(metadata=st.dictionaries(st.sampled_from(META_KEYS), metadata_texts(), max_size=4))
def test_hostile_metadata_through_inspect(tmp_path_factory, capsys, metadata):
    folder = tmp_path_factory.mktemp("meta")
    path = folder / "m.safetensors"
    shutil.copy(_fixture()["net"], path)
    tensors = {"lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.ones(64, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b": torch.ones(2, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a": torch.ones(64, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b": torch.ones(2, 32)}
    save_file(tensors, path, metadata=metadata)
    summary = summarize(loha.load(path))
    render(summary)
    json.dumps(summary, allow_nan=False)  # what the ComfyUI route and the WebUI card send
    assert all(isinstance(count, int) and not isinstance(count, bool) for _, count in summary["top_tags"])
    assert _run(["inspect", path, "--json"]) == 0
    assert _run(["inspect", path]) == 0
    capsys.readouterr()
