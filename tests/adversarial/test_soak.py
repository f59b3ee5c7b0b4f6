"""Long use loses nothing: many patch/restore cycles and many files leave weights exact and
memory flat; an out-of-memory error half-way through a patch restores the model."""

import gc
import importlib

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

import loha

patch_module = importlib.import_module("loha.patch")  # `loha.patch` is the function
import tiny_models as T


def snapshot(parts):
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def assert_unchanged(before, parts):
    after = snapshot(parts)
    assert all(torch.equal(before[k], after[k]) for k in before)


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_thousand_cycles_with_changing_strengths(tmp_path):
    full = T.sd1_parts()
    path = T.make_loha_file(full, tmp_path / "n.safetensors", use_tucker=True)
    parts = {"text_encoder": full["text_encoder"]}  # the text encoder alone keeps 1000 cycles quick
    before = snapshot(parts)
    handle = loha.apply(parts, (path, 1.0), family="sd1")
    assert all(name.startswith("lora_unet_") for name in handle.unmatched[path])
    handle.restore()
    warm = rss_mb()
    for cycle in range(1000):
        handle.set_strengths([(0.1 + (cycle % 17) / 10, (cycle % 5) / 4)])
        if cycle % 97 == 0 and cycle % 5:  # text-encoder strength is non-zero
            fc1 = parts["text_encoder"].encoder.layers[0].mlp.fc1.weight
            assert not torch.equal(fc1, before["text_encoder.encoder.layers.0.mlp.fc1.weight"])
        handle.restore()
    assert_unchanged(before, parts)
    assert rss_mb() - warm < 30, "memory grew over 1000 patch/restore cycles"


def test_thousand_repatches_of_one_loaded_network_keep_memory_flat(tmp_path):
    """apply + restore of the same loaded network, 1000 times: RSS must not grow (it grew by every
    tensor read while the network held the reference library's memory map: ~80 KB per cycle on
    an SD1.5 file, 346 → 497 MB over 1000 cycles). A 6-layer text encoder keeps cycles quick."""
    parts = {"unet": T.sd1_unet(), "text_encoder": T.clip_text(layers=6)}
    full = load_file(T.make_loha_file(parts, tmp_path / "full.safetensors"))
    save_file({k: v for k, v in full.items() if k.startswith("lora_te_")}, tmp_path / "te.safetensors")
    model = {"text_encoder": parts["text_encoder"]}
    net = loha.load(tmp_path / "te.safetensors")
    assert len(net.modules) == 36
    before = snapshot(model)
    for _ in range(100):  # allocator caches, lazily built kernels
        loha.apply(model, net, family="sd1").restore()
    samples = [rss_mb()]
    for cycle in range(1, 1001):
        handle = loha.apply(model, net, family="sd1")
        assert handle.unmatched == {}
        handle.restore()
        if cycle % 250 == 0:
            samples.append(rss_mb())
    assert_unchanged(before, model)
    growth = samples[-1] - samples[0]
    print(f"RSS over 1000 re-patches: {' → '.join(f'{s:.1f}' for s in samples)} MB (growth {growth:.2f} MB)")
    assert growth < 2, f"memory grew {growth:.2f} MB over 1000 re-patches of one loaded network"


def test_hundred_different_files_do_not_grow_memory(tmp_path):
    full = T.sd1_parts()
    base = load_file(T.make_loha_file(full, tmp_path / "base.safetensors"))
    parts = {"text_encoder": full["text_encoder"]}
    paths = []
    for i in range(100):
        g = torch.Generator().manual_seed(i)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() else v for k, v in base.items()},
                  tmp_path / f"n{i}.safetensors")
        paths.append(tmp_path / f"n{i}.safetensors")
    before = snapshot(parts)
    for path in paths[:10]:  # warm up allocator caches
        loha.apply(parts, str(path), family="sd1").restore()
    warm = rss_mb()
    for path in paths[10:]:
        loha.apply(parts, str(path), family="sd1").restore()
    assert_unchanged(before, parts)
    assert rss_mb() - warm < 30, "memory grew over 90 loads of different files"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_out_of_memory_half_way_restores_the_model(tmp_path, monkeypatch, error):
    parts = T.sd1_parts()
    a = T.make_loha_file(parts, tmp_path / "a.safetensors", seed=1)
    b = T.make_loha_file(parts, tmp_path / "b.safetensors", seed=2, dora_wd=True)
    before = snapshot(parts)
    calls = []
    real = patch_module.apply_to_tensor

    def failing(*args):  # two networks on every weight: each call writes at once; fail on the 5th
        calls.append(1)
        if len(calls) == 5:
            raise error("simulated allocation failure")
        real(*args)

    monkeypatch.setattr(patch_module, "apply_to_tensor", failing)
    with pytest.raises(loha.LohaError, match=r"out of memory while patching .*a\.safetensors.*restored"):
        loha.apply(parts, [a, b])
    assert len(calls) == 5
    assert_unchanged(before, parts)
