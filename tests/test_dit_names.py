"""Full-size name coverage of Flux-dev, SD3.5-large and Qwen-Image, on the meta device.

Every module a trainer targets must map to exactly one weight, or row slice, of the
right shape, in both layouts: the diffusers modules (``map_modules``) and the checkpoint
as SD3.5/Flux files and ComfyUI hold it (``map_state_dict``). Trainers: SimpleTuner's
LyCORIS (``lycoris_`` + diffusers paths; lycoris-lora itself picks the modules), kohya
sd-scripts (``lora_unet_`` + checkpoint paths: every weight in the blocks; ``lora_te1_``/
``lora_te2_``/``lora_te3_`` text encoders, T5 always ``lora_te3_``) and ai-toolkit/diffusers
(``transformer.`` + diffusers paths). Where each weight lives in the checkpoint is read
off diffusers' own single-file converters run on stand-ins (tests/dit_checkpoints.py),
never off loha.keys. Qwen-Image's checkpoints (and ComfyUI) keep diffusers' paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import dit_checkpoints as C
import tiny_dit as D
from loha.keys import map_modules, map_state_dict
from loha.keys.text import T5_PATH, TEXT_PATH
from loha.models.structures import published_transformer

MODELS = {"flux-dev": "flux", "sd3.5-large": "sd3", "qwen-image": "qwen-image"}
PREFIX = "model.diffusion_model."
TEXT_KINDS = {"CLIPTextModel": "clip", "CLIPTextModelWithProjection": "clip", "T5EncoderModel": "t5"}
#: Where an SD3.5/Flux checkpoint keeps each text encoder, by pipeline attribute and family.
TEXT_PLACES = {
    "flux": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."},
    "sd3": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."},
}
KOHYA_TEXT = {"flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
              "sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}}


@dataclass
class Full:
    family: str
    parts: dict
    checkpoint: dict  # key -> shape, checkpoint layout with prefixes
    where: dict  # diffusers transformer key -> C.Rows (checkpoint keys and rows, prefix included)


@pytest.fixture(scope="module", params=list(MODELS))
def full(request) -> Full:
    family = MODELS[request.param]
    with torch.device("meta"):
        parts = published_transformer(request.param)
    state = dict(parts["transformer"].state_dict())
    if family in C.LAYOUT_FAMILIES:
        layout = {k: tuple(v.shape) for k, v in C.to_checkpoint(family, dict(state)).items()}
        converted = C.provenance(family, layout)
        assert converted.keys() == state.keys()
        assert all(converted[k].shape == tuple(v.shape) for k, v in state.items())
    else:
        layout = {k: tuple(v.shape) for k, v in state.items()}
        converted = {k: C.Rows.of(k, shape) for k, shape in layout.items()}
    where = {k: C.Rows(rows.shape, tuple((PREFIX + key, a, b) for key, a, b in rows.segments))
             for k, rows in converted.items()}
    checkpoint = {PREFIX + k: shape for k, shape in layout.items()}
    for attr, place in TEXT_PLACES.get(family, {}).items():
        kind = TEXT_KINDS[type(parts[attr]).__name__]
        checkpoint.update({k: tuple(v.shape) for k, v in C.text_state(kind, parts[attr], place).items()})
    return Full(family, parts, checkpoint, where)


def region(target) -> tuple:
    """(key, rows) of every piece of a target, rows None for a whole tensor."""
    return tuple((p.key, p.rows) for p in (target.pieces or (target,)))


def rows_region(rows: C.Rows, shapes: dict) -> tuple:
    return tuple((key, None if (a, b) == (0, shapes[key][0]) else (a, b)) for key, a, b in rows.segments)


def simpletuner_targets(family: str, model) -> dict[str, tuple]:
    """lycoris name -> module path and weight shape, as lycoris-lora picks them with SimpleTuner's preset."""
    net = D.simpletuner_network(model, ["Attention", "FeedForward", *D.BLOCKS[family]], dim=1)
    paths = {id(m): p for p, m in model.named_modules()}
    return {lora.lora_name: (paths[id(lora.org_module[0])], tuple(lora.org_module[0].weight.shape)) for lora in net.loras}


