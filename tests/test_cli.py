"""The `loha` command line: inspect, merge, demo; exit codes and messages."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import loha
import tiny_models as T
from loha.app import demo as D
from loha.models.to_ldm import save_checkpoint
from loha.app.cli import main
from loha.summary import render, summarize

TAGS = json.dumps({"5_style": {" watercolor": 30, "landscape": 10, "sunset": 2}, "2_extra": {"watercolor": 5, "cat": 12}})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    parts = T.sd1_parts()
    save_checkpoint(d / "model.safetensors", parts)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
            "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4", "use_tucker": "True"}),
            "ss_base_model_version": "sd_v1", "ss_tag_frequency": TAGS, "ss_output_name": "style"}
    net = T.make_loha_file(parts, d / "style.safetensors", dtype=torch.float16, metadata=meta, use_tucker=True)
    tensors = load_file(net)
    for s, shape in (("hada_w1_a", (4, 2)), ("hada_w1_b", (2, 4)), ("hada_w2_a", (4, 2)), ("hada_w2_b", (2, 4))):
        tensors[f"lora_unet_no_such_block.{s}"] = torch.ones(shape, dtype=torch.float16)
    save_file(tensors, d / "extra.safetensors", metadata=meta)
    return {"dir": d, "ckpt": str(d / "model.safetensors"), "net": net, "extra": str(d / "extra.safetensors")}


def run_cli(*args):
    """`python -m loha …` in a subprocess: (exit code, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "loha", *map(str, args)], capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_summary_content(files):
    s = summarize(loha.load(files["net"]))
    assert s["family"] == "sd1" and s["text_encoders"] == ["te1"]
    assert s["module_count"] == sum(s["modules_by_part"].values())
    assert set(s["modules_by_part"]) == {"unet", "te1"} and s["kinds"]["unet"] == {"loha": s["modules_by_part"]["unet"]}
    assert s["ranks"] == {"4": s["module_count"]} and s["alphas"] == {"2": s["module_count"]}
    assert 0 < s["tucker"] < s["module_count"] and s["dora"] == 0  # Tucker on k×k convs only
    assert s["dtypes"] == ["F16"] and s["size_bytes"] == os.path.getsize(files["net"])
    assert s["training"]["base_model"] == "sd_v1" and s["training"]["network_args"]["algo"] == "loha"
    assert s["top_tags"][:3] == [["watercolor", 35], ["cat", 12], ["landscape", 10]]
    assert s["unknown_keys"] == [] and s["hashes"]["sshs_model_hash"].startswith("0x")
    json.dumps(s)  # JSON-ready as is


def test_summary_of_in_memory_network():
    net = loha.from_tensors({"lora_unet_conv_in.diff": torch.zeros(4, 4, 3, 3)}, name="mem")
    s = summarize(net)
    assert s["file"] is None and s["size_bytes"] is None and s["kinds"] == {"unet": {"full": 1}}
    assert "mem" in render(s)


def test_inspect_text(files, capsys):
    assert main(["inspect", files["net"]]) == 0
    out = capsys.readouterr().out
    for needle in ("sd1 (SD 1.x)", "text encoders   te1", "rank", "4 (", "watercolor (35)", "algo=loha", "F16"):
        assert needle in out, needle


def test_inspect_json_and_against(files, capsys):
    assert main(["inspect", files["extra"], "--json", "--against", files["ckpt"]]) == 1  # a name matches nothing
    data = json.loads(capsys.readouterr().out)
    assert data["against"]["unmatched"] == ["lora_unet_no_such_block"]
    assert data["against"]["family"] == "sd1" and data["against"]["matched"] == data["module_count"] - 1
    assert data["against"]["error"] is None
    assert main(["inspect", files["net"], "--against", files["ckpt"]]) == 0
    assert "names match" in capsys.readouterr().out


