"""`qvl serve`: Ollama's and OpenAI's HTTP APIs on a loopback port, answered by the tiny model and
checked against the same model called in Python (greedy, so the texts must be identical)."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import types

import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.lora import Adapters
from qvl.runtime.model import ModelError
from qvl.runtime.server import RequestError, ServeConfig, Service, keep_alive_seconds
from qvl.runtime.store import Store
from serving import MODEL, Running, png


def test_generate_equals_the_library(running, reference):
    want = reference.generate("Describe it.", max_new_tokens=6)
    got = running.json("/api/generate", {"model": "tiny:1", "prompt": "Describe it.", "stream": False,
                                         "options": {"num_predict": 6}})
    assert got["response"] == want.text and got["eval_count"] == 6 and got["done"] is True
    assert got["prompt_eval_count"] == want.prompt_tokens and got["done_reason"] == "length"
    assert got["model"] == "tiny:1" and got["total_duration"] >= got["eval_duration"] > 0
    events = running.lines("/api/generate", {"model": "tiny:1", "prompt": "Describe it.",
                                             "options": {"num_predict": 6}})  # streamed by default
    assert all(not e["done"] for e in events[:-1]) and events[-1]["done"] is True
    assert "".join(e["response"] for e in events) == want.text and len(events) >= 3
    # no model named: the one given to `qvl serve` (a file), called by its file name
    plain = running.json("/api/generate", {"prompt": "Describe it.", "stream": False, "options": {"num_predict": 6}})
    assert plain["response"] == want.text and plain["model"] == MODEL


def test_chat_with_an_image_equals_the_library(running, reference):
    data = png()
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    want = reference.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                        {"type": "text", "text": "What colour?"}]}], max_new_tokens=5)
    got = running.json("/api/chat", {"model": "tiny:1", "stream": False, "options": {"num_predict": 5},
                                     "messages": [{"role": "user", "content": "What colour?",
                                                   "images": [base64.b64encode(data).decode()]}]})
    assert got["message"] == {"role": "assistant", "content": want.text}
    assert got["prompt_eval_count"] == want.prompt_tokens > 20  # the picture's tokens are in
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    body = {"model": "tiny:1", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]}]}
    openai = running.json("/v1/chat/completions", body)
    assert openai["object"] == "chat.completion" and openai["choices"][0]["finish_reason"] == "length"
    assert openai["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert openai["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": 5,
                               "total_tokens": want.prompt_tokens + 5,  # /api/chat's prompt was the same:
                               "prompt_tokens_details": {"cached_tokens": want.prompt_tokens - 1}}  # cached
    status, data = running.request("/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    frames = data.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stored_parameters_and_system_are_defaults(running, reference):
    want = reference.generate("Hi", max_new_tokens=3, seed=5, system="Answer in one word.")
    got = running.json("/api/generate", {"model": "terse:1", "prompt": "Hi", "stream": False})
    assert got["response"] == want.text and got["eval_count"] == 3
    mine = running.json("/api/generate", {"model": "terse:1", "prompt": "Hi", "stream": False, "system": "Be long.",
                                          "options": {"num_predict": 2}})  # the request's win
    assert mine["response"] == reference.generate("Hi", max_new_tokens=2, system="Be long.").text
    assert mine["eval_count"] == 2
    chat = running.json("/api/chat", {"model": "terse:1", "stream": False, "messages": [
        {"role": "user", "content": "Hi"}]})
    assert chat["message"]["content"] == want.text  # the stored SYSTEM goes first


def test_tags_show_and_models(running):
    names = [m["name"] for m in running.json("/api/tags")["models"]]
    assert names == ["terse:1", "tiny:1"]
    shown = running.json("/api/show", {"model": "terse:1"})
    assert shown["system"] == "Answer in one word." and "num_predict 3" in shown["parameters"]
    assert shown["details"]["family"] == "qwen2vl" and "FROM " in shown["modelfile"]
    info = shown["model_info"]  # the GGUF's metadata, long arrays as null (as Ollama's)
    assert info["qwen2vl.block_count"] == 3 and info["tokenizer.ggml.tokens"] is None
    assert info["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert shown["capabilities"] == ["completion", "vision"]
    # the GGUF file qvl serve was given first, by its file name, as llama-server lists its model
    assert [m["id"] for m in running.json("/v1/models")["data"]] == ["tiny-qwen2.5-vl-f16.gguf", *names]
    assert running.request("/")[1] == b"qvl is running"
    assert running.json("/api/version")["version"]


@pytest.mark.parametrize("path,body,status,expect", [
    ("/api/nothing", {}, 404, "POST /api/nothing: no such endpoint"),
    ("/api/generate", b"{not json", 400, "request body: not JSON"),
    ("/api/generate", [1], 400, "request body: a JSON object"),
    ("/api/generate", {"model": "nope:1", "prompt": "x"}, 404, "model 'nope:1' not found"),
    ("/api/generate", {"model": "/etc/passwd", "prompt": "x"}, 404, "model '/etc/passwd' not found"),
    ("/api/generate", {"model": "tiny:1", "prompt": "x", "images": ["@@"]}, 400, "images[0]: not base64"),
    ("/api/generate", {"model": "tiny:1", "prompt": "x", "images": ["aGVsbG8="]}, 400,
     "images[0]: not a readable image"),
    ("/api/generate", {"model": "tiny:1", "prompt": 3}, 400, "prompt: a string"),
    ("/api/generate", {"model": "tiny:1", "prompt": "x", "options": {"top_k": -1}}, 400, "options: PARAMETER top_k"),
    ("/api/generate", {"model": "tiny:1", "prompt": "{image2}", "images": [base64.b64encode(png()).decode()]}, 400,
     "refers to {image2}"),
    ("/api/chat", {"model": "tiny:1", "messages": []}, 400, "messages: a non-empty list"),
    ("/api/chat", {"model": "tiny:1", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0]: an object with role"),
    ("/v1/chat/completions", {"model": "tiny:1", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file://a.png"}}]}]}, 400, "file:// URLs are read only with"),
    ("/v1/chat/completions", {"model": "tiny:1", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     400, "content[0]: a part of type text, image_url or video_url"),
    ("/api/show", {"model": "nope:1"}, 404, "not found"),
])
def test_errors(running, path, body, status, expect):
    got_status, data = running.request(path, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got_status == status, data
    assert expect in json.loads(data)["error"]


class Stand:
    """A model that says "a", then fails: a stream's error is its last event."""

    last_generation = None
    adapters = Adapters()  # no run-time LoRA adapters

    def generate(self, prompt, images, stream, **kwargs):
        def pieces():
            yield "a"
            raise ModelError("the context is full")
        return pieces()


