"""Base models the trainer starts from: any SD checkpoint, with no tokenizer folder.

Full-size SD1/SD2/SDXL checkpoints as they are published (fp16/bf16, EMA-only or with
their EMA copy, SD2 768-v, SDXL v-prediction) are read on the meta device for their
structure; the demo's own LDM checkpoint (`loha demo`) trains from the command line and
the Train tab's callbacks, and its file loads in lycoris-lora with the trainer's outputs.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("diffusers")


def _meta_checkpoint(family: str, dtype: torch.dtype, extra: dict | None = None) -> dict:
    """The state dict of a published `family` checkpoint, on the meta device, plus `extra` keys."""
    from loha.families import checkpoint_parts
    from loha.models.configs import PUBLISHED
    from loha.models.structures import build_part
    from loha.models.to_ldm import ldm_plan, source_dtype

    with torch.device("meta"):
        parts = {attr: build_part(attr, PUBLISHED[family][attr]) for attr in checkpoint_parts(family)}
    plan = ldm_plan({attr: {k: v.shape for k, v in m.state_dict().items()} for attr, m in parts.items()}, family)
    state = {key: torch.empty(s.shape, dtype=source_dtype(s, dtype), device="meta") for key, s in plan.items()}
    return {**state, **(extra or {})}


#: What published files hold beyond the model: kohya/CompVis schedule buffers, and in
#: non-pruned files the EMA copy under model_ema. (dots dropped, as CompVis writes it).
_TRAINING_LEFTOVERS = {
    "alphas_cumprod": torch.empty(1000, device="meta"),
    "betas": torch.empty(1000, device="meta"),
    "model_ema.decay": torch.empty((), device="meta"),
    "model_ema.diffusion_modelinput_blocks00weight": torch.empty(320, 4, 3, 3, device="meta"),
}
_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.mark.parametrize("family, dtype, extra, prediction", [
    ("sd1", torch.float16, {}, "epsilon"),                    # v1-5-pruned-emaonly.safetensors
    ("sd1", torch.float32, _TRAINING_LEFTOVERS, "epsilon"),   # a full v1-5-pruned.ckpt with its EMA
    ("sd2", torch.float16, {_V_PROBE: torch.full((320,), 0.02)}, "epsilon"),  # 512-base-ema
    ("sd2", torch.float16, {_V_PROBE: torch.linspace(-0.5, 0.5, 320)}, "v_prediction"),  # 768-v-ema
    ("sdxl", torch.bfloat16, {}, "epsilon"),
    ("sdxl", torch.float16, {"v_pred": torch.empty(0, device="meta")}, "v_prediction"),
], ids=["sd1-fp16-emaonly", "sd1-fp32-with-ema", "sd2-512", "sd2-768-v", "sdxl-bf16", "sdxl-vpred"])
def test_published_checkpoints_need_no_tokenizer_or_configs(family, dtype, extra, prediction):
    from loha.models.configs import PUBLISHED
    from loha.train.models import SDXLModel, from_state

    base = from_state(_meta_checkpoint(family, dtype, extra), {}, family, device="meta")
    assert base.family == family and base.prediction_type == prediction
    assert isinstance(base, SDXLModel) == (family == "sdxl")
    for attr, config in PUBLISHED[family].items():
        built = getattr(base, attr).config
        for key, value in config.items():
            got = getattr(built, key)
            assert (list(got) if isinstance(got, (tuple, list)) else got) == \
                (list(value) if isinstance(value, (tuple, list)) else value), (attr, key)
    ids = base.tokenize(["a red circle"])
    ids = ids if isinstance(ids, tuple) else (ids,)
    # CLIP's ids for "a red circle", then the end token and padding: CLIP-L pads with the end
    # token (49407), OpenCLIP (SD2's encoder, SDXL's second) with "!" (0).
    pads = {"sd1": (49407,), "sd2": (0,), "sdxl": (49407, 0)}[family]
    for row, pad in zip(ids, pads, strict=True):
        assert row.shape == (1, 77) and row[0, :5].tolist() == [49406, 320, 736, 7117, 49407]
        assert set(row[0, 5:].tolist()) == {pad}


def test_an_unknown_vocabulary_still_asks_for_a_tokenizer_folder(tmp_path):
    import loha
    from loha.train.models import from_checkpoint, save_base_checkpoint
    from train_helpers import tiny_base

    base = tiny_base()  # a 1000-token encoder that is not the demo's (16 positions)
    base.configs = {"unet": {"attention_head_dim": 8, "norm_num_groups": 8}, "vae": {"norm_num_groups": 8},
                    "text_encoder": {"num_attention_heads": 4}}
    path = save_base_checkpoint(base, str(tmp_path / "tiny.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:  # without the byte-tokenizer note save_base_checkpoint leaves
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta.pop("loha.train.tokenizer")
    save_file(tensors, path, meta)
    with pytest.raises(loha.LohaError, match="vocabulary of 1000 tokens, not CLIP's 49408") as caught:
        from_checkpoint(path)
    assert caught.value.option == "tokenizer"


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The checkpoint `loha demo` writes (LDM layout, VAE included, no loha metadata)."""
    from loha.app.demo import _Demo

    folder = tmp_path_factory.mktemp("demo")
    _Demo(str(folder), seed=0, strength=(1.0, 1.0), echo=lambda line: None).checkpoint()
    return folder / "demo-sd1.safetensors"


