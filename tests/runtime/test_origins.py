"""Which pages and names may call qvl serve (origins.py): Ollama's rules, and the server
refusing the rest before anything is done (a cross-site page's POST to /api/delete deletes
nothing)."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from qvl.runtime.origins import host_allowed, origin_allowed, parse_origins


@pytest.mark.parametrize("origin,extra,ok", [
    ("http://localhost", (), True), ("http://localhost:5173", (), True), ("https://127.0.0.1:8443", (), True),
    ("http://0.0.0.0:3000", (), True), ("app://obsidian.md", (), True), ("file://", (), True),
    ("tauri://localhost", (), True), ("vscode-webview://abc123", (), True),
    ("chrome-extension://abcdefghijkl", (), True), ("moz-extension://1234-5678", (), True),
    ("HTTP://LOCALHOST:8080", (), True),
    ("https://evil.example", (), False), ("http://localhost.evil.example", (), False),
    ("http://localhost:3000.evil.example", (), False), ("http://127.0.0.1.nip.io", (), False), ("null", (), False),
    ("https://chat.example.com", ("https://chat.example.com",), True),
    ("https://a.example.com", ("https://*.example.com",), True),
    ("https://example.com.evil.io", ("https://*.example.com",), False),
    ("http://192.168.1.20:8080", ("http://192.168.1.*:*",), True),
    ("https://anything.example", ("*",), True),
])
def test_origin_allowed(origin, extra, ok):
    assert origin_allowed(origin, extra) is ok


@pytest.mark.parametrize("host,loopback,ok", [
    ("127.0.0.1:11434", True, True), ("localhost:11434", True, True), ("[::1]:11434", True, True),
    ("192.168.1.5:11434", True, True), ("0.0.0.0", True, True), ("app.localhost", True, True),
    ("nas.local", True, True), ("svc.internal:80", True, True), (socket.gethostname(), True, True),
    ("evil.example:11434", True, False), ("8.8.8.8", True, False), ("localhost.evil.example", True, False),
    ("evil.example", False, True), (None, True, True),
])
def test_host_allowed(host, loopback, ok):
    assert host_allowed(host, loopback) is ok


def test_parse_origins():
    assert parse_origins(' "https://a.example" , http://b.example:*,, ') == ("https://a.example", "http://b.example:*")
    assert parse_origins(None) == () and parse_origins("") == ()


def _ask(running, method, path, headers, body=None):
    host, port = running.url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def test_a_cross_site_page_changes_nothing(running):
    assert running.request("/api/copy", {"source": "tiny:1", "destination": "victim:1"})[0] == 200
    status, headers, data = _ask(running, "POST", "/api/delete", {"Origin": "https://evil.example",
                                                                 "Content-Type": "text/plain"}, {"model": "victim:1"})
    assert status == 403 and "origin 'https://evil.example' may not call qvl serve" in json.loads(data)["error"]
    assert "Access-Control-Allow-Origin" not in headers
    assert any(m["name"].startswith("victim:1") for m in running.json("/api/tags")["models"])
    status, _, data = _ask(running, "DELETE", "/api/delete", {"Host": "evil.example:11434"}, {"model": "victim:1"})
    assert status == 403 and "host 'evil.example:11434' is not this server's name" in json.loads(data)["error"]
    assert any(m["name"].startswith("victim:1") for m in running.json("/api/tags")["models"])
    status, _, _ = _ask(running, "DELETE", "/api/delete", {"Origin": "http://localhost:5173"}, {"model": "victim:1"})
    assert status == 200
    assert not any(m["name"].startswith("victim:1") for m in running.json("/api/tags")["models"])


def test_a_local_page_gets_cors_headers_and_its_preflight(running):
    status, headers, data = _ask(running, "GET", "/api/version", {"Origin": "http://localhost:5173"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "version" in json.loads(data)
    status, headers, _ = _ask(running, "OPTIONS", "/api/chat", {
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-stainless-os"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type, x-stainless-os"
    assert "Access-Control-Allow-Private-Network" not in headers
    status, headers, _ = _ask(running, "OPTIONS", "/api/chat", {"Origin": "http://localhost:5173",
                                                               "Access-Control-Request-Private-Network": "true"})
    assert status == 204 and headers["Access-Control-Allow-Private-Network"] == "true"
    status, headers, _ = _ask(running, "OPTIONS", "/api/chat", {"Origin": "https://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = _ask(running, "GET", "/api/version", {})  # no Origin (curl, SDKs): no CORS headers
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("args,env,want", [
    (["--origins", "https://a.example, http://b.example:*"], None, ("https://a.example", "http://b.example:*")),
    ([], "https://c.example", ("https://c.example",)),
    (["--origins", ""], "https://c.example", ()),  # the flag wins over the variable
    ([], None, ()),
])
def test_serve_origins_option_and_variable(monkeypatch, tmp_path, args, env, want):
    from typer.testing import CliRunner

    from qvl.runtime import http_serve
    from qvl.runtime.cli import app

    monkeypatch.setenv("QVL_MODELS", str(tmp_path))
    if env is None:
        monkeypatch.delenv("QVL_ORIGINS", raising=False)
    else:
        monkeypatch.setenv("QVL_ORIGINS", env)
    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, *a, **k: got.append(service.config.origins))
    r = CliRunner().invoke(app, ["serve", "--cpu", *args])
    assert r.exit_code == 0, r.stderr
    assert got == [want]
