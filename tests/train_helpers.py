"""A tiny trainable base model (tests/tiny_models' SD1 UNet, a 768-wide CLIP, a small VAE)."""

from __future__ import annotations

import copy
import logging

import torch

from tiny_models import clip_text, sd1_unet

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.18215)


def tiny_base(seed: int = 0):
    from diffusers import AutoencoderKL

    from loha.train.models import BaseModel, ByteTokenizer

    unet, text = sd1_unet(seed), clip_text(hidden=768, seed=seed + 1)  # SD1's 768-wide context
    torch.manual_seed(seed + 7)
    vae = AutoencoderKL(**TINY_VAE).eval()
    return BaseModel(unet, text, vae, ByteTokenizer(length=16), "sd1", "tiny-sd1")


class WithTextModel(torch.nn.Module):
    """A transformers-5 CLIPTextModel under a `text_model` attribute, so tools that name
    modules from the tree (lycoris-lora) see the `text_model.` level files in the wild carry."""

    def __init__(self, text):
        super().__init__()
        self.text_model = text

    def forward(self, *args, **kwargs):
        return self.text_model(*args, **kwargs)


#: What the tiny SDXL parts' weights cannot tell `loha.models.from_ldm` (heads, norm groups,
#: the tiny CLIPs' activation): a checkpoint of them is read back with these overrides.
TINY_SDXL_CONFIGS = {
    "unet": {"attention_head_dim": 8, "norm_num_groups": 8},
    "text_encoder": {"num_attention_heads": 4, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"num_attention_heads": 4, "hidden_act": "quick_gelu"},
    "vae": {"norm_num_groups": 8},
}


def tiny_sdxl_pipeline(seed: int = 0):
    """tiny_pipelines' SDXL pipeline (CLIP-L-wide and OpenCLIP-G-wide encoders, letter
    tokenizers, tiny_models' SDXL UNet) with this file's 8×-downsampling VAE, so 64-pixel
    buckets train on 8×8 latents."""
    from diffusers import AutoencoderKL

    import tiny_pipelines as P

    pipe = P.sdxl_pipeline(seed)
    torch.manual_seed(seed + 7)
    pipe.register_modules(vae=AutoencoderKL(**TINY_VAE).eval())
    pipe.vae_scale_factor = 8
    return pipe


def sdxl_folder(path, seed: int = 0) -> str:
    """The tiny SDXL pipeline saved as a diffusers model folder (what `--model` takes)."""
    tiny_sdxl_pipeline(seed).save_pretrained(str(path))
    return str(path)


def assert_lycoris_patch_and_trainer_agree(path: str, base, spec: dict, lycoris_modules):
    """lycoris-lora's create_network_from_weights takes every module of the file at `path`, and
    its forward path, our loader (loha.patch) and the trainer's own forward (a `LohaNetwork`
    of `spec` loading the file) give one model, changed by training in every part; the file's
    train_norm modules, merged by lycoris-lora (its NormModule.merge_to), give the norm weights
    and biases our loader gives. `lycoris_modules(parts)` gives (text encoders, UNet) as
    lycoris-lora is to see them. Returns the lycoris network."""
    import loha
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.modules.norms import NormModule
    from lycoris.utils.preset import read_preset
    from safetensors.torch import load_file

    from loha.train.modules import LohaNetwork, NetworkSpec
    from tiny_models import _preset_file, run_parts

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net = loha.load(path)
    reference = run_parts(base.parts())

    ours = copy.deepcopy(base.parts())
    handle = loha.apply(ours, [(net, 1.0, 1.0)])
    assert not handle.unmatched
    patched = run_parts(ours)

    theirs = copy.deepcopy(base.parts())
    encoders, unet = lycoris_modules(theirs)
    # lycoris-lora builds (and drops) a network with its class-wide preset first; its
    # built-in "full" names time_embedding twice on diffusers UNets, so use ours.
    LycorisNetworkKohya.apply_preset(read_preset(_preset_file()))
    lyco = create_network_from_weights(1.0, path, None, encoders, unet, for_inference=True)[0]
    assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(net.modules)
    lyco.apply_to(encoders, unet, True, True)
    lyco.load_weights(path)
    by_lycoris = run_parts(theirs)

    live = copy.deepcopy(base.parts())
    network = LohaNetwork(live, NetworkSpec(**spec))
    network.load_file_tensors(load_file(path))
    network.attach()
    by_trainer = run_parts(live)

    for key in reference:
        change = (patched[key] - reference[key]).abs().max()
        assert change > 1e-4, f"training changed nothing in {key}"
        torch.testing.assert_close(by_lycoris[key], patched[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(by_trainer[key], patched[key], rtol=1e-4, atol=1e-5)

    norms = [m for m in lyco.unet_loras if isinstance(m, NormModule)]
    assert len(norms) == sum(m.kind == "norm" for m in net.modules.values())
    merged = {id(m.org_module[0]) for m in norms}
    for module in norms:
        module.merge_to(1.0)
    changed, original = 0, base.parts()["unet"]
    for path, layer in unet.named_modules():
        if id(layer) in merged:
            mine = ours["unet"].get_submodule(path)
            changed += not torch.equal(mine.weight, original.get_submodule(path).weight)
            torch.testing.assert_close(layer.weight, mine.weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.bias, mine.bias, rtol=0, atol=1e-6)
    assert changed == len(norms), "training left a norm layer's scale as it was"
    return lyco
