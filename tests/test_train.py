"""The trainer: ΔW autograd (gradcheck, lycoris-lora 4.1.3's fixed Tucker gradients),
module names, dataset, files that lycoris-lora and our loader read with the same ΔW,
resume, stop, checkpoints read through our name map, the command line."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading

import pytest
import torch
from torch.autograd import gradcheck

from loha.train.autograd import loha_layer, scaled_delta, unscaled_delta

pytest.importorskip("diffusers")

F64 = torch.float64


def _param(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _factors(o, i, r, kernel=(), tucker=False):
    if tucker:
        return (_param(r, o), _param(r, i), _param(r, o), _param(r, i), _param(r, r, *kernel), _param(r, r, *kernel))
    k = i
    for size in kernel:
        k *= size
    return (_param(o, r), _param(r, k), _param(o, r), _param(r, k), None, None)


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("tucker", [False, True])
def test_delta_gradcheck(tucker):
    torch.manual_seed(0)
    factors = _factors(5, 3, 2, (3, 3), tucker)
    present = [f for f in factors if f is not None]
    rebuild = (lambda *f: scaled_delta(f, 0.7)) if tucker else (lambda *f: scaled_delta((*f, None, None), 0.7))
    assert gradcheck(rebuild, present)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-tucker", "conv1x1"])
def test_layer_gradcheck(kind):
    """Gradients of the input and of every factor through a whole layer, in float64."""
    torch.manual_seed(0)
    layers = {
        "linear": (torch.nn.Linear(6, 5), (2, 4, 6), ()),
        "conv": (torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), (1, 2, 5, 5), (3, 3)),
        "conv-tucker": (torch.nn.Conv2d(2, 3, 3, padding=1), (1, 2, 4, 4), (3, 3)),
        "conv1x1": (torch.nn.Conv2d(3, 5, 1), (2, 3, 4, 4), ()),
    }
    layer, x_shape, kernel = layers[kind]
    layer = layer.double().requires_grad_(False)
    tucker = kind == "conv-tucker"
    factors = _factors(layer.weight.shape[0], layer.weight.shape[1], 2, kernel, tucker)
    present = [f for f in factors if f is not None]

    def run(x, *f):
        return loha_layer(x, layer, tuple(f) if tucker else (*f, None, None), 0.5)

    assert gradcheck(run, (_param(*x_shape), *present))


def test_layer_matches_plain_autograd():
    """The layer's output and gradients equal those of op(x, W0 + scale·ΔW) by autograd."""
    torch.manual_seed(1)
    layer = torch.nn.Conv2d(4, 6, 3, padding=1).double().requires_grad_(False)
    factors = _factors(6, 4, 3, (3, 3), tucker=True)
    x = _param(2, 4, 5, 5)
    grad = torch.randn(2, 6, 5, 5, dtype=F64)
    ours = loha_layer(x, layer, factors, 0.25)
    ours_grads = torch.autograd.grad(ours, (x, *factors), grad)
    plain = torch.nn.functional.conv2d(x, layer.weight + 0.25 * unscaled_delta(factors), layer.bias, padding=1)
    plain_grads = torch.autograd.grad(plain, (x, *factors), grad)
    torch.testing.assert_close(ours, plain)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tucker", [False, True])
def test_matches_lycoris_fixed_autograd(tucker):
    """Same ΔW and gradients as lycoris-lora 4.1.3's HadaWeight / HadaWeightTucker (the
    release that fixed the Tucker gradients of hada_w1_a/hada_w2_a)."""
    from lycoris.functional.loha import HadaWeight, HadaWeightTucker

    torch.manual_seed(2)
    w1a, w1b, w2a, w2b, t1, t2 = factors = _factors(7, 4, 3, (3, 3), tucker)
    ours = scaled_delta(factors, 0.6)
    scale = torch.tensor(0.6, dtype=F64)
    if tucker:
        theirs = HadaWeightTucker.apply(t1, w1b, w1a, t2, w2b, w2a, scale)
        order = (w1a, w1b, w2a, w2b, t1, t2)
    else:
        theirs = HadaWeight.apply(w1b, w1a, w2b, w2a, scale)
        order = (w1a, w1b, w2a, w2b)
    grad = torch.randn_like(ours)
    torch.testing.assert_close(ours, theirs.reshape(ours.shape))
    for a, b in zip(torch.autograd.grad(ours, order, grad), torch.autograd.grad(theirs, order, grad.reshape(theirs.shape))):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- modules


