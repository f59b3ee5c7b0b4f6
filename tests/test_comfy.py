"""The ComfyUI node pack without ComfyUI: patches, planning, nodes' logic, routes.

The patches are driven the way ComfyUI's ModelPatcher drives them (fp32 copy of
each weight, ``calculate_weight`` per patch, one rounding) on state dicts named as
ComfyUI holds SD1 models (``diffusion_model.…``, ``clip_l.transformer.…``), and the
patched models are checked against LyCORIS's own forward path. The routes run on a
real aiohttp server over real folders. tests/test_comfy_host.py does the same
against a real ComfyUI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import sys

import pytest
import torch
from safetensors import safe_open

import loha
import tiny_models as T
from loha.models.to_ldm import ldm_state_dict
from loha.errors import LohaError
from loha.patch import plan_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: LDM checkpoint prefix -> where ComfyUI's live SD1 model holds the same weights.
COMFY_NAMES = {"model.diffusion_model.": "diffusion_model.", "cond_stage_model.transformer.": "clip_l.transformer."}


def load_pack():
    """The repository as ComfyUI imports it: a package under a name of ComfyUI's choosing."""
    name = "custom_nodes_loha_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PACK = load_pack()
from custom_nodes_loha_under_test.nodes import (  # noqa: E402
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, blocks as block_node, files, host, loaders, save,
)
from custom_nodes_loha_under_test.nodes.patches import LohaPatch, bypass_injection, plan_patches  # noqa: E402


def comfy_state(parts: dict) -> dict:
    """The parts' weights under ComfyUI's names, sharing storage with the parts."""
    out = {}
    for key, value in ldm_state_dict(parts, "sd1").items():
        for prefix, comfy in COMFY_NAMES.items():
            if key.startswith(prefix):
                out[comfy + key[len(prefix):]] = value
    return out


def split(state: dict) -> dict:
    """Shapes per ComfyUI part, as the loaders hand them to plan_patches."""
    return {"model": {k: tuple(v.shape) for k, v in state.items() if k.startswith("diffusion_model.")},
            "clip": {k: tuple(v.shape) for k, v in state.items() if k.startswith("clip_l.")}}


def patch_like_comfyui(state: dict, patches: dict, strength: float) -> None:
    """ModelPatcher.patch_weight_to_device for every key: fp32 copy, each patch, round once, write back."""
    for key, patch in patches.items():
        with torch.inference_mode():  # ComfyUI runs nodes and model loads under it
            work = state[key].to(torch.float32, copy=True)
            work = patch.calculate_weight(work, key, strength, 1.0, None, lambda a: a)
        with torch.no_grad():
            state[key].copy_(work)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A LoHa file by lycoris-lora for the tiny SD1 model, and that model's state under ComfyUI's names."""
    parts = T.sd1_parts()
    path = T.make_loha_file(parts, tmp_path_factory.mktemp("net") / "style.safetensors")
    return parts, path, {k: v.clone() for k, v in comfy_state(parts).items()}


# --------------------------------------------------------------------------- patches


def test_patches_match_lycoris_forward(sd1):
    _, path, _ = sd1
    ours = T.sd1_parts()
    state = comfy_state(ours)
    result = plan_patches(loha.load(path), split(state))
    assert result.family == "sd1" and not result.unmatched
    assert all(k.startswith("diffusion_model.") for k in result.patches["model"])
    assert all(k.startswith("clip_l.transformer.") for k in result.patches["clip"])
    patch_like_comfyui(state, result.patches["model"], 0.7)
    patch_like_comfyui(state, result.patches["clip"], 0.4)

    base = T.run_parts(T.sd1_parts())
    theirs_unet = T.lycoris_outputs(T.sd1_parts, {}, path, 0.7)
    theirs_text = T.lycoris_outputs(T.sd1_parts, {}, path, 0.4)
    got = T.run_parts(ours)
    T.assert_outputs_close({"unet": got["unet"]}, {"unet": theirs_unet["unet"]}, base)
    T.assert_outputs_close({"text_encoder": got["text_encoder"]}, {"text_encoder": theirs_text["text_encoder"]}, base)


def test_patch_uses_comfyui_strength_and_block_weights(sd1):
    _, path, state = sd1
    net = loha.load(path)
    full = plan_patches(net, split(state))
    outs = plan_patches(net, split(state), "OUTALL")
    # IN and MID blocks are at 0: no patch at all for them, the rest unchanged
    assert set(outs.patches["model"]) < set(full.patches["model"])
    assert not any(".input_blocks." in k or ".middle_block." in k for k in outs.patches["model"])
    key = next(k for k in outs.patches["model"] if ".output_blocks." in k)
    weight = state[key].float()
    half = outs.patches["model"][key].calculate_weight(weight.clone(), key, 0.5, 1.0, None, None)
    one = full.patches["model"][key].calculate_weight(weight.clone(), key, 1.0, 1.0, None, None)
    torch.testing.assert_close(half - weight, (one - weight) * 0.5, rtol=1e-5, atol=1e-6)


class Owner:
    """What the bypass injection reads of ComfyUI's ModelPatcher: the model it loads."""

    def __init__(self, model):
        self.model = model


