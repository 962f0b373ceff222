"""`qvl serve`'s blob endpoints, Ollama's: HEAD /api/blobs/DIGEST (200 where the store has that
blob, else 404) and POST /api/blobs/DIGEST (the request's body, streamed into the store and kept
only where it hashes to DIGEST: 201, or 200 where the blob was there already). `ollama create`
and ollama-python's `create_blob` send a GGUF this way before an /api/create whose `files` name
it. The body comes with a Content-Length or chunked (Go's client sends a file chunked); it is
read in pieces, never held whole."""

from __future__ import annotations

from collections.abc import Iterator
from email.message import Message
from typing import BinaryIO

from .server import RequestError
from .store import Store, StoreError

PREFIX = "/api/blobs/"
PIECE = 1 << 20  # bytes read from the socket at a time


def digest_of(path: str) -> str:
    """The digest an /api/blobs/ path names ("sha256:<hex>"; Ollama also takes "sha256-<hex>")."""
    digest = path.removeprefix(PREFIX)
    return "sha256:" + digest[7:] if digest.startswith("sha256-") else digest


def body_pieces(headers: Message, rfile: BinaryIO) -> Iterator[bytes]:
    """A request body in pieces: Content-Length bytes, or the chunks of a chunked body. A body
    that ends early (the client went away) is a RequestError, so nothing of it is kept."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        yield from _chunked(rfile)
        return
    length = headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
        raise RequestError(411, "a blob is sent with a Content-Length or chunked")
    left = int(length)
    while left:
        piece = rfile.read(min(PIECE, left))
        if not piece:
            raise RequestError(400, f"blob body ended {left} bytes short of its Content-Length")
        left -= len(piece)
        yield piece


def _chunked(rfile: BinaryIO) -> Iterator[bytes]:
    """HTTP/1.1 chunked transfer coding: hex size lines (extensions after ';' ignored), each
    chunk then CRLF; size 0 ends it, after any trailer lines."""
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise RequestError(400, f"chunked body: bad chunk size line {line[:40]!r}") from None
        if size == 0:
            while rfile.readline(1024).strip():
                pass  # trailers
            return
        while size:
            piece = rfile.read(min(PIECE, size))
            if not piece:
                raise RequestError(400, "chunked body ended inside a chunk")
            size -= len(piece)
            yield piece
        if rfile.readline(4).strip():
            raise RequestError(400, "chunked body: a chunk not followed by CRLF")


def head(store: Store, path: str) -> int:
    """HEAD /api/blobs/DIGEST: 200 where the store has it, else a 404 RequestError."""
    digest = digest_of(path)
    try:
        there = store.has_blob(digest)
    except StoreError as e:
        raise RequestError(400, str(e)) from None
    if not there:
        raise RequestError(404, f"blob {digest!r} not found")
    return 200


def upload(store: Store, path: str, headers: Message, rfile: BinaryIO) -> int:
    """POST /api/blobs/DIGEST: 201 once the body, hashed to DIGEST, is in the store; 200 where
    it was there already (the body is read and dropped); 400 for a body of another digest."""
    digest = digest_of(path)
    try:
        if store.has_blob(digest):
            for _ in body_pieces(headers, rfile):
                pass
            return 200
        store.receive_blob(digest, body_pieces(headers, rfile))
    except StoreError as e:
        raise RequestError(400, str(e)) from None
    return 201