def test_modules_named_as_files_name_them():
    from loha.keys import map_modules
    from loha.train.modules import LohaNetwork, NetworkSpec
    from tiny_models import sd1_parts

    parts = sd1_parts()
    names = map_modules(parts)
    counts = {}
    for preset in ("attn-only", "attn-mlp", "full"):
        net = LohaNetwork(parts, NetworkSpec(preset=preset, text_encoder=True))
        counts[preset] = net.counts()
        for name in net.loha:
            target = names.lookup(name)
            assert target is not None and names.names(target)[0] == name
    assert counts["attn-only"]["unet"] < counts["attn-mlp"]["unet"] < counts["full"]["unet"]
    assert counts["full"]["unet"] == sum(t.component == "unet" for t in names.targets)
    assert counts["full"]["te1"] == 12  # 2 layers × q, k, v, out, fc1, fc2
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in net.loha


def test_attach_detach_restores_forward():
    from loha.train.modules import LohaNetwork, NetworkSpec
    from tiny_models import run_parts, sd1_parts

    parts = sd1_parts()
    before = run_parts(parts)
    net = LohaNetwork(parts, NetworkSpec(preset="full", text_encoder=True)).attach()
    with torch.no_grad():
        for module in net.loha.values():
            module.hada_w2_a.normal_(std=0.5)
    changed = run_parts(parts)
    assert not torch.allclose(changed["unet"], before["unet"])
    net.detach()
    after = run_parts(parts)
    for key in before:
        assert torch.equal(before[key], after[key])
    assert all("forward" not in module.layer.__dict__ for module in net.loha.values())


def test_ldm_layout_model_gets_the_same_names():
    """A module tree with LDM names (as ComfyUI's model has) is wrapped under the same file names,
    its norm layers (train_norm) too."""
    from loha.keys import unet_key_map
    from loha.train.modules import LohaNetwork, NetworkSpec
    from tiny_models import sd1_unet

    unet = sd1_unet()
    spec = NetworkSpec(preset="full", train_norm=True)
    by_diffusers = LohaNetwork({"unet": unet}, spec)
    ldm = torch.nn.Module()
    for key, ldm_key in unet_key_map(unet.state_dict(), from_ldm=False).items():
        path = "diffusion_model." + ldm_key.rpartition(".")[0]
        parent = ldm
        for part in path.split(".")[:-1]:
            if part not in parent._modules:
                parent.add_module(part, torch.nn.Module())
            parent = parent._modules[part]
        parent._modules[path.rpartition(".")[2]] = unet.get_submodule(key.rpartition(".")[0])
    by_ldm = LohaNetwork(ldm, spec)
    assert sorted(by_ldm.loha) == sorted(by_diffusers.loha)
    assert sorted(by_ldm.norms) == sorted(by_diffusers.norms) and len(by_ldm.norms) == 48  # train_norm too


# --------------------------------------------------------------------------- dataset


