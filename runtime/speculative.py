"""Self-speculative decoding: llama.cpp's `--spec-type ngram-simple`, drafts from the text itself.

After each sampled token, the last `size_n` tokens (the sampled one last) are looked for earlier
in the text: the prompt's text tokens (pictures and videos left out, as llama-server's history
leaves them out) and the answer so far. Where they were last seen, the tokens that followed them
there (at most `size_m`, and none unless at least `size_n` follow) are the draft. One forward pass
then reads the sampled token and the draft together, and the answer goes on as it would have:
each position's logits are sampled in turn by the same sampler (penalties, grammar, seed and all);
while the sampled token is the draft's next one, the logits after it are already there; at the
first other token the rest of the draft is dropped (the next pass writes over its keys) and
decoding goes on from that token.

So the tokens are the ones decoding one token at a time gives, up to how a pass over several
tokens rounds differently from a pass over one (float32 on a CPU: logits within ~1e-5 of the
single pass's; bf16: within ~2 % of the largest logit, so a near tie can go the other way, as
in llama.cpp's batches). It pays where answers repeat text (a list, a table, code, an earlier
answer reworded). `n_max` caps a pass's draft: by default 3 on a CPU, where a pass over 2, 3, 4
tokens costs 1.1-1.3, 1.4-1.5, 1.6-1.7x a one-token pass and over 5 to 8 3.1-3.3x (torch's int4 matmul takes x's
rows in fours; 3B Q4_K_M, 2 cores, scripts/bench_speculative.py); 7 with every layer on a GPU,
where a pass of up to 8 tokens keeps to the decode GEMV kernel (kernels/qmatmul.GEMV_MAX_M), which reads each weight
once for all of them (not yet timed on a GPU).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SPEC_TYPES = ("none", "ngram-simple")
CPU_DRAFT_MAX = 3
ACCEL_DRAFT_MAX = 7  # a pass of 8 tokens: qmatmul.GEMV_MAX_M


class SpeculationError(ValueError):
    """A speculative-decoding setting out of range; the message names the flag."""


@dataclass(frozen=True)
class Speculation:
    """llama.cpp's ngram-simple settings (`--spec-ngram-simple-size-n`, `-size-m`; its defaults)
    and `--spec-draft-n-max` (None: ACCEL_DRAFT_MAX where the whole decoder is on a GPU, else
    CPU_DRAFT_MAX: a layer on the CPU costs a pass what the CPU's int4 op does)."""

    size_n: int = 12
    size_m: int = 48
    n_max: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--spec-ngram-simple-size-n", self.size_n), ("--spec-ngram-simple-size-m", self.size_m)):
            if not 1 <= value <= 1024:
                raise SpeculationError(f"{flag} {value}: 1 to 1024")
        if self.n_max is not None and self.n_max < 0:
            raise SpeculationError(f"--spec-draft-n-max {self.n_max}: 0 or more")

    def draft_max(self, on_accel: bool) -> int:
        if self.n_max is not None:
            return self.n_max
        return ACCEL_DRAFT_MAX if on_accel else CPU_DRAFT_MAX


def speculation(spec_type: str | None, size_n: int = 12, size_m: int = 48,
                n_max: int | None = None) -> Speculation | None:
    """The CLI's flags: `--spec-type` none or ngram-simple (llama.cpp's names; several split by
    ',' as llama.cpp takes them, of which qvl has the one)."""
    names = [t.strip() for t in (spec_type or "none").split(",") if t.strip()]
    for name in names:
        if name not in SPEC_TYPES:
            raise SpeculationError(f"--spec-type {name}: {' or '.join(SPEC_TYPES)} (qvl has no draft models)")
    return Speculation(size_n, size_m, n_max) if "ngram-simple" in names else None


def ngram_simple_draft(history: np.ndarray, sampled: int, size_n: int, size_m: int) -> list[int]:
    """llama.cpp's common_ngram_simple_draft: `history` the tokens before `sampled`. The pattern
    is history's last size_n - 1 tokens and `sampled`; its last occurrence starting after
    position 0 and ending before history's last token is the match; what follows it, at most
    size_m tokens, is the draft, or nothing when fewer than size_n follow."""
    cur = len(history)
    if cur <= size_n + size_m + 1:
        return []
    pattern = np.append(history[cur - size_n + 1:], sampled)
    last = cur - size_n - 1  # the latest start searched
    starts = np.flatnonzero(history[1:last + 1] == pattern[0]) + 1
    if size_n > 1 and len(starts):
        windows = np.lib.stride_tricks.sliding_window_view(history[:last + size_n], size_n)[starts]
        starts = starts[(windows == pattern).all(axis=1)]
    if not len(starts):
        return []
    at = int(starts[-1]) + size_n
    copy = min(size_m, cur - at)
    if copy < size_n:
        return []
    return [int(t) for t in history[at:at + copy]]


class Drafts:
    """A generation's drafting and verifying. `next(token, position, room)` gives the logits
    after `token` (sampled, at `position`): from the logits a pass already made when `token` is
    the draft's next, else from a pass over `token` and a draft of at most `room` tokens after it
    when the history has one. A draft's keys and values wait past `cache.length` (which counts
    the tokens taken alone), each taken token's counted in turn: one the answer does not take is
    overwritten by the next pass."""

    def __init__(self, spec: Speculation, on_accel: bool, prompt: Sequence[int], capacity: int, cache: Any,
                 decode: Callable[[list[int], int], torch.Tensor]):
        """`prompt`: its text tokens; `capacity`: room for prompt and answer; `cache`: the KV
        cache (its `length`); `decode(tokens, position)`: one pass, logits (len(tokens), vocab)."""
        self.spec, self.cap = spec, spec.draft_max(on_accel)
        self._history = np.zeros(max(capacity, len(prompt)) + 1, np.int64)
        self._history[:len(prompt)] = prompt
        self._n = len(prompt)
        self._cache, self._decode = cache, decode
        self._queue: deque[tuple[int, torch.Tensor]] = deque()
        self.drafted = self.accepted = self.passes = 0

    def next(self, token: int, position: int, room: int) -> torch.Tensor:
        if self._queue and self._queue[0][0] == token:
            self.accepted += 1
            self._cache.length += 1  # its keys and values are there
            self._push(token)
            return self._queue.popleft()[1]
        self._queue.clear()
        most = min(self.cap, room)
        draft = ngram_simple_draft(self._history[:self._n], token, self.spec.size_n,
                                   self.spec.size_m)[:most] if most > 0 else []
        self._push(token)
        logits = self._decode([token] + draft, position)
        if draft:
            self.drafted += len(draft)
            self.passes += 1
            self._cache.length -= len(draft)
            self._queue.extend(zip(draft, logits[1:]))
        return logits[0]

    def _push(self, token: int) -> None:
        if self._n == len(self._history):
            self._history = np.concatenate([self._history, np.zeros_like(self._history)])
        self._history[self._n] = token
        self._n += 1

    @property
    def counts(self) -> tuple[int, int, int]:
        """Draft tokens, those taken, passes that read a draft (llama-server's /metrics counters)."""
        return self.drafted, self.accepted, self.passes

    def timings(self) -> dict[str, float]:
        """llama-server's counts: draft tokens read, and those taken."""
        return {"draft_n": self.drafted, "draft_n_accepted": self.accepted} if self.passes else {}
