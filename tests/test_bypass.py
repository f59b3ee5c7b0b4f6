"""loha.bypass against loha.apply: the same outputs, and modules left exactly as they were.

Every file here is written by lycoris-lora for small real SD1-like and SDXL-like models;
each case runs two networks at several strengths (block weights on one of them) in both
bypass forms: W' built in tiles (the default for torch's own layers) and f(x) + ΔW·x (what
layers with quantized weights get, forced here by a `layer_weights` that reads nothing).
"""

from __future__ import annotations

import pytest
import torch

import loha
import tiny_models as T
import tiny_dit
import tiny_pipelines
from loha.errors import LohaError
from loha.keys import blocks

ADDED = {"merged": None, "added": lambda module, x: None}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many tiny ops: on a busy machine OpenMP's barriers cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tol(ours, want, msg=""):
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=2e-5, msg=msg)


def snapshot(parts):
    """Every module object, its __dict__ keys, hooks and parameters (objects and values)."""
    out = {}
    for part, model in parts.items():
        for name, module in model.named_modules():
            hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
            out[f"{part}.{name}"] = (module, sorted(module.__dict__), [len(h) for h in hooks],
                                     {k: (p, p.data.clone()) for k, p in module.named_parameters(recurse=False)})
    return out


def assert_as_before(before, parts):
    after = snapshot(parts)
    assert before.keys() == after.keys()
    for name, (module, keys, hooks, params) in before.items():
        module2, keys2, hooks2, params2 = after[name]
        assert module2 is module and keys2 == keys and hooks2 == hooks == [0, 0, 0], name
        assert "forward" not in module.__dict__, name
        for key, (param, value) in params.items():
            assert params2[key][0] is param and torch.equal(param.data, value), f"{name}.{key}"


CASES = {  # (parts, lycoris keyword arguments of the first file, its dtype)
    "sd1-plain": (T.sd1_parts, {}, torch.float32),
    "sd1-tucker-fp16-file": (T.sd1_parts, {"use_tucker": True}, torch.float16),
    "sd1-dora-out": (T.sd1_parts, {"dora_wd": True}, torch.float32),
    "sd1-dora-in": (T.sd1_parts, {"dora_wd": True, "wd_on_output": False}, torch.float32),
    "sd1-mixed-kinds": (T.sd1_parts, None, torch.float32),
    "sdxl-plain": (T.sdxl_parts, {}, torch.float32),
    "sdxl-tucker-dora-alpha-ne-rank": (T.sdxl_parts, {"use_tucker": True, "dora_wd": True, "alpha": 1.0, "conv_alpha": 8.0}, torch.float32),
}
#: (first network's unet, te; second network's unet, te) — the second has block weights
STRENGTHS = [(0.7, 0.4, 1.0, None), (-0.5, 1.2, 0.3, 0.8)]


@pytest.mark.parametrize("case", list(CASES))
def test_bypass_equals_patch(case, tmp_path):
    make_parts, kwargs, dtype = CASES[case]
    parts = make_parts()
    if kwargs is None:
        first = T.make_mixed_file(parts, tmp_path / "first.safetensors")
    else:
        first = T.make_loha_file(parts, tmp_path / "first.safetensors", dtype=dtype, **kwargs)
    second = T.make_loha_file(parts, tmp_path / "second.safetensors", seed=5, dim=2, alpha=1.0)
    family = "sd1" if make_parts is T.sd1_parts else "sdxl"
    weights = blocks.parse("1,0,0.5,1,1,0.5,1,0.25,1,0,1,1" if family == "sdxl" else "INALL", family)
    nets = [loha.load(first), loha.load(second)]
    base = T.run_parts(parts)

    def uses(s):
        return [loha.Use(nets[0], s[0], s[1]), loha.Use(nets[1], s[2], s[3], weights)]

    patched = []
    for s in STRENGTHS:
        handle = loha.apply(parts, uses(s))
        assert handle.unmatched == {}
        patched.append(T.run_parts(parts))
        handle.restore()
    before = snapshot(parts)
    for form, layer_weights in ADDED.items():
        handle = loha.bypass(parts, uses(STRENGTHS[0]), layer_weights=layer_weights)
        assert handle.unmatched == {} and handle.skipped == {}
        for s, want in list(zip(STRENGTHS, patched))[-1 if form == "added" else 0 :]:
            handle.set_strengths([(s[0], s[1]), (s[2], s[3])])
            ours = T.run_parts(parts)
            for part in want:
                assert (want[part] - base[part]).abs().max() > 1e-3, "the networks must change the outputs"
                tol(ours[part], want[part], f"{form} {part} at {s}")
        handle.remove()
        assert_as_before(before, parts)
        assert all(torch.equal(T.run_parts(parts)[p], base[p]) for p in base)


