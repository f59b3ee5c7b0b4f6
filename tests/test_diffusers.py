"""loha.hosts.pipelines on tiny SD1-like and SDXL-like pipelines, against two oracles.

The same LyCORIS-made file must give the same pipeline output (a) through load_loha,
(b) through our patcher on the pipeline's weights in the LDM checkpoint layout (the
layout ComfyUI and the WebUI patch; OpenCLIP q/k/v fused for SDXL's second encoder),
copied back into a clean pipeline, and (c) through LyCORIS's own forward path.
"""

import pytest
import torch

import loha
import tiny_models as T
import tiny_pipelines as P
from loha.hosts.pipelines import disable_loha, enable_loha, load_loha, loaded_loha, set_loha_strength, unload_loha

STRENGTH, TE_STRENGTH = 0.7, 0.5
FILE_KWARGS = {"sd1": {}, "sdxl": {"use_tucker": True, "alpha": 1.0, "conv_alpha": 8.0}}


def lycoris_output(family, path):
    pipe = P.PIPELINES[family]()
    net = T.lycoris_network(P.parts(pipe), **FILE_KWARGS[family])
    net.load_weights(path)
    for module in net.unet_loras:
        module.multiplier = STRENGTH
    for module in net.text_encoder_loras:
        module.multiplier = TE_STRENGTH
    return P.run(pipe)


def ldm_output(family, path):
    pipe = P.PIPELINES[family]()
    state = P.ldm_state_dict(pipe)
    handle = loha.apply(state, (path, STRENGTH, TE_STRENGTH))
    assert handle.unmatched == {}
    assert len(handle.patched_keys) > 0
    P.load_ldm_state_dict(pipe, state)
    return P.run(pipe)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_load_loha_matches_ldm_patch_and_lycoris_forward(family, tmp_path):
    pipe = P.PIPELINES[family]()
    path = T.make_loha_file(P.parts(pipe), tmp_path / f"{family}.safetensors", **FILE_KWARGS[family])
    base = P.run(pipe)
    before = P.weights(pipe)

    assert load_loha(pipe, path, strength=STRENGTH, te_strength=TE_STRENGTH) == family
    ours = P.run(pipe)
    assert (ours - base).abs().max() > 1e-2 * base.abs().max(), "the network must change the output"

    torch.testing.assert_close(ours, ldm_output(family, path), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, lycoris_output(family, path), rtol=2e-4, atol=2e-4)

    unload_loha(pipe)
    P.assert_weights_equal(before, pipe)
    assert loaded_loha(pipe) == {}
    assert torch.equal(P.run(pipe), base)


def test_stacked_adapters_strengths_and_partial_unload(tmp_path):
    pipe = P.sd1_pipeline()
    a = T.make_loha_file(P.parts(pipe), tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(P.parts(pipe), tmp_path / "b.safetensors", seed=2, use_tucker=True)
    before = P.weights(pipe)

    load_loha(pipe, a, 0.8, adapter_name="style")
    load_loha(pipe, b, 0.6, 0.3)
    assert loaded_loha(pipe) == {"style": (0.8, None), "b": (0.6, 0.3)}
    both = P.weights(pipe)

    # The same two networks in one plain patch: identical weights (rounded once, in fp32).
    reference = P.sd1_pipeline()
    handle = loha.apply(reference, [(a, 0.8), (b, 0.6, 0.3)])
    P.assert_weights_equal(both, reference)

    set_loha_strength(pipe, "style", 0.2)
    handle.set_strengths([(0.2, None), (0.6, 0.3)])
    P.assert_weights_equal(P.weights(reference), pipe)

    unload_loha(pipe, "style")  # exactly what b alone gives
    handle.restore()
    loha.apply(reference, (b, 0.6, 0.3))
    P.assert_weights_equal(P.weights(reference), pipe)

    load_loha(pipe, a, 1.0, adapter_name="b")  # a name already loaded is replaced
    assert list(loaded_loha(pipe)) == ["b"]
    unload_loha(pipe)
    P.assert_weights_equal(before, pipe)


def test_unmatched_names_change_nothing(tmp_path):
    pipe = P.sd1_pipeline()
    before = P.weights(pipe)
    good = loha.load(T.make_loha_file(P.parts(pipe), tmp_path / "n.safetensors"))
    module = next(iter(good.modules.values()))
    tensors = {f"lora_unet_no_such_block.{s}": t for s, t in good.tensors(module).items()}
    bad = loha.from_tensors(tensors, "bad")
    with pytest.raises(loha.UnmatchedError, match="lora_unet_no_such_block") as info:
        load_loha(pipe, bad)
    assert info.value.names == ["lora_unet_no_such_block"]
    P.assert_weights_equal(before, pipe)
    assert loaded_loha(pipe) == {}
    with pytest.warns(UserWarning, match="no_such_block"):
        load_loha(pipe, bad, strict=False)
    with pytest.raises(loha.LohaError, match="no LoHa adapter 'other'"):
        unload_loha(pipe, "other")


def test_bypass_mode_leaves_the_weights_and_switches_instantly(tmp_path):
    """load_loha(bypass=True): the patched pipeline's output, the weights never written.

    Bypass sums its products in another order than a patched layer (fp32, ~1e-7 apart);
    classifier-free guidance (×7.5 of a difference) grows that to ~1e-4, hence `close`.
    """
    pipe = P.PIPELINES["sdxl"]()
    path = T.make_loha_file(P.parts(pipe), tmp_path / "n.safetensors", **FILE_KWARGS["sdxl"])
    other = T.make_loha_file(P.parts(pipe), tmp_path / "other.safetensors", seed=3, dora_wd=True)
    base = P.run(pipe)
    before = P.weights(pipe)
    load_loha(pipe, path, strength=STRENGTH, te_strength=TE_STRENGTH)
    load_loha(pipe, other, strength=0.4)
    patched = P.run(pipe)
    set_loha_strength(pipe, "other", 1.1, 0.2)
    patched_later = P.run(pipe)
    unload_loha(pipe)

    def close(ours, want):
        torch.testing.assert_close(ours, want, rtol=1e-3, atol=1e-3)

    load_loha(pipe, path, strength=STRENGTH, te_strength=TE_STRENGTH, bypass=True)
    load_loha(pipe, other, strength=0.4)  # the pipeline stays in bypass mode
    P.assert_weights_equal(before, pipe)
    close(P.run(pipe), patched)
    set_loha_strength(pipe, "other", 1.1, 0.2)
    close(P.run(pipe), patched_later)
    disable_loha(pipe)
    assert torch.equal(P.run(pipe), base)
    enable_loha(pipe)
    close(P.run(pipe), patched_later)

    load_loha(pipe, other, strength=1.1, te_strength=0.2, bypass=False)  # back to patching, both networks
    assert not torch.equal(P.weights(pipe)["unet.conv_in.weight"], before["unet.conv_in.weight"])
    torch.testing.assert_close(P.run(pipe), patched_later, rtol=1e-5, atol=1e-5)
    unload_loha(pipe)
    P.assert_weights_equal(before, pipe)
    assert torch.equal(P.run(pipe), base)
    assert not any("forward" in m.__dict__ for part in P.parts(pipe).values() for m in part.modules())