def test_an_error_inside_a_stream_is_its_last_event(store):
    loads = []
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: loads.append(name) or Stand()))
    events = running.lines("/api/generate", {"model": "tiny:1", "prompt": "x"})
    assert events[0]["response"] == "a" and events[-1] == {"error": "the context is full"}
    running.json("/api/generate", {"model": "tiny:1", "prompt": ""})  # loaded: not again
    running.json("/api/generate", {"model": "library/tiny:1", "prompt": ""})  # the same model
    assert loads == [store.resolve("tiny:1")[0]]
    running.json("/api/generate", {"model": "terse:1", "prompt": ""})  # another model replaces it
    assert len(loads) == 2 and running.service.loaded.key == "terse:1"
    assert running.log[0].startswith("POST /api/generate 200")
    with pytest.raises(RequestError, match="model: required"):
        running.service.generate({"prompt": "x"})  # no model named, none given to qvl serve
    running.server.shutdown()


def test_serve_command_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path))
    runner = CliRunner()
    for args, expect in ((["--port", "70000"], "--port 70000: 0 to 65535"),
                         (["--cpu", "--gpu-layers", "3"], "--cpu with --gpu-layers: choose one"),
                         (["--ctx-size", "0"], "--ctx-size 0: 1 or more"),
                         (["--keep-alive", "soon"], "--keep-alive 'soon': seconds, or a duration like 5m"),
                         (["nope:1"], "model 'nope:1' not found")):
        r = runner.invoke(app, ["serve", *args])
        assert r.exit_code == 2 and r.stderr.startswith(f"qvl serve: error: {expect}"), r.stderr
        assert r.stderr.count("\n") == 1