def test_merge_command(files, tmp_path):
    out = tmp_path / "merged.safetensors"
    code, stdout, stderr = run_cli("merge", files["ckpt"], "--loha", f"{files['net']}:0.5:0.25", "-o", out, "--dtype", "fp16")
    assert code == 0, stderr
    assert "merged style.safetensors (unet 0.5, te 0.25" in stdout and "wrote" in stdout
    merged = load_file(out)
    assert merged["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16


def test_merge_errors(files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["merge", files["ckpt"], "--loha", files["extra"], "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loha: ") and "lora_unet_no_such_block" in err and "--allow-unmatched" in err
    assert not out.exists()

    assert main(["merge", files["ckpt"], "--loha", files["extra"], "-o", str(out), "--allow-unmatched"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "lora_unet_no_such_block" in err and out.exists()

    assert main(["merge", files["ckpt"], "--loha", files["net"], "-o", str(out)]) == 1  # out exists now
    assert capsys.readouterr().err == f"loha: {out}: already exists; choose another name or allow replacing it (pass --force)\n"

    assert main(["merge", files["ckpt"], "--loha", files["net"], "-o", files["ckpt"]]) == 1
    assert "refusing to overwrite the input" in capsys.readouterr().err

    missing = str(tmp_path / "missing.safetensors")
    assert main(["merge", files["ckpt"], "--loha", missing, "-o", str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err == f"loha: {missing}: no such file\n"

    with pytest.raises(SystemExit) as usage:  # no -o: argparse's usage error
        main(["merge", files["ckpt"], "--loha", files["net"]])
    assert usage.value.code == 2 and "-o/--out" in capsys.readouterr().err


def test_merge_says_what_it_did_not_merge(files, tmp_path, capsys):
    tensors = load_file(files["net"])
    tensors["lora_unet_conv_in.odd_suffix"] = torch.ones(1, dtype=torch.float16)
    save_file(tensors, tmp_path / "odd.safetensors")
    assert main(["merge", files["ckpt"], "--loha", str(tmp_path / "odd.safetensors"), "-o",
                 str(tmp_path / "o.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "odd.safetensors: 1 keys are of no known kind and were not merged: lora_unet_conv_in.odd_suffix" in err


def test_errors_print_without_traceback(files, tmp_path):
    code, _, err = run_cli("merge", files["ckpt"], "--loha", files["extra"], "-o", tmp_path / "o.safetensors")
    assert code == 1 and err.startswith("loha: ") and "Traceback" not in err


def test_inspect_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    assert main(["inspect", str(tmp_path / "junk.safetensors")]) == 1
    assert main(["inspect", str(tmp_path / "none.safetensors")]) == 1


def test_own_network_writer_matches_lycoris_names(tmp_path):
    """Without lycoris-lora the demo writes the same modules, shapes and metadata keys."""
    parts = D.build_parts(0, T.sd1_unet().config, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, vocab_size=1000, max_position_embeddings=16))
    assert D.make_network(parts, str(tmp_path / "a.safetensors")).startswith("lycoris-lora")
    assert D.make_network(parts, str(tmp_path / "b.safetensors"), prefer_lycoris=False).startswith("loha")
    theirs, ours = loha.load(tmp_path / "a.safetensors"), loha.load(tmp_path / "b.safetensors")
    unet = {n for n in theirs.modules if n.startswith("lora_unet_")}
    assert unet == {n for n in ours.modules if n.startswith("lora_unet_")}
    for name in unet:
        assert ours.modules[name].shapes == theirs.modules[name].shapes, name
    # lycoris-lora on transformers 5 drops text_model_; ours writes the spelling files in the wild use
    te = {n.replace("lora_te_", "lora_te_text_model_") for n in theirs.modules if n.startswith("lora_te_")}
    assert te == {n for n in ours.modules if n.startswith("lora_te_")}
    assert ours.family == theirs.family == "sd1"
    assert ours.metadata.keys() == theirs.metadata.keys() - {"sshs_model_hash"}


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "bit-identical" in out and "done in" in out
    files = sorted(os.listdir(tmp_path / "demo"))
    assert files == ["demo-loha.safetensors", "demo-merged.safetensors", "demo-sd1.safetensors", "demo.png"]
    from PIL import Image

    with Image.open(tmp_path / "demo" / "demo.png") as image:
        assert image.size[0] > image.size[1] > 100


def test_picture_without_pillow_is_a_ppm(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import …` now fails
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 8, 8, generator=g)
    w = torch.randn(16, 16, generator=g)
    path = D.draw({"checkpoint": str(tmp_path / "x.safetensors")}, out, out * 1.5, w, w + 0.1, size=32, gap=2)
    assert path.endswith("demo.ppm")
    data = open(path, "rb").read()
    assert data.startswith(b"P6\n100 66\n255\n") and len(data) == len(b"P6\n100 66\n255\n") + 100 * 66 * 3