def test_dataset_folders_repeats_captions_buckets(tmp_path):
    from PIL import Image

    from loha.train.data import Dataset, buckets

    (tmp_path / "3_red thing").mkdir()
    (tmp_path / "misc").mkdir()  # not N_name: ignored
    Image.new("RGB", (128, 128), "red").save(tmp_path / "3_red thing" / "a.png")
    (tmp_path / "3_red thing" / "a.txt").write_text("red, square\n")
    Image.new("RGB", (192, 64), "blue").save(tmp_path / "3_red thing" / "b.jpg")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "root.png")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "misc" / "ignored.png")
    data = Dataset(str(tmp_path), resolution=128, step=64)
    assert [os.path.basename(i.path) for i in data.items] == ["root.png", "a.png", "b.jpg"]
    assert data.captions == [tmp_path.name.replace("_", " "), "red, square", "red thing"]
    assert [i.repeats for i in data.items] == [1, 3, 3]
    assert data.buckets == [(128, 128), (128, 128), (192, 64)]
    assert data.tag_frequency["3_red thing"] == {"red": 1, "square": 1, "red thing": 1}
    assert data.dirs["3_red thing"] == {"n_repeats": 3, "img_count": 2}
    assert all(w * h <= 128 * 128 and w % 64 == 0 and h % 64 == 0 for w, h in buckets(128))
    epoch = data.epoch(seed=0, epoch=0, batch_size=2)
    assert all(len({data.buckets[i] for i in batch}) == 1 for batch in epoch)
    assert epoch == data.epoch(seed=0, epoch=0, batch_size=2)
    assert epoch != data.epoch(seed=0, epoch=1, batch_size=2) or len(epoch) == 1


# --------------------------------------------------------------------------- training runs


#: The network the training runs train: every layer kind, Tucker, both parts.
FULL_SPEC = dict(preset="full", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, use_tucker=True, text_encoder=True)


def _config(tmp_path, name="net", **kwargs):
    from loha.train import SAMPLE_DATA, NetworkSpec, TrainConfig

    spec = kwargs.pop("network", NetworkSpec(**FULL_SPEC))
    settings = dict(resolution=64, steps=3, batch_size=2, learning_rate=5e-3, seed=3, device="cpu")
    settings.update(kwargs)
    return TrainConfig(data=SAMPLE_DATA, output=str(tmp_path / f"{name}.safetensors"), network=spec, **settings)


def _train(config, **callbacks):
    from loha.train import Callbacks, train
    from train_helpers import tiny_base

    return train(config, Callbacks(**callbacks), base=tiny_base())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    result = _train(_config(tmp))
    return result


def test_file_has_kohya_metadata(trained):
    import loha

    net = loha.load(trained.path)
    meta = net.metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "loha" and args["conv_dim"] == "2" and args["use_tucker"] == "True"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "3"
    assert json.loads(meta["ss_tag_frequency"])["10_shapes"]["white background"] == 12
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert len(meta["sshs_model_hash"]) == 64
    assert net.family == "sd1"
    tucker = [m for m in net.modules.values() if m.tucker]
    assert tucker and all(m.kind == "loha" for m in net.modules.values())
    assert {m.rank for m in net.modules.values()} == {2, 4}


def test_file_loads_in_lycoris_and_ours_with_the_same_delta(trained):
    """lycoris-lora's create_network_from_weights takes every module of our file, and its
    forward path, our loader (loha.patch) and the trainer's own forward give one model."""
    from train_helpers import WithTextModel, assert_lycoris_patch_and_trainer_agree, tiny_base

    assert_lycoris_patch_and_trainer_agree(
        trained.path, tiny_base(), FULL_SPEC, lambda parts: (WithTextModel(parts["text_encoder"]), parts["unet"]))


SMALL = dict(preset="attn-only", rank=2, alpha=1.0)


