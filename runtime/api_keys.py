"""`qvl serve --api-key KEY` (or $QVL_API_KEY, or --api-key-file): every request but the health
checks, Ollama's "is it running" probe and CORS preflights must carry one of the keys, as
llama-server's --api-key asks: `Authorization: Bearer KEY` (OpenAI's SDKs) or `X-Api-Key: KEY`
(Anthropic's); without, 401 and llama-server's error body. No key given: no check. `qvl ps` and
`qvl stop` send $QVL_API_KEY."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

ENV = "QVL_API_KEY"
PUBLIC = frozenset({"/", "/health", "/v1/health"})  # llama-server's public endpoints, and Ollama's probe
UNAUTHORIZED = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}


class KeyFileError(ValueError):
    """An --api-key-file that cannot be read; one line naming it."""


def server_keys(given: str | None, file: Path | None) -> tuple[str, ...]:
    """The keys: `given` comma-separated (--api-key or $QVL_API_KEY), and the lines of `file` that
    are not empty or comments (#), as llama-server reads --api-key-file."""
    keys = [k.strip() for k in (given or "").split(",") if k.strip()]
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"--api-key-file {file}: {getattr(e, 'strerror', None) or 'not text'}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def allowed(keys: tuple[str, ...], path: str, headers: Mapping[str, str]) -> bool:
    """Whether a request for `path` with `headers` may be answered (compared in constant time)."""
    if not keys or path in PUBLIC:
        return True
    given = headers.get("Authorization") or headers.get("X-Api-Key") or ""
    given = given.removeprefix("Bearer ").strip()
    return any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)