def test_strength_changes_recompute_nothing(tmp_path, monkeypatch):
    """set_strengths is read at the next forward: no factor is prepared again, no DoRA norm recomputed."""
    from loha import bypassing as bypass_module

    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors", dora_wd=True)
    handle = loha.bypass(parts, (path, 1.0, 1.0), layer_weights=ADDED["added"])
    T.run_parts(parts)
    calls = []
    monkeypatch.setattr(bypass_module, "kernel_step", lambda *a: calls.append("step"))
    monkeypatch.setattr(bypass_module, "dora_scales", lambda *a: calls.append("dora"))
    handle.set_strengths([(0.3, 0.6)])
    ours = T.run_parts(parts)
    assert calls == []
    handle.remove()
    loha.apply(parts, (path, 0.3, 0.6))
    want = T.run_parts(parts)
    for part in want:
        tol(ours[part], want[part], part)


def test_enabled_switch_and_zero_strength_give_the_base_bit_for_bit(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    base = T.run_parts(parts)
    handle = loha.bypass(parts, path)
    handle.enabled = False
    assert all(torch.equal(T.run_parts(parts)[p], base[p]) for p in base)
    handle.enabled = True
    handle.set_strengths([0.0])
    assert all(torch.equal(T.run_parts(parts)[p], base[p]) for p in base)
    handle.set_strengths([1.0])
    assert not torch.equal(T.run_parts(parts)["unet"], base["unet"])


def test_two_handles_on_shared_layers_removed_in_either_order(tmp_path):
    parts = T.sd1_parts()
    a = T.make_loha_file(parts, tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(parts, tmp_path / "b.safetensors", seed=2, dora_wd=True)
    handle = loha.apply(parts, [(a, 0.6), (b, 0.9)])
    both = T.run_parts(parts)
    handle.restore()
    handle = loha.apply(parts, (b, 0.9))
    only_b = T.run_parts(parts)
    handle.restore()
    before = snapshot(parts)
    for order in ((0, 1), (1, 0)):
        handles = [loha.bypass(parts, (a, 0.6)), loha.bypass(parts, (b, 0.9))]  # one chain per layer, in order
        ours = T.run_parts(parts)
        for part in both:
            tol(ours[part], both[part], part)
        handles[order[0]].remove()
        if order[0] == 0:
            ours = T.run_parts(parts)
            for part in only_b:
                tol(ours[part], only_b[part], part)
        handles[order[1]].remove()
        assert_as_before(before, parts)


def test_fp16_model_matches_its_patched_weights(tmp_path):
    """Merged tiles are rounded to fp16 as the patched weight is: the outputs agree to fp16 rounding."""
    parts = {k: v.half() for k, v in T.sd1_parts().items()}
    path = T.make_loha_file(T.sd1_parts(), tmp_path / "n.safetensors", use_tucker=True)
    x = {"sample": torch.randn(1, 4, 8, 8).half(), "timestep": torch.tensor([10]),
         "encoder_hidden_states": torch.randn(1, 5, 768).half()}
    handle = loha.apply(parts, (path, 0.8))
    want = parts["unet"](**x).sample.float()
    handle.restore()
    handle = loha.bypass(parts, (path, 0.8))
    ours = parts["unet"](**x).sample.float()
    handle.remove()
    torch.testing.assert_close(ours, want, rtol=2e-3, atol=2e-3)


class DequantizingLinear(torch.nn.Linear):
    """A layer keeping fp8 weights and dequantizing them in its own forward (as quantized packs do)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_linears(model: torch.nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = DequantizingLinear(child.in_features, child.out_features, child.bias is not None)
                layer.weight = torch.nn.Parameter(child.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
                layer.bias = child.bias
                setattr(module, name, layer)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_layers_that_dequantize_in_their_own_forward(tmp_path, dtype):
    """Against the patch of the same values in fp32: bypass adds exact ΔW·x beside the fp8 layer."""
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors", dora_wd=True)
    quantize_linears(parts["text_encoder"])
    for module in parts["text_encoder"].modules():
        if isinstance(module, DequantizingLinear):
            module.weight.data = module.weight.data.to(dtype)
    reference = T.sd1_parts()
    quantize_linears(reference["text_encoder"])  # the same fp8 values, held in fp32 to patch them
    for ours, ref in zip(parts["text_encoder"].modules(), reference["text_encoder"].modules()):
        if isinstance(ours, DequantizingLinear):
            ref.weight.data = ours.weight.data.float()
    base = T.run_parts(parts)
    handle = loha.bypass(parts, (path, 0.8, 0.7))
    ours = T.run_parts(parts)
    handle.remove()
    loha.apply(reference, (path, 0.8, 0.7))
    want = T.run_parts(reference)
    for part in want:
        assert (ours[part] - base[part]).abs().max() > 1e-3
        tol(ours[part], want[part], part)
    assert all(m.weight.dtype == dtype for m in parts["text_encoder"].modules() if isinstance(m, DequantizingLinear))


def test_convolutions_with_groups_dilation_and_padding_modes(tmp_path):
    """Layers a UNet does not have, put into one: the products repeat what each convolution does."""
    from safetensors.torch import save_file

    parts = T.sd1_parts()
    unet = parts["unet"]
    with torch.no_grad():
        unet.conv_in = torch.nn.Conv2d(4, 32, 3, padding=2, dilation=2, padding_mode="reflect")
        unet.down_blocks[1].resnets[0].conv2 = torch.nn.Conv2d(64, 64, 3, padding=1, groups=4, padding_mode="circular")
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape, tucker in (("conv_in", (32, 4, 3, 3), True), ("down_blocks_1_resnets_0_conv2", (64, 16, 3, 3), False)):
        o, i, r = shape[0], shape[1], 4
        p = f"lora_unet_{name}."
        if tucker:
            for n in "12":
                tensors |= {p + f"hada_w{n}_a": torch.randn(r, o, generator=g) * 0.2, p + f"hada_w{n}_b": torch.randn(r, i, generator=g) * 0.2,
                            p + f"hada_t{n}": torch.randn(r, r, 3, 3, generator=g) * 0.2}
        else:
            for n in "12":
                tensors |= {p + f"hada_w{n}_a": torch.randn(o, r, generator=g) * 0.2, p + f"hada_w{n}_b": torch.randn(r, i * 9, generator=g) * 0.2}
        tensors[p + "alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "convs.safetensors")
    base = T.run_parts(parts)
    handle = loha.apply(parts, (str(tmp_path / "convs.safetensors"), 0.9))
    want = T.run_parts(parts)
    handle.restore()
    for layer_weights in ADDED.values():
        handle = loha.bypass(parts, (str(tmp_path / "convs.safetensors"), 0.9), layer_weights=layer_weights)
        ours = T.run_parts(parts)
        handle.remove()
        assert (want["unet"] - base["unet"]).abs().max() > 1e-3
        tol(ours["unet"], want["unet"])


def test_gradients_reach_the_inputs(tmp_path):
    """Bypass is for inference, but what flows back to the input is that of the patched model."""
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    unet = parts["unet"]

    def input_grad():
        inputs = T.unet_inputs(unet)
        sample = inputs.pop("sample").requires_grad_(True)
        unet(sample, **inputs).sample.square().sum().backward()
        return sample.grad

    handle = loha.apply(parts, path)
    want = input_grad()
    handle.restore()
    for layer_weights in ADDED.values():
        handle = loha.bypass(parts, path, layer_weights=layer_weights)
        tol(input_grad(), want)
        handle.remove()


def test_refusals_change_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    with pytest.raises(LohaError, match="state dict"):
        loha.bypass(tiny_pipelines.ldm_state_dict(parts), path)
    tensors = load_file(path)
    tensors["lora_unet_up_blocks_1_attentions_1_proj_out.hada_w1_a"] = torch.ones(40, 4)  # made for a wider layer
    tensors["lora_unet_up_blocks_1_attentions_1_proj_out.hada_w2_a"] = torch.ones(40, 4)
    save_file(tensors, tmp_path / "bad.safetensors")
    before = snapshot(parts)
    with pytest.raises(LohaError, match="proj_out"):
        loha.bypass(parts, str(tmp_path / "bad.safetensors"))
    assert_as_before(before, parts)


class ExtraArgumentLinear(torch.nn.Linear):
    """A layer whose forward takes more than its input (as some packs' layers do)."""

    def forward(self, x, note=None):
        return super().forward(x)


def test_layers_called_with_more_than_their_input_keep_the_network(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    attention = parts["text_encoder"].get_submodule(
        "text_model.encoder.layers.0.self_attn" if hasattr(parts["text_encoder"], "text_model") else "encoder.layers.0.self_attn")
    plain = attention.q_proj
    attention.q_proj = ExtraArgumentLinear(plain.in_features, plain.out_features)
    attention.q_proj.load_state_dict(plain.state_dict())
    x = torch.randn(3, plain.in_features)
    handle = loha.apply(parts, (path, 0.9))
    want = attention.q_proj(x)
    handle.restore()
    base = attention.q_proj(x)
    handle = loha.bypass(parts, (path, 0.9))
    assert (want - base).abs().max() > 1e-3
    tol(attention.q_proj(x, note="kept"), want)
    tol(attention.q_proj(x), want)
    handle.remove()


@pytest.mark.parametrize("family", tiny_dit.FAMILIES)
def test_diffusion_transformers(family, tmp_path):
    """Flux, SD3, PixArt, Qwen-Image, Wan (its 3-D patch convolution too): bypass gives the patched outputs."""
    parts = tiny_dit.parts(family)
    path = tiny_dit.make_file(family, parts, tmp_path / f"{family}.safetensors")
    base = tiny_dit.run(family, parts)
    handle = loha.apply(parts, (path, 0.8, 0.6))
    want = tiny_dit.run(family, parts)
    handle.restore()
    before = snapshot(parts)
    handle = loha.bypass(parts, (path, 0.8, 0.6))
    assert handle.unmatched == {}
    ours = tiny_dit.run(family, parts)
    handle.remove()
    for part in want:
        assert (want[part] - base[part]).abs().max() > 1e-3, f"{part}: the network changes nothing"
        tol(ours[part], want[part], part)
    assert_as_before(before, parts)