@pytest.fixture(scope="module")
def maps(full):
    return map_modules(full.parts), map_state_dict(full.checkpoint)


def test_both_layouts_say_the_family(full, maps):
    assert [m.family for m in maps] == [full.family] * 2


def test_simpletuner_and_diffusers_names(full, maps):
    modules, checkpoint = maps
    targets = simpletuner_targets(full.family, full.parts["transformer"])
    assert len(targets) > 100
    hit = {id(modules): set(), id(checkpoint): set()}
    for name, (path, shape) in targets.items():
        assert name == "lycoris_" + path.replace(".", "_")
        for spelling in (name, f"transformer.{path}", f"lora_transformer_{path.replace('.', '_')}"):
            in_modules, in_checkpoint = modules.lookup(spelling), checkpoint.lookup(spelling)
            assert region(in_modules) == ((f"transformer.{path}.weight", None),) and in_modules.shape == shape
            expected = rows_region(full.where[f"{path}.weight"], full.checkpoint)
            assert region(in_checkpoint) == expected and in_checkpoint.shape == shape, spelling
        hit[id(modules)].add(in_modules)
        hit[id(checkpoint)].add(in_checkpoint)
    assert all(len(found) == len(targets) for found in hit.values())  # one target per module


def test_kohya_checkpoint_names(full, maps):
    """kohya names every weight of the blocks by its checkpoint path: the fused weight in the
    checkpoint, and in diffusers modules the weights (or row blocks) the converter cuts it into."""
    modules, checkpoint = maps
    blocks = tuple(PREFIX + b for b in ("double_blocks.", "single_blocks.", "joint_blocks.", "transformer_blocks."))
    pieces: dict[str, list] = {}
    for key, rows in full.where.items():
        offset = 0
        for ckpt_key, a, b in rows.segments:
            pieces.setdefault(ckpt_key, []).append((a, f"transformer.{key}", (offset, offset + b - a)))
            offset += b - a
    own = {k: tuple(v.shape) for k, v in full.parts["transformer"].state_dict().items()}
    names = 0
    for key, shape in full.checkpoint.items():
        if not (key.startswith(blocks) and key.endswith(".weight") and len(shape) == 2):
            continue
        name = "lora_unet_" + key[len(PREFIX):-len(".weight")].replace(".", "_")
        assert region(checkpoint.lookup(name)) == ((key, None),) and checkpoint.lookup(name).shape == shape
        in_modules = modules.lookup(name)
        expected = tuple((d, None if rows == (0, own[d.removeprefix("transformer.")][0]) else rows)
                         for _, d, rows in sorted(pieces[key]))
        assert region(in_modules) == expected and in_modules.shape == shape, name
        assert modules.names(in_modules)[0] == name and checkpoint.names(checkpoint.lookup(name))[0] == name
        names += 1
    assert names > 100


@pytest.mark.parametrize("full", ["flux-dev", "sd3.5-large"], indirect=True)  # Qwen2.5-VL is not built here
def test_text_encoder_names(full, maps):
    modules, checkpoint = maps
    for attr, place in TEXT_PLACES[full.family].items():
        model = full.parts[attr]
        kind = TEXT_KINDS[type(model).__name__]
        pattern = TEXT_PATH if kind == "clip" else T5_PATH
        count = 0
        for path, module in model.named_modules():
            canonical = path.removeprefix("text_model.")
            if not (isinstance(module, torch.nn.Linear) and pattern.fullmatch(canonical)):
                continue
            level = "text_model." if kind == "clip" else ""
            kohya = KOHYA_TEXT[full.family][attr] + (level + canonical).replace(".", "_")
            for spelling in (kohya, f"{attr}.{level}{canonical}"):
                a, b = modules.lookup(spelling), checkpoint.lookup(spelling)
                assert region(a) == ((f"{attr}.{path}.weight", None),), spelling
                assert region(b) == ((f"{place}{level}{canonical}.weight", None),), spelling
                assert a.shape == b.shape == tuple(module.weight.shape)
            assert modules.names(a)[0] == kohya
            count += 1
        assert count >= 6 * 12