def test_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    from loha.train import NetworkSpec

    spec = NetworkSpec(**SMALL)
    straight = _train(_config(tmp_path, "straight", steps=3, network=spec))
    first = _train(_config(tmp_path, "resumed", steps=2, network=spec))
    resumed = _train(_config(tmp_path, "resumed", steps=3, network=spec, resume=str(tmp_path / "resumed-state")))
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    assert first.losses == resumed.losses[:2]
    a, b = load_file(straight.path), load_file(resumed.path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_intermediate_saves_samples_and_stop(tmp_path):
    import loha

    stop = threading.Event()
    seen = {"progress": [], "saved": [], "samples": []}

    def progress(step, total, loss, lr):
        seen["progress"].append((step, total, loss))
        if step == 4:
            stop.set()

    from loha.train import NetworkSpec

    result = _train(_config(tmp_path, steps=50, save_every=2, sample_every=3, sample_steps=2,
                            network=NetworkSpec(**SMALL)),
                    progress=progress, stop=stop, saved=lambda s, p: seen["saved"].append((s, p)),
                    sample=lambda s, images, p: seen["samples"].append((s, len(images), p)))
    assert result.stopped and result.steps == 4
    assert [s for s, _, _ in seen["progress"]] == [1, 2, 3, 4]
    assert [s for s, _ in seen["saved"]] == [2, 4, 4]
    assert os.path.isfile(tmp_path / "net-step000002.safetensors")
    assert loha.load(result.path).metadata["ss_steps"] == "4"
    assert seen["samples"][0][:2] == (3, 2) and os.path.isfile(seen["samples"][0][2])


def test_v_prediction_and_mixed_precision_and_checkpointing(tmp_path):
    from loha.train import NetworkSpec

    spec = NetworkSpec(**SMALL)
    plain = _train(_config(tmp_path, "plain", network=spec, prediction_type="v_prediction", steps=2))
    checkpointed = _train(_config(tmp_path, "ckpt", network=spec, prediction_type="v_prediction", steps=2,
                                  gradient_checkpointing=True))
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-4)
    bf16 = _train(_config(tmp_path, "bf16", network=spec, mixed_precision="bf16", steps=2))
    assert all(torch.isfinite(torch.tensor(bf16.losses)))


def test_checkpoint_read_through_our_name_map(tmp_path):
    """An LDM checkpoint file loads into diffusers modules that compute what the original did."""
    from loha.train.models import demo_model, from_checkpoint, save_base_checkpoint
    from tiny_models import run_parts

    model = demo_model(seed=5)
    path = save_base_checkpoint(model, str(tmp_path / "demo.safetensors"))
    loaded = from_checkpoint(path)
    a, b = run_parts(model.parts()), run_parts(loaded.parts())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_pixels(pixels), model.encode_pixels(pixels), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.tokenizer(["a red circle"]), loaded.tokenizer(["a red circle"]))


def test_command_line(tmp_path, capsys):
    from loha.app.cli import main

    out = tmp_path / "cli.safetensors"
    code = main(["train", "--model", "demo", "--data", _config(tmp_path).data, "--out", str(out), "--steps", "2",
                 "--resolution", "64", "--rank", "2", "--preset", "attn-only", "--seed", "1"])
    assert code == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and str(out) in printed


def test_tokenizer_folder_pads_to_the_text_encoders_positions(tmp_path):
    """Tokenizer folders hosts ship (ComfyUI's) claim 8192 tokens; SD's encoders take their own count."""
    from loha.train.models import demo_model, from_checkpoint, save_base_checkpoint
    from tiny_pipelines import tokenizer

    model = demo_model(seed=5)
    path = save_base_checkpoint(model, str(tmp_path / "demo.safetensors"))
    claims_8192 = tokenizer()
    claims_8192.model_max_length = 8192
    claims_8192.save_pretrained(tmp_path / "tokenizer")
    loaded = from_checkpoint(path, tokenizer=str(tmp_path / "tokenizer"))
    ids = loaded.tokenizer(["a red circle"])
    assert ids.shape == (1, model.text_encoder.config.max_position_embeddings)
    with torch.no_grad():
        loaded.encode_text(ids)


def test_an_fp16_checkpoint_trains_in_fp32_without_mixed_precision(tmp_path):
    """Published checkpoints are fp16; fp16 convolutions on a CPU are many times slower and AdamW needs fp32."""
    from loha.train import SAMPLE_DATA, NetworkSpec, TrainConfig, Trainer
    from loha.train.models import demo_model, save_base_checkpoint

    model = demo_model(seed=5)
    for part in model.parts().values():
        part.half()
    path = save_base_checkpoint(model, str(tmp_path / "demo-fp16.safetensors"))
    config = TrainConfig(data=SAMPLE_DATA, model=path, output=str(tmp_path / "out.safetensors"), network=NetworkSpec(rank=2),
                         resolution=64, steps=1)
    trainer = Trainer(config)
    trainer._prepare()
    assert {p.dtype for part in trainer.base.parts().values() for p in part.parameters()} == {torch.float32}