def layer_tree(state: dict) -> torch.nn.Module:
    """A module tree with ComfyUI's state-dict keys: one Linear or 3×3/1×1 Conv per weight, holding it."""
    root = torch.nn.Module()
    for key, weight in state.items():
        path = key[: -len(".weight")]
        parent = root
        for name in path.split(".")[:-1]:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        if weight.dim() == 2:
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        else:
            layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=weight.shape[2] // 2, bias=False)
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        parent.add_module(path.split(".")[-1], layer)
    return root


def test_bypass_injection_gives_the_patched_layers_and_leaves_clones_apart(sd1):
    """Each layer injected by the bypass node's injection computes what the patched layer computes."""
    _, path, state = sd1
    state = {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)}
    result = plan_patches(loha.load(path), split(state), "OUTALL")
    patched = {k: v.clone() for k, v in state.items()}
    patch_like_comfyui(patched, result.patches["model"], 0.7)
    tree = layer_tree(state)
    injection = bypass_injection(result.network, result.patches["model"], 0.7)
    injection.check(tree)
    first, second = Owner(tree), Owner(tree)  # two clones of one ComfyUI model
    injection.eject(second)  # never injected: nothing to do
    injection.inject(first)
    injection.inject(first)  # ComfyUI may inject again: one bypass only
    g = torch.Generator().manual_seed(0)
    for key in result.patches["model"]:
        layer = tree.get_submodule(key[: -len(".weight")])
        x = torch.randn(2, 5, layer.in_features, generator=g) if isinstance(layer, torch.nn.Linear) else \
            torch.randn(1, layer.in_channels, 6, 6, generator=g)
        if isinstance(layer, torch.nn.Linear):
            want = torch.nn.functional.linear(x, patched[key])
        else:
            want = layer._conv_forward(x, patched[key], None)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5, msg=key)
    injection.eject(first)
    assert not any("forward" in m.__dict__ for m in tree.modules())
    assert all(torch.equal(tree.get_parameter(k), v) for k, v in state.items())
    elsewhere = bypass_injection(result.network, {"diffusion_model.no_such.weight": result.patches["model"][key]}, 1.0)
    with pytest.raises(LohaError, match="no layer 'diffusion_model.no_such'"):
        elsewhere.check(tree)


