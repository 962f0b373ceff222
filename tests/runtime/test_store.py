"""The local model store: Ollama's names, paths and JSON; create / list / show / rm / cp; run by name."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.model import load
from qvl.runtime.store import MANIFEST_TYPE, ModelName, Store, StoreError

runner = CliRunner()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    return Store()


@pytest.mark.parametrize("text,parsed", [
    ("qwen2.5-vl", ("registry.ollama.ai", "library", "qwen2.5-vl", "latest")),
    ("qwen2.5vl:3b", ("registry.ollama.ai", "library", "qwen2.5vl", "3b")),
    ("me/model:q4_k_m", ("registry.ollama.ai", "me", "model", "q4_k_m")),
    ("localhost:5000/ns/m:v1", ("localhost:5000", "ns", "m", "v1")),
    ("hf.co/Qwen/Qwen2.5-VL-3B-Instruct:Q4_K_M", ("hf.co", "Qwen", "Qwen2.5-VL-3B-Instruct", "Q4_K_M")),
])
def test_names(text, parsed):
    n = ModelName.parse(text)
    assert (n.host, n.namespace, n.model, n.tag) == parsed


@pytest.mark.parametrize("bad", ["", "../etc", "/abs/path", "a/b/c/d", "m:bad/tag", "ns//m", "m:", ":tag",
                                 "a\\b", "m:" + "x" * 200, "-m"])
def test_bad_names(bad):
    with pytest.raises(StoreError):
        ModelName.parse(bad)


def test_layout_is_ollamas(store, fixtures_dir):
    f = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    entry = store.create("tiny:f16", f / "tiny-qwen2.5-vl-f16.gguf", f / "mmproj-tiny-qwen2.5-vl-f16.gguf",
                         template="{{ messages }}", params={"temperature": 0.1})
    path = store.root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "f16"
    manifest = json.loads(path.read_text())
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST_TYPE
    kinds = [x["mediaType"] for x in manifest["layers"]]
    assert kinds == ["application/vnd.ollama.image.model", "application/vnd.ollama.image.projector",
                     "application/vnd.ollama.image.template", "application/vnd.ollama.image.params"]
    import hashlib

    for layer in manifest["layers"] + [manifest["config"]]:
        blob = store.root / "blobs" / layer["digest"].replace(":", "-")
        assert blob.stat().st_size == layer["size"]
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"]
    assert entry.size == sum(x["size"] for x in manifest["layers"]) + manifest["config"]["size"]


def test_cli_round_trip_and_run_by_name(store, fixtures_dir):
    f = fixtures_dir / "tiny-qwen2-vl" / "llamacpp"
    r = runner.invoke(app, ["create", "me/tiny:v1", str(f / "tiny-qwen2-vl-f16.gguf")])
    assert r.exit_code == 0, r.stderr
    assert runner.invoke(app, ["cp", "me/tiny:v1", "tiny:copy"]).exit_code == 0
    listing = runner.invoke(app, ["list"]).stdout
    assert "me/tiny:v1" in listing and "tiny:copy" in listing
    shown = runner.invoke(app, ["show", "tiny:copy"]).stdout
    assert "qwen2vl" in shown and "qwen2vl_merger" in shown and "32768" in shown
    model = load("tiny:copy")  # the projector was found beside the model at create time
    assert model.vision is not None
    r = runner.invoke(app, ["rm", "me/tiny:v1"])
    assert r.exit_code == 0 and "0 blobs" in r.stderr  # still used by tiny:copy
    r = runner.invoke(app, ["rm", "tiny:copy"])
    assert r.exit_code == 0 and "3 blobs" in r.stderr
    assert list((store.root / "blobs").iterdir()) == []


def test_errors(store, tmp_path):
    r = runner.invoke(app, ["show", "nope:1"])
    assert r.exit_code == 2 and "not found" in r.stderr
    junk = tmp_path / "x.gguf"
    junk.write_text("nope")
    r = runner.invoke(app, ["create", "x:1", str(junk)])
    assert r.exit_code == 2 and "not a GGUF" in r.stderr
    assert not (store.root / "manifests").exists() or not any((store.root / "manifests").rglob("*:1"))
    r = runner.invoke(app, ["create", "../x", str(junk)])
    assert r.exit_code == 2 and "invalid model name" in r.stderr


def test_convert_stores_by_name(store, fixtures_dir, tmp_path):
    from qvl.convert.cli import app as convert_app

    r = runner.invoke(convert_app, [str(fixtures_dir / "tiny-qwen2.5-vl" / "hf"), "-o", str(tmp_path / "m.gguf"),
                                    "--name", "conv:f16", "-q"])
    assert r.exit_code == 0, r.stderr
    model_path, proj = store.resolve("conv:f16")
    assert model_path.read_bytes() == (tmp_path / "m.gguf").read_bytes()
    assert proj is not None and proj.read_bytes() == (tmp_path / "mmproj-m.gguf").read_bytes()
