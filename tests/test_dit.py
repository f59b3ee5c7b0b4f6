"""LoHa on diffusion transformers: Flux, SD3, PixArt, Qwen-Image, Wan, and their text encoders.

The oracle is lycoris-lora 4.1.3's own forward path on files made the way SimpleTuner
makes them (tests/tiny_dit.py). The model is patched

- as diffusers modules (``loha.apply`` on the parts, ``load_loha`` on real pipelines);
- for Flux and SD3, in their checkpoint layouts (BFL, MMDiT: fused q/k/v, Flux's fused
  ``linear1``, swapped modulation halves), as a checkpoint holds it and as ComfyUI does,
  and then brought back to diffusers by diffusers' own single-file converter;

and must give lycoris's outputs to fp32 tolerance, and the model back bit for bit on
restore. kohya's checkpoint-path names, which span several diffusers weights, are checked
against the same converter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import dit_checkpoints as C
import loha
import tiny_dit as D
from loha.summary import against, render, summarize

STRENGTH, TE_STRENGTH = 0.8, 0.6


def states(parts: dict) -> dict:
    return {attr: {k: v.clone() for k, v in model.state_dict().items()} for attr, model in parts.items()}


def assert_same_weights(parts: dict, saved: dict) -> None:
    for attr, model in parts.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[attr][key]), (attr, key)


def assert_outputs_close(ours: dict, theirs: dict, base: dict) -> None:
    for part in theirs:
        assert (theirs[part] - base[part]).abs().max() > 1e-3, f"{part}: the network changes nothing"
        torch.testing.assert_close(ours[part], theirs[part], rtol=2e-4, atol=2e-5, msg=part)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One SimpleTuner-style LoHa file per family, over the transformer and every text encoder."""
    folder = tmp_path_factory.mktemp("dit-files")
    return {family: D.make_file(family, D.parts(family), folder / f"{family}.safetensors") for family in D.FAMILIES}


@pytest.fixture(scope="module")
def lycoris(files):
    """lycoris's outputs per family (the oracle), computed once."""
    return {family: D.lycoris_outputs(family, files[family], STRENGTH, TE_STRENGTH) for family in D.FAMILIES}


@pytest.mark.parametrize("family", D.FAMILIES)
def test_diffusers_modules_match_lycoris(family, files, lycoris):
    parts = D.parts(family)
    base, saved = D.run(family, parts), states(parts)
    network = loha.load(files[family])
    assert network.family == family
    handle = loha.apply(parts, (network, STRENGTH, TE_STRENGTH))
    assert handle.unmatched == {} and len(handle.patched_keys) == len(network.modules)
    assert_outputs_close(D.run(family, parts), lycoris[family], base)
    handle.restore()
    assert_same_weights(parts, saved)


def checkpoint_state(family: str, parts: dict, host: str) -> dict:
    """The parts' weights as a checkpoint or ComfyUI holds them (fused transformer, prefixed encoders)."""
    prefixes = C.PREFIXES[host]
    transformer = {k: v.clone() for k, v in parts["transformer"].state_dict().items()}
    state = {prefixes["transformer"] + k: v for k, v in C.to_checkpoint(family, transformer).items()}
    for attr, (kind, _) in D.TEXT_ENCODERS[family].items():
        state.update({k: v.clone() for k, v in C.text_state(kind, parts[attr], prefixes[kind]).items()})
    return state


def load_checkpoint_state(family: str, parts: dict, state: dict, host: str) -> None:
    """Load a checkpoint-layout state back into diffusers parts through diffusers' converter."""
    prefixes = C.PREFIXES[host]
    transformer = {k.removeprefix(prefixes["transformer"]): v for k, v in state.items()
                   if k.startswith(prefixes["transformer"])}
    hidden = parts["transformer"].config.num_attention_heads * parts["transformer"].config.attention_head_dim
    parts["transformer"].load_state_dict(C.to_diffusers(family, dict(transformer), hidden))
    for attr, (kind, _) in D.TEXT_ENCODERS[family].items():
        prefix = prefixes[kind] + ("text_model." if kind.startswith("clip") else "")
        own = parts[attr].state_dict()
        parts[attr].load_state_dict({k: state[prefix + k.removeprefix("text_model.")] if "position_ids" not in k
                                     else v for k, v in own.items()})


