"""Block-weight notation: presets and comma lists mapped onto `keys`' block ids.

The lists' meaning is checked against real structures: on full-size SD1.5 and SDXL
UNets (meta device) the short lists must name exactly the blocks that hold attention
(that is how the extension picked them), the long lists every block the name map
assigns, and a parsed list must reach the weights of the blocks it names when a
LoHa made by lycoris-lora is patched.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

import loha
import tiny_models as T
from loha.keys import blocks
from loha.errors import LohaError
from loha.keys import map_modules
from loha.models.configs import PUBLISHED

FULL_UNETS = {family: PUBLISHED[family]["unet"] for family in ("sd1", "sdxl")}
SHORT = {"sd1": 17, "sdxl": 12}
LONG = {"sd1": 26, "sdxl": 20}


@pytest.fixture(scope="module", params=list(FULL_UNETS))
def full_map(request):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_UNETS[request.param])
    return request.param, map_modules({"unet": unet})


def test_lists_name_the_blocks_of_the_real_structure(full_map):
    family, names = full_map
    assigned = {t.block for t in names.targets if t.block != blocks.NO_BLOCK} | {"BASE"}  # BASE: text encoders
    unblocked = {t.path for t in names.targets if t.block == blocks.NO_BLOCK}
    assert unblocked == {"conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} | (
        {"add_embedding.linear_1", "add_embedding.linear_2"} if family == "sdxl" else set())
    with_attention = {t.block for t in names.targets if ".attentions." in t.path and t.block != "MID"}
    layout = blocks.LAYOUT_OF_FAMILY[family]
    long_ids = blocks.BLOCK_LISTS[(layout, LONG[family])]
    short_ids = blocks.BLOCK_LISTS[(layout, SHORT[family])]
    assert set(long_ids) == assigned and len(long_ids) == len(assigned)
    assert set(short_ids) == with_attention | {"BASE", "MID"}
    assert list(long_ids) == list(blocks.block_ids(family))
    # both lists keep the extension's order: BASE, inputs, MID, outputs
    for ids in (long_ids, short_ids):
        assert ids[0] == "BASE" and [i for i in ids if i.startswith("IN")] == sorted(i for i in ids if i.startswith("IN"))
        assert ids.index("MID") == 1 + sum(i.startswith("IN") for i in ids)


def test_short_list_positions_and_zero_for_unlisted():
    values = ",".join(str(i) for i in range(17))
    weights = blocks.parse(values, "sd1")
    assert len(weights) == 26
    assert weights["BASE"] == 0 and weights["IN01"] == 1 and weights["IN08"] == 6
    assert weights["MID"] == 7 and weights["OUT03"] == 8 and weights["OUT11"] == 16
    assert all(weights[b] == 0 for b in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"))


def test_long_lists_and_sdxl():
    weights = blocks.parse(",".join(["0.5"] * 26), "sd2")
    assert set(weights.values()) == {0.5} and len(weights) == 26
    xl = blocks.parse("1, 0,0,0,0, 0.25, 1,1,1,1,1,1", "sdxl")
    assert xl["MID"] == 0.25 and xl["IN04"] == 0 and xl["OUT05"] == 1 and xl["IN00"] == 0 and xl["OUT08"] == 0
    assert len(blocks.parse(",".join(["1"] * 20), "sdxl")) == 20


def test_presets_are_the_extensions_17_value_lists():
    """As in the extension, a preset is one 17-value list, read by its ids on every family:
    ALL leaves the conv-only blocks a 17-list does not name at 0, on SDXL OUT00–OUT02 too."""
    assert blocks.parse("outall", "sd1") == blocks.parse("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "sd1")
    listed = set(blocks.LISTS[17])
    for family in ("sd1", "sdxl"):
        weights = blocks.parse("ALL", family)
        assert {b for b, v in weights.items() if v == 1.0} == listed & set(blocks.block_ids(family))
        assert {b for b, v in weights.items() if v == 0.0} == set(blocks.block_ids(family)) - listed
        assert set(blocks.parse("NONE", family).values()) == {0.0}
        for name in blocks.preset_names(family):
            assert len(blocks.parse(name, family)) == len(blocks.block_ids(family))
            assert len(blocks.PRESETS[name].split(",")) == 17
    assert blocks.parse("ALL", "sdxl")["OUT00"] == 0 and blocks.parse("ALL", "sdxl")["OUT03"] == 1
    assert blocks.parse(",".join(["1"] * 26), "sd1") == dict.fromkeys(blocks.block_ids("sd1"), 1.0)
    assert blocks.parse("", "sdxl") == {} and blocks.parse("  ", "sd1") == {}


@pytest.mark.parametrize("spec, family, message", [
    ("1,1,1", "sd1", "3 values, but a list has 12, 17, 20, 26 values"),
    (",".join(["1"] * 18), "sdxl", "18 values, but a list has 12, 17, 20, 26 values"),
    ("1,R,1", "sd1", "'R' is not a number"),
    ("1," * 16 + "nan", "sd1", "'nan' is not a finite number"),
    ("ALL", "flux", "unknown model family 'flux'"),
])
def test_errors_name_the_spec(spec, family, message):
    with pytest.raises(LohaError, match=message.replace("(", r"\(")):
        blocks.parse(spec, family)


def state(parts):
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def test_parsed_weights_reach_the_patched_blocks(tmp_path):
    """OUTALL on a real LoHa: text encoder and output blocks change, input blocks and MID do not."""
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "net.safetensors")
    before = state(parts)
    weights = blocks.parse("OUTALL", "sd1")
    handle = loha.apply(parts, loha.Use(loha.load(path), 1.0, 1.0, weights))
    after = state(parts)
    handle.restore()
    names = map_modules(parts)
    changed = {t.block for t in names.targets if not torch.equal(before[t.key], after[t.key])}
    present = {t.block for t in names.targets}
    assert changed == {b for b in present if weights.get(b, 1.0) != 0}
    assert "BASE" in changed and "MID" not in changed and not any(b.startswith("IN") for b in changed)
    assert blocks.NO_BLOCK in changed  # the embeddings and conv_out keep the full strength, as in the extension
