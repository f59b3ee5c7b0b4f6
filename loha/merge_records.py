"""What a checkpoint holds of networks merged into it: the ``loha_merged`` metadata.

A JSON list with one record per merged network (file name, strengths, block weights,
module count, and the hashes tools show for the file), appended to on every merge, so
a checkpoint merged twice lists both. `loha merge` and ComfyUI's LoHa Merge and Save
write the same records.
"""

from __future__ import annotations

import json
import os

from .files.network import parse_json_metadata
from .files.safetensors_io import file_hashes

#: Output metadata key holding what was merged (a JSON list, appended to on re-merges).
MERGED_KEY = "loha_merged"


def merge_record(use, modules: int) -> dict:
    """The record of one `patch.Use` that changed `modules` modules."""
    net = use.network
    record = {
        "name": os.path.basename(net.path) if net.path else net.name,
        "unet": use.unet,
        "te": use.unet if use.te is None else use.te,
        "modules": modules,
    }
    if use.blocks:
        record["blocks"] = dict(use.blocks)
    if net.path:
        record.update(file_hashes(net.path))
    if net.metadata.get("sshs_model_hash"):
        record["sshs_model_hash"] = net.metadata["sshs_model_hash"]
    return record


def with_records(metadata: dict[str, str], records: list[dict]) -> dict[str, str]:
    """`metadata` with `records` appended to its `loha_merged` list."""
    out = dict(metadata)
    if MERGED_KEY in out:
        earlier = parse_json_metadata(out, MERGED_KEY)
        if earlier is None:  # not JSON we can carry (or nested absurdly deep): kept as the text it is
            earlier = [out[MERGED_KEY]]
        elif not isinstance(earlier, list):
            earlier = [earlier]
    else:
        earlier = []
    out[MERGED_KEY] = json.dumps(earlier + records, ensure_ascii=False)
    return out