@pytest.mark.parametrize("host", ["checkpoint", "comfyui"])
@pytest.mark.parametrize("family", C.LAYOUT_FAMILIES)
def test_checkpoint_layouts_match_lycoris(family, host, files, lycoris):
    parts = D.parts(family)
    base = D.run(family, parts)
    state = checkpoint_state(family, parts, host)
    saved = {k: v.clone() for k, v in state.items()}
    handle = loha.apply(state, (files[family], STRENGTH, TE_STRENGTH))
    assert handle.unmatched == {} and handle._view.names.family == family
    fused = [k for k in handle.patched_keys if k.endswith((".qkv.weight", "linear1.weight"))]
    assert fused, "no fused weight was patched: the test would show nothing about row slices"
    patched = D.parts(family)
    load_checkpoint_state(family, patched, state, host)
    assert_outputs_close(D.run(family, patched), lycoris[family], base)
    handle.restore()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def kohya_file(family: str, checkpoint: dict, path, seed: int = 0) -> str:
    """A LoHa over every weight of the checkpoint's blocks under kohya's names (the checkpoint's
    paths): fused q/k/v and ``linear1`` whole, plus DoRA and a full-diff module with a bias."""
    blocks = ("double_blocks.", "single_blocks.", "joint_blocks.")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in checkpoint.items():
        if not (key.startswith(blocks) and key.endswith(".weight") and value.dim() == 2):
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        (out, inp), rank = value.shape, 4
        if key.endswith(("txt_attn.qkv.weight", "context_block.attn.qkv.weight")):
            tensors[f"{name}.diff"] = torch.randn(out, inp, generator=g) * 0.01
            tensors[f"{name}.diff_b"] = torch.randn(out, generator=g) * 0.01
            continue
        for i in "12":
            tensors[f"{name}.hada_w{i}_a"] = torch.randn(out, rank, generator=g) * 0.1
            tensors[f"{name}.hada_w{i}_b"] = torch.randn(rank, inp, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
        if "linear1" in key or "x_block.attn.qkv" in key:
            tensors[f"{name}.dora_scale"] = value.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(out, 1, generator=g))
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("family", C.LAYOUT_FAMILIES)
def test_kohya_checkpoint_names_span_diffusers_weights(family, tmp_path):
    """kohya's ``lora_unet_double_blocks_0_img_attn_qkv`` on a diffusers model = the fused weight
    patched whole in the checkpoint, then split by diffusers' converter."""
    parts = D.parts(family, text=False)
    model = parts["transformer"]
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    checkpoint = C.to_checkpoint(family, {k: v.clone() for k, v in model.state_dict().items()})
    path = kohya_file(family, checkpoint, tmp_path / "kohya.safetensors")
    network = loha.load(path)
    assert network.family == family

    handle = loha.apply(checkpoint, (network, STRENGTH))
    assert handle.unmatched == {}
    expected = C.to_diffusers(family, checkpoint, hidden)
    saved = states(parts)
    handle = loha.apply(parts, (network, STRENGTH))
    assert handle.unmatched == {}
    split = [t for t in handle._view.names.targets if t.pieces]
    assert {len(t.pieces) for t in split} >= ({3, 4, 2} if family == "flux" else {3, 2})
    changed = 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(value, saved["transformer"][key])
    assert changed > 10
    handle.restore()
    assert_same_weights(parts, saved)


def test_input_axis_dora_over_a_fused_weight_is_refused(tmp_path):
    parts = D.parts("flux", text=False)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {f"{name}.hada_w1_a": torch.ones(48, 2), f"{name}.hada_w1_b": torch.ones(2, 16),
               f"{name}.hada_w2_a": torch.ones(48, 2), f"{name}.hada_w2_b": torch.ones(2, 16),
               f"{name}.dora_scale": torch.ones(1, 16)}
    saved = states(parts)
    with pytest.raises(loha.LohaError, match="input-axis dora_scale.*to_q.weight"):
        loha.apply(parts, loha.from_tensors(tensors, "dora-in"))
    assert_same_weights(parts, saved)


PIPELINES = {
    "flux": ("FluxPipeline", {"scheduler": None, "vae": None, "tokenizer": None, "tokenizer_2": None}),
    "sd3": ("StableDiffusion3Pipeline", {"scheduler": None, "vae": None, "tokenizer": None, "tokenizer_2": None,
                                         "tokenizer_3": None}),
    "pixart": ("PixArtSigmaPipeline", {"scheduler": None, "vae": None, "tokenizer": None}),
    "qwen-image": ("QwenImagePipeline", {"scheduler": None, "vae": None, "tokenizer": None, "text_encoder": None}),
    "wan": ("WanPipeline", {"scheduler": None, "vae": None, "tokenizer": None}),
}


@pytest.mark.parametrize("family", D.FAMILIES)
def test_load_loha_on_transformer_pipelines(family, files, lycoris):
    import diffusers

    from loha.hosts.pipelines import load_loha, set_loha_strength, unload_loha

    parts = D.parts(family)
    cls, others = PIPELINES[family]
    pipe = getattr(diffusers, cls)(**{**parts, **others})
    base, saved = D.run(family, parts), states(parts)
    assert load_loha(pipe, files[family], strength=STRENGTH, te_strength=TE_STRENGTH) == family
    assert_outputs_close(D.run(family, parts), lycoris[family], base)
    set_loha_strength(pipe, family, 0.0, 0.0)
    assert_same_weights(parts, saved)
    set_loha_strength(pipe, family, STRENGTH, TE_STRENGTH)
    unload_loha(pipe)
    assert_same_weights(parts, saved)


