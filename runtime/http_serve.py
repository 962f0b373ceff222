"""`qvl serve`'s HTTP side: requests read, routed to server.Service's endpoints and answered,
one at a time in the thread that calls `serve` (server.py says why), with one log line each.
A reply is JSON, text, or a stream (JSON lines, or server-sent events); an error before the
reply starts is {"error"} with its status, one inside a stream is the stream's last event; a
client that leaves ends its generation."""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import torch

from .image import ImageError
from .model import ModelError
from .server import ROUTES, VERSION, Reply, RequestError, Service
from .store import StoreError
from .video import VideoError

CLIENT_TIMEOUT_S = 60  # a client that stalls this long (sending a request, reading a stream) is dropped


def _failure(e: BaseException) -> RequestError:
    """What a request's error is answered with; a bug's traceback goes to the server's stderr."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (ModelError, ImageError, VideoError, StoreError)):
        return RequestError(400, str(e))
    if isinstance(e, torch.OutOfMemoryError):
        return RequestError(500, "out of memory; a smaller num_ctx, fewer or smaller images, or a smaller model")
    traceback.print_exc(file=sys.stderr)
    return RequestError(500, f"{type(e).__name__}: {e}")


def make_handler(service: Service, log: Callable[[str], None]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"qvl/{VERSION}"
        timeout = CLIENT_TIMEOUT_S

        def do_GET(self) -> None:
            self._answer("GET")

        def do_HEAD(self) -> None:
            self._send_head(200, "text/plain; charset=utf-8", 0)

        def do_POST(self) -> None:
            self._answer("POST")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line a request, written by _answer

        def _send_head(self, status: int, kind: str, length: int | None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _body(self) -> dict[str, Any]:
            size = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError(400, "request body: not JSON") from None
            if not isinstance(body, dict):
                raise RequestError(400, "request body: a JSON object")
            return body

        def _answer(self, method: str) -> None:
            t0 = time.perf_counter()
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            status = 200
            try:
                route = ROUTES.get((method, path))
                if route is None:
                    raise RequestError(404, f"{method} {path}: no such endpoint")
                body = self._body() if method != "GET" else {}
                try:
                    reply = route(service, body)
                except Exception as e:  # noqa: BLE001 - every error is the request's answer
                    raise _failure(e) from None
                status = reply.status
                self._write(reply)
            except RequestError as e:
                status = e.status
                data = json.dumps({"error": e.message}).encode()
                self._send_head(e.status, "application/json; charset=utf-8", len(data))
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                status = 499  # the client went away (or stalled); the generation stopped with it
            log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")

        def _write(self, reply: Reply) -> None:
            if reply.events is None:
                text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body, ensure_ascii=False)
                data = text.encode()
                kind = "text/plain" if isinstance(reply.body, str) else "application/json"
                self._send_head(reply.status, f"{kind}; charset=utf-8", len(data))
                self.wfile.write(data)
                return
            self._send_head(reply.status, "text/event-stream" if reply.sse else "application/x-ndjson", None)
            events = reply.events
            try:
                for event in events:
                    self._event(event, reply.sse)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                raise
            except Exception as e:  # noqa: BLE001 - headers are out: the error is the stream's last event
                self._event({"error": _failure(e).message}, reply.sse)
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # a generation the client left stops here
            if reply.sse:
                self.wfile.write(b"data: [DONE]\n\n")

        def _event(self, event: dict[str, Any], sse: bool) -> None:
            line = json.dumps(event, ensure_ascii=False)
            self.wfile.write((f"data: {line}\n\n" if sse else line + "\n").encode())
            self.wfile.flush()

    return Handler


def serve(service: Service, host: str, port: int, log: Callable[[str], None],
          ready: Callable[[HTTPServer], None] | None = None) -> None:
    """Answer requests one at a time in this thread until interrupted (or `shutdown` from
    another); `ready` gets the bound server (its port, for port 0)."""
    server = HTTPServer((host, port), make_handler(service, log))
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()

