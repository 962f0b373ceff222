"""Prompt reuse between generations: the KV cache a generation leaves behind serves the next one as
far as the two token sequences agree, as llama.cpp's server and Ollama do. A chat turn then reads
only what the conversation added (the last answer as text, the new question), not the whole
conversation and its pictures again.

Tokens are compared by identity: a text token by its id, an image or video token by what the
vision tower would see (a hash of its pixel patches and grid) and its place in that picture, so
that a different picture of the same size is not mistaken for the one in the cache. The reused
part stops before the last prompt token (its logits start the answer) and never inside a picture
(the part after it would need the picture's features: it is read again whole).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MAX_MEDIA = 256  # distinct pictures remembered by hash before the table starts again


@dataclass(frozen=True)
class MediaSpan:
    """A picture or video's run of pad tokens in a prompt."""

    start: int
    length: int
    video: bool
    pixels: np.ndarray
    grid_thw: tuple[int, int, int]


def media_digest(span: MediaSpan) -> bytes:
    """What the vision tower sees of a picture or video: a hash of its pixel patches and grid."""
    digest = hashlib.blake2b(np.ascontiguousarray(span.pixels).view(np.uint8).data,
                             digest_size=16, person=b"video" if span.video else b"image")
    digest.update(np.asarray(span.grid_thw, dtype=np.int64).tobytes())
    return digest.digest()


class PromptKeys:
    """Per-token identities of prompts, and the identities of what a kept cache holds."""

    def __init__(self) -> None:
        self._media: dict[bytes, int] = {}
        self.kept: list[int] = []  # identities of the kept cache's tokens, in order

    def _media_key(self, span: MediaSpan) -> int:
        return self._index(media_digest(span))

    def _index(self, key: bytes) -> int:
        """A picture's identity by its hash, a new one for a hash not seen before."""
        if key not in self._media:
            if len(self._media) >= MAX_MEDIA:
                self._media.clear()
                self.kept = []  # its media identities are gone with the table
            self._media[key] = len(self._media)
        return self._media[key]

    def keys(self, ids: list[int], media: list[MediaSpan], salt: int = 0) -> list[int]:
        """Token ids (>= 0) with each picture's pads replaced by its own negative identities:
        -(1 + 2**20 * picture + offset) for the pad at `offset` in the picture. A `salt` (run-time
        LoRA adapters' Adapters.salt: what else the keys and values depend on) is added to the text
        tokens' as salt * 2**32: a cache made under other adapters or scales is not reused, as
        llama.cpp's server clears its cache when a request's adapters differ."""
        out = [i + (salt << 32) for i in ids] if salt else list(ids)
        for span in media:
            base = 1 + (1 << 20) * self._media_key(span)
            out[span.start:span.start + span.length] = [-(base + i) for i in range(span.length)]
        return out

    def reusable(self, keys: list[int], media: list[MediaSpan], kept: list[int] | None = None) -> int:
        """How many leading tokens of a prompt with these keys the kept cache (or one holding `kept`)
        already holds, at most all but the prompt's last, never ending inside a picture."""
        kept = self.kept if kept is None else kept
        limit = min(len(keys) - 1, len(kept))
        n = 0
        while n < limit and keys[n] == kept[n]:
            n += 1
        for span in media:
            if span.start < n < span.start + span.length:
                n = span.start
        return n

    def export(self) -> tuple[list[int], list[str]]:
        """What the kept cache holds, apart from this table: its keys with each picture's identity
        made an index into the list of pictures' hashes (hex) returned beside them."""
        table = {index: key for key, index in self._media.items()}
        found: dict[int, int] = {}
        out = []
        for k in self.kept:
            if k < 0:
                index, offset = divmod(-k - 1, 1 << 20)
                local = found.setdefault(index, len(found))
                k = -(1 + (1 << 20) * local + offset)
            out.append(k)
        return out, [table[i].hex() for i in found]

    def adopt(self, keys: list[int], hashes: list[str]) -> None:
        """The kept cache holds `keys` of `export` with these pictures' hashes (from another process)."""
        if len(self._media) + len(hashes) > MAX_MEDIA:
            self._media.clear()  # the table starts again before, not among, these pictures
        self.kept = self.local(keys, hashes, register=True)

    def local(self, keys: list[int], hashes: list[str], register: bool = False) -> list[int]:
        """`export`'s keys with this table's identities; a picture the table has not seen gets one
        that no prompt's key has (unless `register`: then it is entered)."""
        indices = [self._index(bytes.fromhex(h)) if register else self._media.get(bytes.fromhex(h), MAX_MEDIA + j)
                   for j, h in enumerate(hashes)]
        out = []
        for k in keys:
            if k < 0:
                local, offset = divmod(-k - 1, 1 << 20)
                k = -(1 + (1 << 20) * indices[local] + offset)
            out.append(k)
        return out
