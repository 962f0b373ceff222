"""`qvl serve`'s HTTP side: requests read, routed to server.Service's endpoints and answered,
with one log line each. Each connection has a thread of its own, which reads the request and
writes the reply; the endpoints that only read the store or the server's state (`LIGHT`:
/api/tags, /api/ps, /api/show, /api/version, /v1/models, /v1/models/NAME, /metrics; and /api/pull, /api/push, /api/create,
/api/blobs/) answer there at once, the others (a model's work) are queued to the thread that calls `serve` and
run there one at a time, in order (torch's CPU ops run slower from a second thread: server.py). A reply is JSON,
text, or a stream (JSON lines, or server-sent events); an error before the reply starts is
{"error"} with its status, one inside a stream is the stream's last event; a client that leaves
ends its generation."""

from __future__ import annotations

import json
import queue
import ssl
import sys
import threading
import time
import traceback
from urllib.parse import parse_qsl, unquote
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from ..convert.errors import ConvertError
from . import (anthropic_api, blob_upload, embed_api, llamacpp_api, llamacpp_completion, lora_api, metrics_api,
               openai_api, responses_api, server, slots_api, store_api)
from .api_keys import UNAUTHORIZED, allowed
from .origins import PREFLIGHT_HEADERS, host_allowed, is_loopback, origin_allowed
from .go_template import TemplateError
from .image import ImageError
from .model import ModelError
from .server import VERSION, Reply, RequestError, Service
from .store import StoreError
from .video import VideoError

ROUTES = {**server.ROUTES, **store_api.ROUTES, **openai_api.ROUTES, **responses_api.ROUTES, **embed_api.ROUTES,
          **llamacpp_api.ROUTES, **llamacpp_completion.ROUTES, **anthropic_api.ROUTES, **slots_api.ROUTES,
          **lora_api.ROUTES, **metrics_api.ROUTES}
CLIENT_TIMEOUT_S = 60  # a client that stalls this long (sending a request, reading a stream) is dropped
# answered in the connection's thread, even while a model works: they read the store, a GGUF's
# header or the server's state, or (a pull, a push, a create that quantizes or converts) wait on a
# thread of their own
WEB_CHAT = Path(__file__).with_name("web_chat.html")  # the page a browser gets at /
LIGHT = frozenset({("GET", "/"), ("GET", "/health"), ("GET", "/v1/health"), ("GET", "/api/version"),
                   ("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/v1/models"), ("GET", "/models"),
                   ("GET", "/metrics"), ("POST", "/api/show"), ("POST", "/api/pull"), ("POST", "/api/push"),
                   ("POST", "/api/create")})
MAX_WAITING = 64  # requests queued for the serving thread beyond this are answered 503, as Ollama's queue


@dataclass
class Job:
    """A request for the serving thread; what it makes of it comes back through `out`: ("error",
    RequestError), ("reply", Reply) or ("stream", Reply), then ("event", dict)... ("end", None)."""

    route: Callable[[Service, dict[str, Any]], Reply]
    body: dict[str, Any]
    out: queue.Queue = field(default_factory=queue.Queue)
    left: threading.Event = field(default_factory=threading.Event)  # the client went away


def _run(service: Service, job: Job) -> None:
    """A queued request, in the serving thread; a stream's events are made here, one by one,
    until its end or until its client has gone."""
    failure = None
    try:
        reply = job.route(service, job.body)
    except Exception as e:  # noqa: BLE001 - every error is the request's answer
        failure = _failure(e)
        failure = RequestError(failure.status, failure.message)  # without the frames its traceback held
    if failure is not None:  # answered once the exception and what its frames held (a request's
        job.out.put(("error", failure))  # video in a temporary file) are gone
        return
    if reply.events is None:
        job.out.put(("reply", reply))
        return
    job.out.put(("stream", reply))
    events = reply.events
    try:
        for event in events:
            if job.left.is_set():
                break
            job.out.put(("event", event))
    except Exception as e:  # noqa: BLE001 - headers are out: the error is the stream's last event
        job.out.put(("event", {"error": _failure(e).message}))
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a generation the client left stops here
        job.out.put(("end", None))


