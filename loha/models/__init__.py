"""Whole models: published and demo configurations, weightless structures, and the
conversion of whole SD checkpoints between the diffusers and the LDM layouts.

- `configs`: the configurations (one table);
- `structures`: diffusers/transformers modules built from configs on the meta device;
- `to_ldm`: diffusers parts -> an LDM checkpoint state dict or file;
- `from_ldm`: an LDM checkpoint -> diffusers parts (architecture read off the shapes).
"""
