"""Pictures by URL in requests, as llama-server takes them: http(s) URLs fetched (10 MiB, 10 s;
refused with --no-remote-media), file:// URLs read below --media-path and nowhere else; the
answer the same as for the picture sent inline."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import time

import pytest
from serving import MODEL, Running, png

from qvl.runtime import media_fetch
from qvl.runtime.image import ImageError
from qvl.runtime.media_fetch import NO_ACCESS, MediaAccess, url_bytes
from qvl.runtime.server import ServeConfig, Service

PICTURE = png((30, 160, 90))


class _Pages(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/pic.png":
            self._send(PICTURE, len(PICTURE))
        elif self.path == "/said-big":  # a length over the limit: not read
            self._send(b"x" * 10, 10**9)
        elif self.path == "/unsaid-big":  # no length, more bytes than the limit
            self._send(b"x" * 5000, None)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(PICTURE, len(PICTURE))
        elif self.path == "/drip":  # a byte now and then, never long enough apart for the timeout
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_error(404, "Not Found")

    def _send(self, data, length):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client left (a length over the limit)
            pass

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def pages():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "pics").mkdir()
    (root / "pics" / "a b.png").write_bytes(PICTURE)
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    outside.write_bytes(PICTURE)
    os.symlink(outside, root / "link.png")
    return root


def test_an_http_url_is_fetched(pages):
    assert url_bytes(f"{pages}/pic.png", "w", ImageError, MediaAccess()) == PICTURE


@pytest.mark.parametrize("path,expect", [
    ("/missing.png", "w: fetching http://127.0.0.1:\\d+/missing.png: HTTP 404"),
    ("/said-big", "is over the 0.00390625 MiB a fetched file may be"),
    ("/unsaid-big", "is over the 0.00390625 MiB a fetched file may be"),
    ("/slow", "fetching http://127.0.0.1:\\d+/slow: .*timed out|no reply in 0.3 s"),
    ("/drip", "fetching http://127.0.0.1:\\d+/drip: not all there after 1 s"),
])
def test_fetch_failures_are_one_line(pages, monkeypatch, path, expect):
    monkeypatch.setattr(media_fetch, "FETCH_MAX_BYTES", 4096)
    monkeypatch.setattr(media_fetch, "FETCH_TIMEOUT_S", 0.3)
    monkeypatch.setattr(media_fetch, "FETCH_TOTAL_S", 1.0)
    with pytest.raises(ImageError, match=expect):
        url_bytes(pages + path, "w", ImageError, MediaAccess())


def test_refused_without_leave(pages, folder):
    with pytest.raises(ImageError, match="w: http://127.0.0.1:\\d+/pic.png: this qvl serve fetches no URLs"):
        url_bytes(f"{pages}/pic.png", "w", ImageError, NO_ACCESS)
    with pytest.raises(ImageError, match="file:// URLs are read only with qvl serve --media-path DIR"):
        url_bytes("file://pics/a%20b.png", "w", ImageError, MediaAccess())
    with pytest.raises(ImageError, match="file:// URLs are read only"):
        url_bytes("file:pics/a%20b.png", "w", ImageError, NO_ACCESS)


def test_a_file_url_below_the_media_path(folder):
    access = MediaAccess(media_path=folder)
    assert url_bytes("file://pics/a%20b.png", "w", ImageError, access) == PICTURE  # percent-escapes read
    assert url_bytes("file:pics/a b.png", "w", ImageError, access) == PICTURE
    for url, expect in [("file:///etc/passwd", "a path relative to --media-path, without '..'"),
                        ("file://pics/../../x.png", "a path relative to --media-path, without '..'"),
                        ("file://link.png", "outside --media-path"),
                        ("file://pics/none.png", "No such file or directory"),
                        ("file://pics", "Is a directory")]:
        with pytest.raises(ImageError, match=expect):
            url_bytes(url, "w", ImageError, access)


@pytest.fixture(scope="module")
def fetching(store, files, folder):
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), media=MediaAccess(media_path=folder)), store))
    yield r
    r.server.shutdown()


def _chat(running, url):
    return running.request("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What colour?"}]}]})


def test_a_picture_by_url_answers_as_the_picture_inline(fetching, running, pages):
    inline = json.loads(_chat(fetching, "data:image/png;base64," + base64.b64encode(PICTURE).decode())[1])
    assert inline["usage"]["prompt_tokens"] > 20  # the picture's tokens are in
    for url in (f"{pages}/pic.png", "file://pics/a%20b.png"):
        status, data = _chat(fetching, url)
        assert status == 200 and json.loads(data)["choices"] == inline["choices"], (url, data)
    anthropic = {"model": "tiny:1", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": f"{pages}/pic.png"}},
        {"type": "text", "text": "What colour?"}]}]}
    answer = fetching.json("/v1/messages", anthropic)
    assert answer["content"][0]["text"] == inline["choices"][0]["message"]["content"]
    status, data = _chat(fetching, f"{pages}/missing.png")
    assert status == 400 and "messages[0].content[0]: fetching" in json.loads(data)["error"]
    status, data = _chat(running, "file://pics/a%20b.png")  # a server without --media-path
    assert status == 400 and "messages[0].content[0]: file://pics/a%20b.png: file:// URLs are read only with" in \
        json.loads(data)["error"]


def test_the_serve_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qvl.runtime import http_serve
    from qvl.runtime.cli import app

    got = []
    monkeypatch.setattr(http_serve, "serve", lambda service, *a, **k: got.append(service.config.media))
    for args, want in [([], MediaAccess()), (["--no-remote-media", "--media-path", str(tmp_path)],
                                             MediaAccess(remote=False, media_path=tmp_path))]:
        r = CliRunner().invoke(app, ["serve", "--cpu", *args])
        assert r.exit_code == 0 and got.pop() == want, r.output
    r = CliRunner().invoke(app, ["serve", "--media-path", str(tmp_path / "none")])
    assert r.exit_code == 2 and f"--media-path {tmp_path / 'none'}: not a folder" in r.stderr


def test_qvl_run_takes_image_urls(pages, tiny_gguf, tmp_path):
    """qvl-run --image URL (as mlx-vlm takes one): the answer the file itself gets; the fetched
    copy gone when qvl-run ends; a URL that fails is one line, exit 2."""
    import glob
    import tempfile

    from typer.testing import CliRunner

    from qvl.runtime.run_cli import app

    (tmp_path / "pic.png").write_bytes(PICTURE)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "qvl-run-*")))

    def run(picture):
        r = CliRunner().invoke(app, [tiny_gguf, "--image", picture, "-p", "What colour?", "-n", "4", "--json"])
        return r.exit_code, r.stdout, r.stderr

    code, out, err = run(f"{pages}/pic.png")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == json.loads(run(str(tmp_path / "pic.png"))[1])["token_ids"]
    assert json.loads(out)["prompt_tokens"] > 20
    r = CliRunner().invoke(app, [tiny_gguf, "--each", "--image", f"{pages}/pic.png", "--image",
                                 str(tmp_path / "pic.png"), "-p", "What colour?", "-n", "4", "--json"])
    replies = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [a["image"] for a in replies] == [f"{pages}/pic.png", str(tmp_path / "pic.png")]
    assert replies[0]["token_ids"] == replies[1]["token_ids"] == json.loads(out)["token_ids"]
    code, _, err = run(f"{pages}/missing.png")
    assert code == 2 and err.strip().splitlines()[-1].startswith("qvl-run: error: --image: fetching http://")
    assert "HTTP 404" in err
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "qvl-run-*"))) == before
