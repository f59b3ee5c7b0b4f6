"""Each training option changes what it should: optimizers, accumulation, epochs, schedules,
noise offset, min-SNR, captions, flips, LyCORIS's dropouts, dora_wd and train_norm, metadata, trackers,
sample prompts; config files round-trip bit for bit; a resume says what differs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

SMALL = dict(preset="attn-only", rank=2, alpha=1.0)


def _config(tmp_path, name="net", **kwargs):
    from loha.train import SAMPLE_DATA, NetworkSpec, TrainConfig

    spec = kwargs.pop("network", NetworkSpec(**SMALL))
    settings = dict(data=SAMPLE_DATA, resolution=64, steps=2, batch_size=2, learning_rate=5e-3, seed=3, device="cpu")
    settings.update(kwargs)
    return TrainConfig(output=str(tmp_path / f"{name}.safetensors"), network=spec, **settings)


def _few_images(folder, count: int) -> str:
    """The first `count` sample images with their captions, once each: data a run encodes in a
    blink (the sample set's epochs are ~60 steps)."""
    import shutil

    from loha.train import SAMPLE_DATA

    data = folder / "1_shapes"
    data.mkdir(parents=True)
    for image in sorted((Path(SAMPLE_DATA) / "10_shapes").glob("*.png"))[:count]:
        shutil.copy(image, data)
        shutil.copy(image.with_suffix(".txt"), data)
    return str(folder)


def _trainer(config):
    from loha.train import Trainer
    from train_helpers import tiny_base

    return Trainer(config, base=tiny_base())


def _run(config, **callbacks):
    from loha.train import Callbacks, train
    from train_helpers import tiny_base

    return train(config, Callbacks(**callbacks), base=tiny_base())


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


# --------------------------------------------------------------------------- steps and batches


def test_accumulating_two_micro_batches_of_one_equals_a_batch_of_two(tmp_path):
    trainers = [_trainer(_config(tmp_path, "whole", batch_size=2, max_grad_norm=0)),
                _trainer(_config(tmp_path, "accumulated", batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0))]
    for t in trainers:
        t._prepare()
    losses = [t._train_step() for t in trainers]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for whole, accumulated in zip(*(t.params for t in trainers)):  # the gradient of step 1
        torch.testing.assert_close(accumulated.grad, whole.grad, rtol=1e-5, atol=1e-7)
    whole = _run(_config(tmp_path, "whole", batch_size=2, steps=3, max_grad_norm=0))
    accumulated = _run(_config(tmp_path, "accumulated", batch_size=1, gradient_accumulation_steps=2, steps=3,
                               max_grad_norm=0))
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-5)
    a, b = _tensors(whole.path), _tensors(accumulated.path)
    for key in a:  # AdamW divides by √v: fp32 rounding in the gradient shows as 1e-6-size steps
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert _meta(accumulated.path)["ss_total_batch_size"] == "2"
    assert _meta(accumulated.path)["ss_gradient_accumulation_steps"] == "2"


def _meta(path):
    import loha

    return loha.load(path).metadata


def test_epochs_set_the_number_of_steps(tmp_path):
    trainer = _trainer(_config(tmp_path, epochs=2, steps=1, data=_few_images(tmp_path / "data", 4)))
    result = trainer.run()
    assert result.steps == result.total == 2 * trainer.per_epoch > 1
    assert _meta(result.path)["ss_num_epochs"] == "2" and _meta(result.path)["ss_epoch"] == "2"


# --------------------------------------------------------------------------- optimizers and schedules


#: kohya optimizer_type -> (module, class) the run must use.
_OPTIMIZERS = {"AdamW8bit": ("bitsandbytes", "AdamW8bit"), "Prodigy": ("prodigyopt", "Prodigy"),
               "Lion": ("lion_pytorch", "Lion"), "Adafactor": ("transformers", "Adafactor")}


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_each_optimizer_is_the_library_s_own_and_steps_differently(name, tmp_path):
    package, cls = _OPTIMIZERS[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the optional extra)")
    adamw = _run(_config(tmp_path, "adamw", steps=1))
    trainer = _trainer(_config(tmp_path, name, steps=1, optimizer=name.lower()))  # kohya's names, any case
    result = trainer.run()
    assert type(trainer.optimizer).__name__ == cls and type(trainer.optimizer).__module__.startswith(package)
    assert result.losses == adamw.losses  # same first loss: the factors start alike
    ours, theirs = _tensors(result.path), _tensors(adamw.path)
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith("alpha"))
    assert _meta(result.path)["ss_optimizer"].startswith(type(trainer.optimizer).__module__ + "." + cls + "(")


