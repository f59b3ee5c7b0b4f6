"""PEFT LoHa folders: made by peft itself, read as networks, converted, written back.

PEFT's own forward pass is the oracle: a folder converted to a LyCORIS/kohya file and
patched into a clean model must give PEFT's outputs, and the round trip back to a PEFT
folder must load into peft with the same tensors and the same outputs, bit for bit.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import loha
import tiny_models as T
import tiny_pipelines as P
from loha.files import peft as lp
from loha.convert import kohya_to_peft, peft_to_kohya
from loha.hosts.pipelines import load_loha, unload_loha

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peft_model(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def train_steps(unet, te, steps=2):
    """A few Adam steps on a random target, so every factor (w2_b starts at 0) moves."""
    params = [p for m in (unet, te) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    inputs = T.unet_inputs(unet.get_base_model())
    ids = torch.tensor([[0, 5, 17, 42, 2]])
    torch.manual_seed(0)
    target = torch.randn_like(unet(**inputs).sample)
    for _ in range(steps):
        opt.zero_grad()
        loss = (unet(**inputs).sample - target).pow(2).mean() + te(ids).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PEFT LoHa trained on a tiny SD1 pipeline's UNet (Tucker convs, rank/alpha patterns) and encoder."""
    from peft import LoHaConfig

    folder = tmp_path_factory.mktemp("peft") / "adapter"
    pipe = P.sd1_pipeline()
    unet_config = LoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, use_effective_conv2d=True,
                             rank_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2, "conv2": 3},
                             alpha_pattern={"conv1": 3, r"up_blocks\.1\.attentions\.\d\.proj_out": 16})
    unet = peft_model(pipe.unet, unet_config)
    te = peft_model(pipe.text_encoder, LoHaConfig(r=3, alpha=5, target_modules=TEXT_TARGETS))
    unet.train(), te.train()
    train_steps(unet, te)
    unet.eval(), te.eval()
    unet.save_pretrained(folder / "unet")
    te.save_pretrained(folder / "text_encoder")
    outputs = T.run_parts({"unet": unet, "text_encoder": te})
    return folder, outputs


def clean_parts():
    return P.parts(P.sd1_pipeline())


def assert_matches_peft(ours, theirs, base):
    for part in theirs:
        assert (theirs[part] - base[part]).abs().max() > 1e-3, f"{part}: the adapter changes nothing"
        torch.testing.assert_close(ours[part], theirs[part], rtol=1e-4, atol=1e-5, msg=part)


def test_folder_loads_as_network(trained):
    folder, _ = trained
    net = loha.load(folder)
    assert net.family == "sd1" and net.text_encoders == {"te1"}
    q = net.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (q.rank, q.alpha) == (2, 8.0)
    conv1 = net.modules["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv1.tucker and (conv1.rank, conv1.alpha) == (4, 3.0)
    assert net.modules["lora_unet_up_blocks_1_attentions_0_proj_out"].alpha == 16.0
    assert net.modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].rank == 3


def test_converted_file_gives_peft_outputs_and_round_trips(trained, tmp_path):
    folder, peft_outputs = trained
    parts = clean_parts()
    base = T.run_parts(parts)
    before = {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}

    kohya = peft_to_kohya(folder, tmp_path / "converted.safetensors", base=parts)
    net = loha.load(kohya)
    assert all(name.startswith(("lora_unet_", "lora_te_text_model_")) for name in net.modules)
    assert json.loads(net.metadata["ss_network_args"])["use_tucker"] is True

    handle = loha.apply(parts, kohya)
    assert handle.unmatched == {}
    assert_matches_peft(T.run_parts(parts), peft_outputs, base)
    handle.restore()
    for key, value in before.items():
        part, _, name = key.partition(".")
        assert torch.equal(parts[part].state_dict()[name], value), key

    # Back to PEFT: the same tensors, the same per-module rank and alpha, the same outputs.
    written = kohya_to_peft(kohya, tmp_path / "again", base=parts)
    assert sorted(os.path.basename(w) for w in written) == ["text_encoder", "unet"]
    for sub in ("unet", "text_encoder"):
        original = load_file(folder / sub / lp.WEIGHTS_FILE)
        again = load_file(tmp_path / "again" / sub / lp.WEIGHTS_FILE)
        assert original.keys() == again.keys()
        for key in original:
            assert torch.equal(original[key], again[key]), key
        old_config, old = lp.read_adapter(str(folder / sub))
        new_config, _ = lp.read_adapter(str(tmp_path / "again" / sub))
        for path in old:
            for field, pattern in (("r", "rank_pattern"), ("alpha", "alpha_pattern")):
                assert lp.pattern_value(new_config[pattern], path, new_config[field]) == \
                    lp.pattern_value(old_config[pattern], path, old_config[field]), (sub, path, field)

    from peft import PeftModel

    fresh = clean_parts()
    reloaded = {part: PeftModel.from_pretrained(fresh[part], tmp_path / "again" / part).eval() for part in fresh}
    again_outputs = T.run_parts(reloaded)
    for part in peft_outputs:
        assert torch.equal(again_outputs[part], peft_outputs[part]), part


def test_folder_loads_into_a_pipeline(trained):
    folder, peft_outputs = trained
    pipe = P.sd1_pipeline()
    before = P.weights(pipe)
    load_loha(pipe, folder)
    base = T.run_parts(clean_parts())
    assert_matches_peft(T.run_parts(P.parts(pipe)), peft_outputs, base)
    unload_loha(pipe)
    P.assert_weights_equal(before, pipe)


