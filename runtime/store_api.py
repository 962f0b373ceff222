"""`qvl serve`'s store endpoints: /api/create (from stored models), /api/pull and /api/push
(registries; the transfer in a thread of its own, its progress streamed)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .modelfile import Creation, ModelfileError, check_params, parse, stored_creation, stored_defaults
from .server import Reply, RequestError, Service, _named, _store_error
from .store import StoreError

PROGRESS_EVENT_S = 0.2  # a transfer's progress events come at most this often


def create(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's create from a stored model: `from` with `system`, `template`, `license`,
    `parameters` and `messages`, or the older `modelfile` text whose FROM is a stored model. No
    files: the server opens none a request names (`qvl create NAME -f Modelfile` on its machine
    does)."""
    name = _named(body)
    for key in ("files", "adapters", "quantize"):
        if body.get(key):
            raise RequestError(400, f"{key}: qvl serve creates from stored models only; on the server's machine, "
                                    "qvl create NAME -f Modelfile takes GGUF files")
    try:
        if isinstance(body.get("modelfile"), str):
            mf = parse(body["modelfile"])
            sources, params, texts = mf.sources, mf.params, (mf.template, mf.system, mf.license)
            messages = list(mf.messages)
        else:
            source = body.get("from")
            if not isinstance(source, str) or not source:
                raise RequestError(400, "from: the stored model to create from (or modelfile)")
            options = body.get("parameters") or {}
            if not isinstance(options, dict):
                raise RequestError(400, "parameters: a JSON object")
            license_text = body.get("license")
            if isinstance(license_text, list):
                license_text = "\n".join(str(t) for t in license_text)
            sources, params = (source,), check_params(options, strict=True)
            texts = tuple(t if isinstance(t, str) else None
                          for t in (body.get("template"), body.get("system"), license_text))
            messages = body.get("messages") or []
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise RequestError(400, "messages: a list of {role: system, user or assistant, content: text}")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if len(sources) != 1:
            raise RequestError(400, "FROM: one stored model")
        base = stored_creation(service.store, sources[0], "not a stored model (qvl serve opens no file a request "
                                                       "names)")
        job = Creation(base.model, base.projector, {**base.params, **params},
                       *(new if new is not None else old for new, old in
                         zip(texts, (base.template, base.system, base.license))), tuple(messages) or base.messages)
        entry = service.store.create(name, job.model, job.projector, job.template, job.params or None,
                                     job.license, system=job.system, messages=job.messages)
    except ModelfileError as e:
        raise RequestError(404 if "not a stored model" in str(e) else 400, str(e)) from None
    except StoreError as e:
        raise _store_error(e) from None
    if service.loaded is not None and service.loaded.key == str(entry.name):  # its defaults are the new ones
        service.loaded.params, service.loaded.system = stored_defaults(service.store, str(entry.name))
        service.loaded.model.defaults = {"messages": list(job.messages)} if job.messages else {}
    done = [{"status": "using existing layers"}, {"status": "writing manifest"}, {"status": "success"}]
    return Reply(done[-1]) if body.get("stream", True) is False else Reply(events=iter(done))


def _in_background(work: Callable[[Callable[[int, int], None]], None], status: str, first: str,
                   body: dict[str, Any]) -> Reply:
    """A transfer run in a thread of its own (I/O; a client that leaves does not stop it), its
    stream: `first`, then `status` with bytes done and total at most every PROGRESS_EVENT_S,
    then "success" (or the error, as the stream's last event)."""
    events: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVENT_S or done == total:
            last[0] = now
            events.put({"status": status, "total": total, "completed": done})

    def run() -> None:
        try:
            work(progress)
            events.put({"status": "success"})
        except BaseException as e:  # noqa: BLE001 - handed to the request's thread
            events.put(e)
        events.put(None)

    threading.Thread(target=run, name=f"qvl-{first.split()[0]}", daemon=True).start()

    def stream() -> Iterator[dict[str, Any]]:
        yield {"status": first}
        while (event := events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event

    if body.get("stream", True) is False:
        return Reply([e for e in stream()][-1])
    return Reply(events=stream())


def pull(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's pull: `qvl pull`'s sources (registries, hf.co/..., aliases, ollama://); the
    stream says "pulling NAME" with bytes done and total, then "success"."""
    from .sources import pull_any

    name = _named(body)
    insecure = bool(body.get("insecure", False))
    def work(progress: Callable[[int, int], None]) -> None:
        pull_any(name, service.store, insecure, progress)

    return _in_background(work, f"pulling {name}", "pulling manifest", body)


def push(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's push: a stored model to the registry its name says (host/namespace/model:tag),
    the blobs the registry has skipped, as `qvl push`."""
    from .registry import push as push_to

    name = _named(body)
    try:
        service.store.get(name)
    except StoreError as e:
        raise _store_error(e) from None
    insecure = bool(body.get("insecure", False))
    def work(progress: Callable[[int, int], None]) -> None:
        push_to(name, name, service.store, insecure)

    return _in_background(work, f"pushing {name}", "retrieving manifest", body)


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("POST", "/api/create"): create,
    ("POST", "/api/pull"): pull,
    ("POST", "/api/push"): push,
}
