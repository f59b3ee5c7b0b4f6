"""Oracle tests: our patched models against LyCORIS's own forward path, on files it wrote.

LyCORIS's forward path (not its merge_to, which applies alpha/rank twice) is the
reference: the same file loaded into lycoris-lora's modules and run wrapped around an
untouched copy of the model must give the outputs of our patched model.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import loha
import tiny_models as T


def state(parts):
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def assert_state_equal(before, parts):
    after = state(parts)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


CASES = {
    "sd1-plain": (T.sd1_parts, {}, torch.float32, 0.7),
    "sd1-fp16-file": (T.sd1_parts, {}, torch.float16, 1.0),
    "sd1-bf16-file": (T.sd1_parts, {}, torch.bfloat16, 0.5),
    "sd1-tucker": (T.sd1_parts, {"use_tucker": True}, torch.float32, 1.0),
    "sd1-dora-out": (T.sd1_parts, {"dora_wd": True}, torch.float32, 1.0),
    "sd1-dora-in": (T.sd1_parts, {"dora_wd": True, "wd_on_output": False}, torch.float32, 1.0),
    "sdxl-plain": (T.sdxl_parts, {}, torch.float32, 0.8),
    "sdxl-tucker-alpha-ne-rank": (T.sdxl_parts, {"use_tucker": True, "alpha": 1.0, "conv_alpha": 8.0}, torch.float32, 1.0),
    # lycoris train_norm: w_norm/b_norm modules on every GroupNorm/LayerNorm of the targeted blocks
    "sdxl-train-norm": (T.sdxl_parts, {"train_norm": True}, torch.float32, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_patch_matches_lycoris_forward(case, tmp_path):
    make_parts, kwargs, dtype, strength = CASES[case]
    parts = make_parts()
    path = T.make_loha_file(parts, tmp_path / f"{case}.safetensors", dtype=dtype, **kwargs)
    base = T.run_parts(parts)
    before = state(parts)

    handle = loha.apply(parts, (path, strength))
    assert handle.unmatched == {}
    ours = T.run_parts(parts)
    T.assert_outputs_close(ours, T.lycoris_outputs(make_parts, kwargs, path, strength), base)

    handle.restore()
    assert_state_equal(before, parts)


def test_loaded_network_description(tmp_path):
    parts = T.sdxl_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors", dtype=torch.float16, use_tucker=True, dora_wd=True)
    loaded = loha.load(path)
    assert loaded.family == "sdxl"
    assert loaded.text_encoders == {"te1", "te2"}
    assert loaded.unknown_keys == []
    kinds = {m.kind for m in loaded.modules.values()}
    assert kinds == {"loha"}
    conv = loaded.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.tucker and conv.dora and conv.rank == 4 and conv.alpha == 2.0
    assert loaded.dtypes() == {"F16"}


def test_strength_change_equals_fresh_patch(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    handle = loha.apply(parts, (path, 1.0, 0.3))
    handle.set_strengths([(0.4, 0.9)])
    changed = state(parts)
    handle.restore()

    fresh = T.sd1_parts()
    loha.apply(fresh, (path, 0.4, 0.9))
    assert_state_equal(changed, fresh)


def test_two_networks_and_separate_te_strength(tmp_path):
    parts = T.sd1_parts()
    a = T.make_loha_file(parts, tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(parts, tmp_path / "b.safetensors", seed=2, use_tucker=True)
    before = state(parts)
    handle = loha.apply(parts, [(a, 0.5, 0.0), (b, 1.0, 0.25)])
    # text encoder: only b, at 0.25; check one weight against the reference math
    net_b = loha.load(b)
    mod = net_b.modules["lora_te_encoder_layers_0_mlp_fc1"]
    t = net_b.tensors(mod)
    expected = before["text_encoder.encoder.layers.0.mlp.fc1.weight"] + 0.25 * mod.alpha / mod.rank * (
        (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]))
    torch.testing.assert_close(parts["text_encoder"].encoder.layers[0].mlp.fc1.weight, expected)
    handle.restore()
    assert_state_equal(before, parts)


def test_unmatched_names_are_listed(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    tensors = load_file(path)
    tensors["lora_unet_no_such_block_proj.hada_w1_a"] = torch.ones(4, 2)
    tensors["lora_unet_no_such_block_proj.hada_w1_b"] = torch.ones(2, 4)
    tensors["lora_unet_no_such_block_proj.hada_w2_a"] = torch.ones(4, 2)
    tensors["lora_unet_no_such_block_proj.hada_w2_b"] = torch.ones(2, 4)
    tensors["lora_unet_conv_in.strange_suffix"] = torch.ones(1)
    save_file(tensors, tmp_path / "extra.safetensors")
    net = loha.load(tmp_path / "extra.safetensors")
    assert net.unknown_keys == ["lora_unet_conv_in.strange_suffix"]
    with pytest.warns(UserWarning) as warned:
        handle = loha.apply(parts, net)
    assert handle.unmatched == {str(tmp_path / "extra.safetensors"): ["lora_unet_no_such_block_proj"]}
    assert handle.unknown_keys == {str(tmp_path / "extra.safetensors"): ["lora_unet_conv_in.strange_suffix"]}
    said = " ".join(str(w.message) for w in warned)
    assert "1 module names match no weight" in said and "1 keys are of no known kind" in said


def test_shape_mismatch_changes_nothing(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    tensors = load_file(path)
    # A module late in the file made for a wider layer: everything before it must not be applied.
    key = "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2"
    for suffix in ("hada_w1_b", "hada_w2_b"):
        r, i = tensors[f"{key}.{suffix}"].shape
        tensors[f"{key}.{suffix}"] = torch.randn(r, i + 3)
    save_file(tensors, tmp_path / "bad.safetensors")
    before = state(parts)
    with pytest.raises(loha.ShapeError) as err:
        loha.apply(parts, str(tmp_path / "bad.safetensors"))
    message = str(err.value)
    assert "bad.safetensors" in message and key in message and "ff.net.2.weight" in message
    assert_state_equal(before, parts)


def test_out_of_memory_while_planning_is_reported_as_memory(tmp_path, monkeypatch):
    """Not as a ShapeError blaming the file, and with the model unchanged."""
    import loha.patch

    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    real, calls = loha.patch._prepare_checked, []

    def runs_out_late(*args):
        calls.append(1)
        if len(calls) == 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(loha.patch, "_prepare_checked", runs_out_late)
    before = state(parts)
    with pytest.raises(loha.LohaError) as err:
        loha.apply(parts, path)
    assert not isinstance(err.value, loha.ShapeError)
    assert "out of memory" in str(err.value) and "n.safetensors" in str(err.value)
    assert_state_equal(before, parts)


def test_inconsistent_factors_are_refused_on_load(tmp_path):
    save_file({"lora_unet_conv_in.hada_w1_a": torch.ones(8, 2), "lora_unet_conv_in.hada_w1_b": torch.ones(3, 36),
               "lora_unet_conv_in.hada_w2_a": torch.ones(8, 2), "lora_unet_conv_in.hada_w2_b": torch.ones(2, 36)},
              tmp_path / "x.safetensors")
    with pytest.raises(loha.FormatError, match=r"x\.safetensors.*lora_unet_conv_in.*hada_w1_a columns 2 != hada_w1_b rows 3"):
        loha.load(tmp_path / "x.safetensors")


def test_truncated_file_is_a_format_error(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    data = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(loha.FormatError, match="cut.safetensors"):
        loha.load(tmp_path / "cut.safetensors")


def test_nan_factor_changes_nothing(tmp_path):
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    tensors = load_file(path)
    tensors["lora_unet_conv_out.hada_w2_b"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    before = state(parts)
    with pytest.raises(loha.FormatError, match="lora_unet_conv_out.*NaN"):
        loha.apply(parts, str(tmp_path / "nan.safetensors"))
    assert_state_equal(before, parts)


def test_alpha_semantics():
    assert loha.delta.module_scale(None, 4) == 1.0
    assert loha.delta.module_scale(0.0, 4) == 0.0
    assert loha.delta.module_scale(2.0, 8) == 0.25


def test_onetrainer_text_projection_and_class_embedding_names():
    """`lora_te2_text_projection` (OneTrainer) and `lora_unet_class_embedding_*` (SDXL's label_emb under
    its other diffusers name) patch diffusers modules and LDM checkpoints alike; OpenCLIP stores the
    projection input-major, so the checkpoint gets ΔWᵀ."""
    from loha.models.to_ldm import ldm_state_dict

    parts = T.sdxl_parts()
    projection = parts["text_encoder_2"].text_projection.weight
    embedding = parts["unet"].add_embedding.linear_1.weight
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (rows, cols) in {"lora_te2_text_projection": projection.shape,
                               "lora_unet_class_embedding_linear_1": embedding.shape}.items():
        for suffix, shape in (("hada_w1_a", (rows, 2)), ("hada_w1_b", (2, cols)), ("hada_w2_a", (rows, 2)),
                              ("hada_w2_b", (2, cols))):
            tensors[f"{name}.{suffix}"] = torch.randn(shape, generator=g)
    net = loha.from_tensors(tensors, "onetrainer")
    ldm = {k: v.clone() for k, v in ldm_state_dict(parts).items()}
    before = projection.detach().clone()
    assert loha.apply(parts, net).unmatched == {}
    assert loha.apply(ldm, net).unmatched == {}
    assert not torch.equal(projection, before)
    expected = ldm_state_dict(parts)  # the patched diffusers parts, written as a checkpoint
    for key in ("conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"):
        torch.testing.assert_close(ldm[key], expected[key], rtol=0, atol=1e-6)
    comfy = {"clip_g.transformer.text_projection.weight": tuple(projection.shape),
             "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (1280, 1280),
             "clip_l.transformer.text_projection.weight": (768, 768),
             "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
             "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 2048)}
    names = loha.keys.map_state_dict(comfy)  # ComfyUI's live layout: HF orientation
    assert names.lookup("lora_te2_text_projection").key == "clip_g.transformer.text_projection.weight"
    assert not names.lookup("lora_te2_text_projection").transposed
    assert names.lookup("lora_te1_text_projection").key == "clip_l.transformer.text_projection.weight"


def test_reapply_equals_a_fresh_patch_and_keeps_the_originals(tmp_path):
    parts = T.sd1_parts()
    a = T.make_loha_file(parts, tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(parts, tmp_path / "b.safetensors", seed=2, dora_wd=True)
    before = state(parts)
    conv_in = parts["unet"].conv_in.weight
    original = conv_in.data
    handle = loha.apply(parts, (a, 0.5))
    handle.reapply([(b, 0.8, 0.3), (a, 1.0)])
    changed = state(parts)
    handle.restore()
    assert_state_equal(before, parts)
    assert conv_in.data.data_ptr() == original.data_ptr(), "restore puts the original tensor back"
    fresh = T.sd1_parts()
    loha.apply(fresh, [(b, 0.8, 0.3), (a, 1.0)])
    assert_state_equal(changed, fresh)


def test_restore_keeps_the_memory_for_the_next_patch_until_released(tmp_path):
    """Re-patching takes no fresh memory (page faults cost more than the kernels); release_memory lets it go."""
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path / "n.safetensors")
    weight = parts["unet"].conv_in.weight
    handle = loha.apply(parts, path)
    patched = weight.data.data_ptr()
    handle.restore()
    handle = loha.apply(parts, (path, 0.5))
    assert weight.data.data_ptr() == patched
    handle.restore()
    loha.release_memory(parts)
    handle = loha.apply(parts, path)
    handle.restore()
    loha.release_memory()
    from loha import patch

    assert patch._SPARE == {}