def test_ps_copy_delete(tmp_path, files):
    store = Store(tmp_path)
    store.create("a:1", files / MODEL, files / f"mmproj-{MODEL}")
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Stand()))
    assert running.json("/api/ps") == {"models": []}
    running.json("/api/generate", {"model": "a:1", "prompt": ""})
    [ps] = running.json("/api/ps")["models"]
    assert ps["name"] == "a:1" and ps["details"]["family"] == "qwen2vl" and ps["size"] == store.get("a:1").size
    assert running.request("/api/copy", {"source": "a:1", "destination": "b:2"})[0] == 200
    assert [str(e.name) for e in store.list()] == ["a:1", "b:2"]
    status, data = running.request("/api/copy", {"source": "zz:1", "destination": "c:1"})
    assert status == 404 and "not found" in json.loads(data)["error"]
    unloaded = running.json("/api/generate", {"model": "library/a:1", "keep_alive": 0})  # Ollama's unload
    assert unloaded["done_reason"] == "unload" and running.json("/api/ps") == {"models": []}
    running.json("/api/generate", {"model": "a:1", "prompt": ""})
    running.json("/api/generate", {"model": "b:2", "keep_alive": "0"})  # another model: a:1 stays
    assert [m["name"] for m in running.json("/api/ps")["models"]] == ["a:1"]
    assert running.request("/api/delete", {"model": "a:1"}, method="DELETE")[0] == 200
    assert running.json("/api/ps") == {"models": []}  # the deleted model was unloaded
    assert [str(e.name) for e in store.list()] == ["b:2"] and store.resolve("b:2")[0].is_file()
    assert running.request("/api/delete", {"model": "a:1"}, method="DELETE")[0] == 404
    running.server.shutdown()


def test_an_end_of_turn_token_is_done_reason_stop(running, reference):
    first = reference.generate("Describe it.", max_new_tokens=8).token_ids
    k = next(i for i, t in enumerate(first) if i >= 1 and first.index(t) == i)  # a token new at k
    running.json("/api/generate", {"model": "tiny:1", "prompt": ""})  # loaded
    model = running.service.loaded.model
    saved = model.stop_ids
    model.stop_ids = saved | {first[k]}  # that token now ends the answer
    try:
        got = running.json("/api/generate", {"model": "tiny:1", "prompt": "Describe it.", "stream": False,
                                             "options": {"num_predict": 8}})
        openai = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 8, "messages": [
            {"role": "user", "content": "Describe it."}]})
    finally:
        model.stop_ids = saved
    assert got["done_reason"] == "stop" and got["eval_count"] == k
    assert openai["choices"][0]["finish_reason"] == "stop" and openai["usage"]["completion_tokens"] == k


def test_pull(tmp_path, files, monkeypatch):
    ollama = Store(tmp_path / "ollama")
    ollama.create("tiny:latest", files / MODEL, files / f"mmproj-{MODEL}")
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama.root))
    store = Store(tmp_path / "ours")
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Stand()))
    events = running.lines("/api/pull", {"model": "ollama://tiny"})
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    assert [m["name"] for m in running.json("/api/tags")["models"]] == ["tiny:latest"]
    events = running.lines("/api/pull", {"model": "a::b"})
    assert events[-1]["error"].startswith("invalid model name 'a::b'") and len(events) == 2
    status, data = running.request("/api/pull", {"model": "a::b", "stream": False})
    assert status == 400 and json.loads(data)["error"] == events[-1]["error"]
    assert running.json("/api/pull", {"model": "ollama://tiny", "stream": False}) == {"status": "success"}
    running.server.shutdown()


def test_stop_strings_from_options_and_openai(running, reference):
    full = reference.generate("Describe it.", max_new_tokens=16).text
    k = next(k for k in range(1, len(full) - 2) if full.find(full[k:k + 2]) == k and full[k:k + 2].strip())
    stop = full[k:k + 2]
    got = running.json("/api/generate", {"model": "tiny:1", "prompt": "Describe it.", "stream": False,
                                         "options": {"num_predict": 16, "stop": [stop]}})
    assert got["response"] == full[:k] and got["done_reason"] == "stop"
    events = running.lines("/api/generate", {"model": "tiny:1", "prompt": "Describe it.",
                                             "options": {"num_predict": 16, "stop": [stop]}})
    assert "".join(e["response"] for e in events) == full[:k]
    for value in (stop, [stop, "never there"]):  # OpenAI's stop: a string or a list
        openai = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 16, "stop": value,
                                                       "messages": [{"role": "user", "content": "Describe it."}]})
        assert openai["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": full[:k]},
                                        "logprobs": None, "finish_reason": "stop"}


