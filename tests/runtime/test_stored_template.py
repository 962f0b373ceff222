"""A stored TEMPLATE renders the model's prompts (ollama_template.py): in a run by name, in `qvl serve`
and in a context's next turn; one that cannot run is refused at create, and a pulled one that cannot
is left for the GGUF's chat template with a warning. Greedy on the tiny model: the answers must be
those of the file's model given the very prompt the template writes."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
from PIL import Image
from serving import Running, png
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.store import Store, StoreError

runner = CliRunner()
TEMPLATE = '{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\nSure:'


@pytest.fixture(scope="module")
def files(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"


@pytest.fixture
def store(tmp_path, monkeypatch, files):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("tiny-qwen2.5-vl-f16.gguf", "mmproj-tiny-qwen2.5-vl-f16.gguf"):
        shutil.copy(files / name, folder / name)
    (folder / "Modelfile").write_text(f'FROM tiny-qwen2.5-vl-f16.gguf\nSYSTEM terse\nTEMPLATE """{TEMPLATE}"""\n')
    result = runner.invoke(app, ["create", "sure:1", "-f", str(folder / "Modelfile")])
    assert result.exit_code == 0, result.output
    return Store()


@pytest.fixture(scope="module")
def plain(files):
    return load(files / "tiny-qwen2.5-vl-f16.gguf")


def test_a_run_by_name_reads_the_template_prompt(store, plain):
    named = load("sure:1")
    text = "<|im_start|>system\nterse<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nSure:"
    want = plain.generate(text, template=False, max_new_tokens=6)
    got = named.generate("Hi", max_new_tokens=6)
    assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens
    assert got.token_ids != plain.generate("Hi", system="terse", max_new_tokens=6).token_ids  # not the GGUF's
    picture = Image.open(io.BytesIO(png())).convert("RGB")
    text = ("<|im_start|>system\nterse<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            "What colour?<|im_end|>\n<|im_start|>assistant\nSure:")
    want = plain.generate(text, [picture], template=False, max_new_tokens=4)
    got = named.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                    {"type": "text", "text": "What colour?"}]}], max_new_tokens=4)
    assert got.token_ids == want.token_ids and got.prompt_tokens == want.prompt_tokens


def test_serve_renders_with_it_and_a_context_goes_on_with_it(store, plain):
    running = Running(Service(ServeConfig(), store))
    try:
        first = running.json("/api/generate", {"model": "sure:1", "prompt": "Hi", "stream": False,
                                               "options": {"num_predict": 5}})
        head = "<|im_start|>system\nterse<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nSure:"
        assert first["response"] == plain.generate(head, template=False, max_new_tokens=5).text
        assert plain.tokenizer.decode(first["context"], skip_special_tokens=False) == head + first["response"]
        second = running.json("/api/generate", {"model": "sure:1", "prompt": "Why?", "stream": False,
                                                "context": first["context"], "options": {"num_predict": 5}})
        text = head + first["response"] + "<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nSure:"
        assert second["response"] == plain.generate(text, template=False, max_new_tokens=5).text
        chat = running.json("/api/chat", {"model": "sure:1", "stream": False, "options": {"num_predict": 5},
                                          "messages": [{"role": "user", "content": "Hi", "images": [
                                              base64.b64encode(png()).decode()]}]})
        picture = Image.open(io.BytesIO(png())).convert("RGB")
        text = ("<|im_start|>system\nterse<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                "Hi<|im_end|>\n<|im_start|>assistant\nSure:")
        assert chat["message"]["content"] == plain.generate(text, [picture], template=False, max_new_tokens=5).text
        # a request's template (Ollama's /api/generate field) in place of the stored one
        mine = running.json("/api/generate", {"model": "sure:1", "prompt": "Hi", "stream": False,
                                              "template": "Q: {{ .Prompt }}\nA:{{ .Response }}\n",
                                              "options": {"num_predict": 5}})
        assert mine["response"] == plain.generate("Q: Hi\nA:", template=False, max_new_tokens=5).text
        more = running.json("/api/generate", {"model": "sure:1", "prompt": "So?", "stream": False,
                                              "template": "Q: {{ .Prompt }}\nA:{{ .Response }}\n",
                                              "context": mine["context"], "options": {"num_predict": 5}})
        text = "Q: Hi\nA:" + mine["response"] + "\nQ: So?\nA:"
        assert more["response"] == plain.generate(text, template=False, max_new_tokens=5).text
        status, body = running.request("/api/generate", {"model": "sure:1", "prompt": "Hi", "template": "{{ if 1 }}"})
        assert status == 400 and json.loads(body)["error"] == "template: line 1: {{if}} without {{end}}"
    finally:
        running.server.shutdown()


def test_a_template_that_cannot_run_is_refused_at_create(store, tmp_path, files):
    (tmp_path / "Bad").write_text(f"FROM {files / 'tiny-qwen2.5-vl-f16.gguf'}\nTEMPLATE \"\"\"a\n{{{{ if .System }}}}\"\"\"\n")
    before = sorted(p.name for p in (store.root / "blobs").iterdir())
    result = runner.invoke(app, ["create", "bad:1", "-f", str(tmp_path / "Bad")])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "qvl: error: TEMPLATE: line 2: {{if}} without {{end}}"]
    with pytest.raises(StoreError):
        store.get("bad:1")
    assert sorted(p.name for p in (store.root / "blobs").iterdir()) == before  # nothing stored
    status, body = Running(Service(ServeConfig(), store)).request(
        "/api/create", {"model": "bad:2", "from": "sure:1", "template": "{{ nosuch }}", "stream": False})
    assert status == 400 and "TEMPLATE: line 1: function 'nosuch' not defined" in json.loads(body)["error"]


def test_a_pulled_template_that_cannot_run_leaves_the_ggufs(store, plain):
    """As a pull writes a registry's manifest: a template layer qvl cannot run (a function of
    Ollama's it lacks) is warned of, and the GGUF's chat template renders instead."""
    entry = store.get("sure:1")
    digest, size = store.add_blob(b"{{ currentDate }}")
    manifest = json.loads(json.dumps(entry.manifest))
    for layer in manifest["layers"]:
        if layer["mediaType"].endswith("template"):
            layer.update(digest=digest, size=size)
    store.write_manifest(store.get("sure:1").name.__class__.parse("pulled:1"), manifest)
    with pytest.warns(UserWarning, match="model 'pulled:1': TEMPLATE: line 1: function "
                                         "'currentDate' not defined; the GGUF's chat template renders"):
        named = load("pulled:1")
    assert named.generate("Hi", max_new_tokens=6).token_ids == \
        plain.generate("Hi", system="terse", max_new_tokens=6).token_ids


def test_show_prints_the_template_that_renders(store, files):
    out = runner.invoke(app, ["show", "sure:1", "--template"])
    assert out.exit_code == 0 and out.stdout == TEMPLATE + "\n"
    out = runner.invoke(app, ["show", "sure:1", "--system", "--license"])
    assert out.exit_code == 0 and out.stdout == "terse\n(no license)\n"
    assert runner.invoke(app, ["create", "plain:1", str(files / "tiny-qwen2.5-vl-f16.gguf"), "--params",
                               '{"temperature": 0.5, "stop": ["a", "b"]}']).exit_code == 0
    out = runner.invoke(app, ["show", "plain:1", "--template", "--parameters"])
    with GGUFFile(files / "tiny-qwen2.5-vl-f16.gguf") as g:
        jinja = g.get("tokenizer.chat_template")
    assert out.exit_code == 0 and out.stdout == 'temperature 0.5\nstop "a"\nstop "b"\n' + jinja + "\n"
    out = runner.invoke(app, ["show", "nosuch:1", "--template"])
    assert out.exit_code == 2 and "nosuch" in out.output and len(out.output.strip().splitlines()) == 1


def test_a_template_failing_at_a_request_is_its_answer(store, files):
    """A template that passed create's trial but fails on this conversation: a 400 saying so, and
    qvl-run's one line (exit 2), not a traceback."""
    store.create("short:1", files / "tiny-qwen2.5-vl-f16.gguf", template="{{ index .Messages 3 }}")
    running = Running(Service(ServeConfig(), store))
    try:
        status, body = running.request("/api/chat", {"model": "short:1", "stream": False,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 400 and json.loads(body)["error"] == "TEMPLATE: index 3 out of range"
    finally:
        running.server.shutdown()
    from qvl.runtime.run_cli import app as run_app

    out = runner.invoke(run_app, ["short:1", "-p", "Hi", "-n", "2"])
    assert out.exit_code == 2 and out.stderr.strip() == "qvl-run: error: TEMPLATE: index 3 out of range"