# --------------------------------------------------------------------------- SDXL


def _ldm_unet_tree(unet) -> torch.nn.Module:
    """The UNet's layers under their LDM paths (input_blocks.4.1.…), as kohya's SDXL UNet
    names them: tools that name modules from the tree (lycoris-lora) then see kohya's
    SDXL names. The layers are the UNet's own, so hooks on them act on the UNet."""
    from loha.keys import unet_key_map

    root = torch.nn.Module()
    for key, ldm_key in unet_key_map(unet.state_dict(), from_ldm=False).items():
        path = ldm_key.rpartition(".")[0]
        parent = root
        for part in path.split(".")[:-1]:
            if part not in parent._modules:
                parent.add_module(part, torch.nn.Module())
            parent = parent._modules[part]
        parent._modules[path.rpartition(".")[2]] = unet.get_submodule(key.rpartition(".")[0])
    return root


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from train_helpers import sdxl_folder

    return sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="module")
def sdxl_trained(sdxl_folder, tmp_path_factory):
    from loha.train import train

    tmp = tmp_path_factory.mktemp("sdxl-trained")
    return train(_config(tmp, "sdxl", model=sdxl_folder))


def test_sdxl_folder_trains_both_text_encoders(sdxl_trained):
    import loha

    assert len(sdxl_trained.losses) == 3 and all(0 < x < 10 for x in sdxl_trained.losses)
    assert set(sdxl_trained.modules) == {"unet", "te1", "te2"}
    net = loha.load(sdxl_trained.path)
    assert net.family == "sdxl"
    meta = net.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lycoris"
    assert meta["ss_network_train_unet_only"] == "False"
    names = set(net.modules)
    prefixes = {n.split("_")[1] for n in names}
    assert prefixes == {"te1", "te2", "unet"}
    # kohya's SDXL names: LDM UNet paths, text_model. level on both encoders
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_label_emb_0_0" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert sum(n.startswith("lora_te2_") for n in names) == sdxl_trained.modules["te2"] == 12


def test_sdxl_file_loads_in_lycoris_and_ours_with_the_same_outputs(sdxl_trained, sdxl_folder):
    """As the SD1 test: lycoris-lora (on kohya's LDM-named UNet tree, both encoders as a
    list, so lora_te1_/lora_te2_), loha.patch and the trainer's forward give one model."""
    from loha.train.models import from_diffusers
    from train_helpers import WithTextModel, assert_lycoris_patch_and_trainer_agree

    def lycoris_modules(parts):
        # transformers 5's CLIPTextModel lacks the text_model. level, its CLIPTextModelWithProjection has it
        encoders = [text if hasattr(text, "text_model") else WithTextModel(text)
                    for text in (parts["text_encoder"], parts["text_encoder_2"])]
        return encoders, _ldm_unet_tree(parts["unet"])

    lyco = assert_lycoris_patch_and_trainer_agree(sdxl_trained.path, from_diffusers(sdxl_folder), FULL_SPEC,
                                                  lycoris_modules)
    assert {m.lora_name.split("_")[1] for m in lyco.text_encoder_loras} == {"te1", "te2"}


