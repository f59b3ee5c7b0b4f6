"""LoHa -> LoRA conversion (exact, SVD-reduced, several networks into one) and the CLI.

ΔW of the LoRA written must equal the LoHa's (as our patcher applies it) to fp32
rounding; reduced layers must report the error they really have; and the LoRA file
must load in diffusers' own `load_lora_weights` and give the LoHa's pipeline output.
"""

import json
import os

import pytest
import torch

import loha
import tiny_models as T
import tiny_pipelines as P
from loha import delta as D
from loha.app.cli import main
from loha.convert import reduce_rank, to_lora
from loha.hosts.pipelines import load_loha
from loha.keys import map_modules


def deltas_by_target(parts, path, uses=None):
    """{weight key: W_patched − W0} for a network (or several) patched into `parts`, fp64."""
    before = {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}
    handle = loha.apply(parts, uses if uses is not None else path)
    assert handle.unmatched == {}
    after = {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}
    handle.restore()
    return {k: (after[k].double() - before[k].double()) for k in before if not torch.equal(after[k], before[k])}


def assert_same_deltas(ours, expected):
    assert ours.keys() == expected.keys()
    for key in expected:
        scale = expected[key].abs().max()
        assert scale > 0, key
        # fp32 rounding of W0 + ΔW: a few ulps of the weight, never more
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kwargs", [{}, {"use_tucker": True, "alpha": 1.0, "conv_alpha": 8.0}], ids=["plain", "tucker"])
def test_exact_lora_equals_loha(kwargs, tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors", **kwargs)
    report = to_lora((path, 0.8, 0.6), tmp_path / "lora.safetensors", base=parts)
    assert report.max_error == 0
    assert {layer.rank for layer in report.layers} == {16}  # dim 4 → 4²
    net = loha.load(report.out)
    assert {m.kind for m in net.modules.values()} == {"lora"}
    assert any(m.shapes["lora_down.weight"][2:] == (3, 3) for m in net.modules.values())  # conv kernels kept
    assert_same_deltas(deltas_by_target(parts, report.out), deltas_by_target(parts, None, (path, 0.8, 0.6)))


def test_svd_reports_the_error_it_makes(tmp_path):
    parts = T.sd1_parts()
    names = map_modules(parts)
    src = loha.load(T.make_loha_file(parts, tmp_path / "n.safetensors"))
    report = to_lora(src, tmp_path / "r4.safetensors", rank=5, base=parts)
    out = loha.load(report.out)
    loha_delta = {}
    for module in src.modules.values():
        t = src.tensors(module)
        factors = D.hadamard_factors(*(t.get(s) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")))
        loha_delta[names.lookup(module.name)] = D.hadamard_delta(*factors).double() * D.module_scale(module.alpha, module.rank)
    errors = {}
    for layer in report.layers:
        module = out.modules[layer.name]
        t = out.tensors(module)
        up, down = t["lora_up.weight"].double(), t["lora_down.weight"].double()
        lora = (up.flatten(1) @ down.flatten(1)) * (module.alpha / module.rank)
        expected = loha_delta[names.lookup(layer.name)]
        measured = float(torch.linalg.norm(lora - expected) / torch.linalg.norm(expected))
        assert layer.rank == module.rank <= 5 < layer.exact_rank
        assert abs(layer.error - measured) < 1e-5, (layer.name, layer.error, measured)
        errors[layer.name] = layer.error
    assert len(errors) == len(src.modules)
    assert max(errors.values()) > 1e-2  # rank 5 of 16 really drops something


def test_reduce_rank_is_optimal_truncation():
    torch.manual_seed(0)
    up, down = torch.randn(40, 12), torch.randn(12, 30)
    new_up, new_down, error = reduce_rank(up, down, 4)
    s = torch.linalg.svdvals((up @ down).double())
    assert abs(error - float(s[4:].norm() / s.norm())) < 1e-6
    torch.testing.assert_close(torch.linalg.svdvals((new_up @ new_down).double())[:4], s[:4], rtol=1e-5, atol=1e-5)


def test_several_networks_into_one_lora(tmp_path):
    parts = T.sd1_parts()
    a = T.make_loha_file(parts, tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(parts, tmp_path / "b.safetensors", seed=2, use_tucker=True, dim=2, conv_dim=2)
    uses = [(a, 0.8), (b, 0.5, 0.3)]
    report = to_lora(uses, tmp_path / "ab.safetensors", base=parts)
    assert {layer.rank for layer in report.layers} == {16 + 4}
    assert_same_deltas(deltas_by_target(parts, report.out), deltas_by_target(parts, None, uses))
    assert [r["name"] for r in json.loads(loha.load(report.out).metadata["loha_converted_from"])] == ["a", "b"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_file_loads_in_diffusers(family, tmp_path):
    # float64 pipelines: the outputs reach ~200, where fp32 forward noise alone (LoRA
    # layers vs merged weights) exceeds the tolerance on outputs near zero.
    pipe = P.PIPELINES[family]().to(torch.float64)
    path = T.make_loha_file(P.parts(pipe), tmp_path / "n.safetensors")
    lora = to_lora(path, tmp_path / "lora.safetensors", base=pipe).out
    names = list(loha.load(lora).modules)
    if family == "sdxl":  # kohya's SDXL spelling: LDM UNet paths, both encoders with text_model
        assert any(n.startswith("lora_unet_input_blocks_") for n in names)
        assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    base = P.run(pipe)
    pipe.load_lora_weights(lora)
    adapted = [m for part in P.parts(pipe).values() for m in part.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == len(names)  # diffusers dropped nothing
    theirs = P.run(pipe)
    ours_pipe = P.PIPELINES[family]().to(torch.float64)
    load_loha(ours_pipe, path)
    ours = P.run(ours_pipe)
    assert (ours - base).abs().max() > 1e-2 * base.abs().max()
    torch.testing.assert_close(theirs, ours, rtol=2e-4, atol=2e-4)


def save_base_folder(pipe, folder):
    """A diffusers model folder with configs only (what --base needs)."""
    pipe.unet.save_config(os.path.join(folder, "unet"))
    pipe.text_encoder.config.save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def test_cli_convert(tmp_path, capsys):
    pipe = P.sd1_pipeline()
    base = save_base_folder(pipe, str(tmp_path / "base"))
    path = T.make_loha_file(P.parts(pipe), tmp_path / "n.safetensors")

    assert main(["convert", f"{path}:0.5", "-o", str(tmp_path / "l.safetensors"), "--to", "lora",
                 "--rank", "3", "--base", base]) == 0
    printed = capsys.readouterr().out
    assert "rank 16 -> 3, relative error" in printed and "max relative error" in printed
    assert {m.rank for m in loha.load(tmp_path / "l.safetensors").modules.values()} == {3}

    assert main(["convert", path, "-o", str(tmp_path / "peft"), "--to", "peft", "--base", base]) == 0
    assert os.path.isfile(tmp_path / "peft" / "unet" / "adapter_config.json")
    assert main(["convert", str(tmp_path / "peft"), "-o", str(tmp_path / "back.safetensors"), "--to", "lycoris",
                 "--base", base]) == 0
    original, back = loha.load(path), loha.load(tmp_path / "back.safetensors")
    names = map_modules(P.parts(pipe))
    assert len(back.modules) == len(original.modules)
    for module in original.modules.values():  # the same tensors, under kohya's spelling
        again = back.modules[names.names(names.lookup(module.name))[0]]
        ours, theirs = original.tensors(module), back.tensors(again)
        assert ours.keys() == theirs.keys()
        for suffix in ours:
            assert torch.equal(ours[suffix], theirs[suffix]), (module.name, suffix)

    assert main(["convert", path, "-o", str(tmp_path / "l.safetensors"), "--to", "lora", "--base", base]) == 1
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("family, name, shape", [
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (320, 768)),
    ("sd2", "lora_te_text_model_encoder_layers_22_mlp_fc1", (4096, 1024)),
    ("sdxl", "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k", (1280, 2048)),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_q_proj", (1280, 1280)),
])
def test_standard_structures_know_real_names(family, name, shape):
    from loha.convert import base_names

    names = base_names(family)
    assert names.family == family
    target = names.lookup(name)
    assert target is not None and target.shape == shape
    assert names.names(target)[0] == name  # what kohya writes


def test_checkpoint_file_as_base(tmp_path):
    """An LDM checkpoint (OpenCLIP q/k/v fused in SDXL's second encoder) as the base of a LoRA."""
    from safetensors.torch import save_file

    parts = T.sdxl_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors", use_tucker=True)
    state = P.ldm_state_dict(parts)
    save_file(state, tmp_path / "ckpt.safetensors")
    report = to_lora(path, tmp_path / "lora.safetensors", base=str(tmp_path / "ckpt.safetensors"))
    assert any(layer.name.endswith("encoder_layers_0_self_attn_k_proj") for layer in report.layers)

    def patched(network):
        work = {k: v.clone() for k, v in state.items()}
        assert loha.apply(work, network).unmatched == {}
        return {k: work[k].double() - state[k].double() for k in state if not torch.equal(work[k], state[k])}

    assert_same_deltas(patched(report.out), patched(path))


def test_refusals_name_the_module(tmp_path):
    from loha.convert import kohya_to_peft

    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    with pytest.raises(loha.ShapeError, match=r"its target '[^']+' has shape"):  # tiny file, real SD1 base
        kohya_to_peft(path, tmp_path / "peft", base="sd1")
    dora = T.make_loha_file(parts, tmp_path / "dora.safetensors", dora_wd=True)
    with pytest.raises(loha.FormatError, match=r"module 'lora_\w+' is DoRA"):
        to_lora(dora, tmp_path / "lora.safetensors", base=parts)
    with pytest.raises(loha.FormatError, match="PEFT's LoHa cannot hold it"):
        kohya_to_peft(dora, tmp_path / "peft2", base=parts)
    assert not os.path.exists(tmp_path / "lora.safetensors")
