"""Other conversations' KV caches, kept aside in host memory for `qvl serve` (`--cache-pool GB`).

A model keeps one cache: the last generation's (prompt_cache.py). When two clients, or two chats
of one client, take turns, each turn would read the other conversation's pictures and text
again from the start: on a CPU a picture costs tens of seconds. Here, before a generation, the
prompt is compared with the kept cache and with the caches set aside (as prompt_cache.py
compares: tokens by id, pictures by their pixels): the one holding the longest start of the
prompt is used, and the kept cache, when the generation would cut at least MIN_LOST of its
tokens (another conversation's), is copied aside first, the least recently used ones going
when the pool's bytes pass its budget. The copies are exact (the cache's own values, float32 for
16-bit ones), so an answer is the one the conversation's own kept cache would have given.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoder import KVCache
from .kv_file import let_go, parts
from .prompt_cache import MediaSpan, PromptKeys

MIN_LOST = 32  # tokens a generation would cut from the kept cache for it to be copied aside first


@dataclass
class _Entry:
    cache: KVCache  # in host memory, holding len(keys) tokens
    keys: list[int]  # PromptKeys.export's
    hashes: list[str]
    nbytes: int


def _nbytes(cache: KVCache) -> int:
    return sum(p.nbytes for s in cache.k + cache.v for p in parts(s))


class CachePool:
    """Caches set aside, the most recently used last, in at most `max_bytes` of host memory."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: list[_Entry] = []

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def before(self, model, table: PromptKeys, keys: list[int], media: list[MediaSpan], reuse: int) -> int:
        """Before `model` generates from a prompt with `keys` (its `table`'s identities), of which
        its kept cache holds `reuse` tokens: the kept cache copied aside if the generation would
        cut MIN_LOST or more of its tokens, and the pool's cache holding more of the prompt made
        the kept one. Returns the tokens the kept cache now holds of the prompt."""
        best, best_n = None, reuse
        for i, e in enumerate(self.entries):
            n = table.reusable(keys, media, table.local(e.keys, e.hashes))
            if n > best_n:
                best, best_n = i, n
        chosen = self.entries.pop(best) if best is not None else None
        cache, kept, hashes = model.kept_prompt()
        held = min(len(kept), cache.length) if cache is not None else 0
        if cache is not None and held - (0 if chosen is not None else reuse) >= MIN_LOST:
            copy = KVCache(model.cfg, held, None, model.placement.kv_type)
            copy.take_prefix(cache, held)
            self._add(_Entry(copy, kept[:held], hashes, _nbytes(copy)), table)
        if chosen is None:
            return reuse
        e = chosen
        del cache
        let_go(model)  # its cache goes before the chosen one takes device memory
        restored = model.decoder.new_cache(len(e.keys), model.placement.kv_type)
        restored.take_prefix(e.cache, len(e.keys))
        model.keep_prompt(restored, e.keys, e.hashes)
        return best_n

    def _add(self, entry: _Entry, table: PromptKeys) -> None:
        """Set `entry` aside, dropping the ones it holds the whole of, then the oldest past the budget."""
        mine = table.local(entry.keys, entry.hashes)
        self.entries = [e for e in self.entries
                        if not _starts(mine, table.local(e.keys, e.hashes))]
        self.entries.append(entry)
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.pop(0)


def _starts(longer: list[int], shorter: list[int]) -> bool:
    return len(shorter) <= len(longer) and longer[:len(shorter)] == shorter