def test_large_weight_under_inference_mode():
    """ComfyUI's working copies are inference tensors; the kernels' worker threads must cope."""
    o, i, r = 1024, 1024, 4
    g = torch.Generator().manual_seed(0)
    tensors = {f"lora_unet_conv_in.{s}": torch.randn(shape, generator=g) for s, shape in
               (("hada_w1_a", (o, r)), ("hada_w1_b", (r, i)), ("hada_w2_a", (o, r)), ("hada_w2_b", (r, i)))}
    net = loha.from_tensors(tensors)
    items = plan_modules(_single_weight_map(o, i), [loha.Use(net)])[0]
    patch = LohaPatch(items[0].use, items)
    expected = 2.0 * (tensors["lora_unet_conv_in.hada_w1_a"] @ tensors["lora_unet_conv_in.hada_w1_b"]) * (
        tensors["lora_unet_conv_in.hada_w2_a"] @ tensors["lora_unet_conv_in.hada_w2_b"])
    with torch.inference_mode():
        inside = patch.calculate_weight(torch.zeros(o, i), "w", 2.0, 1.0, None, None)
    outside = patch.calculate_weight(torch.zeros(o, i), "w", 2.0, 1.0, None, None)  # after, without it
    torch.testing.assert_close(inside, expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(outside, expected, rtol=1e-4, atol=1e-3)


def _single_weight_map(o, i):
    from loha.keys import NameMap, Target

    target = Target("unet", "conv_in", "w", None, (o, i), "IN00")
    return NameMap("sd1", [(target, ["lora_unet_conv_in"])])


def test_model_only_ignores_text_names_and_wrong_family_is_an_error(sd1, tmp_path):
    _, path, state = sd1
    net = loha.load(path)
    model_only = plan_patches(net, {"model": split(state)["model"]})
    assert set(model_only.patches) == {"model"} and not model_only.unmatched
    xl = T.make_loha_file(T.sdxl_parts(), tmp_path / "xl.safetensors")
    with pytest.raises(LohaError, match="xl.safetensors: the file is for sdxl models, this model is sd1"):
        plan_patches(loha.load(xl), split(state))
    renamed = {k.replace("lora_unet_", "lora_unet_x_"): v for k, v in _tensors(path).items() if "unet" in k}
    with pytest.raises(LohaError, match=r"none of its \d+ modules matches this sd1 model"):
        plan_patches(loha.from_tensors(renamed, "renamed"), {"model": split(state)["model"]})


def test_unmatched_names_are_reported(sd1, tmp_path):
    _, path, state = sd1
    tensors = _tensors(path)
    stray = {k.replace("lora_unet_conv_in", "lora_unet_no_such_layer"): v
             for k, v in tensors.items() if k.startswith("lora_unet_conv_in.")}
    net = loha.from_tensors({**tensors, **stray, "lora_unet_conv_in.odd_suffix": torch.ones(1)}, "stray")
    result = plan_patches(net, split(state))
    assert result.unmatched == ["lora_unet_no_such_layer"]
    assert loaders.not_applied(result) == ["1 names match no weight of this sd1 model: lora_unet_no_such_layer",
                                           "1 keys are of no kind loha applies: lora_unet_conv_in.odd_suffix"]


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


# --------------------------------------------------------------------------- nodes


def test_outside_comfyui_the_pack_registers_nothing():
    assert PACK.NODE_CLASS_MAPPINGS == {} and PACK.WEB_DIRECTORY == "./js"
    assert os.path.isfile(os.path.join(REPO, "js", "loha.js"))


def test_nodes_are_registered_with_tooltips_and_category(monkeypatch):
    monkeypatch.setattr(host, "lora_names", lambda: ["a.safetensors", "sub/b.safetensors"])
    ours = {"LohaLoader", "LohaLoaderModelOnly", "LohaLoaderBypass", "LohaStack", "LohaBlockWeights", "LohaMergeSave",
            "LohaInfo"}
    assert ours <= set(NODE_CLASS_MAPPINGS)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for name in ours:
        cls = NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "loaders/loha", name
        assert cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION)), name
        for group in ("required", "optional"):
            for input_name, spec in cls.INPUT_TYPES().get(group, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
    stack = loaders.LohaStack.INPUT_TYPES()["required"]
    assert stack["lora_1"][0][0] == loaders.NONE and "sub/b.safetensors" in stack["lora_4"][0]
    assert loaders.LohaStack.INPUT_TYPES()["optional"]["bypass"][0] == "BOOLEAN"
    assert NODE_DISPLAY_NAME_MAPPINGS["LohaLoaderBypass"] == "LoHa Loader (bypass)"


def test_block_weights_node():
    node = block_node.LohaBlockWeights
    assert node().build("OUTALL", "") == ("OUTALL",)
    assert node().build("OUTALL", " 1,0,0,0,0,0,0,0,0,0,0,0 ") == ("1,0,0,0,0,0,0,0,0,0,0,0",)
    assert node().build("none", "") == ("",)
    assert node.VALIDATE_INPUTS("none", ",".join(["1"] * 12)) is True  # an SDXL list
    assert node.VALIDATE_INPUTS("INS", "") is True  # an SD preset
    message = node.VALIDATE_INPUTS("none", "1,2,3")
    assert "3 values" in message and "17 or 26" in message and "12 or 20" in message


def test_plans_are_reused_until_the_file_changes(sd1, tmp_path):
    _, path, state = sd1
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(path, "rb").read())
    parts = split(state)
    first = loaders.planned(str(copy), parts, "")
    assert loaders.planned(str(copy), parts, "") is first  # a strength change re-runs with this
    assert loaders.planned(str(copy), parts, "OUTALL") is not first
    assert loaders.planned(str(copy), {"model": parts["model"]}, "") is not first
    stat = os.stat(copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    assert loaders.planned(str(copy), parts, "") is not first


def test_zero_strengths_return_the_inputs_unchanged():
    model, clip = object(), object()
    assert loaders.apply_loha(model, clip, "never-read.safetensors", 0, 0) == (model, clip)


def test_checkpoint_writer_streams_and_records(sd1, tmp_path):
    _, path, state = sd1
    result = plan_patches(loha.load(path), split(state))

    class Patcher:  # what merged_uses reads of ComfyUI's ModelPatcher: its patches dict
        def __init__(self, patches, strength):
            self.patches = {k: [(strength, p, 1.0, None, None)] for k, p in patches.items()}

    clip = type("Clip", (), {"patcher": Patcher(result.patches["clip"], 0.25)})()
    uses = save.merged_uses(Patcher(result.patches["model"], 0.75), clip)
    assert [(u.network.path, u.unet, u.te) for u in uses] == [(path, 0.75, 0.25)]

    out = tmp_path / "merged.safetensors"
    ticks = []
    bar = type("Bar", (), {"update": lambda self, n: ticks.append(n)})()
    save.write_merged(str(out), state, {"k": "v"}, bar)
    assert len(ticks) == len(state) and not os.path.exists(str(out) + ".partial")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"k": "v"} and set(f.keys()) == set(state)
        for key in state:
            assert torch.equal(f.get_tensor(key), state[key]), key


