"""llama.cpp's `--spec-type ngram-map-k` and `ngram-map-k4v`: drafts from n-grams met before, with
what each key's drafts taught (common/ngram-map.cpp's common_ngram_map, ported as it is).

A key is the last `n` tokens (the sampled one last). Its last occurrence is found through a hash
table of 262,144 slots (the first n-gram to reach a slot keeps it; a hit is checked token by
token) or, failing that, by searching the prompt and then the answer backwards. A key found gets
an entry in a list of keys, kept from one answer to the next (llama-server's per slot; qvl's per
model), and the draft is what followed the match, `m` tokens, but no more than the key's last
draft had taken (llama.cpp's n_accepted: a key whose drafts are refused drafts less).

ngram-map-k (`key_only`) drafts at once. ngram-map-k4v waits for `min_hits` sightings of the key,
counts up to four different m-grams that followed its occurrences, and drafts only when one of
them occurred at least twice as often as the others together (the tokens drafted are still those
after the last match, as in llama.cpp). Indices into the token history are kept across answers,
as llama.cpp keeps them: an answer whose prompt is shorter than the last history drops the keys
and hashes past its new start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ngram_mod import window_hashes

HASH_SLOTS = 262144  # COMMON_NGRAM_HASH_MAP_SIZE, a power of two: the hash's low 18 bits
LCG_FACTOR = 2654435761  # hash = hash * LCG_FACTOR + token, in 32 bits
MAX_VALUES = 4  # COMMON_NGRAM_MAX_VALUES
MAX_COUNT = 16380  # COMMON_NGRAM_MAX_VALUE_COUNT


@dataclass
class Value:
    """An m-gram seen after a key: where it starts, how often, what its last draft had taken."""

    idx: int = 0  # 0: unused
    num: int = 0
    n_accepted: int = -1


@dataclass
class Key:
    key_idx: int
    stat_idx: int = 0  # the occurrences before this index are counted in values
    key_num: int = 0
    values: list[Value] = field(default_factory=list)


def _windows_equal(tokens: np.ndarray, starts: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    if not len(starts):
        return np.zeros(0, bool)
    return (tokens[starts[:, None] + np.arange(len(pattern))] == pattern).all(axis=1)


def last_match(tokens: np.ndarray, lo: int, hi: int, pattern: np.ndarray) -> int:
    """The largest j with lo < j <= hi where `pattern` starts, or 0 (ngram-simple's search too)."""
    if hi <= lo:
        return 0
    starts = np.flatnonzero(tokens[lo + 1:hi + 1] == pattern[0]) + lo + 1  # the windows worth comparing
    found = starts[_windows_equal(tokens, starts, pattern)]
    return int(found[-1]) if len(found) else 0


class NgramMap:
    """The state of one model's ngram-map-k (key_only) or ngram-map-k4v drafting."""

    def __init__(self, n: int, m: int, key_only: bool, min_hits: int):
        self.n, self.m, self.key_only, self.min_hits = n, m, key_only, min_hits
        self.keys: list[Key] = []
        self.key_map = np.zeros(HASH_SLOTS, np.int64)  # slot -> the index of an n-gram (0: empty)
        self.key_map_last_idx = 0  # the n-grams starting after it are not hashed yet
        self.size_last_begin = 0  # the prompt's length at this answer's start
        self.idx_last_check = 0  # the history's length at the last begin or draft
        self.last_draft: tuple[int, int] | None = None  # (key, value) of the last draft made

    def _hashes(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return window_hashes(tokens, starts, self.n, LCG_FACTOR, HASH_SLOTS)  # of the 32-bit hash
    def begin(self, tokens: np.ndarray) -> None:
        """An answer begins after `tokens`: entries past a history that got shorter are dropped."""
        size_begin = len(tokens)
        cleanup = self.size_last_begin
        if cleanup > size_begin:
            cleanup = size_begin - self.n - self.m if size_begin > self.n + self.m else 0
        if size_begin < self.idx_last_check:
            self.key_map[(self.key_map != 0) & (self.key_map >= cleanup)] = 0
            self.key_map_last_idx = cleanup - 1 if cleanup > 0 else 0
            kept = []
            for key in self.keys:
                if key.key_idx >= cleanup:
                    continue
                if not self.key_only:
                    for j in range(MAX_VALUES - 1, -1, -1):
                        if key.values[j].idx != 0 and key.values[j].idx >= cleanup:
                            key.values[j:] = [Value(v.idx, v.num, v.n_accepted) for v in key.values[j + 1:]] + [
                                Value(0, 0, key.values[-1].n_accepted)]
                    if key.values[0].idx == 0:
                        continue
                kept.append(key)
            self.keys = kept
        self.idx_last_check = self.size_last_begin = size_begin

    def _add_hashes(self, tokens: np.ndarray, lo: int, hi: int) -> None:
        """The n-grams at hi, hi-1, ... down to lo+1 each take their slot if it is empty."""
        if hi <= lo:
            return
        starts = np.arange(hi, lo, -1)
        slots = self._hashes(tokens, starts)
        slots, first = np.unique(slots, return_index=True)  # the first (largest j) to reach a slot
        empty = self.key_map[slots] == 0
        self.key_map[slots[empty]] = starts[first][empty]

    def draft(self, tokens: np.ndarray, sampled: int) -> list[int]:
        """The draft after `tokens` (the history before `sampled`) and `sampled`."""
        self.last_draft = None
        cur, n, m = len(tokens), self.n, self.m
        if cur < 2 * n + m:
            return []
        self.idx_last_check = cur
        key = np.append(tokens[cur - n + 1:], sampled)
        top = cur - n - m - 1  # the latest start searched
        match = 0
        at = int(self.key_map[int(self._hashes(key, np.zeros(1, np.int64))[0])])
        if at != 0 and at < top and (tokens[at:at + n] == key).all():
            match = at
        early = self.size_last_begin - n - m - 1  # the prompt's part
        if match == 0 and self.size_last_begin > n + m + 1:
            match = last_match(tokens, self.key_map_last_idx, early, key)
        if match == 0:
            match = last_match(tokens, max(self.size_last_begin, self.key_map_last_idx), top, key)
        if self.size_last_begin > n + m + 1:
            self._add_hashes(tokens, self.key_map_last_idx, early)
        self._add_hashes(tokens, max(self.size_last_begin, self.key_map_last_idx), top)
        self.key_map_last_idx = max(top, self.key_map_last_idx)
        if match == 0:
            return []
        offset = next((i for i, k in enumerate(self.keys) if (tokens[k.key_idx:k.key_idx + n] == key).all()), None)
        if offset is None:
            offset = len(self.keys)
            self.keys.append(Key(match, values=[Value(0, 0, m) for _ in range(MAX_VALUES)]))
        entry = self.keys[offset]
        entry.key_num = min(entry.key_num + 1, MAX_COUNT)
        if self.key_only:
            self.last_draft = (offset, 0)
            return [int(t) for t in tokens[match + n:match + n + min(m, entry.values[0].n_accepted)]]
        if entry.key_num < self.min_hits:
            return []
        starts = np.arange(entry.stat_idx, match + 1)
        for i in starts[_windows_equal(tokens, starts, key)]:
            begin = int(i) + n
            for v, value in enumerate(entry.values):
                if value.idx == 0:
                    entry.values[v] = value = Value(begin, 0, m)
                elif not (tokens[begin:begin + m] == tokens[value.idx:value.idx + m]).all():
                    continue
                value.num = min(value.num + 1, MAX_COUNT)
                break
        entry.stat_idx = match
        nums = [v.num for v in entry.values]
        best = int(np.argmax(nums))  # the first of the most frequent (the first slot when none counted)
        others = sum(nums) - nums[best]
        if others > 0 and nums[best] < 2 * others:
            return []
        self.last_draft = (offset, best)
        return [int(t) for t in tokens[match + n:match + n + min(m, entry.values[best].n_accepted)]]

    def accept(self, n_accepted: int) -> None:
        """The last draft's first `n_accepted` tokens were taken: the next draft of its key is no longer."""
        if self.last_draft is not None:
            key, value = self.last_draft
            self.keys[key].values[value].n_accepted = n_accepted
