"""qvl serve's options for where and to whom it answers: --api-key (requests without one of the
keys a 401 with llama-server's body, the health checks and preflights open; keys from the flag,
$QVL_API_KEY or a file; qvl ps sends $QVL_API_KEY), HTTPS, and Ollama's environment variables'
counterparts ($QVL_HOST, $QVL_KEEP_ALIVE, $QVL_KV_CACHE_TYPE, $QVL_CONTEXT_LENGTH)."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from serving import MODEL, Running
from typer.testing import CliRunner

from qvl.runtime import http_serve
from qvl.runtime.api_keys import UNAUTHORIZED, KeyFileError, allowed, server_keys
from qvl.runtime.cli import app
from qvl.runtime.server import ServeConfig, Service


@pytest.fixture(scope="module")
def keyed(store, files):
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), api_keys=("k1", "secret two")), store))
    yield r
    r.server.shutdown()


def _call(running, path, headers=None, body=None, method=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(running.url + path, data=data, headers=headers or {},
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_requests_want_a_key(keyed):
    for path in ("/api/tags", "/v1/models", "/props", "/metrics"):
        status, data = _call(keyed, path)
        assert status == 401 and json.loads(data) == UNAUTHORIZED, path
    assert _call(keyed, "/api/tags", {"Authorization": "Bearer wrong"})[0] == 401
    assert _call(keyed, "/api/tags", {"Authorization": "Bearer secret two"})[0] == 200
    assert _call(keyed, "/api/tags", {"Authorization": "k1"})[0] == 200  # llama-server takes it bare too
    assert _call(keyed, "/v1/models", {"X-Api-Key": "k1"})[0] == 200  # Anthropic's header
    for path in ("/health", "/v1/health", "/"):
        assert _call(keyed, path)[0] == 200, path
    status, page = _call(keyed, "/", {"Accept": "text/html"})  # the chat page (it asks for the key on a 401)
    assert status == 200 and page.startswith(b"<!doctype html>")
    assert _call(keyed, "/api/tags", {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"},
                 method="OPTIONS")[0] == 204  # a browser's preflight carries no key
    status, data = _call(keyed, "/v1/chat/completions", {"Authorization": "Bearer k1"},
                         {"model": "tiny:1", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 2
    status, _ = _call(keyed, "/v1/chat/completions", None,
                      {"model": "tiny:1", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 401


def test_qvl_ps_sends_the_environments_key(keyed, monkeypatch):
    host = keyed.url.removeprefix("http://")
    monkeypatch.delenv("QVL_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["ps", "--host", host])
    assert r.exit_code != 0 and "401" in r.stderr
    monkeypatch.setenv("QVL_API_KEY", "secret two")
    r = CliRunner().invoke(app, ["ps", "--host", host])
    assert r.exit_code == 0 and r.stdout.startswith("NAME"), r.output


def test_keys_from_the_flag_and_a_file(tmp_path):
    (tmp_path / "keys").write_text("# ours\nalpha\n\n beta \nalpha\n")
    assert server_keys("x, y,,x", None) == ("x", "y")
    assert server_keys(None, tmp_path / "keys") == ("alpha", "beta")
    assert server_keys("x", tmp_path / "keys") == ("x", "alpha", "beta")
    with pytest.raises(KeyFileError, match="--api-key-file .*none: No such file"):
        server_keys(None, tmp_path / "none")
    assert allowed((), "/api/tags", {}) and allowed(("a",), "/health", {})
    assert not allowed(("a",), "/api/tags", {"Authorization": "Bearer b"})


def test_the_serve_flags(tmp_path, monkeypatch):
    got = []

    def fake_serve(service, host, port, log, ready):
        got.append(service.config.api_keys)
        ready(SimpleNamespace(server_address=(host, 11434)))

    monkeypatch.setattr(http_serve, "serve", fake_serve)
    monkeypatch.setenv("QVL_API_KEY", "from-env")
    r = CliRunner().invoke(app, ["serve", "--cpu"])
    assert r.exit_code == 0 and got.pop() == ("from-env",) and "warning" not in r.stderr
    r = CliRunner().invoke(app, ["serve", "--cpu", "--api-key", "a,b", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and got.pop() == ("a", "b") and "warning" not in r.stderr
    monkeypatch.delenv("QVL_API_KEY")
    r = CliRunner().invoke(app, ["serve", "--cpu", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and got.pop() == () and "no --api-key is set" in r.stderr
    r = CliRunner().invoke(app, ["serve", "--api-key-file", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--api-key-file" in r.stderr and "No such file" in r.stderr
    (tmp_path / "empty").write_text("# nothing\n")
    r = CliRunner().invoke(app, ["serve", "--api-key-file", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no key given" in r.stderr


CERT = Path(__file__).with_name("tls-localhost-cert.pem")  # self-signed for localhost / 127.0.0.1, test-only
KEY = Path(__file__).with_name("tls-localhost-key.pem")


def test_https_with_a_certificate(store, files):
    """--ssl-cert-file / --ssl-key-file: the server speaks TLS (a client trusting the certificate
    gets its answers, a plain-HTTP one gets none), keys checked inside it as before."""
    config = ServeConfig(default_model=str(files / MODEL), api_keys=("k1",), tls=(str(CERT), str(KEY)))
    r = Running(Service(config, store))
    try:
        url = r.url.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=str(CERT))
        req = urllib.request.Request(url + "/api/tags", headers={"Authorization": "Bearer k1"})
        with urllib.request.urlopen(req, timeout=60, context=trusted) as reply:
            assert reply.status == 200 and "models" in json.loads(reply.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/api/tags", timeout=60, context=trusted)
        assert refused.value.code == 401
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(r.url + "/health", timeout=10)  # plain HTTP on a TLS port
        for _ in range(50):  # the server's log says so in one line (no traceback)
            if any("connection dropped" in line for line in r.log):
                break
            time.sleep(0.1)
        assert any("connection dropped" in line for line in r.log), r.log
    finally:
        r.server.shutdown()


def test_tls_flags(tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, host, port, log, ready: (
        got.append(service.config.tls), ready(SimpleNamespace(server_address=(host, 443)))))
    r = CliRunner().invoke(app, ["serve", "--cpu", "--ssl-cert-file", str(CERT), "--ssl-key-file", str(KEY)])
    assert r.exit_code == 0 and got.pop() == (str(CERT), str(KEY)) and "https://127.0.0.1:443" in r.stderr
    r = CliRunner().invoke(app, ["serve", "--ssl-cert-file", str(CERT)])
    assert r.exit_code == 2 and "--ssl-cert-file and --ssl-key-file: give both" in r.stderr
    (tmp_path / "bad.pem").write_text("not a key")
    r = CliRunner().invoke(app, ["serve", "--ssl-cert-file", str(CERT), "--ssl-key-file", str(tmp_path / "bad.pem")])
    assert r.exit_code == 2 and r.stderr.startswith("qvl serve: error: --ssl-cert-file") and r.stderr.count("\n") == 1


def test_serve_reads_qvl_host_and_keep_alive(monkeypatch):
    """As ollama serve reads $OLLAMA_HOST and $OLLAMA_KEEP_ALIVE: $QVL_HOST is where it listens
    (the flags win), $QVL_KEEP_ALIVE how long a model stays."""
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, host, port, log, ready: got.append(
        (host, port, service.config.keep_alive_s)))
    monkeypatch.delenv("QVL_API_KEY", raising=False)
    for env, args, want in [(None, [], ("127.0.0.1", 11434, 300.0)),
                            ("0.0.0.0:8080", [], ("0.0.0.0", 8080, 300.0)),
                            ("http://[::1]:9000/", [], ("::1", 9000, 300.0)),
                            ("10.0.0.5", ["--port", "7000"], ("10.0.0.5", 7000, 300.0)),
                            ("0.0.0.0:8080", ["--host", "127.0.0.1"], ("127.0.0.1", 8080, 300.0))]:
        if env is None:
            monkeypatch.delenv("QVL_HOST", raising=False)
        else:
            monkeypatch.setenv("QVL_HOST", env)
        r = CliRunner().invoke(app, ["serve", "--cpu", *args])
        assert r.exit_code == 0 and got.pop() == want, (env, r.output)
    monkeypatch.delenv("QVL_HOST")
    monkeypatch.setenv("QVL_KEEP_ALIVE", "1h")
    assert CliRunner().invoke(app, ["serve", "--cpu"]).exit_code == 0 and got.pop()[2] == 3600.0
    assert CliRunner().invoke(app, ["serve", "--cpu", "--keep-alive", "30s"]).exit_code == 0 and got.pop()[2] == 30.0
    monkeypatch.setenv("QVL_KEEP_ALIVE", "soon")
    r = CliRunner().invoke(app, ["serve", "--cpu"])
    assert r.exit_code == 2 and "$QVL_KEEP_ALIVE 'soon'" in r.stderr
    monkeypatch.setenv("QVL_HOST", "host:port")
    r = CliRunner().invoke(app, ["serve", "--cpu"])
    assert r.exit_code == 2 and "$QVL_HOST 'host:port': [http://]HOST[:PORT]" in r.stderr


def test_serve_cache_type(monkeypatch):
    """--cache-type (or $QVL_KV_CACHE_TYPE, as Ollama's OLLAMA_KV_CACHE_TYPE): the KV cache's type."""
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, *a: got.append(service.config.placement.kv_type))
    monkeypatch.delenv("QVL_KV_CACHE_TYPE", raising=False)
    assert CliRunner().invoke(app, ["serve", "--cpu"]).exit_code == 0 and got.pop() is None
    assert CliRunner().invoke(app, ["serve", "--cpu", "--cache-type", "q8_0"]).exit_code == 0 and got.pop() == "q8_0"
    monkeypatch.setenv("QVL_KV_CACHE_TYPE", "f16")
    assert CliRunner().invoke(app, ["serve", "--cpu"]).exit_code == 0 and got.pop() == "f16"
    r = CliRunner().invoke(app, ["serve", "--cpu", "--cache-type", "q4_0"])
    assert r.exit_code == 2 and "--cache-type q4_0: choose f32, bf16, f16, q8_0" in r.stderr


def test_serve_context_length(monkeypatch):
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, *a: got.append(service.config.ctx_size))
    monkeypatch.setenv("QVL_CONTEXT_LENGTH", "8192")
    assert CliRunner().invoke(app, ["serve", "--cpu"]).exit_code == 0 and got.pop() == 8192
    assert CliRunner().invoke(app, ["serve", "--cpu", "-c", "2048"]).exit_code == 0 and got.pop() == 2048
    monkeypatch.setenv("QVL_CONTEXT_LENGTH", "lots")
    r = CliRunner().invoke(app, ["serve", "--cpu"])
    assert r.exit_code == 2 and "$QVL_CONTEXT_LENGTH 'lots': a number of tokens" in r.stderr


def test_the_given_file_by_its_name_or_alias(running, store, files):
    """The GGUF file qvl serve was given answers to the name it shows (its file name, or --alias),
    is listed first by /v1/models and found by /v1/models/NAME, as llama-server's model is."""
    body = {"max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}
    unnamed = running.json("/v1/chat/completions", body)
    named = running.json("/v1/chat/completions", {**body, "model": MODEL})
    assert named["choices"] == unnamed["choices"] and named["model"] == unnamed["model"] == MODEL
    assert running.json(f"/v1/models/{MODEL}")["owned_by"] == "qvl"
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), alias="qwen-tiny"), store))
    try:
        listed = r.json("/v1/models")["data"]
        assert listed[0]["id"] == "qwen-tiny" and r.json("/v1/models/qwen-tiny") == listed[0]
        aliased = r.json("/v1/chat/completions", {**body, "model": "qwen-tiny"})
        assert aliased["choices"] == unnamed["choices"] and aliased["model"] == "qwen-tiny"
        assert r.json("/props")["model_alias"] == "qwen-tiny"
        assert r.request("/v1/chat/completions", {**body, "model": MODEL})[0] == 404  # the alias replaces it
    finally:
        r.server.shutdown()


def test_the_alias_flag(monkeypatch):
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, *a: got.append(service.config.alias))
    assert CliRunner().invoke(app, ["serve", "--cpu", "-a", "mine"]).exit_code == 0 and got.pop() == "mine"
    assert CliRunner().invoke(app, ["serve", "--cpu"]).exit_code == 0 and got.pop() is None