def test_demo_checkpoint_reads_back_as_the_demo_model(demo_checkpoint):
    from loha.models.configs import DEMO
    from loha.train.models import ByteTokenizer, demo_model, from_checkpoint

    loaded, demo = from_checkpoint(str(demo_checkpoint)), demo_model(0)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.prediction_type == "epsilon"
    for attr in ("unet", "text_encoder", "vae"):
        want, got = getattr(demo, attr).state_dict(), getattr(loaded, attr).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), attr
    for attr in ("unet", "vae"):
        for key, value in DEMO[attr].items():
            got = getattr(getattr(loaded, attr).config, key)
            assert (tuple(got) if isinstance(got, list) else got) == value, (attr, key)
    with torch.no_grad():
        assert torch.equal(loaded.encode_captions(["a red circle"]), demo.encode_captions(["a red circle"]))


_RUN = ["--resolution", "64", "--steps", "2", "--rank", "2", "--alpha", "1", "--preset", "attn-mlp",
        "--text-encoder", "--seed", "0", "--lr", "1e-2", "--device", "cpu", "--log-every", "1"]  # seed 0: the demo model's


def test_demo_checkpoint_trains_from_the_command_line_and_the_tab(demo_checkpoint, tmp_path, capsys):
    """No tokenizer folder, no overrides: the command line and the Train tab's callbacks train
    the demo's checkpoint as they train `demo` (same losses), and the file loads in
    lycoris-lora with the trainer's own outputs."""
    import loha
    from loha.app import ui_train
    from loha.app.cli import main
    from loha.app.ui import Folders
    from loha.train.models import demo_model
    from train_helpers import WithTextModel, assert_lycoris_patch_and_trainer_agree

    def losses(printed):
        return [float(line.split("loss ")[1].split()[0]) for line in printed.splitlines()
                if line.startswith("step ")]

    assert main(["train", "--model", str(demo_checkpoint), "-o", str(tmp_path / "cli.safetensors"), *_RUN]) == 0
    from_file = losses(capsys.readouterr().out)
    assert main(["train", "--model", "demo", "-o", str(tmp_path / "demo.safetensors"), *_RUN]) == 0
    assert from_file and from_file == losses(capsys.readouterr().out)

    folders = Folders(checkpoints=[str(demo_checkpoint.parent)], output=str(tmp_path))
    job = ui_train.start(folders, {"model": demo_checkpoint.name, "output": "tab", "steps": 2, "resolution": 64,
                                   "rank": 2, "alpha": 1.0, "text_encoder": True, "seed": 0, "learning_rate": 1e-2,
                                   "sample_every": 0, "batch_size": 1})
    deadline = time.time() + 600
    while job.running and time.time() < deadline:
        time.sleep(0.2)
    assert job.error is None and job.result.path == str(tmp_path / "tab.safetensors")
    assert job.result.losses == pytest.approx(from_file, abs=1e-4)  # printed to 4 places
    assert loha.load(job.result.path).metadata["ss_sd_model_name"] == "demo-sd1"
    spec = dict(preset="attn-mlp", rank=2, alpha=1.0, text_encoder=True)
    assert_lycoris_patch_and_trainer_agree(job.result.path, demo_model(0), spec,
                                           lambda parts: (WithTextModel(parts["text_encoder"]), parts["unet"]))