def test_format_json_from_ollama_and_openai(running, reference):
    """Ollama's format ("json", a schema) and OpenAI's response_format (json_object, json_schema) give
    what generate and chat give with that format; a schema qvl cannot follow is a 400."""
    want = reference.generate("Describe it.", max_new_tokens=8, format="json")
    assert want.text.startswith("{")
    got = running.json("/api/generate", {"model": "tiny:1", "prompt": "Describe it.", "stream": False,
                                         "format": "json", "options": {"num_predict": 8}})
    assert got["response"] == want.text
    messages = [{"role": "user", "content": "Describe it."}]
    chat = reference.chat(messages, max_new_tokens=8, format="json").text
    assert chat.startswith("{")
    got = running.json("/api/chat", {"model": "tiny:1", "stream": False, "format": "json", "messages": messages,
                                     "options": {"num_predict": 8}})
    assert got["message"]["content"] == chat
    openai = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 8, "messages": messages,
                                                   "response_format": {"type": "json_object"}})
    assert openai["choices"][0]["message"]["content"] == chat
    plain = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 8, "messages": messages,
                                                  "response_format": {"type": "text"}})
    assert plain["choices"][0]["message"]["content"] == reference.chat(messages, max_new_tokens=8).text
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}}, "required": ["colour"]}
    want = reference.chat(messages, max_new_tokens=8, format=schema).text
    assert want.startswith("{")
    got = running.json("/api/chat", {"model": "tiny:1", "stream": False, "format": schema, "messages": messages,
                                     "options": {"num_predict": 8}})
    assert got["message"]["content"] == want
    openai = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 8, "messages": messages,
                                                   "response_format": {"type": "json_schema", "json_schema": {
                                                       "name": "c", "schema": schema, "strict": True}}})
    assert openai["choices"][0]["message"]["content"] == want
    for path, extra, expect in [
            ("/api/generate", {"format": {"type": "array", "uniqueItems": True}}, "format: #: 'uniqueItems' is not followed"),
            ("/api/generate", {"format": "xml"}, "format 'xml': \"json\" or a JSON schema"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {
                "type": "date"}}}}, "response_format.json_schema.schema: #.type 'date'"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema"}},
             "response_format: {\"type\": \"json_object\"}")]:
        body = {"model": "tiny:1", "prompt": "x", "messages": messages, **extra}
        status, data = running.request(path, body)
        assert status == 400 and expect in json.loads(data)["error"], data


class Gate:
    """A model whose answers wait for `go`: a generation that is still running. Records the thread
    each generation runs in."""

    last_generation = None
    adapters = Adapters()
    defaults: dict = {}
    chat_template = None

    def __init__(self):
        self.go = threading.Event()
        self.threads: list[str] = []
        self.tokenizer = self  # a reply's context: the ids of the rendered prompt and answer

    def messages_for(self, prompt, n_images, system=None):
        return [{"role": "user", "content": prompt}]

    def encode(self, text, add_special_tokens):
        return types.SimpleNamespace(ids=[ord(c) for c in text])

    def generate(self, prompt, images, stream, **kwargs):
        from qvl.runtime.model import Generation

        def pieces():
            self.threads.append(threading.current_thread().name)
            yield f"<{prompt}>"
            assert self.go.wait(30)
            self.last_generation = Generation(f"<{prompt}>", [1], 3, ended=True)
        return pieces()


