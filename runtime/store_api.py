"""`qvl serve`'s store endpoints: /api/create (from stored models, uploaded GGUF blobs or an
uploaded checkpoint, quantized or not), /api/pull and /api/push (registries); the long ones
(a transfer, a conversion) in a thread of their own, their progress streamed."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .gguf_file import GGUFError
from .modelfile import Creation, Modelfile, ModelfileError, check_params, parse, resolve, stored_defaults
from .server import Reply, RequestError, Service, _named, _store_error
from .store import ModelName, StoreError

PROGRESS_EVENT_S = 0.2  # a transfer's progress events come at most this often


def create(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's create: `from` a stored model, or `files` ({file name: digest} of GGUF blobs sent
    first to /api/blobs/, a `clip` one the projector), with `system`, `template`, `license`,
    `parameters` and `messages`; or the older `modelfile` text, whose FROMs are stored models or
    @sha256:... blobs. The server opens no file a request names (`qvl create NAME -f Modelfile`
    on its machine does)."""
    from ..convert.errors import ConvertError
    from ..convert.for_store import is_checkpoint
    from ..convert.requantize import Quantization

    name = _named(body)
    adapters = body.get("adapters") or {}
    if not isinstance(adapters, dict) or not all(isinstance(d, str) for d in adapters.values()):
        raise RequestError(400, "adapters: {file name: sha256 digest of a LoRA adapter GGUF sent to /api/blobs/}")
    kind = body.get("quantize") or None
    if kind is not None and not isinstance(kind, str):
        raise RequestError(400, "quantize: a type name such as q4_K_M, q4_K_S or q8_0")
    try:
        ModelName.parse(name)
        files = body.get("files")
        if "modelfile" not in body and isinstance(files, dict) and is_checkpoint(list(files)):
            try:
                return _convert_uploads(service, name, body, kind)
            except ConvertError as e:
                raise RequestError(400, f"files: {e}") from None
        mf = parse(body["modelfile"]) if isinstance(body.get("modelfile"), str) else _asked(body)
        lora = tuple(_adapter_blob(service, a) for a in (*mf.adapters, *("@" + d for d in adapters.values())))
        job = resolve(Modelfile(tuple(_source(service, s) for s in mf.sources), mf.params, mf.template, mf.system,
                                mf.license, mf.messages, lora), service.store.blobs, service.store)
        if kind is not None:  # planned here (a refusal is the request's 400), written in a thread of its own
            quantization = Quantization(service.store, job, kind)

            def work(progress: Callable[[int, int], None]) -> None:
                try:
                    model, projector = quantization.run(progress)
                    _store(service, name, replace(job, model=model, projector=projector))
                finally:
                    quantization.close()

            return _in_background(work, f"quantizing {quantization.source_type} model to {kind.upper()}",
                                  "parsing GGUF", body)
        _store(service, name, job)
    except ModelfileError as e:
        raise RequestError(404 if "not a stored model" in str(e) else 400, str(e)) from None
    except GGUFError as e:
        raise RequestError(400, f"files: {e} (qvl serve creates from GGUF files; qvl convert makes them)") from None
    except ConvertError as e:
        raise RequestError(400, f"quantize: {e}") from None
    except StoreError as e:
        raise _store_error(e) from None
    done = [{"status": "using existing layers"}, {"status": "writing manifest"}, {"status": "success"}]
    return Reply(done[-1]) if body.get("stream", True) is False else Reply(events=iter(done))


def _convert_uploads(service: Service, name: str, body: dict[str, Any], kind: str | None) -> Reply:
    """/api/create from a checkpoint's files (as `ollama create` sends a safetensors folder):
    converted as qvl-convert does (f16, or `quantize`'s type), in a thread of its own, then stored."""
    from ..convert.for_store import Conversion, checked_name

    asked = _asked(body)  # the defaults it is stored with; its FROMs are the files' digests
    blobs = {file: Path(_source(service, "@" + digest)) for file, digest in body["files"].items()}
    conversion = Conversion.of_uploads(service.store, blobs, checked_name(name), kind)

    def work(progress: Callable[[int, int], None]) -> None:
        try:
            model, projector = conversion.run(progress)
            _store(service, name, Creation(model, projector, asked.params, asked.template, asked.system,
                                           asked.license, asked.messages))
        finally:
            conversion.close()

    return _in_background(work, "converting model", "parsing checkpoint", body)


def _store(service: Service, name: str, job: Creation) -> None:
    """Store `job` as `name`; a loaded model of that name takes its new defaults."""
    entry = service.store.create(name, job.model, job.projector, job.template, job.params or None,
                                 job.license, system=job.system, messages=job.messages, adapters=job.adapters)
    if service.loaded is not None and service.loaded.key == str(entry.name):  # its defaults are the new ones
        service.loaded.params, service.loaded.system = stored_defaults(service.store, str(entry.name))
        service.loaded.model.defaults = {"messages": list(job.messages)} if job.messages else {}


def _asked(body: dict[str, Any]) -> Modelfile:
    """The Modelfile a JSON create request stands for: FROM its `from` or its `files`' blobs."""
    files, source = body.get("files"), body.get("from")
    if files and source:
        raise RequestError(400, "from or files: one of them, not both")
    if files:
        if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
            raise RequestError(400, "files: {file name: sha256 digest of a blob sent to /api/blobs/}")
        sources = tuple("@" + d for d in files.values())
    elif isinstance(source, str) and source:
        sources = (source,)
    else:
        raise RequestError(400, "from: the stored model to create from (or files, or modelfile)")
    options = body.get("parameters") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "parameters: a JSON object")
    license_text = body.get("license")
    if isinstance(license_text, list):
        license_text = "\n".join(str(t) for t in license_text)
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages):
        raise RequestError(400, "messages: a list of {role: system, user or assistant, content: text}")
    texts = (t if isinstance(t, str) else None for t in (body.get("template"), body.get("system"), license_text))
    return Modelfile(sources, check_params(options, strict=True), *texts,
                     tuple({"role": m["role"], "content": m["content"]} for m in messages))


def _source(service: Service, source: str) -> str:
    """A FROM of a served create as modelfile.resolve takes it: a @sha256:... blob as its path
    in the store, a stored model's name as it is; any other (a path) is refused unopened."""
    if source.startswith("@"):
        digest = source[1:]
        try:
            there = service.store.has_blob(digest)
        except StoreError as e:
            raise RequestError(400, f"files: {e}") from None
        if not there:
            raise RequestError(400, f"files: blob {digest!r} not in the store; send it first "
                                    f"(POST /api/blobs/{digest})")
        return str(service.store.blob_path(digest))
    try:
        service.store.get(source)
    except StoreError:
        raise ModelfileError(f"FROM {source}: not a stored model (qvl serve opens no file a request names)") from None
    return source


def _adapter_blob(service: Service, adapter: str) -> str:
    """An ADAPTER of a served create: a @sha256:... blob sent first (a LoRA adapter GGUF), as its path."""
    if not adapter.startswith("@"):
        raise ModelfileError(f"ADAPTER {adapter}: a blob sent to /api/blobs/ (qvl serve opens no file a request "
                             "names)")
    return _source(service, adapter)


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