def _failure(e: BaseException) -> RequestError:
    """What a request's error is answered with; a bug's traceback goes to the server's stderr."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (ModelError, ImageError, VideoError, StoreError, ConvertError, TemplateError)):
        return RequestError(400, str(e))
    if isinstance(e, torch.OutOfMemoryError):
        return RequestError(500, "out of memory; a smaller num_ctx, fewer or smaller images, or a smaller model")
    traceback.print_exc(file=sys.stderr)
    return RequestError(500, f"{type(e).__name__}: {e}")


def make_handler(service: Service, log: Callable[[str], None],
                 jobs: queue.Queue | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler; with `jobs`, requests other than LIGHT ones go there for the serving
    thread (`serve`), without, every request is answered in the handler's thread."""

    class Handler(BaseHTTPRequestHandler):
        server_version = f"qvl/{VERSION}"
        timeout = CLIENT_TIMEOUT_S

        def do_GET(self) -> None:
            self._answer("GET")

        def do_HEAD(self) -> None:
            self._answer("HEAD")

        def do_POST(self) -> None:
            self._answer("POST")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def do_OPTIONS(self) -> None:  # a browser's CORS preflight
            self._answer("OPTIONS")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line a request, written by _answer

        def _allow_origin(self) -> None:
            """CORS: a page of an allowed origin may read the reply (origins.py)."""
            origin = self.headers.get("Origin")
            if origin is not None and origin_allowed(origin, service.config.origins):
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Vary", "Origin")

        def _send_head(self, status: int, kind: str, length: int | None) -> None:
            self.send_response(status)
            self._allow_origin()
            self.send_header("Content-Type", kind)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _body(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
            size = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RequestError(400, "request body: not JSON") from None
            if path == lora_api.PATH:  # llama.cpp's JSON array, the model in the query
                return {**query, lora_api.LIST_KEY: body}
            if not isinstance(body, dict):
                raise RequestError(400, "request body: a JSON object")
            return body

        def _answer(self, method: str) -> None:
            t0 = time.perf_counter()
            path, _, query = self.path.partition("?")
            path = path.rstrip("/") or "/"
            status = 200
            try:
                self._check_caller()
                if method == "OPTIONS":
                    status = self._preflight()
                    log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")
                    return
                if method in ("GET", "HEAD") and path == "/" and "text/html" in (self.headers.get("Accept") or ""):
                    status = self._web_chat(method)  # a browser: the chat page; a client: "qvl is running"
                    log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")
                    return
                if not allowed(service.config.api_keys, path, self.headers):  # --api-key (api_keys.py)
                    status = 401
                    data = json.dumps(UNAUTHORIZED).encode()
                    self._send_head(401, "application/json; charset=utf-8", len(data))
                    if method != "HEAD":
                        self.wfile.write(data)
                    log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")
                    return
                if method == "HEAD" or path.startswith(blob_upload.PREFIX):
                    status = self._blob_or_head(method, path)
                    log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")
                    return
                route = ROUTES.get((method, path))
                body: dict[str, Any] = dict(parse_qsl(query))  # a GET's arguments: /props?model=NAME
                if route is None and method == "GET" and path.startswith(openai_api.MODEL_PATH):
                    route, body = openai_api.model, {"model": unquote(path[len(openai_api.MODEL_PATH):])}
                slot = route is None and method == "POST" and path.startswith(slots_api.PREFIX)
                if slot:  # llama.cpp's POST /slots/ID?action=...: the id and the query beside the body
                    route = slots_api.slot_action
                if route is None:
                    raise RequestError(404, f"{method} {path}: no such endpoint")
                if method != "GET":
                    body = ({**self._body(path, body), **body, "id_slot": path[len(slots_api.PREFIX):]} if slot
                            else self._body(path, body))
                job = Job(route, body)
                if jobs is None or (method, path) in LIGHT or route is openai_api.model:
                    _run(service, job)
                else:
                    try:
                        jobs.put_nowait(job)
                    except queue.Full:
                        raise RequestError(503, f"server busy: {MAX_WAITING} requests are waiting") from None
                status = self._write(job)
            except RequestError as e:
                status = e.status
                data = json.dumps({"error": e.message}).encode()
                self._send_head(e.status, "application/json; charset=utf-8", len(data))
                if method != "HEAD":
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                status = 499  # the client went away (or stalled); the generation stopped with it
            log(f"{method} {path} {status} {time.perf_counter() - t0:.2f}s")

        def _check_caller(self) -> None:
            """A page of another site, or a name that is not this server's: 403 (origins.py)."""
            host = self.headers.get("Host")
            if not host_allowed(host, is_loopback(str(self.server.server_address[0]))):
                raise RequestError(403, f"host {host!r} is not this server's name (qvl serve answers local names "
                                        "on a loopback address)")
            origin = self.headers.get("Origin")
            if origin is not None and not origin_allowed(origin, service.config.origins):
                raise RequestError(403, f"origin {origin!r} may not call qvl serve (allow it with qvl serve --origins "
                                        "or $QVL_ORIGINS)")

        def _web_chat(self, method: str) -> int:
            """GET / from a browser: the chat page (web_chat.html: pictures and videos asked about
            through /v1/chat/completions), framed by no other site's page."""
            data = WEB_CHAT.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method == "GET":
                self.wfile.write(data)
            return 200

        def _preflight(self) -> int:
            """OPTIONS: the methods and headers a page of an allowed origin may use."""
            self.send_response(204)
            self._allow_origin()
            for key, value in PREFLIGHT_HEADERS.items():
                self.send_header(key, value)
            asked = self.headers.get("Access-Control-Request-Headers")
            self.send_header("Access-Control-Allow-Headers", asked or "Authorization, Content-Type")
            if self.headers.get("Access-Control-Request-Private-Network") == "true":  # a public page (--origins)
                self.send_header("Access-Control-Allow-Private-Network", "true")  # calling this machine: Chrome's PNA
            self.send_header("Content-Length", "0")
            self.end_headers()
            return 204

        def _blob_or_head(self, method: str, path: str) -> int:
            """HEAD and POST /api/blobs/DIGEST (blob_upload.py), in this thread: I/O, no model;
            HEAD of any other path: 200, as Ollama's server answers one (a client's probe)."""
            if method == "POST":
                status = blob_upload.upload(service.store, path, self.headers, self.rfile)
            elif method == "HEAD" and path.startswith(blob_upload.PREFIX):
                status = blob_upload.head(service.store, path)
            elif method == "HEAD":
                status = 200
            else:
                raise RequestError(405, f"{method} {path}: blobs take HEAD and POST")
            self._send_head(status, "text/plain; charset=utf-8", 0)
            return status

        def _write(self, job: Job) -> int:
            """Writes what the serving thread makes of `job`; returns the status."""
            kind, item = job.out.get()
            if kind == "error":
                raise item
            reply: Reply = item
            if kind == "reply":
                text = reply.body if isinstance(reply.body, str) else json.dumps(reply.body, ensure_ascii=False)
                data = text.encode()
                ctype = "text/plain" if isinstance(reply.body, str) else "application/json"
                self._send_head(reply.status, f"{ctype}; charset=utf-8", len(data))
                self.wfile.write(data)
                return reply.status
            self._send_head(reply.status, "text/event-stream" if reply.sse else "application/x-ndjson", None)
            try:
                while (got := job.out.get())[0] != "end":
                    self._event(got[1], reply)
            except BaseException:
                job.left.set()  # the serving thread stops the generation at its next token
                raise
            if reply.sse and reply.sse_done:
                self.wfile.write(b"data: [DONE]\n\n")
            return reply.status

        def _event(self, event: dict[str, Any], reply: Reply) -> None:
            line = json.dumps(event, ensure_ascii=False)
            name = f"event: {event.get('type') or 'error'}\n" if reply.named_events else ""  # an error: {"error"}
            self.wfile.write((f"{name}data: {line}\n\n" if reply.sse else line + "\n").encode())
            self.wfile.flush()

    return Handler


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """qvl serve --ssl-cert-file / --ssl-key-file (llama-server's): a server's TLS context from PEM
    files (ssl.SSLError or OSError when they cannot be read or do not match)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def serve(service: Service, host: str, port: int, log: Callable[[str], None],
          ready: Callable[[HTTPServer], None] | None = None) -> None:
    """Answer requests until interrupted (or the server's `shutdown` from another thread): the
    connections in threads of their own, the queued requests in this thread, which also unloads
    a model idle for its keep_alive; `ready` gets the bound server (its port, for port 0)."""
    jobs: queue.Queue[Job] = queue.Queue(MAX_WAITING)
    server = ThreadingHTTPServer((host, port), make_handler(service, log, jobs))
    server.daemon_threads = True
    if service.config.tls is not None:  # HTTPS: each connection's handshake in its own thread, at its first read
        context = tls_context(*service.config.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        plain = server.handle_error

        def handle_error(request: Any, client: Any) -> None:  # a client not speaking TLS: one line, no traceback
            error = sys.exc_info()[1]
            if isinstance(error, (ssl.SSLError, ConnectionError)):
                log(f"{client[0]}: connection dropped ({error})")
            else:
                plain(request, client)

        server.handle_error = handle_error  # type: ignore[method-assign]
    listening = threading.Thread(target=server.serve_forever, name="qvl-serve-http", daemon=True)
    listening.start()
    if ready is not None:
        ready(server)
    service.usage.waiting = jobs.qsize
    try:
        while listening.is_alive():
            try:
                job = jobs.get(timeout=0.2)
            except queue.Empty:
                if (gone := service.expire(time.time())) is not None:
                    log(f"unloaded {gone} (idle for its keep_alive)")
                continue
            service.usage.working = True
            try:
                _run(service, job)
            finally:
                service.usage.working = False
            service.settle(time.time())
    finally:
        server.shutdown()
        server.server_close()
