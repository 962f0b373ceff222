"""`qvl serve`'s slot endpoints of llama.cpp's server: the loaded model's KV cache (its one slot,
0) saved to a file, restored from one, or erased, so that a long prompt (a page's picture, a
system prompt) read once can be taken up again after a restart or another conversation.

    GET  /slots                              [{"id": 0, "n_ctx", "is_processing", ...}]
    POST /slots/0?action=save     {"filename"} -> {"id_slot", "filename", "n_saved", "n_written", "timings"}
    POST /slots/0?action=restore  {"filename"} -> {"id_slot", "filename", "n_restored", "n_read", "timings"}
    POST /slots/0?action=erase                 -> {"id_slot", "n_erased"}

The slot is the loaded model's cache (or the request's `model`'s). Files are kv_file.py's (as
`qvl-run --prompt-cache` writes), in `qvl serve --slot-save-path DIR`, named by a plain file name
(no folders); without that option save and restore answer 501, as llama.cpp's server does. A
file made with another model or other settings is refused (400, naming why), not used.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from . import kv_file
from .server import Reply, RequestError, Service

PREFIX = "/slots/"  # POST /slots/ID?action=...: http_serve.py routes it here
_NAME = re.compile(r"[\w][\w.\-]{0,254}")


def slots(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.loaded
    ctx = service.config.ctx_size or (loaded.model.cfg.context_length if loaded is not None else 0)
    speculative = service.config.speculation is not None  # --spec-type: llama-server's can_speculate()
    return Reply([{"id": 0, "id_task": -1, "n_ctx": ctx, "speculative": speculative, "is_processing": False}])


def _file(service: Service, body: dict[str, Any]) -> tuple[str, Path]:
    folder = service.config.slot_save_path
    if folder is None:
        raise RequestError(501, "slot save and restore: start qvl serve with --slot-save-path DIR")
    name = body.get("filename")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise RequestError(400, "filename: a plain file name (letters, digits, _ . -; no folders)")
    return name, Path(folder) / name


def slot_action(service: Service, body: dict[str, Any]) -> Reply:
    """POST /slots/ID?action=save|restore|erase (body's `id_slot` and `action` come from the path and query)."""
    if body.get("id_slot") != "0":
        raise RequestError(400, f"slot {body.get('id_slot')!r}: qvl serve has one slot, 0")
    action = body.get("action")
    if action not in ("save", "restore", "erase"):
        raise RequestError(400, "action: save, restore or erase (?action=...)")
    loaded = service.loaded  # the model loaded now, unless the request names one
    model = service.use(body.get("model") or (loaded.key if loaded is not None else None)).model
    if action == "erase":
        _, kept, _ = model.kept_prompt()
        kv_file.let_go(model)
        return Reply({"id_slot": 0, "n_erased": len(kept)})
    name, path = _file(service, body)
    t0 = time.perf_counter()
    if action == "save":
        try:
            n = kv_file.save(model, path)
        except OSError as e:
            raise RequestError(500, f"{name}: cannot write it ({e.strerror or e})") from None
        return Reply({"id_slot": 0, "filename": name, "n_saved": n, "n_written": path.stat().st_size if n else 0,
                      "timings": {"save_ms": round((time.perf_counter() - t0) * 1e3, 3)}})
    if not path.is_file():
        raise RequestError(400, f"{name}: no such file in --slot-save-path")
    n, why = kv_file.restore(model, path)
    if why is not None:
        raise RequestError(400, why.replace(str(path), name))
    return Reply({"id_slot": 0, "filename": name, "n_restored": n, "n_read": path.stat().st_size,
                  "timings": {"restore_ms": round((time.perf_counter() - t0) * 1e3, 3)}})


ROUTES = {("GET", "/slots"): slots}
