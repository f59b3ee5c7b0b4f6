"""Tiny diffusion transformers (Flux, SD3, PixArt, Qwen-Image, Wan) and their text encoders,
with seeded random weights, and LoHa files made by lycoris-lora the way SimpleTuner makes them.

SimpleTuner sets a LyCORIS preset over ``Attention``/``FeedForward`` and the family's
transformer blocks (``LycorisNetwork.apply_preset``), wraps the transformer with
``lycoris.create_lycoris`` and saves ``lycoris_`` + diffusers paths. Text encoders get
the same treatment under kohya's prefixes (``lora_te1`` …) through the preset's
``lora_prefix``. The zero-initialised factor (``hada_w2_a``) is randomised so ΔW ≠ 0.
"""

from __future__ import annotations

import copy
import logging

import torch

#: family -> pipeline attribute -> (text encoder kind, the prefix its modules get in the files
#: here: kohya's, where T5 is te3 in Flux and SD3), in the family's order.
TEXT_ENCODERS = {
    "flux": {"text_encoder": ("clip", "lora_te1"), "text_encoder_2": ("t5", "lora_te3")},
    "sd3": {"text_encoder": ("clip", "lora_te1"), "text_encoder_2": ("clip_g", "lora_te2"),
            "text_encoder_3": ("t5", "lora_te3")},
    "pixart": {"text_encoder": ("t5", "lora_te1")},
    "qwen-image": {},
    "wan": {"text_encoder": ("umt5", "lora_te1")},
}
#: The transformer blocks SimpleTuner's presets name besides Attention/FeedForward.
BLOCKS = {
    "flux": ["FluxTransformerBlock", "FluxSingleTransformerBlock"],
    "sd3": ["JointTransformerBlock"],
    "pixart": ["BasicTransformerBlock"],
    "qwen-image": ["QwenImageTransformerBlock"],
    "wan": ["WanTransformerBlock"],
}
TEXT_BLOCKS = {"clip": ["CLIPAttention", "CLIPMLP"], "clip_g": ["CLIPAttention", "CLIPMLP"],
               "t5": ["T5Attention", "T5LayerFF"], "umt5": ["UMT5Attention", "UMT5LayerFF"]}
FAMILIES = tuple(BLOCKS)
TOKENS = torch.tensor([[0, 5, 17, 42, 2]])


def transformer(family: str, seed: int = 0):
    """A tiny diffusers transformer of `family` (seeded random weights, eval mode)."""
    import diffusers as d

    torch.manual_seed(seed)
    common = dict(attention_head_dim=8, num_attention_heads=2)
    if family == "flux":
        model = d.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                                         axes_dims_rope=(2, 2, 4), **common)
    elif family == "sd3":  # two blocks, the first with SD3.5 medium's second attention
        model = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm", **common)
    elif family == "pixart":
        model = d.PixArtTransformer2DModel(sample_size=8, num_layers=2, in_channels=4, out_channels=8,
                                           cross_attention_dim=16, caption_channels=16, norm_num_groups=1,
                                           patch_size=2, **common)
    elif family == "qwen-image":
        model = d.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              joint_attention_dim=16, axes_dims_rope=(2, 2, 4), **common)
    elif family == "wan":
        model = d.WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                        ffn_dim=32, num_layers=2, rope_max_seq_len=32, **common)
    else:
        raise ValueError(family)
    return model.eval()