def test_a_running_generation_does_not_hold_up_tags_ps_and_show(store):
    """While a generation runs, /api/tags, /api/ps, /api/show and /api/version answer; generations
    queue and run one at a time in the thread that called serve, in order."""
    gate = Gate()
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: gate))
    served_by = [t for t in threading.enumerate() if t.name != "MainThread" and t.is_alive()]
    answers: dict[str, list] = {}

    def ask(prompt: str) -> None:
        answers[prompt] = running.lines("/api/generate", {"model": "tiny:1", "prompt": prompt})

    first = threading.Thread(target=ask, args=("one",))
    first.start()
    for _ in range(500):
        if gate.threads:
            break
        threading.Event().wait(0.01)
    second = threading.Thread(target=ask, args=("two",))
    second.start()
    assert [m["name"] for m in running.json("/api/tags")["models"]] == ["terse:1", "tiny:1"]
    assert [m["name"] for m in running.json("/api/ps")["models"]] == ["tiny:1"]
    assert running.json("/api/show", {"model": "tiny:1"})["details"]["family"] == "qwen2vl"
    assert running.json("/api/version")["version"]
    assert gate.threads == [gate.threads[0]] and "one" not in answers  # the first still runs, the second waits
    gate.go.set()
    first.join(30)
    second.join(30)
    assert answers["one"][0]["response"] == "<one>" and answers["two"][0]["response"] == "<two>"
    assert answers["one"][-1]["done"] is True and answers["two"][-1]["done_reason"] == "stop"
    assert "".join(map(chr, answers["two"][-1]["context"])).endswith("user\ntwo<|im_end|>\n<|im_start|>assistant\n<two>")
    assert len(gate.threads) == 2 and gate.threads[0] == gate.threads[1]  # both in the serving thread
    assert gate.threads[0] in [t.name for t in served_by]
    running.server.shutdown()


def test_create_from_a_stored_model(tmp_path, files):
    """Ollama's create: `from` a stored model with new parameters and system prompt, or the older
    `modelfile`; the new name shares the blobs; paths, unknown types and parameters are refused."""
    store = Store(tmp_path)
    store.create("a:1", files / MODEL, files / f"mmproj-{MODEL}", params={"seed": 4})
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Stand()))
    events = running.lines("/api/create", {"model": "short:1", "from": "a:1", "system": "Be brief.",
                                           "parameters": {"num_predict": 2, "temperature": 0.5}})
    assert events[-1] == {"status": "success"}
    shown = running.json("/api/show", {"model": "short:1"})
    assert shown["system"] == "Be brief."
    assert sorted(shown["parameters"].splitlines()) == ["num_predict 2", "seed 4", "temperature 0.5"]
    assert store.resolve("short:1") == store.resolve("a:1")  # the same GGUF blobs
    assert running.json("/api/create", {"model": "old:1", "stream": False,
                                        "modelfile": "FROM a:1\nPARAMETER top_k 7\nSYSTEM hi"}) == {"status": "success"}
    shown = running.json("/api/show", {"model": "old:1"})
    assert shown["system"] == "hi" and "top_k 7" in shown["parameters"] and "seed 4" in shown["parameters"]
    running.json("/api/generate", {"model": "short:1", "prompt": ""})  # loaded: its defaults change with it
    running.json("/api/create", {"model": "short:1", "from": "a:1", "stream": False, "system": "Be long."})
    assert running.service.loaded.system == "Be long." and running.service.loaded.params == {"seed": 4}
    for body, status, expect in [
            ({"model": "x:1", "from": "nope:1"}, 404, "FROM nope:1: not a stored model"),
            ({"model": "x:1", "from": str(files / MODEL)}, 404, "not a stored model (qvl serve opens no file"),
            ({"model": "x:1", "modelfile": f"FROM {files / MODEL}"}, 404, "not a stored model"),
            ({"model": "x:1", "from": "a:1", "files": {"m.gguf": "sha256:00"}}, 400, "from or files: one of them"),
            ({"model": "x:1", "from": "a:1", "parameters": {"num_gpu": 1}}, 400, "num_gpu: qvl does not use it"),
            ({"model": "x:1"}, 400, "from: the stored model to create from"),
            ({"model": "x:1", "from": "a:1", "quantize": "q9"}, 400, "quantize: type 'q9': choose one of"),
            ({"model": "x:1", "modelfile": "FROM a:1\nFROM old:1"}, 400, "FROM old:1: a second text model")]:
        got, data = running.request("/api/create", {**body, "stream": False})
        assert got == status and expect in json.loads(data)["error"], data
    assert "x:1" not in [str(e.name) for e in store.list()]
    running.server.shutdown()


