"""The host-independent halves of the integrations: importable without the host.

- `webui`: the `<loha:…>` prompt arguments, network files and the active set
  patched in place (AUTOMATIC1111);
- `forge`: the same as patches on Forge's own patchers;
- `pipelines`: `load_loha` & co. for diffusers pipelines;
- `safepaths`: the check that a browser-named file lies inside the model folders.

The host sides (`nodes/` for ComfyUI, `scripts/` for the WebUI) only register these.
"""
