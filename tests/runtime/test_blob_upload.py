"""`qvl serve`'s blob endpoints and /api/create from uploaded GGUFs, as `ollama create` and
ollama-python's create_blob + create(files=...) use them: bytes land in the store only under the
digest they hash to, a body of another digest or one cut short leaves nothing behind."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time

import pytest

from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.store import Store
from serving import MODEL, Running


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunked_post(running: Running, path: str, pieces: list[bytes]) -> tuple[int, bytes]:
    """A POST whose body is sent chunked, as Go's http client sends a file."""
    host, port = running.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, body=iter(pieces), encode_chunked=True)
    r = conn.getresponse()
    return r.status, r.read()


def raw_exchange(running: Running, request: bytes) -> bytes:
    """Send `request` as it is, close our side, and read what the server answers."""
    host, port = running.server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(request)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed first
            pass
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir()) if store.blobs.exists() else []


@pytest.fixture
def served(tmp_path):
    store = Store(tmp_path)
    running = Running(Service(ServeConfig(), store))
    yield store, running
    running.server.shutdown()


def test_uploaded_ggufs_become_a_model(served, files):
    store, running = served
    model, projector = (files / MODEL).read_bytes(), (files / f"mmproj-{MODEL}").read_bytes()
    dm, dp = digest(model), digest(projector)
    assert running.request(f"/api/blobs/{dm}", method="HEAD")[0] == 404
    assert running.request(f"/api/blobs/{dm}", raw=model)[0] == 201  # with a Content-Length
    assert running.request(f"/api/blobs/{dm}", method="HEAD")[0] == 200
    assert running.request(f"/api/blobs/{dm}", raw=model)[0] == 200  # there already
    step = 7919  # chunks of a prime size: the chunk and read boundaries never line up
    status, _ = chunked_post(running, f"/api/blobs/{dp.replace(':', '-')}",  # Ollama also takes sha256-<hex>
                             [projector[i:i + step] for i in range(0, len(projector), step)])
    assert status == 201 and store.blob_path(dp).read_bytes() == projector
    assert leftovers(store) == sorted([dm.replace(":", "-"), dp.replace(":", "-")])

    events = running.lines("/api/create", {"model": "up:1", "files": {"model.gguf": dm, "mmproj.gguf": dp},
                                           "system": "Be brief.", "parameters": {"seed": 3}})
    assert events[-1] == {"status": "success"}
    assert store.resolve("up:1") == (store.blob_path(dm), store.blob_path(dp))  # the projector told by its GGUF
    shown = running.json("/api/show", {"model": "up:1"})
    assert shown["system"] == "Be brief." and shown["parameters"].split() == ["seed", "3"]
    # the older clients' way: a modelfile whose FROMs are @digests
    assert running.json("/api/create", {"model": "old:1", "stream": False,
                                        "modelfile": f"FROM @{dp}\nFROM @{dm}\nPARAMETER top_k 5"}) == {
        "status": "success"}
    assert store.resolve("old:1") == store.resolve("up:1")
    assert "top_k 5" in running.json("/api/show", {"model": "old:1"})["parameters"]