# --------------------------------------------------------------------------- routes


@pytest.fixture
def folders(tmp_path, sd1):
    _, path, _ = sd1
    loras, other, outside = tmp_path / "loras", tmp_path / "more", tmp_path / "outside"
    for folder in (loras, other, outside, loras / "sub"):
        folder.mkdir()
    (loras / "style.safetensors").write_bytes(open(path, "rb").read())
    (loras / "style.preview.png").write_bytes(b"\x89PNG fake but served as is")
    (other / "sub").mkdir()
    (other / "sub" / "two.safetensors").write_bytes(open(path, "rb").read())
    (other / "sub" / "two.png").write_bytes(b"\x89PNG two")
    (outside / "secret.safetensors").write_bytes(open(path, "rb").read())
    (outside / "secret.png").write_bytes(b"\x89PNG secret")
    os.symlink(outside / "secret.safetensors", loras / "escape.safetensors")
    os.symlink(outside / "secret.png", loras / "style2.png")
    (loras / "style2.safetensors").write_bytes(open(path, "rb").read())
    os.symlink(outside, loras / "sub" / "linked")
    (loras / "broken.safetensors").write_bytes(b"not a network")
    return [str(loras), str(other)], str(outside)


def serve(roots, requests):
    """Answer raw request paths with our routes on a real aiohttp server: [(status, headers, body)]."""
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    from custom_nodes_loha_under_test.nodes import routes

    async def go():
        app = web.Application()
        table = web.RouteTableDef()
        routes.register(table)
        app.add_routes(table)
        server = TestServer(app)
        await server.start_server()
        try:
            out = []
            async with ClientSession() as session:
                for raw in requests:  # sent as written: no client-side normalising or quoting
                    async with session.get(server.make_url("/").join(
                            __import__("yarl").URL(raw, encoded=True))) as response:
                        out.append((response.status, response.headers, await response.read()))
            return out
        finally:
            await server.close()

    original = host.lora_roots
    host.lora_roots = lambda: roots
    try:
        return asyncio.run(go())
    finally:
        host.lora_roots = original


def test_info_and_preview_routes(folders):
    roots, _ = folders
    (info, pic, two, two_pic, none, bad) = serve(roots, [
        "/loha/info?name=style.safetensors", "/loha/preview?name=style.safetensors",
        "/loha/info?name=sub%2Ftwo.safetensors", "/loha/preview?name=sub/two.safetensors",
        "/loha/preview?name=broken.safetensors", "/loha/info?name=broken.safetensors"])
    assert info[0] == 200
    payload = json.loads(info[2])
    assert payload["summary"]["family"] == "sd1" and payload["preview"] is True
    assert payload["summary"]["file"] == "style.safetensors" and roots[0] not in info[2].decode()
    assert re.search(r"family +sd1 \(SD 1.x\)", payload["text"])
    assert pic[0] == 200 and pic[1]["Content-Type"] == "image/png" and pic[2] == b"\x89PNG fake but served as is"
    assert two[0] == 200 and json.loads(two[2])["preview"] is True
    assert two_pic[0] == 200 and two_pic[2] == b"\x89PNG two"
    assert none[0] == 404
    assert bad[0] == 422 and json.loads(bad[2])["error"].startswith("broken.safetensors: ")
    assert all(root not in bad[2].decode() for root in roots)  # files named relative to their folder


