"""`qvl ps` and `qvl stop`: asking a running `qvl serve` (or Ollama) over its HTTP API."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from . import api_keys

DEFAULT_HOST = "127.0.0.1:11434"
TIMEOUT_S = 10


class ClientError(RuntimeError):
    """No server there, or its answer was an error; one line."""


def server_url(host: str | None) -> str:
    """`host` (or $QVL_HOST, else Ollama's 127.0.0.1:11434) as a base URL; "0.0.0.0" (listening
    on every interface) is asked on the loopback address."""
    host = (host or os.environ.get("QVL_HOST") or DEFAULT_HOST).rstrip("/")
    if "://" not in host:
        host = "http://" + host
    scheme, _, rest = host.partition("://")
    address, slash, path = rest.partition("/")
    if address.startswith("0.0.0.0"):
        address = "127.0.0.1" + address[len("0.0.0.0"):]
    if ":" not in address.rsplit("]", 1)[-1]:
        address += ":11434"
    return f"{scheme}://{address}{slash}{path}"


def listen_address(value: str) -> tuple[str, int]:
    """$QVL_HOST as `qvl serve` binds it, as ollama serve reads $OLLAMA_HOST: [http://]HOST[:PORT]
    ([::1]:PORT for IPv6), port 11434 unless given (ValueError for a port that is not a number)."""
    rest = value.split("://", 1)[-1].split("/", 1)[0]
    host, colon, port = rest.rpartition(":")
    if not colon or "]" in port:  # no port, or a bracketed IPv6 address without one
        host, port = rest, ""
    return host.strip("[]") or "127.0.0.1", int(port) if port else int(DEFAULT_HOST.rsplit(":", 1)[1])


def ask(base: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON answer to GET `path` (or a POST of `body`)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(api_keys.ENV):  # a server started with --api-key
        headers["Authorization"] = f"Bearer {key.split(',')[0].strip()}"
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error") or e.reason
        except (json.JSONDecodeError, AttributeError):
            message = e.reason
        raise ClientError(f"{base}{path}: {e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise ClientError(f"no server at {base} ({why}); start one with qvl serve") from None
    except json.JSONDecodeError:
        raise ClientError(f"{base}{path}: the answer is not JSON (is that a qvl or Ollama server?)") from None


def processor(size: int, size_vram: int) -> str:
    """Ollama's PROCESSOR column: where the model's bytes are."""
    if size_vram <= 0:
        return "100% CPU"
    if size <= 0 or size_vram >= size:
        return "100% GPU"
    gpu = round(100 * size_vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"