def test_a_missing_optimizer_package_is_one_line(tmp_path, monkeypatch):
    import loha

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt raises ImportError
    with pytest.raises(loha.LohaError) as caught:
        _trainer(_config(tmp_path, optimizer="Prodigy")).run()
    assert str(caught.value) == "optimizer Prodigy needs the prodigyopt package: pip install prodigyopt"
    from loha.app.cli import error_line

    assert error_line(caught.value).endswith("(pass --optimizer)")


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine",
                                      "cosine_with_restarts", "polynomial"])
def test_schedules_are_diffusers_get_scheduler(schedule, tmp_path):
    from diffusers.optimization import get_scheduler

    seen = []
    _run(_config(tmp_path, steps=6, warmup_steps=2, lr_scheduler=schedule, lr_scheduler_num_cycles=2,
                 lr_scheduler_power=2.0, learning_rate=1e-2), progress=lambda s, t, loss, lr: seen.append(lr))
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([param], lr=1e-2)
    extra = {"num_cycles": 2} if schedule == "cosine_with_restarts" else {}
    extra |= {"power": 2.0} if schedule == "polynomial" else {}
    name = "constant_with_warmup" if schedule == "constant" else schedule  # a warm-up asks for one
    expected = get_scheduler(name, reference, num_warmup_steps=2, num_training_steps=6, **extra)
    want = []
    for _ in range(6):
        reference.step()
        expected.step()
        want.append(expected.get_last_lr()[0])
    assert seen == pytest.approx(want)


# --------------------------------------------------------------------------- noise and loss


def test_noise_offset_adds_one_value_per_sample_and_channel(tmp_path):
    plain = _trainer(_config(tmp_path))
    offset = _trainer(_config(tmp_path, noise_offset=0.1))
    for t in (plain, offset):
        t._prepare()
    batch = plain._batch(0)
    a, b = plain._draws(0, batch), offset._draws(0, batch)
    assert torch.equal(a["timesteps"], b["timesteps"])
    shift = b["noise"] - a["noise"]
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)
    assert 0.01 < shift[..., 0, 0].abs().mean() < 0.3


def test_min_snr_gamma_weights_the_loss_as_kohya(tmp_path):
    plain = _trainer(_config(tmp_path))
    plain._prepare()
    weighted = {}
    for gamma in (1e9, 1.0):
        t = _trainer(_config(tmp_path, min_snr_gamma=gamma))
        t._prepare()
        with torch.no_grad():
            weighted[gamma] = t._loss(0).item()
    with torch.no_grad():
        base = plain._loss(0).item()
        # per-sample losses and SNRs of step 0, one sample at a time
        losses, snrs = [], []
        batch = plain._batch(0)
        draws = plain._draws(0, batch)
        for i in range(len(batch)):
            a = plain.alphas[draws["timesteps"][i]]
            latents = plain.dataset.latents[batch[i]][None]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * draws["noise"][i:i + 1]
            pred = plain.base.predict(noisy, draws["timesteps"][i:i + 1], plain._context([batch[i]], None))
            losses.append(torch.nn.functional.mse_loss(pred.float(), draws["noise"][i:i + 1]).item())
            snrs.append((a / (1 - a)).item())
    assert weighted[1e9] == pytest.approx(base, rel=1e-6)  # γ above every SNR: weight 1
    kohya = sum(loss * min(snr, 1.0) / snr for loss, snr in zip(losses, snrs)) / len(losses)
    assert weighted[1.0] == pytest.approx(kohya, rel=1e-5)


# --------------------------------------------------------------------------- captions and images


