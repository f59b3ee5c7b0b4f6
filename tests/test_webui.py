"""The WebUI extension's host-independent half, without a WebUI.

The model is an LDM-layout module tree as the WebUI holds it (tiny SD1 weights), and
the built-in Lora extension's lazy patching is played by `builtin_forward`, which
follows its protocol: back a layer up on first use, and when the wanted networks
differ from those applied, restore the backup and add their ΔW.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import loha
from loha.models.to_ldm import ldm_state_dict
from loha.hosts.webui import (ActiveSet, LiveParameters, NetworkFiles, Request, card_files, card_metadata,
                              list_networks, not_applied_text, parse_request, preferred_weight, release_builtin)
from tiny_models import make_loha_file, sd1_parts


# --------------------------------------------------------------------------- prompt arguments


@pytest.mark.parametrize("positional, named, expected", [
    (["x"], {}, Request("x", 1.0, 1.0)),
    (["x", "0.8"], {}, Request("x", 0.8, 0.8)),
    (["x", "0.5", "0.7"], {}, Request("x", unet=0.7, te=0.5)),
    (["x"], {"te": "0.2", "unet": "0.9"}, Request("x", unet=0.9, te=0.2)),
    (["x", "0.5"], {"unet": "0"}, Request("x", unet=0.0, te=0.5)),
    (["x", "1"], {"lbw": "OUTALL"}, Request("x", 1.0, 1.0, "OUTALL")),
])
def test_prompt_arguments_read_as_the_builtin_lora_reads_them(positional, named, expected):
    assert parse_request(positional, named) == expected


def test_default_strength_is_the_hosts():
    assert parse_request(["x"], {}, default=0.6) == Request("x", 0.6, 0.6)


@pytest.mark.parametrize("positional, named, message", [
    ([], {}, "name is required"),
    (["x", "strong"], {}, "must be a number"),
    (["x"], {"unet": "?"}, "unet= must be a number"),
    (["x"], {"dyn": "4"}, "unknown arguments dyn="),
    (["x", "1", "1", "8"], {}, "unknown arguments '8'"),
    (["x", "nan"], {}, "te strength is nan; strengths must be finite"),
    (["x"], {"unet": "inf"}, "unet= is inf; strengths must be finite"),
])
def test_bad_arguments_are_refused_by_name(positional, named, message):
    with pytest.raises(loha.LohaError, match=message):
        parse_request(positional, named)


# --------------------------------------------------------------------------- files and cards


@pytest.fixture(scope="module")
def parts():
    return sd1_parts()


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    tags = json.dumps({"1_x": {"red fox": 3, "snow": 1}})
    b = make_loha_file(parts, folder / "b.safetensors", seed=1, metadata={"ss_tag_frequency": tags})
    c = make_loha_file(parts, folder / "c.safetensors", seed=2, use_tucker=True)
    return {"b": b, "c": c}


def test_listing_lets_the_first_folder_win_a_name(tmp_path):
    first, second = tmp_path / "loha", tmp_path / "lora"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    for path in (first / "sub" / "x.safetensors", second / "x.safetensors", second / "y.safetensors",
                 second / "z.pt"):
        path.write_bytes(b"")
    assert list_networks([str(first), str(second), str(tmp_path / "missing")]) == {
        "x": str(first / "sub" / "x.safetensors"), "y": str(second / "y.safetensors")}


def test_card_shows_shape_tags_and_the_preferred_weight(files, tmp_path):
    meta = card_metadata(loha.load(files["b"]))
    assert meta["family"] == "SD 1.x"
    assert meta["tags"] == "red fox (3), snow (1)"
    assert meta["rank"] == "4" and meta["modules"] > 0
    assert "ss_tag_frequency" not in meta  # shown as tags instead
    path = tmp_path / "n.safetensors"
    assert preferred_weight(str(path), 1.0) == 1.0
    (tmp_path / "n.json").write_text(json.dumps({"preferred weight": 0.7}))
    assert preferred_weight(str(path), 1.0) == 0.7


# --------------------------------------------------------------------------- the live model


def ldm_model(parts) -> torch.nn.Module:
    """A module tree whose parameters carry the LDM checkpoint names, as the WebUI's model does."""
    state = ldm_state_dict({"unet": parts["unet"].state_dict(), "text_encoder": parts["text_encoder"].state_dict()}, family="sd1")
    root = torch.nn.Module()
    for key, tensor in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if tensor.is_floating_point():
            module.register_parameter(name, torch.nn.Parameter(tensor.detach().clone(), requires_grad=False))
    return root