def test_qvl_ps_and_stop_ask_the_server(tmp_path, files, monkeypatch):
    from qvl.runtime.client import processor, server_url

    store = Store(tmp_path)
    store.create("a:1", files / MODEL, files / f"mmproj-{MODEL}")
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Stand()))
    host = running.url.removeprefix("http://")
    runner = CliRunner()
    r = runner.invoke(app, ["ps", "--host", host])
    assert r.exit_code == 0 and r.stdout.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    running.json("/api/generate", {"model": "a:1", "prompt": ""})
    monkeypatch.setenv("QVL_HOST", host)  # the default host
    r = runner.invoke(app, ["ps"])
    row = r.stdout.splitlines()[1].split()
    assert r.exit_code == 0 and row[0] == "a:1" and row[1] == store.get("a:1").digest[7:19]
    assert row[-6:] == ["100%", "CPU", "5", "minutes", "from", "now"]  # qvl serve's keep_alive: 5m
    r = runner.invoke(app, ["stop", "b:1"])
    assert r.exit_code == 2 and r.stderr.strip() == "qvl: error: model 'b:1' is not loaded (loaded: a:1)"
    r = runner.invoke(app, ["stop", "a:1"])
    assert r.exit_code == 0 and running.json("/api/ps") == {"models": []}
    running.server.shutdown()
    r = runner.invoke(app, ["ps", "--host", "127.0.0.1:9"])
    assert r.exit_code == 2 and r.stderr.startswith("qvl: error: no server at http://127.0.0.1:9 (")
    assert r.stderr.strip().endswith("start one with qvl serve") and r.stderr.count("\n") == 1
    assert server_url("0.0.0.0") == "http://127.0.0.1:11434" and server_url("h:80/") == "http://h:80"
    assert server_url("https://[::1]") == "https://[::1]:11434"
    assert [processor(100, v) for v in (0, 100, 150, 25)] == ["100% CPU", "100% GPU", "100% GPU", "75%/25% CPU/GPU"]


@pytest.mark.parametrize("value,seconds", [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), ("1.5s", 1.5), (10, 10),
                                           ("10", 10), (0, 0), ("0", 0), (-1, math.inf), ("-1m", math.inf),
                                           ("-1", math.inf)])
def test_keep_alive_durations(value, seconds):
    assert keep_alive_seconds(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 minutes", "m", "5x", "", True, [5], None, "1h 5m"])
def test_keep_alive_refused(value):
    with pytest.raises(RequestError, match="a duration like 5m"):
        keep_alive_seconds(value)


def test_an_idle_model_is_unloaded_after_its_keep_alive(tmp_path, files):
    """The model goes keep_alive after its last request is done (the server's default, or the
    request's own); never while a request uses it; -1 keeps it; /api/ps says until when."""
    store = Store(tmp_path)
    store.create("a:1", files / MODEL, files / f"mmproj-{MODEL}")
    service = Service(ServeConfig(keep_alive_s=60.0), store, loader=lambda name, **kw: Stand())
    service.generate({"model": "a:1", "prompt": ""})
    assert service.expire(1e12) is None  # in use: not settled yet
    service.settle(1000.0)
    assert service.expires == 1060.0 and service.expire(1059.0) is None and service.loaded is not None
    assert service.expire(1060.0) == "a:1" and service.loaded is None
    service.generate({"model": "a:1", "prompt": "", "keep_alive": "2h"})
    service.settle(0.0)
    assert service.expires == 7200.0
    service.generate({"model": "a:1", "prompt": "", "keep_alive": -1})
    service.settle(0.0)
    assert service.expire(1e15) is None and service.loaded is not None
    assert service.ps({}).body["models"][0]["expires_at"] > "2300"  # Ollama's forever, about 292 years
    with pytest.raises(RequestError, match="keep_alive 'soon'"):
        service.generate({"model": "a:1", "prompt": "", "keep_alive": "soon"})
    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Stand()))
    running.json("/api/generate", {"model": "a:1", "prompt": ""})
    assert [m["name"] for m in running.json("/api/ps")["models"]] == ["a:1"]
    running.lines("/api/generate", {"model": "a:1", "prompt": "x", "keep_alive": 0})  # answered, then unloaded
    for _ in range(50):  # the serving thread unloads it at its next idle tick, then logs it
        if "unloaded a:1 (idle for its keep_alive)" in running.log:
            break
        threading.Event().wait(0.1)
    assert running.json("/api/ps") == {"models": []} and "unloaded a:1 (idle for its keep_alive)" in running.log
    running.server.shutdown()