def test_caption_shuffle_keep_tokens_and_dropouts():
    from loha.train.data import CaptionOptions

    caption = "sks person, red hat, smiling, outdoors, blue sky"
    draws = {CaptionOptions(shuffle=True, keep_tokens=1).apply(caption, torch.Generator().manual_seed(s))
             for s in range(20)}
    assert len(draws) > 5 and all(d.startswith("sks person, ") for d in draws)
    assert all(sorted(d.split(", ")) == sorted(caption.split(", ")) for d in draws)
    again = CaptionOptions(shuffle=True, keep_tokens=1).apply(caption, torch.Generator().manual_seed(3))
    assert again == CaptionOptions(shuffle=True, keep_tokens=1).apply(caption, torch.Generator().manual_seed(3))
    assert CaptionOptions(dropout_rate=1.0).apply(caption, torch.Generator()) == ""
    assert CaptionOptions(keep_tokens=2, tag_dropout_rate=1.0).apply(caption, torch.Generator()) == \
        "sks person, red hat"
    assert CaptionOptions().apply(caption, torch.Generator()) == caption


def test_changing_captions_are_encoded_every_step(tmp_path):
    trainer = _trainer(_config(tmp_path, caption_dropout_rate=0.5, shuffle_caption=True))
    result = trainer.run()
    assert trainer.embeddings is None and trainer.ids is None and len(result.losses) == 2
    assert _meta(result.path)["ss_shuffle_caption"] == "True"


def test_flip_augmentation_encodes_mirrored_images(tmp_path):
    trainer = _trainer(_config(tmp_path, flip_aug=True))
    trainer._prepare()
    from loha.train.data import load_pixels

    data = trainer.dataset
    pixels = load_pixels(data.items[0].path, data.buckets[0])[None]
    with torch.no_grad():
        want = trainer.base.encode_pixels(pixels.flip(-1))[0]
    torch.testing.assert_close(data.latent(0, True), want)
    flips = [f for step in range(6) for f in trainer._draws(step, trainer._batch(step))["flips"]]
    assert True in flips and False in flips


# --------------------------------------------------------------------------- LyCORIS's options


def test_module_and_rank_dropout_change_the_layers_as_lycoris_does(tmp_path):
    from loha.train.modules import LohaNetwork, NetworkSpec
    from train_helpers import tiny_base

    base = tiny_base()
    net = LohaNetwork(base.parts(), NetworkSpec(**SMALL, rank_dropout=0.5, module_dropout=0.3)).attach()
    for module in net.loha.values():
        torch.nn.init.normal_(module.hada_w2_a)  # a non-zero ΔW
    net.draw_dropout(torch.Generator().manual_seed(0))
    skipped = [m for m in net.loha.values() if m.skip]
    masked = [m for m in net.loha.values() if m.row_mask is not None]
    assert skipped and masked and len(skipped) + len(masked) == len(net.loha)
    x = torch.randn(3, skipped[0].layer.in_features)
    layer = skipped[0].layer
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    module = masked[0]
    w1a, w1b, w2a, w2b = module.hada_w1_a, module.hada_w1_b, module.hada_w2_a, module.hada_w2_b
    delta = (w1a @ w1b) * (w2a @ w2b) * module.scale * module.row_mask[:, None]  # LyCORIS: rows of ΔW
    x = torch.randn(3, module.layer.in_features)
    torch.testing.assert_close(module.layer(x), torch.nn.functional.linear(x, module.layer.weight + delta,
                                                                           module.layer.bias), rtol=1e-5, atol=1e-5)
    net.draw_dropout(None)
    assert not any(m.skip or m.row_mask is not None for m in net.loha.values())
    net.detach()


def test_dropout_runs_repeat_exactly(tmp_path):
    from loha.train import NetworkSpec

    spec = NetworkSpec(**SMALL, rank_dropout=0.3, module_dropout=0.2)
    a = _run(_config(tmp_path, "a", network=spec, steps=3))
    b = _run(_config(tmp_path, "b", network=spec, steps=3))
    plain = _run(_config(tmp_path, "plain", steps=3))
    assert a.losses == b.losses and a.losses[1:] != plain.losses[1:]
    args = json.loads(_meta(a.path)["ss_network_args"])
    assert (args["rank_dropout"], args["module_dropout"]) == ("0.3", "0.2")


