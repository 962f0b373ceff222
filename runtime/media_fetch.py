"""A request's picture or video given by URL, as llama-server takes them: an http(s) URL fetched
(at most FETCH_MAX_BYTES, FETCH_TIMEOUT_S without a byte, FETCH_TOTAL_S in all; `qvl serve --no-remote-media` refuses
them instead), a file:// URL read from the folder `qvl serve --media-path DIR` names (a path
relative to it, never out of it; refused without the option), as llama-server's --media-path."""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

FETCH_MAX_BYTES = 10 * 1024 * 1024  # llama-server's limit on a downloaded picture
FETCH_TIMEOUT_S = 10.0  # llama-server's: the longest wait for a byte
FETCH_TOTAL_S = 60.0  # the longest a fetch takes in all
CHUNK = 1 << 16
USER_AGENT = "qvl-serve"


@dataclass(frozen=True)
class MediaAccess:
    """Where a request's media may come from besides its own bytes."""

    remote: bool = True  # http(s) URLs fetched (llama-server's default); False: refused
    media_path: Path | None = None  # file:// URLs read below this folder; None: refused


NO_ACCESS = MediaAccess(remote=False)  # the request's own bytes only (base64, data: URLs)


def is_remote(data: str) -> bool:
    return data.startswith(("http://", "https://"))


def is_url(data: str) -> bool:
    return is_remote(data) or data.startswith("file:")


def url_bytes(url: str, where: str, error: type[ValueError], access: MediaAccess,
              limit: int | None = None) -> bytes:
    """The bytes an http(s) or file:// URL names, as `access` allows, an http(s) one at most
    `limit` bytes (None: FETCH_MAX_BYTES); `error` (ImageError, VideoError) names `where` and the URL."""
    shown = url if len(url) <= 120 else url[:117] + "..."
    if url.startswith("file:"):
        return _local(url, shown, where, error, access.media_path)
    if not access.remote:
        raise error(f"{where}: {shown}: this qvl serve fetches no URLs (--no-remote-media); send the file inline "
                    "(base64 or a data: URL)")
    return _fetch(url, shown, where, error, FETCH_MAX_BYTES if limit is None else limit)


def _fetch(url: str, shown: str, where: str, error: type[ValueError], most: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    limit = f"{most / 2**20:g} MiB"
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as reply:
            length = reply.headers.get("Content-Length") or ""
            said_too_big = length.isdigit() and int(length) > most  # such a file is not read
            data = b"" if said_too_big else _read(reply, most + 1, FETCH_TOTAL_S)
    except urllib.error.HTTPError as e:
        raise error(f"{where}: fetching {shown}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise error(f"{where}: fetching {shown}: {e.reason}") from None
    except _TooSlow:
        raise error(f"{where}: fetching {shown}: not all there after {FETCH_TOTAL_S:g} s") from None
    except TimeoutError:
        raise error(f"{where}: fetching {shown}: no reply in {FETCH_TIMEOUT_S:g} s") from None
    except (OSError, ValueError) as e:  # a reset connection, a malformed URL
        raise error(f"{where}: fetching {shown}: {e}") from None
    if said_too_big or len(data) > most:
        raise error(f"{where}: {shown} is over the {limit} a fetched file may be")
    return data


class _TooSlow(Exception):
    """A fetch past FETCH_TOTAL_S."""


def _read(reply: Any, most: int, total_s: float) -> bytes:
    """Up to `most` bytes of `reply`, a piece at a time, within `total_s` seconds in all (a server
    sending a byte now and then holds a request no longer than that)."""
    deadline, parts, size = time.monotonic() + total_s, [], 0
    while size < most and (piece := reply.read1(min(CHUNK, most - size))):  # what has come, not a full CHUNK
        parts.append(piece)
        size += len(piece)
        if time.monotonic() > deadline:
            raise _TooSlow
    return b"".join(parts)


def _local(url: str, shown: str, where: str, error: type[ValueError], folder: Path | None) -> bytes:
    if folder is None:
        raise error(f"{where}: {shown}: file:// URLs are read only with qvl serve --media-path DIR")
    relative = urllib.parse.unquote(url[len("file://"):] if url.startswith("file://") else url[len("file:"):])
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith(("/", "\\")) or ".." in parts or "\\" in relative or ":" in relative:
        raise error(f"{where}: {shown}: a path relative to --media-path, without '..'")
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):  # a link out of the folder
        raise error(f"{where}: {shown}: outside --media-path")
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{where}: {shown}: {e.strerror}") from None