def test_a_bad_body_leaves_nothing(served):
    store, running = served
    data = b"GGUF" + bytes(range(256)) * 40
    status, answer = running.request(f"/api/blobs/{digest(b'other')}", raw=data)
    assert status == 400 and "digest mismatch" in json.loads(answer)["error"]
    status, answer = running.request("/api/blobs/sha256:12ab", raw=data)
    assert status == 400 and "invalid digest" in json.loads(answer)["error"]
    assert leftovers(store) == []
    # a chunked body whose client goes away inside a chunk
    answer = raw_exchange(running, f"POST /api/blobs/{digest(data)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   "Transfer-Encoding: chunked\r\n\r\n1000\r\n".encode() + data[:100])
    assert answer.startswith(b"HTTP/1.0 400") and b"ended inside a chunk" in answer
    answer = raw_exchange(running, f"POST /api/blobs/{digest(data)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.0 411")
    answer = raw_exchange(running, f"POST /api/blobs/{digest(data)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:-1])
    assert answer.startswith(b"HTTP/1.0 400") and b"1 bytes short" in answer
    assert leftovers(store) == []  # no partial file
    assert running.request(f"/api/blobs/{digest(data)}")[0] == 405  # GET
    assert running.request("/", method="HEAD")[0] == 200  # a client's probe
    deadline = time.monotonic() + 5
    while not any(line.startswith("POST /api/blobs/") and " 411 " in line for line in running.log):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_create_from_files_refuses_what_is_not_a_gguf_pair(served, files):
    store, running = served
    text = b"not a model at all"
    assert running.request(f"/api/blobs/{digest(text)}", raw=text)[0] == 201
    projector = (files / f"mmproj-{MODEL}").read_bytes()
    assert running.request(f"/api/blobs/{digest(projector)}", raw=projector)[0] == 201
    missing = digest(b"never sent")
    for files_, expect in [({"m.gguf": missing}, f"blob '{missing}' not in the store; send it first"),
                           ({"m.gguf": digest(text)}, "not a GGUF file"),
                           ({"m.gguf": "md5:00"}, "invalid digest"),
                           ({"mmproj.gguf": digest(projector)}, "FROM names only a projector"),
                           (["m.gguf"], "files: {file name: sha256 digest")]:
        status, answer = running.request("/api/create", {"model": "x:1", "files": files_, "stream": False})
        assert status == 400 and expect in json.loads(answer)["error"], answer
    assert store.list() == []


def test_create_quantize(served, files, tmp_path):
    """/api/create with `quantize` (ollama-python's create(quantize=...)): progress events while
    the text model is quantized, then the stored model, its GGUF `qvl quantize`'s to the byte; a
    refusal is a 400 before any work, and nothing is stored or left behind."""
    from typer.testing import CliRunner

    from qvl.runtime.cli import app

    store, running = served
    model = (files / MODEL).read_bytes()
    assert running.request(f"/api/blobs/{digest(model)}", raw=model)[0] == 201
    events = running.lines("/api/create", {"model": "up:q8", "files": {"m.gguf": digest(model)}, "quantize": "q8_0"})
    assert events[0] == {"status": "parsing GGUF"} and events[-1] == {"status": "success"}
    steps = [e for e in events if e["status"] == "quantizing F16 model to Q8_0"]
    assert steps and steps[-1]["completed"] == steps[-1]["total"] > 0
    r = CliRunner().invoke(app, ["quantize", str(files / MODEL), "q8_0", "-o", str(tmp_path / "want.gguf"), "-q"])
    assert r.exit_code == 0, r.output
    assert store.resolve("up:q8")[0].read_bytes() == (tmp_path / "want.gguf").read_bytes()
    for body, expect in [({"from": "up:q8", "quantize": "q4_K_M"}, "is Q8_0 already; quantizing starts from f16"),
                         ({"from": "up:q8", "quantize": "q9"}, "type 'q9': choose one of"),
                         ({"from": "up:q8", "quantize": 4}, "quantize: a type name"),
                         ({"from": "up:q8", "quantize": "q8_0", "model": "bad name!"}, "invalid")]:
        status, answer = running.request("/api/create", {"model": "x:1", "stream": False, **body})
        assert status == 400 and expect in json.loads(answer)["error"], answer
    assert [str(e.name) for e in store.list()] == ["up:q8"]
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_create_from_an_uploaded_checkpoint(served, fixtures_dir, tmp_path):
    """/api/create whose `files` are a checkpoint's (as `ollama create` sends a safetensors
    folder): converted as qvl-convert converts the folder, here straight to the `quantize` type
    (f16 without one: test_modelfile.py's folder), stored with the request's defaults, the
    temporary files gone; a file that is not a checkpoint's, or one never sent, is a 400."""
    from typer.testing import CliRunner

    from gguf_compare import differences
    from qvl.convert.cli import app as convert_app

    store, running = served
    folder = fixtures_dir / "tiny-qwen2.5-vl" / "hf"
    sent = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        assert running.request(f"/api/blobs/{digest(data)}", raw=data)[0] == 201
        sent[path.name] = digest(data)
    events = running.lines("/api/create", {"model": "hf:q8_0", "files": sent, "system": "Be brief.",
                                           "quantize": "q8_0"})
    assert events[0] == {"status": "parsing checkpoint"} and events[-1] == {"status": "success"}, events
    steps = [e for e in events if e["status"] == "converting model"]
    assert steps and steps[-1]["completed"] == steps[-1]["total"] > 0
    r = CliRunner().invoke(convert_app, [str(folder), "-o", str(tmp_path / "want.gguf"), "--type", "q8_0", "-q"])
    assert r.exit_code == 0, r.output
    model, projector = store.resolve("hf:q8_0")
    assert differences(model, tmp_path / "want.gguf") == [] and differences(projector, tmp_path / "mmproj-want.gguf") == []
    assert running.json("/api/show", {"model": "hf:q8_0"})["system"] == "Be brief."
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
    for files, expect in [({**sent, "../x.json": sent["config.json"]}, "files: '../x.json': a checkpoint's file name"),
                          ({**sent, "model.safetensors": digest(b"never")}, "not in the store; send it first")]:
        status, answer = running.request("/api/create", {"model": "x:1", "files": files, "stream": False})
        assert status == 400 and expect in json.loads(answer)["error"], answer
    assert sorted(str(e.name) for e in store.list()) == ["hf:q8_0"]
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
