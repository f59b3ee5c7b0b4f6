"""A tiny trainable base model (tests/tiny_models' SD1 UNet, a 768-wide CLIP, a small VAE)."""

from __future__ import annotations

import torch

from tests.tiny_models import clip_text, sd1_unet

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