def test_dora_wd_file_loads_in_lycoris_with_the_trainer_s_outputs(tmp_path):
    import loha
    from loha.train import NetworkSpec
    from train_helpers import WithTextModel, assert_lycoris_patch_and_trainer_agree, tiny_base

    spec = dict(preset="full", rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0, text_encoder=True, dora_wd=True)
    result = _run(_config(tmp_path, network=NetworkSpec(**spec), steps=2, learning_rate=2e-2))
    net = loha.load(result.path)
    assert all(m.dora for m in net.modules.values())
    scale = next(m for m in net.modules.values() if m.kind == "loha" and len(m.shapes["hada_w1_b"]) == 2)
    assert scale.shapes["dora_scale"] == (scale.shapes["hada_w1_a"][0], 1)  # LyCORIS's output axis
    assert json.loads(net.metadata["ss_network_args"])["dora_wd"] == "True"
    assert_lycoris_patch_and_trainer_agree(result.path, tiny_base(), spec,
                                           lambda parts: (WithTextModel(parts["text_encoder"]), parts["unet"]))


def test_dora_starts_at_the_base_model(tmp_path):
    """m = ‖W0‖ and ΔW = 0 at step 0: the decomposed weight is W0 (to rounding)."""
    from loha.train.modules import LohaNetwork, NetworkSpec
    from train_helpers import tiny_base

    base = tiny_base()
    net = LohaNetwork(base.parts(), NetworkSpec(**SMALL, dora_wd=True))
    for module in net.loha.values():
        torch.testing.assert_close(module.dora_weight(), module.layer.weight, rtol=1e-5, atol=1e-6)


#: train_norm on every layer kind: the "full" preset's norms are the transformers' GroupNorm and
#: LayerNorms and the resnets' GroupNorms.
NORM_SPEC = dict(preset="full", rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0, text_encoder=True, train_norm=True)


@pytest.fixture(scope="module")
def norm_trained(tmp_path_factory):
    from loha.train import NetworkSpec

    tmp = tmp_path_factory.mktemp("train_norm")
    return _run(_config(tmp, network=NetworkSpec(**NORM_SPEC), data=_few_images(tmp / "data", 2), steps=1,
                        batch_size=1, learning_rate=2e-2, save_dtype="fp16"))


def _lycoris_train_norm_file(path) -> str:
    """What lycoris.kohya writes with train_norm=True for the tiny base model, NORM_SPEC's settings
    and fp16 (its preset "full" as tests/tiny_models has it)."""
    import logging

    from lycoris.kohya import create_network
    from tiny_models import _preset_file
    from train_helpers import WithTextModel, tiny_base

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    parts = tiny_base().parts()
    text = WithTextModel(parts["text_encoder"])
    net = create_network(1.0, 2, 1.0, None, text, parts["unet"], algo="loha", conv_dim=2, conv_alpha=1.0,
                         preset=_preset_file(), train_norm=True)
    net.apply_to(text, parts["unet"], True, True)
    net.save_weights(str(path), torch.float16, {})
    return str(path)


def _header(path) -> dict:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_train_norm_trains_the_norm_layers_and_writes_them_as_lycoris_does(norm_trained, tmp_path):
    import loha

    tensors = _tensors(norm_trained.path)
    norms = {k: v for k, v in tensors.items() if k.endswith((".w_norm", ".b_norm"))}
    assert len(norms) == 2 * norm_trained.modules["norms"] == 96
    assert all(v.abs().min() > 0 for v in norms.values())  # one AdamW step moves every channel off zero
    ours, theirs = _header(norm_trained.path), _header(_lycoris_train_norm_file(tmp_path / "lycoris.safetensors"))
    assert ours.keys() == theirs.keys()
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert {k: ours[k] for k in norms} == {k: theirs[k] for k in norms}  # names, shapes and dtypes (F16)
    net = loha.load(norm_trained.path)
    assert {m.kind for m in net.modules.values()} == {"loha", "norm"} and not net.unknown_keys
    assert json.loads(net.metadata["ss_network_args"])["train_norm"] == "True"