def test_sdxl_two_text_encoders(tmp_path):
    """Untrained but random PEFT factors on SDXL parts: te1/te2 names, encoders with text_model."""
    from peft import LoHaConfig

    parts = T.sdxl_parts()
    config = {"unet": LoHaConfig(r=4, alpha=2, target_modules=UNET_TARGETS, init_weights=False),
              "text_encoder": LoHaConfig(r=2, alpha=2, target_modules=TEXT_TARGETS, init_weights=False),
              "text_encoder_2": LoHaConfig(r=2, alpha=4, target_modules=TEXT_TARGETS, init_weights=False)}
    torch.manual_seed(0)
    peft_parts = {part: peft_model(model, config[part]).eval() for part, model in parts.items()}
    for part, model in peft_parts.items():
        model.save_pretrained(tmp_path / "adapter" / part)
    peft_outputs = T.run_parts(peft_parts)

    net = loha.load(tmp_path / "adapter")
    assert net.family == "sdxl" and net.text_encoders == {"te1", "te2"}
    assert any(n.startswith("lora_te2_text_model_encoder_layers_1_") for n in net.modules)
    clean = T.sdxl_parts()
    base = T.run_parts(clean)
    handle = loha.apply(clean, net)
    assert handle.unmatched == {}
    assert_matches_peft(T.run_parts(clean), peft_outputs, base)


def test_refuses_what_is_not_a_loha_adapter(tmp_path):
    folder = tmp_path / "lora_adapter"
    folder.mkdir()
    (folder / lp.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(loha.FormatError, match="'LORA' adapter, not LOHA"):
        loha.load(folder)
    with pytest.raises(loha.FormatError, match="no PEFT adapter"):
        loha.load(tmp_path / "lora_adapter" / "..")


def sdxl_peft_parts(pipe, inject: bool = False):
    """A seeded random PEFT LoHa on every part of an SDXL pipeline: {part: (model to run, config)}."""
    from peft import LoHaConfig, inject_adapter_in_model

    configs = {"unet": LoHaConfig(r=4, alpha=2, target_modules=UNET_TARGETS, use_effective_conv2d=True,
                                  rank_pattern={"conv2": 3}, alpha_pattern={"to_q": 5}, init_weights=False),
               "text_encoder": LoHaConfig(r=2, alpha=2, target_modules=TEXT_TARGETS, init_weights=False),
               "text_encoder_2": LoHaConfig(r=3, alpha=4, target_modules=TEXT_TARGETS, init_weights=False)}
    torch.manual_seed(0)
    parts = {}
    for part, model in P.parts(pipe).items():
        parts[part] = (inject_adapter_in_model(configs[part], model) if inject else peft_model(model, configs[part])).eval()
    return parts, configs


def test_diffengine_sdxl_folder_patches_a_pipeline_to_peft_outputs(tmp_path):
    """diffengine's PeftSaveHook writes stepN/unet, stepN/text_encoder_one and stepN/text_encoder_two:
    every part is read, and a pipeline patched with the folder gives PEFT's own outputs."""
    peft_parts, _ = sdxl_peft_parts(P.sdxl_pipeline())
    step = tmp_path / "work_dir" / "step10"
    for part, sub in (("unet", "unet"), ("text_encoder", "text_encoder_one"), ("text_encoder_2", "text_encoder_two")):
        peft_parts[part].save_pretrained(step / sub)
    peft_outputs = T.run_parts(peft_parts)

    net = loha.load(step)
    assert net.family == "sdxl" and net.text_encoders == {"te1", "te2"} and net.components == {"unet", "te1", "te2"}
    pipe = P.sdxl_pipeline()
    base = T.run_parts(P.parts(P.sdxl_pipeline()))
    before = P.weights(pipe)
    load_loha(pipe, step)
    assert_matches_peft(T.run_parts(P.parts(pipe)), peft_outputs, base)
    unload_loha(pipe)
    P.assert_weights_equal(before, pipe)


def test_diffusers_lora_weights_file_patches_a_pipeline_to_peft_outputs(tmp_path):
    """diffusers' save_lora_weights (its training scripts) writes one pytorch_lora_weights.safetensors with
    part-prefixed PEFT names and the adapter configs as metadata; the folder and the file both load."""
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    peft_parts, configs = sdxl_peft_parts(P.sdxl_pipeline(), inject=True)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "out", **{f"{part}_lora_layers": get_peft_model_state_dict(model) for part, model in peft_parts.items()},
        **{f"{part}_lora_adapter_metadata": configs[part].to_dict() for part in peft_parts})
    peft_outputs = T.run_parts(peft_parts)
    base = T.run_parts(P.parts(P.sdxl_pipeline()))
    for source in (tmp_path / "out", tmp_path / "out" / lp.DIFFUSERS_WEIGHTS_FILE):
        net = loha.load(source)
        assert net.components == {"unet", "te1", "te2"}
        assert net.modules["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"].alpha == 5
        pipe = P.sdxl_pipeline()
        load_loha(pipe, source)
        assert_matches_peft(T.run_parts(P.parts(pipe)), peft_outputs, base)


def test_a_file_without_adapter_configs_says_what_scale_it_assumes(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import get_peft_model_state_dict

    peft_parts, _ = sdxl_peft_parts(P.sdxl_pipeline(), inject=True)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(peft_parts["unet"]))
    with pytest.warns(UserWarning, match="no adapter config for unet .*alpha is taken equal to each module's rank"):
        net = loha.load(tmp_path)
    assert {m.alpha == m.rank for m in net.modules.values()} == {True}
