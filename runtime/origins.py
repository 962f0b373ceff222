"""Which web pages may call `qvl serve`, and by which names, as Ollama's server decides.

A browser sends any page's requests to a server on the user's own machine, and a request with a
text/plain body needs no CORS preflight; so a page from anywhere could pull, create or delete
models, or run them, through qvl serve. As Ollama's server does:
- a request whose `Origin` is not allowed is refused (403), and allowed origins get CORS headers
  (a preflight's OPTIONS is answered): pages of localhost, 127.0.0.1 and 0.0.0.0 (http or https,
  any port), the app://, file://, tauri://, vscode-webview:// and vscode-file:// schemes, browser
  extensions, and what `qvl serve --origins` / $QVL_ORIGINS add (comma-separated; each `*` in a
  pattern stands for any text, a last `:*` for any port; `*` alone: every origin);
- listening on a loopback address, a request must name the server by an IP address of this
  machine's kind (loopback, private, unspecified), localhost, a *.localhost / *.local /
  *.internal name or this machine's host name (a DNS-rebinding page names its own host).
"""

from __future__ import annotations

import ipaddress
import re
import socket

DEFAULT_ORIGINS = tuple(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
                        for scheme in ("http", "https") for port in ("", ":*")) + (
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
EXTENSIONS = ("chrome-extension://", "moz-extension://", "safari-web-extension://", "ms-browser-extension://")
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
PREFLIGHT_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
                     "Access-Control-Max-Age": "43200"}


def parse_origins(text: str | None) -> tuple[str, ...]:
    """--origins / $QVL_ORIGINS: comma-separated origins, quotes and spaces trimmed."""
    return tuple(p for p in (o.strip().strip("'\"").strip() for o in (text or "").split(",")) if p)


def _matches(origin: str, pattern: str) -> bool:
    """`pattern` with each `*` any text, but a last `:*` a port (digits)."""
    if "*" not in pattern:
        return origin == pattern
    port = pattern.endswith(":*")
    body = pattern[:-2] if port else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*")) + (r":\d+" if port else "")
    return re.fullmatch(regex, origin) is not None


def origin_allowed(origin: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a page of `origin` may call the server (`extra`: --origins' patterns)."""
    origin = origin.strip().lower()
    if "*" in extra or origin.startswith(EXTENSIONS):
        return True
    return any(_matches(origin, p.lower()) for p in DEFAULT_ORIGINS + extra)


def host_allowed(host: str | None, loopback: bool) -> bool:
    """Whether a request's Host header names this server, for a server listening on a loopback
    address (`loopback`; on other addresses any name is allowed)."""
    if not loopback or not host:
        return True
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        name = name.rstrip(".")
        return name == "localhost" or name == socket.gethostname().lower() or name.endswith(LOCAL_SUFFIXES)
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
