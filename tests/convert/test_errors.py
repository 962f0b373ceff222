"""Bad input: one line on stderr, exit code 2, nothing written (and existing outputs untouched)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qvl.convert import pipeline
from qvl.convert.cli import app
from qvl.convert.writer import GGUFStream

runner = CliRunner()


@pytest.fixture
def ckpt(fixtures_dir, tmp_path) -> Path:
    """A writable copy of the tiny Qwen2.5-VL checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(fixtures_dir / "tiny-qwen2.5-vl" / "hf", dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def fails(args: list[str], outdir: Path, expect: str) -> None:
    before = sorted(p.name for p in outdir.iterdir()) if outdir.exists() else None
    r = runner.invoke(app, [*args, "-q"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("qvl-convert: error: ")
    assert expect in lines[0], lines[0]
    assert "Traceback" not in r.output
    if before is not None:
        assert sorted(p.name for p in outdir.iterdir()) == before


def edit_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_missing_config(ckpt, outdir):
    (ckpt / "config.json").unlink()
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "config.json: file not found")


def test_malformed_config(ckpt, outdir):
    (ckpt / "config.json").write_text("{ not json")
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "malformed JSON")


def test_missing_config_key(ckpt, outdir):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "missing required key 'num_hidden_layers'")


def test_unsupported_architecture(ckpt, outdir):
    edit_config(ckpt, architectures=["LlavaForConditionalGeneration"], model_type="llava")
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "unsupported architecture")


def test_missing_shard(ckpt, outdir):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "model-00002-of-00002.safetensors: shard listed")


def test_tensor_with_wrong_shape(ckpt, outdir):
    edit_config(ckpt, intermediate_size=256)
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir,
          "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [320, 64], config says [256, 64]")


def test_missing_tensor(ckpt, outdir):
    edit_config(ckpt, num_hidden_layers=4)
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "missing tensor 'model.layers.3.")


def test_truncated_safetensors(ckpt, outdir):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "truncated file")


def test_not_a_folder_nor_repo(outdir):
    fails(["./no/such/dir", "-o", str(outdir / "m.gguf")], outdir, "no such folder")


def test_offline_hub_id(outdir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    fails(["Qwen/Qwen2.5-VL-3B-Instruct", "-o", str(outdir / "m.gguf")], outdir, "offline")


def test_missing_output_folder(ckpt, tmp_path):
    fails([str(ckpt), "-o", str(tmp_path / "nope" / "m.gguf")], tmp_path, "output folder does not exist")


def test_unwritable_output_folder(ckpt, tmp_path):
    # /sys refuses new files even to root (os.access would say yes to root)
    fails([str(ckpt), "-o", "/sys/m.gguf"], tmp_path, "output folder is not writable")


def test_existing_output_needs_force(ckpt, outdir):
    (outdir / "m.gguf").write_text("keep me")
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "already exists (use --force")
    assert (outdir / "m.gguf").read_text() == "keep me"
    r = runner.invoke(app, [str(ckpt), "-o", str(outdir / "m.gguf"), "--force", "-q"])
    assert r.exit_code == 0, r.output
    assert (outdir / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_not_enough_space_is_checked_first(ckpt, outdir, monkeypatch):
    class Usage:
        free = 1 << 20

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda _: Usage())
    fails([str(ckpt), "-o", str(outdir / "m.gguf")], outdir, "not enough free space")


def test_disk_full_while_writing_leaves_nothing(ckpt, outdir, monkeypatch):
    (outdir / "m.gguf").write_text("old")
    real_write = GGUFStream.write

    def write_then_fail(self, ckpt_, on_bytes, workers):
        if self.path.name.startswith("mmproj-"):  # the text model is complete by now
            self.writer.write_header_to_file()
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, ckpt_, on_bytes, workers)

    monkeypatch.setattr(GGUFStream, "write", write_then_fail)
    fails([str(ckpt), "-o", str(outdir / "m.gguf"), "--force"], outdir, "no space left on device")
    assert (outdir / "m.gguf").read_text() == "old"


def test_bad_type_names(ckpt, outdir):
    fails([str(ckpt), "-o", str(outdir / "m.gguf"), "--type", "q3_k"], outdir, "--type 'q3_k'")
    fails([str(ckpt), "-o", str(outdir / "m.gguf"), "--vision-type", "q4_k"], outdir, "--vision-type")
    fails([str(ckpt), "-o", str(outdir / "m.gguf"), "--layout", "mlx"], outdir, "--layout 'mlx'")
    fails([str(ckpt), "-o", str(outdir / "m.gguf"), "--threads", "0"], outdir, "--threads 0")


def test_hub_source_is_named_after_the_repo(fixtures_dir, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub; outputs are named after the repo, not the snapshot hash."""
    snapshot = tmp_path / "snapshots" / "0123abcd"
    shutil.copytree(fixtures_dir / "tiny-qwen2-vl" / "hf", snapshot)
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["Qwen/Qwen2-VL-2B-Instruct", "--revision", "main", "-q"])
    assert r.exit_code == 0, r.output
    assert calls == [("Qwen/Qwen2-VL-2B-Instruct", "main")]
    assert (tmp_path / "Qwen2-VL-2B-Instruct-F16.gguf").exists()
    assert (tmp_path / "mmproj-Qwen2-VL-2B-Instruct-F16.gguf").exists()
