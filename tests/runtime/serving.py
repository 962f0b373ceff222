"""What the serve tests share: the tiny model's name, a picture, and a `qvl serve` on a loopback
port (`Running`); their fixtures are in conftest.py."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request

from PIL import Image

from qvl.runtime.http_serve import serve
from qvl.runtime.server import Service

MODEL = "tiny-qwen2.5-vl-f16.gguf"


def png(color=(200, 30, 30), size=(56, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class Running:
    def __init__(self, service: Service):
        self.service = service
        self.log: list[str] = []
        started = threading.Event()

        def ready(server):
            self.server = server
            started.set()

        threading.Thread(target=serve, args=(service, "127.0.0.1", 0, self.log.append, ready), daemon=True).start()
        assert started.wait(10)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def request(self, path: str, body=None, raw: bytes | None = None, method: str | None = None):
        """(status, body bytes) of a GET (no body), a POST or `method`."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        method = method or ("POST" if data is not None else "GET")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str, body=None):
        status, data = self.request(path, body)
        assert status == 200, data
        return json.loads(data)

    def lines(self, path: str, body):
        status, data = self.request(path, body)
        assert status == 200, data
        return [json.loads(line) for line in data.decode().splitlines()]