def test_a_models_messages_come_before_each_request(tmp_path, files, reference):
    """/api/create's messages (Ollama's MESSAGE lines) are stored, shown, and every chat and
    generate of the model follows them."""
    store = Store(tmp_path)
    store.create("tiny:1", files / MODEL, files / f"mmproj-{MODEL}")
    running = Running(Service(ServeConfig(), store))
    few = [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes."}]
    assert running.json("/api/create", {"model": "few:1", "from": "tiny:1", "messages": few,
                                        "stream": False}) == {"status": "success"}
    assert running.json("/api/show", {"model": "few:1"})["messages"] == few
    ask = [{"role": "user", "content": "Is grass green?"}]
    want = reference.chat(few + ask, max_new_tokens=5).text
    got = running.json("/api/chat", {"model": "few:1", "messages": ask, "stream": False,
                                     "options": {"num_predict": 5}})
    assert got["message"]["content"] == want
    got = running.json("/api/generate", {"model": "few:1", "prompt": "Is grass green?", "stream": False,
                                         "options": {"num_predict": 5}})
    assert got["response"] == want
    status, data = running.request("/api/create", {"model": "x:1", "from": "tiny:1", "messages": [{"role": "bot"}]})
    assert status == 400 and "messages: a list of {role" in json.loads(data)["error"]
    running.server.shutdown()




def test_ollama_logprobs(running, reference):
    """Ollama's logprobs / top_logprobs: each answer token's log-probability (the library's, to
    1e-6), spelled with its bytes, its alternatives likeliest first; a stream's objects carry their
    own tokens', which together are the unstreamed answer's."""
    want = reference.generate("Describe it.", max_new_tokens=5, logprobs=2)
    body = {"model": "tiny:1", "prompt": "Describe it.", "options": {"num_predict": 5}, "logprobs": True,
            "top_logprobs": 2}
    got = running.json("/api/generate", {**body, "stream": False})
    lp = got["logprobs"]
    assert [e["logprob"] for e in lp] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-6)
    assert bytes(b for e in lp for b in e["bytes"]).decode() == got["response"] == want.text
    assert all([a["logprob"] for a in e["top_logprobs"]] == pytest.approx([v for _, v in t.top], abs=1e-6)
               for e, t in zip(lp, want.logprobs))
    events = running.lines("/api/generate", body)
    assert sum(1 for e in events if "logprobs" in e) >= 3 and [x for e in events for x in e.get("logprobs", [])] == lp
    chat = {"model": "tiny:1", "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 4},
            "logprobs": True}
    whole = running.json("/api/chat", {**chat, "stream": False})
    assert len(whole["logprobs"]) == 4 and all(e["top_logprobs"] == [] for e in whole["logprobs"])
    assert [x for e in running.lines("/api/chat", chat) for x in e.get("logprobs", [])] == whole["logprobs"]
    assert "logprobs" not in running.json("/api/chat", {**chat, "logprobs": False, "stream": False})
    status, data = running.request("/api/chat", {**chat, "top_logprobs": 21})
    assert status == 400 and "top_logprobs 21: 0 to 20" in json.loads(data)["error"]


@pytest.mark.parametrize("path, extra, says", [
    ("/api/chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tiny:1 does not support tools"),
    ("/api/chat", {"think": True}, "tiny:1 does not support thinking"),
    ("/api/generate", {"think": "high"}, "tiny:1 does not support thinking"),
    ("/api/generate", {"suffix": "return x"}, "tiny:1 does not support insert"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tiny:1 does not support tools"),
])
def test_what_the_model_cannot_do_is_a_400(running, path, extra, says):
    """Tools, thinking and fill-in-the-middle asked of a model without them: Ollama's 400, not an
    answer that silently lacks them; asked for as empty or false, they are no error."""
    body = {"model": "tiny:1", "stream": False, "options": {"num_predict": 1}, "max_tokens": 1,
            "messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi"}
    status, data = running.request(path, {**body, **extra})
    assert status == 400 and json.loads(data)["error"].startswith(says)
    off = {k: ([] if isinstance(v, list) else False if k == "think" else "") for k, v in extra.items()}
    status, data = running.request(path, {**body, **off})
    assert status == 200, data
