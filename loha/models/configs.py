"""Model configurations: the published SD1.x/SD2.x/SDXL ones, the published diffusion
transformers', and the demo model's.

One table for every module that builds or reads a model: the meta-device structures
conversions need (`structures`), the configs a checkpoint's weights cannot tell
(`from_ldm`: attention heads, norm groups, activations), the demo and the trainer's
demo model, and the benchmarks.
"""

from __future__ import annotations

_SD_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
)
SD_TEXT = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)
_CLIP_L = dict(SD_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
#: The published diffusers configs per family and part (what weights cannot tell —
#: attention heads, norm groups, activations — comes from here for full-size models).
PUBLISHED = {
    "sd1": {
        "unet": dict(_SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "text_encoder": _CLIP_L,
        "vae": _SD_VAE,
    },
    "sd2": {
        "unet": dict(_SD_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True),
        "text_encoder": dict(SD_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=512),
        "vae": _SD_VAE,
    },
    "sdxl": {
        "unet": dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        ),
        "text_encoder": _CLIP_L,
        "text_encoder_2": dict(SD_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
        "vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
    },
}

#: The demo model: SD1.5's UNet structure at small widths, a 2-layer CLIP-L-wide text
#: encoder and a small VAE (8× downsampling, 4 latent channels).
DEMO = {
    "unet": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "text_encoder": dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=12,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128, scaling_factor=0.18215,
    ),
}

#: Per family, the whole-model configurations a checkpoint part is recognised as (by the
#: shapes `from_ldm` checks), in order: what its weights cannot tell is taken from the first
#: that fits. The demo's is one, so `loha demo`'s checkpoint reads back as it was built.
KNOWN = {"sd1": (PUBLISHED["sd1"], DEMO), "sd2": (PUBLISHED["sd2"],), "sdxl": (PUBLISHED["sdxl"],)}

#: The published diffusion transformers and their text encoders: (diffusers class,
#: config) per pipeline attribute, for full-size structures on the meta device
#: (`structures.published_transformer`). Text encoders are transformers classes.
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_CLIP_G = PUBLISHED["sdxl"]["text_encoder_2"]
_SD35_TEXT = {"text_encoder": ("CLIPTextModelWithProjection", _CLIP_L),
              "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G),
              "text_encoder_3": ("T5EncoderModel", _T5_XXL)}
PUBLISHED_TRANSFORMERS = {
    "flux-dev": {
        "transformer": ("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))),
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("T5EncoderModel", _T5_XXL),
    },
    "sd3.5-large": {
        "transformer": ("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
            num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")),
        **_SD35_TEXT,
    },
    "sd3.5-medium": {
        "transformer": ("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)))),
        **_SD35_TEXT,
    },
    "qwen-image": {
        "transformer": ("QwenImageTransformer2DModel", dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
    },
}
