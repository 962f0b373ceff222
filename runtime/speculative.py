"""Self-speculative decoding: llama.cpp's `--spec-type ngram-simple` and its kin, drafts from the text itself.

After each sampled token, the last `size_n` tokens (the sampled one last) are looked for earlier
in the text: the prompt's text tokens (pictures and videos left out, as llama-server's history
leaves them out) and the answer so far. Where they were last seen, the tokens that followed them
there (at most `size_m`, and none unless at least `size_n` follow) are the draft. One forward pass
then reads the sampled token and the draft together, and the answer goes on as it would have:
each position's logits are sampled in turn by the same sampler (penalties, grammar, seed and all);
while the sampled token is the draft's next one, the logits after it are already there; at the
first other token the rest of the draft is dropped (the next pass writes over its keys) and
decoding goes on from that token. `ngram-map-k` and `ngram-map-k4v` (ngram_map.py) keep the keys
they met and what their drafts had taken; `ngram-mod` (ngram_mod.py) drafts from a hashed table of
what followed each 24-token n-gram, kept from one answer to the next; `draft-simple`
(draft_model.py) asks a smaller model with the same vocabulary. With several, as in llama.cpp, the
first in SPEC_TYPES' order that has a draft drafts.

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

from .draft_model import DraftModel, DraftPrompt
from .ngram_map import NgramMap, last_match
from .ngram_mod import NgramMod
from .usage import DraftCounts

# the drafters in llama.cpp's order of preference
SPEC_TYPES = ("none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "draft-simple")
MAP_TYPES = ("ngram-map-k", "ngram-map-k4v")
CPU_DRAFT_MAX = 3
ACCEL_DRAFT_MAX = 7  # a pass of 8 tokens: qmatmul.GEMV_MAX_M


class SpeculationError(ValueError):
    """A speculative-decoding setting out of range; the message names the flag."""


@dataclass(frozen=True)
class Speculation:
    """llama.cpp's ngram-simple settings (`--spec-ngram-simple-size-n`, `-size-m`; its defaults),
    `--spec-draft-n-max` (None: ACCEL_DRAFT_MAX where the whole decoder is on a GPU and no draft
    model drafts, else CPU_DRAFT_MAX: a layer on the CPU costs a pass what the CPU's int4 op does), the drafters
    (`types`, in llama.cpp's order), ngram-mod's settings (`--spec-ngram-mod-n-match`, `-n-max`,
    `-n-min`; its defaults: a draft's chain runs to the smaller of mod_n_max and the pass's cap),
    ngram-map-k's and ngram-map-k4v's (`--spec-ngram-map-k-size-n`, `-size-m`, `-min-hits`) and
    the draft model's (`--spec-draft-p-min`, `--spec-draft-n-min`; llama.cpp's defaults)."""

    size_n: int = 12
    size_m: int = 48
    n_max: int | None = None
    types: tuple[str, ...] = ("ngram-simple",)
    mod_n_match: int = 24
    mod_n_max: int = 64
    mod_n_min: int = 48
    map_k: tuple[int, int, int] = (12, 48, 1)  # size_n, size_m, min_hits
    map_k4v: tuple[int, int, int] = (12, 48, 1)
    draft_p_min: float = 0.0
    draft_n_min: int = 0

    def __post_init__(self) -> None:
        for flag, value, low in (("--spec-ngram-simple-size-n", self.size_n, 1),
                                 ("--spec-ngram-simple-size-m", self.size_m, 1),
                                 ("--spec-ngram-mod-n-match", self.mod_n_match, 1),
                                 ("--spec-ngram-mod-n-max", self.mod_n_max, 0),
                                 ("--spec-ngram-mod-n-min", self.mod_n_min, 0)):
            if not low <= value <= 1024:
                raise SpeculationError(f"{flag} {value}: {low} to 1024")
        for kind, (n, m, hits) in (("map-k", self.map_k), ("map-k4v", self.map_k4v)):
            for flag, value, high in (("size-n", n, 1024), ("size-m", m, 1024), ("min-hits", hits, 65535)):
                if not 1 <= value <= high:
                    raise SpeculationError(f"--spec-ngram-{kind}-{flag} {value}: 1 to {high}")
        if self.n_max is not None and self.n_max < 0:
            raise SpeculationError(f"--spec-draft-n-max {self.n_max}: 0 or more")
        if not 0.0 <= self.draft_p_min <= 1.0:
            raise SpeculationError(f"--spec-draft-p-min {self.draft_p_min}: 0 to 1")
        if self.draft_n_min < 0:
            raise SpeculationError(f"--spec-draft-n-min {self.draft_n_min}: 0 or more")
        if not self.types or any(t not in SPEC_TYPES[1:] for t in self.types):
            raise SpeculationError(f"--spec-type {','.join(self.types)}: {' and/or '.join(SPEC_TYPES[1:])}")

    def draft_max(self, on_accel: bool) -> int:
        if self.n_max is not None:
            return self.n_max
        # a draft model's guess costs one of its passes: llama.cpp's default 3 on any device
        return ACCEL_DRAFT_MAX if on_accel and "draft-simple" not in self.types else CPU_DRAFT_MAX


def speculation(spec_type: str | None, size_n: int = 12, size_m: int = 48, n_max: int | None = None,
                mod_n_match: int = 24, mod_n_max: int = 64, mod_n_min: int = 48,
                map_k: tuple[int, int, int] = (12, 48, 1),
                map_k4v: tuple[int, int, int] = (12, 48, 1), draft_p_min: float = 0.0, draft_n_min: int = 0,
                draft_model: bool = False) -> Speculation | None:
    """The CLI's flags: `--spec-type` none, ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod,
    draft-simple or several split by ',' (llama.cpp's names; tried in llama.cpp's order whatever the
    order given). `draft_model`: a --spec-draft-model was given (draft-simple needs one; with none
    of the types named, it is draft-simple)."""
    names = [t.strip() for t in (spec_type or ("draft-simple" if draft_model else "none")).split(",") if t.strip()]
    for name in names:
        if name not in SPEC_TYPES:
            raise SpeculationError(f"--spec-type {name}: {', '.join(SPEC_TYPES)}")
    if ("draft-simple" in names) != draft_model:
        raise SpeculationError(f"--spec-draft-model drafts with --spec-type draft-simple (not {spec_type})"
                               if draft_model else "--spec-type draft-simple needs --spec-draft-model FILE")
    types = tuple(t for t in SPEC_TYPES[1:] if t in names)
    if not types:
        return None
    return Speculation(size_n, size_m, n_max, types, mod_n_match, mod_n_max, mod_n_min, map_k, map_k4v,
                       draft_p_min, draft_n_min)


def ngram_simple_draft(history: np.ndarray, sampled: int, size_n: int, size_m: int) -> list[int]:
    """llama.cpp's common_ngram_simple_draft: `history` the tokens before `sampled`. The pattern
    is history's last size_n - 1 tokens and `sampled`; its last occurrence starting after
    position 0 and ending before history's last token is the match; what follows it, at most
    size_m tokens, is the draft, or nothing when fewer than size_n follow."""
    cur = len(history)
    if cur <= size_n + size_m + 1:
        return []
    pattern = np.append(history[cur - size_n + 1:], sampled)
    match = last_match(history, 0, cur - size_n - 1, pattern)  # position 0 is never searched: 0 is none
    if match == 0:
        return []
    at = match + size_n
    copy = min(size_m, cur - at)
    if copy < size_n:
        return []
    return [int(t) for t in history[at:at + copy]]


class Drafter:
    """A model's drafters from one answer to the next, as llama.cpp's common_speculative: the state
    of those that keep one (ngram-mod's table, ngram-map-k's and -k4v's keys; made when first asked
    for, made anew when their settings change; the draft model's cache), and the count of taken
    tokens of the last draft, given to the drafter that made it (its accept) before the next draft
    or the next answer's start. `model`: draft-simple's draft model (--spec-draft-model)."""

    def __init__(self, model: DraftModel | None = None) -> None:
        self.mod: NgramMod | None = None
        self.maps: dict[str, NgramMap] = {}
        self.model = model
        self._pending: tuple[NgramMod | NgramMap | None, int] | None = None  # (drafter, tokens taken)
        self._n_prompt = 0

    def begin(self, spec: Speculation, prompt: np.ndarray, full: DraftPrompt | None = None, capacity: int = 0) -> None:
        """`prompt`: its text tokens; `full`: as the draft model reads it, with room for `capacity` tokens."""
        self._settle()
        self._n_prompt = len(prompt)
        if "draft-simple" in spec.types:
            if self.model is None or full is None:
                raise SpeculationError("--spec-type draft-simple needs --spec-draft-model FILE")
            self.model.begin(full, capacity)
        if "ngram-mod" in spec.types:
            if self.mod is None or self.mod.n != spec.mod_n_match:
                self.mod = NgramMod(spec.mod_n_match)
            self.mod.begin(prompt)
        for kind in MAP_TYPES:
            if kind in spec.types:
                n, m, hits = spec.map_k if kind == "ngram-map-k" else spec.map_k4v
                kept = self.maps.get(kind)
                if kept is None or (kept.n, kept.m, kept.min_hits) != (n, m, hits):
                    kept = self.maps[kind] = NgramMap(n, m, kind == "ngram-map-k", hits)
                kept.begin(prompt)

    def draft(self, spec: Speculation, history: np.ndarray, sampled: int, cap: int, most: int) -> list[int]:
        """The first drafter's draft that is not empty, at most `most` tokens (ngram-mod's chain
        runs to the smaller of its n_max and `cap`, the cut to `most` after, as llama.cpp's room)."""
        self._settle()
        for kind in spec.types:
            state: NgramMod | NgramMap | None = None  # begin made the states of spec's drafters
            if kind == "ngram-simple":
                draft = ngram_simple_draft(history, sampled, spec.size_n, spec.size_m)
            elif kind == "ngram-mod":
                state = self.mod
                draft = self.mod.draft(history, sampled, min(spec.mod_n_max, cap), spec.mod_n_min) if self.mod else []
            elif kind == "draft-simple":
                assert self.model is not None  # begin said so
                answer = [int(t) for t in history[self._n_prompt:]] + [sampled]
                draft = self.model.draft(answer, most, spec.draft_p_min, spec.draft_n_min)
            else:
                state = self.maps[kind]
                draft = state.draft(history, sampled)
            if draft:
                self._pending = (state, 0)
                return draft[:most]
        return []

    def took(self) -> None:
        """The last draft's next token was taken."""
        if self._pending is not None:
            self._pending = (self._pending[0], self._pending[1] + 1)

    def _settle(self) -> None:
        if self._pending is not None and self._pending[0] is not None:
            self._pending[0].accept(self._pending[1])
        self._pending = None


class Drafts:
    """A generation's drafting and verifying. `next(token, position, room)` gives the logits
    after `token` (sampled, at `position`): from the logits a pass already made when `token` is
    the draft's next, else from a pass over `token` and a draft of at most `room` tokens after it
    when the history has one. A draft's keys and values wait past `cache.length` (which counts
    the tokens taken alone), each taken token's counted in turn: one the answer does not take is
    overwritten by the next pass."""

    def __init__(self, spec: Speculation, on_accel: bool, prompt: Sequence[int], capacity: int, cache: Any,
                 decode: Callable[[list[int], int], torch.Tensor], drafter: Drafter, full: DraftPrompt | None = None):
        """`prompt`: its text tokens; `capacity`: room for prompt and answer; `cache`: the KV
        cache (its `length`); `decode(tokens, position)`: one pass, logits (len(tokens), vocab);
        `drafter`: the model's, kept across its answers; `full`: the prompt as a draft model reads it."""
        self.spec, self.cap = spec, spec.draft_max(on_accel)
        self._history = np.zeros(max(capacity, len(prompt)) + 1, np.int64)
        self._history[:len(prompt)] = prompt
        self._n = len(prompt)
        self._drafter = drafter
        room = max(capacity, len(full.ids) if full else 0) + self.cap + 1  # the draft model's guesses past the answer
        self._drafter.begin(spec, self._history[:self._n], full, room)
        self._cache, self._decode = cache, decode
        self._queue: deque[tuple[int, torch.Tensor]] = deque()
        self.drafted = self.accepted = self.passes = 0
        self._at = [0] * self.cap  # drafts whose i-th token was taken, each i
        self._taken = 0  # the pending draft's tokens taken so far

    def next(self, token: int, position: int, room: int) -> torch.Tensor:
        if self._queue and self._queue[0][0] == token:
            self.accepted += 1
            self._at[self._taken] += 1
            self._taken += 1
            self._drafter.took()
            self._cache.length += 1  # its keys and values are there
            self._push(token)
            return self._queue.popleft()[1]
        self._queue.clear()
        most = min(self.cap, room)
        draft = self._drafter.draft(self.spec, self._history[:self._n], token, self.cap, most) if most > 0 else []
        self._push(token)
        logits = self._decode([token] + draft, position)
        if draft:
            self._taken = 0
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
    def counts(self) -> DraftCounts:
        """Draft tokens, those taken, passes that read a draft, taken at each place (llama-server's /metrics')."""
        return DraftCounts(self.drafted, self.accepted, self.passes, tuple(self._at) if self.passes else ())

    def timings(self) -> dict[str, float]:
        """llama-server's counts: draft tokens read, and those taken."""
        return {"draft_n": self.drafted, "draft_n_accepted": self.accepted} if self.passes else {}