def test_flux_pipeline_samples_with_the_loha(files, lycoris):
    """A real FluxPipeline run (given prompt embeddings, latent output) uses the patched transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from loha.hosts.pipelines import load_loha, unload_loha

    def sample(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe(prompt_embeds=torch.randn(1, 3, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                    height=16, width=16, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).images

    def pipeline(parts):
        return FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, parts["text_encoder"], None,
                            parts["text_encoder_2"], None, parts["transformer"])

    pipe = pipeline(D.parts("flux"))
    base = sample(pipe)
    load_loha(pipe, files["flux"], strength=STRENGTH)
    ours = sample(pipe)
    theirs = sample(pipeline(D.lycoris_parts("flux", files["flux"], STRENGTH, STRENGTH)))
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-5)
    unload_loha(pipe)
    assert torch.equal(sample(pipe), base)


def test_merge_streams_a_flux_checkpoint(files, tmp_path):
    """`loha merge` on a Flux all-in-one checkpoint = `loha.apply` on its state dict, bit for bit."""
    from safetensors.torch import load_file

    from loha.merge import merge

    parts = D.parts("flux")
    state = checkpoint_state("flux", parts, "checkpoint")
    source = tmp_path / "flux.safetensors"
    save_file(state, str(source))
    result = merge(str(source), [(files["flux"], STRENGTH, TE_STRENGTH)], str(tmp_path / "out.safetensors"))
    assert result.streamed and result.unmatched == {}
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in result.changed
    expected = copy.deepcopy(state)
    loha.apply(expected, (files["flux"], STRENGTH, TE_STRENGTH))
    merged = load_file(str(tmp_path / "out.safetensors"))
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    match = against(loha.load(files["flux"]), source)  # `loha inspect --against`: the header alone
    assert (match["family"], match["unmatched"], match["error"]) == ("flux", [], None)
    assert against(loha.load(files["sd3"]), source)["unmatched"]  # an SD3 file names what Flux lacks


def test_inspect_names_the_family_or_says_unknown(files, tmp_path):
    assert "family          flux (Flux.1)" in render(summarize(loha.load(files["flux"])))
    assert summarize(loha.load(files["sd3"]))["text_encoders"] == ["te1", "te2", "te3"]
    tensors = {f"lycoris_my_block_{i}_proj.{s}": torch.ones(4, 2) if s.endswith("_a") else torch.ones(2, 4)
               for i in range(3) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    tensors["lora_te1_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.ones(4, 2)
    tensors["lora_te1_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.ones(2, 4)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    text = render(summarize(loha.load(path)))
    assert "family          unknown: 4 modules over the diffusion model (3) and text encoder te1 (1)" in text


class Toy(torch.nn.Module):
    """A model of no known family: a plain module tree."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Linear(6, 12)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(),
                                                              torch.nn.Linear(24, 12)) for _ in range(2))
        self.head = torch.nn.Conv1d(12, 4, 3, padding=1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.transpose(1, 2))


def test_a_model_of_no_known_family_is_patched_by_its_own_paths(tmp_path):
    model, x = Toy().eval(), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
    net = D.simpletuner_network(copy.deepcopy(model), ["Sequential"], conv_dim=2)
    net.save_weights(str(tmp_path / "toy.safetensors"), torch.float32, {})
    reference = copy.deepcopy(model)
    D.simpletuner_network(reference, ["Sequential"], conv_dim=2).load_weights(str(tmp_path / "toy.safetensors"))
    with torch.no_grad():
        theirs = reference(x)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    handle = loha.apply(model, tmp_path / "toy.safetensors")
    assert handle.unmatched == {} and handle._view.names.family is None and len(handle.patched_keys) == 4
    with torch.no_grad():
        ours = model(x)
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-5)
    handle.restore()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_every_spelling_of_a_path_names_one_weight():
    names = loha.patch.ModelView(Toy()).names
    target = names.lookup("lycoris_blocks_1_2")
    assert (target.key, target.rows, target.shape) == ("transformer.blocks.1.2.weight", None, (12, 24))
    for spelling in ("lora_unet_blocks_1_2", "lora_transformer_blocks_1_2", "transformer.blocks.1.2",
                     "base_model.model.blocks.1.2", "diffusion_model.blocks.1.2", "blocks.1.2"):
        assert names.lookup(spelling) is target, spelling
    assert names.names(target)[0] == "lora_unet_blocks_1_2"
    assert names.lookup("lora_te1_blocks_1_2") is None and names.lookup("lycoris_blocks_1_3") is None