@pytest.mark.parametrize("name, status", [
    ("../outside/secret.safetensors", 400),
    ("%2e%2e/outside/secret.safetensors", 400),  # decoded once by the server: "../"
    ("%2e%2e%2foutside%2fsecret.safetensors", 400),
    ("..%5coutside%5csecret.safetensors", 400),  # backslash separators
    ("%252e%252e/outside/secret.safetensors", 404),  # still encoded after decoding: a literal name
    ("sub/../style.safetensors", 400),
    ("./style.safetensors", 400),
    ("", 400),
    ("%00style.safetensors", 400),
    ("/etc/passwd", 400),
    ("%2Fetc%2Fpasswd", 400),
    ("C:%5Cwindows%5Cwin.ini", 400),
    ("escape.safetensors", 404),  # a symlink out of the folder
    ("sub/linked/secret.safetensors", 404),  # through a symlinked folder
    ("style2.safetensors", 200),  # the file is fine ...
    ("nothing.safetensors", 404),
])
def test_routes_refuse_names_outside_the_folders(folders, name, status):
    roots, outside = folders
    info, pic = serve(roots, [f"/loha/info?name={name}", f"/loha/preview?name={name}"])
    assert info[0] == status, info[2]
    assert pic[2] != b"\x89PNG secret"
    assert (b'"summary"' in info[2]) == (status == 200)
    if status == 200:
        assert pic[0] == 404 and json.loads(info[2])["preview"] is False  # ... its preview links out


def test_resolve_directly(folders):
    roots, outside = folders
    assert files.resolve("style.safetensors", roots) == os.path.realpath(os.path.join(roots[0], "style.safetensors"))
    assert files.resolve("sub\\two.safetensors", roots).endswith(os.path.join("more", "sub", "two.safetensors"))
    with pytest.raises(files.NotFound):
        files.resolve("sub", roots)  # a folder is not a file
    with pytest.raises(files.Refused):
        files.resolve(os.path.join(outside, "secret.safetensors"), roots)


def test_comfyui_key_map_covers_models_loha_has_no_layout_for():
    """A model in a layout loha does not know (PixArt's, as ComfyUI holds it: fused q/k/v and
    k/v) takes names from ComfyUI's key map: keys, (key, (dim, start, length)) row slices and
    the swap of ΔW's halves; the patches add exactly what those say."""

    def swap_scale_shift(weight):  # ComfyUI's function is known to the planner by this name
        shift, scale = weight.chunk(2, dim=0)
        return torch.cat([scale, shift])

    h, g = 8, torch.Generator().manual_seed(0)
    state = {"diffusion_model.blocks.0.attn.qkv.weight": torch.randn(3 * h, h, generator=g),
             "diffusion_model.blocks.0.cross_attn.kv_linear.weight": torch.randn(2 * h, h, generator=g),
             "diffusion_model.blocks.0.mlp.fc1.weight": torch.randn(4 * h, h, generator=g),
             "diffusion_model.final_layer.adaLN_modulation.1.weight": torch.randn(2 * h, h, generator=g)}
    key_map = {"transformer.transformer_blocks.0.attn1.to_k": ("diffusion_model.blocks.0.attn.qkv.weight", (0, h, h)),
               "transformer.transformer_blocks.0.attn2.to_v": ("diffusion_model.blocks.0.cross_attn.kv_linear.weight",
                                                               (0, h, h)),
               "transformer.transformer_blocks.0.ff.net.0.proj": "diffusion_model.blocks.0.mlp.fc1.weight",
               "transformer.norm_out.linear": ("diffusion_model.final_layer.adaLN_modulation.1.weight", None,
                                               swap_scale_shift)}
    tensors, expected = {}, {k: v.clone() for k, v in state.items()}
    for name, value in key_map.items():
        key, offset, function = (value, None, None) if isinstance(value, str) else (*value, None)[:3]
        rows = state[key].shape[0] if offset is None else offset[2]
        factors = [torch.randn(shape, generator=g) * 0.3 for shape in ((rows, 2), (2, h), (rows, 2), (2, h))]
        tensors.update({f"{name}.hada_w{i}_{ab}": f for (i, ab), f in zip(("1a", "1b", "2a", "2b"), factors)})
        delta = 0.5 * (factors[0] @ factors[1]) * (factors[2] @ factors[3])
        target = expected[key] if offset is None else expected[key][offset[1]:offset[1] + offset[2]]
        target += function(delta) if function else delta
    net = loha.from_tensors(tensors, "pixart")
    with pytest.raises(LohaError, match="none of its 4 modules matches this pixart model"):
        plan_patches(net, split(state))
    result = plan_patches(net, split(state), key_map=key_map)
    assert result.unmatched == [] and set(result.patches["model"]) == set(state)
    patch_like_comfyui(state, result.patches["model"], 0.5)
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
