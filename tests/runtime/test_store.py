"""The local model store: Ollama's names, paths and JSON; create / list / show / rm / cp; run by name."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
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
                         template="{{ range .Messages }}{{ .Content }}{{ end }}", params={"temperature": 0.1})
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


def test_aliases():
    from qvl.runtime.sources import alias_source

    assert alias_source("qwen2.5-vl:3b") == ("Qwen/Qwen2.5-VL-3B-Instruct", "q4_k_m")
    assert alias_source("qwen2-vl:7b-q8_0") == ("Qwen/Qwen2-VL-7B-Instruct", "q8_0")
    assert alias_source("me/model:3b") is None
    with pytest.raises(StoreError, match="no official model"):
        alias_source("qwen2.5-vl:5b")
    assert alias_source("qwen2.5-vl:7b-q3_k_m") == ("Qwen/Qwen2.5-VL-7B-Instruct", "q3_k_m")  # any --type
    with pytest.raises(StoreError, match="quantization 'iq2_xs'"):
        alias_source("qwen2.5-vl:3b-iq2_xs")


def test_ollama_import_hard_links(store, fixtures_dir, tmp_path, monkeypatch):
    from qvl.runtime.sources import pull_any

    ollama = Store(tmp_path / "ollama")
    f = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    ollama.create("tiny:latest", f / "tiny-qwen2.5-vl-f16.gguf", f / "mmproj-tiny-qwen2.5-vl-f16.gguf")
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama.root))
    pull_any("ollama://tiny", store)
    ours, _ = store.resolve("tiny")
    theirs, _ = ollama.resolve("tiny")
    assert ours.stat().st_ino == theirs.stat().st_ino  # same file system: a hard link, no copy


def test_hf_checkpoint_is_converted_and_stored(store, fixtures_dir, monkeypatch):
    """hf.co/<repo>:<quant> of a checkpoint repo: downloaded (stubbed here) and converted."""
    import huggingface_hub

    from qvl.runtime.sources import pull_any

    hf_dir = fixtures_dir / "tiny-qwen2-vl" / "hf"
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [p.name for p in hf_dir.iterdir()])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, revision=None, allow_patterns=None: str(hf_dir))
    pull_any("hf.co/Qwen/tiny-qwen2-vl:q8_0", store)
    model, proj = store.resolve("hf.co/Qwen/tiny-qwen2-vl:q8_0")
    from qvl.runtime.gguf_file import GGUFFile

    with GGUFFile(model) as g:
        assert g.get("general.file_type") == 7 and g.architecture == "qwen2vl"
    assert proj is not None


def test_run_pulls_missing_names_unless_no_pull(store, tmp_path):
    from qvl.runtime.run_cli import app as run_app

    r = runner.invoke(run_app, ["me/absent:v1", "--no-pull", "--prompt", "x"])
    assert r.exit_code == 2 and "--no-pull" in r.stderr
    r = runner.invoke(run_app, ["127.0.0.1:9/me/absent:v1", "--prompt", "x", "--insecure"])
    assert r.exit_code == 2 and "pulling" in r.stderr and "failed" in r.stderr


@pytest.mark.parametrize("bad", ["", "a::b", "ollama://a::b"])
def test_pull_of_a_bad_name_prints_one_line(store, bad):
    """Piped stderr gets no progress bar: the error is its only line, nothing drawn before it."""
    r = runner.invoke(app, ["pull", bad])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("qvl: error: invalid model name")
    assert not store.root.exists() or not any(store.root.rglob("*.json"))


def test_hf_gguf_repo_is_downloaded_as_is(store, fixtures_dir, monkeypatch):
    import huggingface_hub

    from qvl.runtime.sources import pull_any

    f = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    files = {"tiny-Q8_0.gguf": f / "tiny-qwen2.5-vl-f16.gguf", "tiny-F16.gguf": f / "tiny-qwen2.5-vl-f16.gguf",
             "mmproj-tiny-f16.gguf": f / "mmproj-tiny-qwen2.5-vl-f16.gguf", "README.md": None}
    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: list(files))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: asked.append(name) or str(files[name]))
    pull_any("hf.co/ggml-org/tiny-GGUF:Q8_0", store)
    assert asked == ["tiny-Q8_0.gguf", "mmproj-tiny-f16.gguf"]
    model, proj = store.resolve("hf.co/ggml-org/tiny-GGUF:Q8_0")
    assert model.read_bytes() == files["tiny-Q8_0.gguf"].read_bytes() and proj is not None


def test_run_model_id_pulls_a_hub_id_or_runs_a_store_name(store, fixtures_dir, monkeypatch):
    """candle's --model-id: ORG/REPO is a Hugging Face id (pulled as q4_k_m, stubbed hub here)."""
    import huggingface_hub

    from qvl.runtime.run_cli import app as run_app

    hf_dir = fixtures_dir / "tiny-qwen2-vl" / "hf"
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: [p.name for p in hf_dir.iterdir()])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, revision=None, allow_patterns=None: str(hf_dir))
    r = runner.invoke(run_app, ["--model-id", "Qwen/tiny-qwen2-vl", "--prompt", "Hi", "--max-length", "3", "--json"])
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 3
    assert [str(e.name) for e in store.list()] == ["hf.co/Qwen/tiny-qwen2-vl:latest"]
    model, _ = store.resolve("hf.co/Qwen/tiny-qwen2-vl:latest")
    from qvl.runtime.gguf_file import GGUFFile

    with GGUFFile(model) as g:
        assert g.get("general.file_type") == 15  # Q4_K_M, the default quant
    r = runner.invoke(run_app, ["--model-id", "hf.co/Qwen/tiny-qwen2-vl", "--prompt", "Hi", "--max-length", "2"])
    assert r.exit_code == 0, r.stderr  # a store name as is, already there: no second pull
    for args, expect in ((["--prompt", "x"], "no model"),
                         (["m.gguf", "--model-id", "a/b", "--prompt", "x"], "not both"),
                         (["--model-id", "a/b", "--revision", "v2", "--prompt", "x"], "--revision v2"),
                         (["--model-id", "a/b", "--bf16", "--f32", "--prompt", "x"], "choose one")):
        r = runner.invoke(run_app, args)
        assert r.exit_code == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_load_by_name_takes_the_stored_parameters_and_system_as_defaults(store, fixtures_dir):
    """qvl.load(name): the stored PARAMETERs and SYSTEM are generate's and chat's defaults; an
    argument given wins (temperature 0: greedy over a stored temperature)."""
    src = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    store.create("terse:1", src / "tiny-qwen2.5-vl-f16.gguf", src / "mmproj-tiny-qwen2.5-vl-f16.gguf",
                 params={"num_predict": 4, "seed": 5, "temperature": 0.9, "top_k": 20},
                 system="Answer in one word.")
    named, plain = load("terse:1"), load(src / "tiny-qwen2.5-vl-f16.gguf")
    assert named.defaults == {"max_new_tokens": 4, "seed": 5, "temperature": 0.9, "top_k": 20,
                              "system": "Answer in one word."} and plain.defaults == {}
    want = plain.generate("Describe it.", max_new_tokens=4, seed=5, temperature=0.9, top_k=20,
                          system="Answer in one word.", cache_prompt=False)
    got = named.generate("Describe it.", cache_prompt=False)
    assert got.token_ids == want.token_ids and len(got.token_ids) == 4
    greedy = named.generate("Describe it.", temperature=0, max_new_tokens=6, system="Be long.", cache_prompt=False)
    assert greedy.token_ids == plain.generate("Describe it.", max_new_tokens=6, system="Be long.",
                                              cache_prompt=False).token_ids
    messages = [{"role": "user", "content": "Describe it."}]
    chat = named.chat(messages, temperature=0)
    assert chat.token_ids == plain.chat([{"role": "system", "content": "Answer in one word."}, *messages],
                                        max_new_tokens=4).token_ids
    store.create("long:1", src / "tiny-qwen2.5-vl-f16.gguf", src / "mmproj-tiny-qwen2.5-vl-f16.gguf",
                 params={"num_predict": -1, "num_ctx": 64})
    assert load("long:1").defaults == {"max_new_tokens": 64, "ctx_size": 64}  # as -n -1: the context bounds it


def test_a_split_model_is_stored_merged(store, fixtures_dir, tmp_path):
    """The store keeps a model in one file: a split one (given by its first part) is stored as its
    parts merged (llama-gguf-split --merge's file), its tensors and metadata the whole file's; no
    scratch file is left in the store's folder."""
    from gguf_compare import differences, split_gguf
    from qvl.runtime.gguf_file import SPLIT_KEYS

    whole = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
    first = split_gguf(whole, tmp_path / "m.gguf", 12)[0]
    entry = store.create("split:latest", first)
    blob = store.blob_path(entry.layer("model")["digest"])
    assert differences(blob, whole) == [f"metadata keys differ: only ours {sorted(SPLIT_KEYS)}, only theirs []"]
    with GGUFFile(blob) as g:
        assert len(g.parts) == 1 and g.get("split.count") == 0
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
    assert [e.name for e in store.list()] == [entry.name]