def weights(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_patches_once_per_set_and_restores_bit_for_bit(parts, files):
    model = ldm_model(parts)
    base = weights(model)
    active = ActiveSet()
    b = loha.load(files["b"])
    assert active.update(model, [(Request("b", 0.8, 0.5), files["b"])])
    assert same(weights(model), _patched_state(base, (b, 0.8, 0.5)))
    live = model.get_parameter(next(iter(active.handle.patched_keys))).data.clone()
    assert not active.update(model, [(Request("b", 0.8, 0.5), files["b"])])  # same set: nothing written
    assert torch.equal(model.get_parameter(next(iter(active.handle.patched_keys))).data, live)
    assert active.update(model, [(Request("b", 0.3, 0.3), files["b"]), (Request("c", 1.0, 1.0), files["c"])])
    expected = _patched_state(base, (b, 0.3, 0.3), (loha.load(files["c"]), 1.0, 1.0))
    assert same(weights(model), expected)
    assert active.update(model, [])
    assert same(weights(model), base)
    assert not active.update(model, [])


def _patched_state(base, *uses):
    """What the core's patch() makes of a copy of the base weights."""
    state = {k: v.clone() for k, v in base.items()}
    loha.apply(state, list(uses))
    return state


def test_block_weights_scale_only_their_blocks(parts, files):
    model = ldm_model(parts)
    base = weights(model)
    active = ActiveSet()
    only_in01 = ",".join(["0", "0", "1"] + ["0"] * 23)  # 26 values: BASE, IN00–IN11, MID, OUT00–OUT11
    active.update(model, [(Request("b", 1.0, 1.0, only_in01), files["b"])])
    changed = {k for k, v in weights(model).items() if not torch.equal(v, base[k])}
    # the time embedding and conv_out are in no block: the block weights leave them at the full strength
    in_no_block = ("model.diffusion_model.time_embed.", "model.diffusion_model.out.2.")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.") for k in changed)
    assert all(k.startswith(("model.diffusion_model.input_blocks.1.", *in_no_block)) for k in changed)
    with pytest.raises(loha.LohaError, match="values"):
        active.update(model, [(Request("b", 1.0, 1.0, "1,2,3"), files["b"])])
    active.clear(model)
    assert same(weights(model), base)


def test_a_reloaded_model_is_not_restored_from_stale_backups(parts, files):
    model = ldm_model(parts)
    active = ActiveSet()
    active.update(model, [(Request("b"), files["b"])])
    reloaded = {k: torch.randn_like(v) for k, v in weights(model).items()}
    with torch.no_grad():
        for k, v in reloaded.items():
            model.get_parameter(k).copy_(v)
    active.forget()  # the host's model-loaded callback
    assert not active.update(model, [])
    assert same(weights(model), reloaded)


def test_live_parameters_follow_device_moves(parts):
    model = ldm_model(parts)
    live = LiveParameters(model)
    key = next(iter(live))
    before = live[key]
    model.to(torch.float64)  # new tensors behind the same parameters, as low-VRAM moves make
    assert live[key].dtype == torch.float64 and live[key] is not before
    with pytest.raises(KeyError):
        live["no.such.weight"]


# --------------------------------------------------------------------------- with the built-in Lora


def builtin_forward(model, deltas: dict[str, torch.Tensor], wanted: tuple) -> None:
    """The built-in Lora's lazy patching of each layer at its forward (see the module doc)."""
    for key, delta in deltas.items():
        layer = model.get_submodule(key.rpartition(".")[0])
        current = getattr(layer, "network_current_names", ())
        if getattr(layer, "network_weights_backup", None) is None and wanted:
            layer.network_weights_backup = layer.weight.detach().clone()
        if getattr(layer, "network_bias_backup", None) is None and getattr(layer, "bias", None) is not None:
            layer.network_bias_backup = layer.bias.detach().clone()
        if current != wanted:
            if getattr(layer, "network_weights_backup", None) is not None:
                layer.weight.data.copy_(layer.network_weights_backup)
            if wanted:
                layer.weight.data += delta
            layer.network_current_names = wanted


@pytest.mark.parametrize("order", ["loha first", "lora first"])
def test_coexists_with_the_builtin_lora(parts, files, order):
    model = ldm_model(parts)
    base = weights(model)
    b = loha.load(files["b"])
    with_b = _patched_state(base, b)
    keys = [k for k in base if not torch.equal(with_b[k], base[k])][:6]  # layers both touch
    keys += ["model.diffusion_model.out.2.weight"]  # a layer only the LoRA touches
    g = torch.Generator().manual_seed(0)
    delta_a = {k: torch.randn(base[k].shape, generator=g) * 0.01 for k in keys}
    with_a = {k: base[k] + delta_a.get(k, 0) for k in base}
    active = ActiveSet()

    def generate(lora: bool, loha_on: bool):
        active.update(model, [(Request("b"), files["b"])] if loha_on else [])
        builtin_forward(model, delta_a, ("a",) if lora else ())

    generate(lora=order == "lora first", loha_on=order == "loha first")
    generate(lora=True, loha_on=True)
    both = weights(model)
    expected = dict(with_b)
    for k, d in delta_a.items():
        expected[k] = expected[k] + d
    assert all(torch.allclose(both[k], expected[k], atol=1e-6) for k in base)
    generate(lora=True, loha_on=False)  # the LoHa leaves, the LoRA stays
    assert all(torch.allclose(weights(model)[k], with_a[k], atol=1e-6) for k in base)
    generate(lora=True, loha_on=True)
    assert all(torch.allclose(weights(model)[k], expected[k], atol=1e-6) for k in base)
    generate(lora=False, loha_on=True)  # the LoRA leaves, the LoHa stays
    assert same(weights(model), with_b)
    generate(lora=False, loha_on=False)
    assert same(weights(model), base)


def test_release_hands_back_fused_attention_from_its_backup():
    attention = torch.nn.MultiheadAttention(8, 2)
    model = torch.nn.Sequential(torch.nn.Module())
    model[0].add_module("attn", attention)
    base = (attention.in_proj_weight.detach().clone(), attention.out_proj.weight.detach().clone())
    attention.network_weights_backup = tuple(t.clone() for t in base)
    attention.network_bias_backup = attention.out_proj.bias.detach().clone()
    attention.network_current_names = (("a", 1.0, 1.0, None),)
    with torch.no_grad():
        attention.in_proj_weight += 1
        attention.out_proj.weight += 1
    assert release_builtin(model, ["0.attn.out_proj.weight"]) == 1
    assert torch.equal(attention.in_proj_weight, base[0]) and torch.equal(attention.out_proj.weight, base[1])
    assert attention.network_weights_backup is None and attention.network_current_names == ()


def test_a_broken_file_is_left_out_and_named_while_the_good_one_applies(parts, files, tmp_path):
    model = ldm_model(parts)
    base = weights(model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    active = ActiveSet()
    wanted = [(Request("broken"), str(broken)), (Request("b", 0.8, 0.5), files["b"]),
              (Request("c", 1.0, 1.0, "1,2,3"), files["c"])]
    with pytest.raises(loha.LohaError, match="broken.safetensors"):
        active.update(model, wanted)  # the library default: refuse
    assert same(weights(model), base)
    assert active.update(model, wanted, keep_going=True)
    assert set(active.failed) == {"broken", "c"}
    assert "not a readable safetensors file" in active.failed["broken"] and "3 values" in active.failed["c"]
    assert same(weights(model), _patched_state(base, (loha.load(files["b"]), 0.8, 0.5)))
    text = not_applied_text(active.failed, {"broken": str(broken)})
    assert text.startswith("broken: not a readable safetensors file") and str(tmp_path) not in text
    assert not active.update(model, wanted, keep_going=True)  # nothing changed: nothing written, failures kept
    assert set(active.failed) == {"broken", "c"}
    active.clear(model)
    assert same(weights(model), base) and active.failed == {}


def test_a_file_replaced_on_disk_is_applied_anew(parts, files, tmp_path):
    model = ldm_model(parts)
    base = weights(model)
    path = tmp_path / "swap.safetensors"
    shutil.copy(files["b"], path)
    active = ActiveSet()
    assert active.update(model, [(Request("swap"), str(path))])
    shutil.copy(files["c"], tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", path)  # the same name, another file
    assert active.update(model, [(Request("swap"), str(path))])
    assert same(weights(model), _patched_state(base, (loha.load(files["c"]), 1.0, 1.0)))
    active.clear(model)


def test_cards_list_loha_files_and_unreadable_ones(parts, files, tmp_path):
    own, lora = tmp_path / "LoHa", tmp_path / "Lora"
    own.mkdir(), lora.mkdir()
    shutil.copy(files["b"], own / "mine.safetensors")
    shutil.copy(files["c"], lora / "loha-in-lora.safetensors")
    tensors = {"lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1),
               "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}
    save_file(tensors, lora / "plain-lora.safetensors")
    (lora / "broken.safetensors").write_bytes(b"\x80\x04 pickled")
    listed = card_files([str(own)], [str(lora)], NetworkFiles())
    assert sorted(listed) == ["broken", "loha-in-lora", "mine"]  # the plain LoRA is the Lora page's
    assert listed["mine"][1] is None and listed["loha-in-lora"][1] is None
    assert "pickle" in listed["broken"][1]