def test_train_norm_file_loads_in_lycoris_with_the_trainer_s_outputs(norm_trained):
    """lycoris-lora's forward path, its merge of the norm modules, loha.apply and the trainer's own
    forward give one model."""
    from train_helpers import WithTextModel, assert_lycoris_patch_and_trainer_agree, tiny_base

    assert_lycoris_patch_and_trainer_agree(norm_trained.path, tiny_base(), NORM_SPEC,
                                           lambda parts: (WithTextModel(parts["text_encoder"]), parts["unet"]))


def test_train_norm_resumes_exactly(tmp_path):
    from loha.train import NetworkSpec, Trainer
    from loha.train.settings import differences
    from train_helpers import tiny_base

    base, data = tiny_base(), _few_images(tmp_path / "data", 2)
    spec = NetworkSpec(preset="attn-mlp", rank=2, alpha=1.0, train_norm=True)
    run = lambda name, steps, **kw: Trainer(_config(tmp_path, name, network=spec, data=data, steps=steps,  # noqa: E731
                                                    batch_size=1, **kw), base=base).run()
    straight = run("straight", 2)
    run("resumed", 1)
    resumed = run("resumed", 2, resume=str(tmp_path / "resumed-state"))
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = _tensors(straight.path), _tensors(resumed.path)
    assert a.keys() == b.keys() and any(k.endswith(".w_norm") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # a state saved before train_norm existed trained without it: resuming it with train_norm is refused
    saved, now = {"network": {"rank": 2, "alpha": 1.0}}, {"network": {"rank": 2, "alpha": 1.0, "train_norm": True}}
    assert differences(saved, now)[0] == ["network train_norm: False in the state, True now"]


def test_train_norm_modules_take_lycoris_dropouts():
    """Module dropout skips a norm module; rank dropout keeps each channel's change with 1 - p."""
    from loha.train.modules import LohaNetwork, NetworkSpec
    from train_helpers import tiny_base

    base = tiny_base()
    net = LohaNetwork(base.parts(), NetworkSpec(preset="attn-mlp", rank=2, train_norm=True, rank_dropout=0.5,
                                                module_dropout=0.3)).attach()
    for module in net.norms.values():
        torch.nn.init.normal_(module.w_norm)
        torch.nn.init.normal_(module.b_norm)
    net.draw_dropout(torch.Generator().manual_seed(0))
    skipped = [m for m in net.norms.values() if m.skip]
    masked = [m for m in net.norms.values() if m.row_mask is not None]
    assert skipped and masked and len(skipped) + len(masked) == len(net.norms)
    for module in (skipped[0], masked[0]):
        layer, mask = module.layer, module.row_mask if module.row_mask is not None else 0.0
        x = torch.randn(2, layer.weight.shape[0], 3, 3) if isinstance(layer, torch.nn.GroupNorm) else \
            torch.randn(2, 5, layer.weight.shape[0])
        with torch.no_grad():
            saved = layer.weight.clone(), layer.bias.clone()
            layer.weight.add_(module.w_norm * mask)
            layer.bias.add_(module.b_norm * mask)
            want = module._original(x)
            layer.weight.copy_(saved[0])
            layer.bias.copy_(saved[1])
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    net.draw_dropout(None)
    assert not any(m.skip or m.row_mask is not None for m in net.norms.values())
    net.detach()
    assert all("forward" not in m.layer.__dict__ for m in net.norms.values())


def test_train_norm_option_round_trips_through_flags_configs_and_the_tab(tmp_path):
    """--train-norm, network_args' train_norm=True (TOML and JSON) and the tab's checkbox are one setting."""
    from loha.app import ui_train
    from loha.app.cli import _train_config, build_parser
    from loha.app.ui import Folders
    from loha.train.settings import read_config, write_config

    parse = build_parser().parse_args
    config = _train_config(parse(["train", "-o", str(tmp_path / "n.safetensors"), "--train-norm"]))
    assert config.network.train_norm is True
    for name in ("run.toml", "run.json"):
        path = write_config(config, str(tmp_path / name))
        assert "train_norm=True" in open(path, encoding="utf-8").read()
        assert read_config(path)["network"]["train_norm"] is True
        again = _train_config(parse(["train", "--config", path]))
        assert again == config
        assert _train_config(parse(["train", "--config", path, "--no-train-norm"])).network.train_norm is False
    folders = Folders(output=str(tmp_path))
    tab = ui_train.settings_of(config)
    assert tab["train_norm"] is True
    saved = ui_train.save_settings(folders, tab, "tab.toml")
    assert ui_train.load_settings(folders, saved)["train_norm"] is True


# --------------------------------------------------------------------------- metadata, logs, samples


def test_metadata_fields_are_written_where_readers_look(tmp_path):
    result = _run(_config(tmp_path, steps=1, title="Shapes", author="me", description="coloured shapes",
                          license="CC-BY-4.0", tags="shapes,test", trigger_words="shp style", comment="tiny run"))
    meta = _meta(result.path)
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"]) == \
        ("Shapes", "me", "coloured shapes")
    assert (meta["modelspec.license"], meta["modelspec.tags"], meta["modelspec.trigger_phrase"]) == \
        ("CC-BY-4.0", "shapes,test", "shp style")
    assert meta["ss_training_comment"] == "tiny run" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "64x64"


def test_tensorboard_gets_the_loss_and_lr_of_each_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run(_config(tmp_path, steps=3, log_with="tensorboard"))
    runs = os.listdir(tmp_path / "net-logs")
    events = EventAccumulator(str(tmp_path / "net-logs" / runs[0]))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(result.losses, rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([5e-3] * 3)


def test_kohya_prompt_lines():
    from loha.train.prompts import SamplePrompt, parse_prompts

    text = "# a comment\n\na red circle --n blurry, ugly --w 64 --h 32 --s 3 --l 5.5 --d 42\nblue square\n"
    assert parse_prompts(text) == [SamplePrompt("a red circle", "blurry, ugly", 64, 32, 3, 5.5, 42),
                                   SamplePrompt("blue square")]


def test_samples_follow_the_prompt_file_and_carry_their_step(tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 32 --s 2 --d 5 --l 3 --n blue\nblue square --s 2\n")
    seen = []
    result = _run(_config(tmp_path, steps=2, sample_every=1, sample_prompts=str(prompts)),
                  sample=lambda step, images, path: seen.append((step, [i.size for i in images], path)))
    assert [(s, sizes) for s, sizes, _ in seen] == [(1, [(64, 32), (64, 64)]), (2, [(64, 32), (64, 64)])]
    folder = tmp_path / "net-samples"
    assert sorted(os.listdir(folder)) == ["step000001-00.png", "step000001-01.png", "step000001.png",
                                          "step000002-00.png", "step000002-01.png", "step000002.png"]
    first = Image.open(folder / "step000002-00.png").convert("RGB")
    band = [first.getpixel((x, first.height - 1)) for x in range(2)]
    assert band == [(0, 0, 0)] * 2  # the step label's band
    assert result.steps == 2


# --------------------------------------------------------------------------- configs and resume


_FLAGS = ["--resolution", "64", "--steps", "2", "--batch-size", "1", "--grad-accum", "2", "--rank", "2",
          "--alpha", "1", "--preset", "attn-only", "--seed", "7", "--lr", "3e-3", "--optimizer", "AdamW",
          "--optimizer-args", "betas=(0.8,0.99)", "--scheduler", "cosine", "--warmup", "1", "--noise-offset", "0.05",
          "--min-snr-gamma", "5", "--shuffle-caption", "--keep-tokens", "1", "--caption-dropout", "0.1",
          "--flip-aug", "--rank-dropout", "0.1", "--module-dropout", "0.1", "--text-encoder", "--title", "T",
          "--device", "cpu"]


def test_saved_config_reproduces_the_run_bit_for_bit(tmp_path, capsys):
    from loha.app.cli import _train_config, build_parser, main

    extension = ".toml"

    direct = tmp_path / "direct.safetensors"
    assert main(["train", "--model", "demo", "-o", str(direct), *_FLAGS]) == 0
    config = tmp_path / f"run{extension}"
    from_config = tmp_path / "from-config.safetensors"
    assert main(["train", "--model", "demo", "-o", str(from_config), *_FLAGS, "--save-config", str(config)]) == 0
    assert not from_config.exists() and f"wrote {config}" in capsys.readouterr().out
    text = config.read_text()
    for key in ("network_dim", "network_alpha", "learning_rate", "max_train_steps", "train_batch_size",
                "gradient_accumulation_steps", "optimizer_type", "optimizer_args", "network_args", "lr_scheduler",
                "lr_warmup_steps", "noise_offset", "min_snr_gamma", "shuffle_caption", "keep_tokens",
                "caption_dropout_rate", "flip_aug", "pretrained_model_name_or_path", "output_name"):
        assert key in text, key
    assert main(["train", "--config", str(config)]) == 0
    a, b = _tensors(direct), _tensors(from_config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    as_json = tmp_path / "run.json"  # JSON holds the same keys and reads back to the same run
    assert main(["train", "--config", str(config), "--save-config", str(as_json)]) == 0
    assert json.loads(as_json.read_text())["network_dim"] == 2
    parse = build_parser().parse_args
    assert _train_config(parse(["train", "--config", str(as_json)])) == _train_config(parse(["train", "--config",
                                                                                             str(config)]))


def test_flags_override_a_config_and_presets_load(tmp_path):
    from loha.app.cli import _train_config, build_parser
    from loha.train.settings import CONFIG_PRESETS, build_config, read_config

    for name in CONFIG_PRESETS:
        config = build_config({**read_config(name), "data": "d", "output": "o.safetensors"})
        config.check()
    sdxl = build_config({**read_config("sdxl-loha"), "data": "d", "output": "o.safetensors"})
    assert (sdxl.resolution, sdxl.gradient_checkpointing, sdxl.mixed_precision) == (1024, True, "bf16")
    args = build_parser().parse_args(["train", "--config", "sdxl-loha", "-o", str(tmp_path / "x.safetensors"),
                                      "--rank", "16", "--no-gradient-checkpointing"])
    config = _train_config(args)
    assert (config.network.rank, config.network.alpha, config.gradient_checkpointing) == (16, 4.0, False)


def test_config_errors_name_the_file_and_the_setting(tmp_path):
    import loha
    from loha.train.settings import read_config

    bad = tmp_path / "bad.toml"
    bad.write_text('network_dim = 4\nno_such_setting = 1\n')
    with pytest.raises(loha.LohaError, match=r"bad.toml: settings loha does not know: no_such_setting"):
        read_config(str(bad))
    bad.write_text('network_args = ["algo=lokr"]\n')
    with pytest.raises(loha.LohaError, match="algo=lokr"):
        read_config(str(bad))


def test_resume_says_what_differs(tmp_path):
    import loha
    from loha.train import NetworkSpec

    _run(_config(tmp_path, "run", steps=1))
    state = str(tmp_path / "run-state")
    with pytest.raises(loha.LohaError, match=r"network rank: 2 in the state, 4 now"):
        _run(_config(tmp_path, "run", steps=2, resume=state, network=NetworkSpec(**{**SMALL, "rank": 4})))
    lines = []
    result = _run(_config(tmp_path, "run", steps=2, resume=state, learning_rate=1e-3), log=lines.append)
    assert "resume: learning_rate: 0.005 in the state, 0.001 now" in lines and result.steps == 2


def test_a_state_from_an_older_version_resumes():
    """Settings the saved config lacks (added later) or has and this version dropped are no difference."""
    from loha.train.settings import differences

    saved = {"steps": 10, "sample_prompt": "", "network": {"rank": 2, "alpha": 1.0}}
    current = {"steps": 20, "noise_offset": 0.0, "network": {"rank": 2, "alpha": 1.0, "dora_wd": False}}
    assert differences(saved, current) == ([], ["steps: 10 in the state, 20 now"])
    assert differences(saved, {**current, "network": {"rank": 4, "alpha": 1.0}})[0] == \
        ["network rank: 2 in the state, 4 now"]