def test_sdxl_conditioning_matches_diffusers_encode_prompt(sdxl_folder):
    """Context, pooled text and time ids are what StableDiffusionXLPipeline computes
    (the independent oracle): encode_prompt with clip_skip None (ours 1) and 1 (ours 2),
    _get_add_time_ids for an uncropped non-square bucket."""
    from diffusers import StableDiffusionXLPipeline

    from loha.train.models import SDXLModel, from_diffusers

    base = from_diffusers(sdxl_folder)
    assert isinstance(base, SDXLModel) and base.family == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    prompts = ["a photo of a cat", "red and blue stripes, flat colour"]
    with torch.no_grad():
        for ours_skip, their_skip in ((1, None), (2, 1)):
            context, pooled = base.encode_captions(prompts, ours_skip)
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False,
                                                             clip_skip=their_skip)
            assert context.shape == (2, 16, 768 + 1280) and pooled.shape == (2, 32)
            torch.testing.assert_close(context, embeds, rtol=0, atol=0)
            torch.testing.assert_close(pooled, pooled_embeds, rtol=0, atol=0)
    latents = torch.zeros(2, 4, 8, 12)  # an 64×96-pixel bucket
    expected = pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(base.time_ids(latents), expected.expand(2, 6))


def test_sdxl_checkpoint_trains_through_the_same_path(sdxl_folder, sdxl_trained, tmp_path, capsys):
    """An SDXL LDM checkpoint (written through loha.models.to_ldm) reads back into parts that
    compute what the folder's do, needs both tokenizers, and trains (command line) to a
    file with the same names and the same first loss as the folder."""
    import loha
    from loha.app.cli import main
    from loha.train.models import from_checkpoint, from_diffusers, save_base_checkpoint
    from tiny_models import run_parts
    from train_helpers import TINY_SDXL_CONFIGS

    model = from_diffusers(sdxl_folder)
    model.configs = TINY_SDXL_CONFIGS
    ckpt = save_base_checkpoint(model, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(loha.LohaError, match="tokenizer_2"):
        from_checkpoint(ckpt)
    with pytest.raises(loha.LohaError, match="tokenizer_2"):
        from_checkpoint(ckpt, tokenizer=os.path.join(sdxl_folder, "tokenizer"))
    loaded = from_checkpoint(ckpt, tokenizer=sdxl_folder)
    assert loaded.family == "sdxl"
    a, b = run_parts(model.parts()), run_parts(loaded.parts())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for x, y in zip(model.encode_captions(["a red circle"]), loaded.encode_captions(["a red circle"])):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    out = tmp_path / "from-ckpt.safetensors"
    config = _config(tmp_path)
    code = main(["train", "--model", ckpt, "--tokenizer", sdxl_folder, "--data", config.data, "--out", str(out),
                 "--resolution", "64", "--steps", "1", "--batch-size", "2", "--lr", "5e-3", "--seed", "3",
                 "--preset", "full", "--rank", "4", "--alpha", "2", "--conv-rank", "2", "--conv-alpha", "1",
                 "--tucker", "--text-encoder", "--device", "cpu", "--log-every", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    first = float(printed.split("step 1/1  loss ")[1].split()[0])
    assert first == pytest.approx(sdxl_trained.losses[0], rel=1e-4)
    net = loha.load(str(out))
    assert net.family == "sdxl" and net.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert set(net.modules) == set(loha.load(sdxl_trained.path).modules)


def test_sdxl_frozen_text_encoders_cache_context_and_pooled(sdxl_folder, tmp_path):
    """Without --text-encoder both conditionings are encoded once; v-prediction, bf16 and
    checkpointing run on SDXL too."""
    from loha.train import NetworkSpec, Trainer

    trainer = Trainer(_config(tmp_path, model=sdxl_folder, network=NetworkSpec(**SMALL), steps=1,
                              prediction_type="v_prediction", gradient_checkpointing=True))
    result = trainer.run()
    context, pooled = trainer.embeddings
    assert context.shape == (14, 16, 2048) and pooled.shape == (14, 32) and trainer.ids is None
    assert set(result.modules) == {"unet"} and all(torch.isfinite(torch.tensor(result.losses)))
    bf16 = Trainer(_config(tmp_path, "bf16", model=sdxl_folder, network=NetworkSpec(**SMALL), steps=1,
                           mixed_precision="bf16")).run()
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