def transformer_inputs(family: str, seed: int = 0) -> dict:
    """Seeded inputs for the tiny transformer's forward."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if family == "flux":
        return dict(hidden_states=r(1, 4, 4), encoder_hidden_states=r(1, 3, 16), pooled_projections=r(1, 8),
                    timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                    guidance=torch.tensor([3.0]))
    if family == "sd3":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 16), pooled_projections=r(1, 8),
                    timestep=torch.tensor([10]))
    if family == "pixart":
        return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 3, 16), timestep=torch.tensor([10]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "qwen-image":
        return dict(hidden_states=r(1, 4, 16), encoder_hidden_states=r(1, 3, 16),
                    encoder_hidden_states_mask=torch.ones(1, 3), timestep=torch.tensor([0.5]), img_shapes=[(1, 2, 2)])
    return dict(hidden_states=r(1, 4, 1, 4, 4), timestep=torch.tensor([10]), encoder_hidden_states=r(1, 3, 16))


def text_encoder(kind: str, seed: int = 0):
    """A tiny CLIP-L-like, OpenCLIP-G-like (with projection), T5 or UMT5 encoder."""
    torch.manual_seed(seed)
    if kind in ("clip", "clip_g"):
        import tiny_models

        return tiny_models.clip_text(hidden=32, seed=seed, projection=kind == "clip_g")
    from transformers import T5Config, T5EncoderModel, UMT5EncoderModel

    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    return (UMT5EncoderModel if kind == "umt5" else T5EncoderModel)(config).eval()


def parts(family: str, seed: int = 0, text: bool = True) -> dict:
    """{"transformer": …, "text_encoder": …, …} of a tiny model of `family`."""
    found = {"transformer": transformer(family, seed)}
    if text:
        for i, (attr, (kind, _)) in enumerate(TEXT_ENCODERS[family].items()):
            found[attr] = text_encoder(kind, seed + 1 + i)
    return found


def simpletuner_network(module, targets, prefix: str = "lycoris", seed: int = 0, dim: int = 4, alpha: float = 2.0,
                        **kwargs):
    """lycoris-lora's LoHa on `module` as SimpleTuner builds it, hooked in, zero factor randomised."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    LycorisNetwork.apply_preset({"target_module": list(targets), "lora_prefix": prefix})
    try:
        net = create_lycoris(module, 1.0, dim, alpha, algo="loha", warn_on_unmatched=False, **kwargs)
    finally:
        LycorisNetwork.apply_preset({"lora_prefix": "lycoris"})
    net.apply_to()
    torch.manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            lora.hada_w2_a.normal_(std=0.1)
            if getattr(lora, "wd", False):
                lora.dora_scale.mul_(1 + 0.1 * torch.randn_like(lora.dora_scale))
    return net


def networks(family: str, model_parts: dict, **kwargs) -> dict:
    """One SimpleTuner-style network per part of `model_parts`, hooked into them."""
    nets = {"transformer": simpletuner_network(model_parts["transformer"],
                                               ["Attention", "FeedForward", *BLOCKS[family]], **kwargs)}
    for attr, (kind, prefix) in TEXT_ENCODERS[family].items():
        if attr in model_parts:
            nets[attr] = simpletuner_network(model_parts[attr], TEXT_BLOCKS[kind], prefix, **kwargs)
    return nets


def make_file(family: str, model_parts: dict, path, dtype=torch.float32, **kwargs) -> str:
    """One LoHa file for every part of `model_parts` (built on a copy; the parts stay clean)."""
    from safetensors.torch import save_file

    tensors = {}
    for net in networks(family, copy.deepcopy(model_parts), **kwargs).values():
        tensors.update({k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()})
    save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya"})
    return str(path)


def run(family: str, model_parts: dict) -> dict:
    """Outputs of every part on fixed inputs."""
    out = {}
    with torch.no_grad():
        out["transformer"] = model_parts["transformer"](**transformer_inputs(family)).sample
        for attr in TEXT_ENCODERS[family]:
            if attr in model_parts:
                out[attr] = model_parts[attr](TOKENS).last_hidden_state
    return out


def lycoris_parts(family: str, path, strength: float, te_strength: float, text: bool = True, **kwargs) -> dict:
    """Fresh parts with lycoris's forward path applying the file at `path` (hooked in)."""
    from safetensors.torch import load_file

    ref = parts(family, text=text)
    weights = load_file(str(path))
    for attr, net in networks(family, ref, **kwargs).items():
        net.load_state_dict({k: weights[k] for k in net.state_dict()})
        for lora in net.loras:
            lora.multiplier = strength if attr == "transformer" else te_strength
    return ref


def lycoris_outputs(family: str, path, strength: float, te_strength: float, **kwargs) -> dict:
    """Outputs of fresh parts with lycoris's forward path applying the file at `path`."""
    return run(family, lycoris_parts(family, path, strength, te_strength, **kwargs))
