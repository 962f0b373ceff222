"""llama.cpp's `--spec-type ngram-mod`: drafts from a hashed table of what followed each n-gram.

A table of 4,194,304 slots (16 MB, as common_ngram_mod's): each `n_match`-token n-gram of the text
is hashed to a slot, which keeps the token that last followed it (a later n-gram with the same hash
overwrites it; nothing checks the n-gram on reading, so a collision drafts a wrong token, which the
model then refuses). A draft is a chain: the last n_match tokens (the sampled one last) give the next
token, which with the n_match - 1 before it gives the one after, and so on, up to `n_max` tokens; a
slot found empty ends the chain, and the whole draft is dropped when it ends before `n_min`.

What qvl keeps as llama.cpp's common_speculative_impl_ngram_mod keeps it: the prompt's n-grams go in
when an answer begins, the answer's in chunks (when more than 32 new tokens wait), the table lasts
from one answer to the next (llama-server's serves every request: an answer can draft from what an
earlier request said), and is emptied when more than a quarter of its slots are used at an answer's
start, or after 5 drafts running of which under a quarter was taken.
"""

from __future__ import annotations

import numpy as np

SLOTS = 4 * 1024 * 1024  # a power of two: the hash's low 22 bits pick the slot
HASH_FACTOR = 6364136223846793005  # common_ngram_mod::idx: res = res * HASH_FACTOR + token, mod 2**64
EMPTY = -1
CHUNK = 32  # the answer's n-grams go in once more than this many wait
FULL = 0.25  # at an answer's start, a table fuller than this is emptied
LOW_ACCEPTANCE, LOW_STREAK = 0.25, 5  # drafts taken below this fraction, this many times running: emptied


def window_hashes(tokens: np.ndarray, starts: np.ndarray, n: int, factor: int, slots: int) -> np.ndarray:
    """The slot of each n-token window starting at `starts`: hash = hash * factor + token over the
    window, in unsigned wrap-around arithmetic, its low bits (`slots` a power of two). Kept mod
    `slots` all along, the factor too, which gives the same low bits and never overflows int64."""
    res = np.zeros(len(starts), np.int64)
    for k in range(n):
        res = (res * (factor & (slots - 1)) + tokens[starts + k]) & (slots - 1)
    return res


class NgramMod:
    """The table and the drafting state of one model (`n`: the n-gram's tokens, --spec-ngram-mod-n-match)."""

    def __init__(self, n: int):
        self.n = n
        self.entries = np.full(SLOTS, EMPTY, np.int32)
        self.used = 0
        self.i_last = 0  # the n-grams starting before this index are in the table
        self.n_draft_last = 0  # the last draft's length, before the room cut it (for accept)
        self.n_low = 0  # drafts running with under LOW_ACCEPTANCE taken

    def reset(self) -> None:
        self.entries.fill(EMPTY)
        self.used = 0

    def _add(self, tokens: np.ndarray, lo: int, hi: int) -> None:
        """The n-grams starting at lo..hi-1, each with the token after it, in order (a later one wins a slot)."""
        if hi <= lo:
            return
        starts = np.arange(lo, hi)
        slots = window_hashes(tokens, starts, self.n, HASH_FACTOR, SLOTS)
        # the last n-gram of each slot wins, as the sequential writes leave it
        rev_slots, first = np.unique(slots[::-1], return_index=True)
        values = tokens[starts + self.n][::-1][first]
        self.used += int((self.entries[rev_slots] == EMPTY).sum())
        self.entries[rev_slots] = values

    def _get(self, window: list[int]) -> int:
        res = 0
        for t in window:  # window_hashes' arithmetic, one window
            res = (res * HASH_FACTOR + t) & (SLOTS - 1)
        return int(self.entries[res])

    def begin(self, prompt: np.ndarray) -> None:
        """An answer begins after `prompt` (its text tokens): its n-grams go in."""
        self.i_last = self.n_draft_last = 0
        if len(prompt) < self.n:
            return
        self._add(prompt, 0, len(prompt) - self.n)
        self.i_last = len(prompt) - self.n
        if self.used / SLOTS > FULL:
            self.reset()

    def draft(self, history: np.ndarray, sampled: int, n_max: int, n_min: int) -> list[int]:
        """The chain after `history` (the text before `sampled`) and `sampled`: at most n_max tokens,
        none when it ends before n_min."""
        self.n_draft_last = 0
        cur, n = len(history), self.n
        if cur < n:
            return []
        if self.i_last + CHUNK < cur:
            self._add(history, self.i_last, cur - n)
            self.i_last = cur - n
        result = [int(t) for t in history[cur - n + 1:]] + [sampled]
        for i in range(n_max):
            token = self._get(result[i:i + n])
            if token == EMPTY:
                if i < n_min:
                    return []
                break
            result.append(token)
        drafted = result[n:]
        self.n_draft_last = len(drafted)
        return drafted

    def accept(self, n_accepted: int) -> None:
        """The last draft's first `n_accepted` tokens were taken."""
        if self.n_draft_last == 0:
            return
        if n_accepted / self.n_draft_last < LOW_ACCEPTANCE:
            self.n_low += 1
            if self.n_low >= LOW_STREAK:
                self.reset()
                self.n_low = self.i_last = 0
        else:
            self.n_low = 0
