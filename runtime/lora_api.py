"""`qvl serve`'s LoRA endpoints of llama.cpp's server: the model's run-time adapters (`qvl serve
MODEL --lora FILE`, --lora-scaled FILE:SCALE, a stored model's ADAPTER layers) listed, and the
scales they are applied at set while it stays loaded.

    GET  /lora-adapters   [{"id", "path", "scale", "task_name", "prompt_prefix"}, ...]
    POST /lora-adapters   [{"id": 0, "scale": 0.5}, ...] -> {"success": true}

POST sets the scales of every later request that gives none of its own; as llama.cpp's server,
an adapter the list leaves out is set to 0 (off). A request's own `lora` field, the same list on
POST /completion, /v1/completions and /v1/chat/completions, sets the scales for that request
alone (again an adapter it leaves out is off); any other request runs at the set scales. An id
the model has no adapter for is refused (400), where llama.cpp's server ignores it. `qvl serve
--lora-init-without-apply` starts --lora's adapters at 0. The model is the request's
`?model=NAME`, else the one given to qvl serve; the set scales stay with that model's name while
the server runs, through unloads. A cached prompt made under other adapters or scales is not
reused (prompt_cache.py), as llama.cpp's server clears its cache when a request's adapters differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .lora import LoraError
from .server import Reply, RequestError, Service

PATH = "/lora-adapters"
LIST_KEY = "adapters"  # POST's JSON array, as http_serve.py hands it over


def adapters(service: Service, body: dict[str, Any]) -> Reply:
    model = service.use(body.get("model")).model
    return Reply([{"id": i, "path": a.path, "scale": a.scale.value, "task_name": a.task_name,
                   "prompt_prefix": a.prompt_prefix} for i, a in enumerate(model.adapters.adapters)])


def set_adapters(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"))
    try:
        scales = loaded.model.adapters.asked(body.get(LIST_KEY), "request body")
    except LoraError as e:
        raise RequestError(400, str(e)) from None
    service.lora_scales[loaded.key] = scales
    loaded.model.adapters.set_scales(scales)
    return Reply({"success": True})


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", PATH): adapters,
    ("POST", PATH): set_adapters,
}
