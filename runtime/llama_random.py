"""llama.cpp's random draws, number for number as a libstdc++ build of it makes them: std::mt19937
seeded with the request's seed, std::generate_canonical (uniform_real_distribution on [0, 1) of
double or float), std::discrete_distribution, and llama.cpp's own draw over its candidates
(llama_sampler_dist: one double a token against the running sum of expf(logit - max)).
Mirostat's and adaptive-p's probabilities are llama.cpp's float32 softmax to the bit (expf
correctly rounded, as glibc's); dist's running sum is torch's, on the logits' device, equal to
llama.cpp's but for rounding (`dist_pick`).

A generation keeps one generator per llama.cpp sampler that draws (`Streams`): dist's, XTC's,
mirostat's and adaptive-p's, each seeded with the same seed, as llama.cpp's common_sampler gives
each its own std::mt19937(seed). With the same seed and the same candidates in the same order,
qvl draws the token llama.cpp draws (tests/runtime/test_seeded_draws.py checks it against
libllama's samplers). libc++ computes generate_canonical the same way, bar its clamp below 1.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

WORD = 0xFFFFFFFF
TWO_32 = 4294967296.0


class StdMt19937:
    """std::mt19937(seed)'s 32-bit words (CPython's generator is MT19937: its state set as
    init_genrand(seed) leaves it, getrandbits(32) is genrand_uint32)."""

    max = WORD

    def __init__(self, seed: int):
        state = [seed & WORD]
        for i in range(1, 624):
            state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & WORD)
        self._r = random.Random()
        self._r.setstate((3, (*state, 624), None))

    def __call__(self) -> int:
        return self._r.getrandbits(32)


def canonical(gen: StdMt19937) -> float:
    """generate_canonical<double, 53>: two words, (w1 + w2 x 2^32) / 2^64 in double, below 1."""
    total = float(gen())
    total += float(gen()) * TWO_32
    u = total / (TWO_32 * TWO_32)
    return u if u < 1.0 else float(np.nextafter(1.0, 0.0))


def canonical_f32(gen: StdMt19937) -> np.float32:
    """generate_canonical<float, 24> (uniform_real_distribution<float>(0, 1)): one word, float(w) / 2^32."""
    u = np.float32(gen()) / np.float32(TWO_32)
    return u if u < 1 else np.nextafter(np.float32(1), np.float32(0))


def expf(x: np.ndarray) -> np.ndarray:
    """float32 exp, correctly rounded (glibc's expf), through float64."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def softmax_f32(logits: np.ndarray) -> np.ndarray:
    """llama_sampler_softmax_impl's probabilities: expf(logit - max) over their float32 running sum."""
    logits = np.asarray(logits, dtype=np.float32)
    p = expf(logits - logits.max())
    return p / np.cumsum(p)[-1]


def discrete(gen: StdMt19937, probs: np.ndarray) -> int:
    """std::discrete_distribution<int>(probs)(gen): fewer than two weights give 0 and no draw; else
    the first index whose normalized running sum (double; the last set to 1) reaches a canonical."""
    w = np.asarray(probs, dtype=np.float64)
    if len(w) < 2:
        return 0
    cum = np.cumsum(w / np.cumsum(w)[-1])
    cum[-1] = 1.0
    return int(np.searchsorted(cum, canonical(gen), side="left"))


BLOCK = 1024  # dist_pick's running sum: block sums first, then the one block that holds the target
KEY_BINS, KEY_RANGE = 1024, 32.0  # sorted candidates: bins of the sort key below its largest


def dist_pick(gen: StdMt19937, logits: torch.Tensor, key: torch.Tensor | None = None) -> int:
    """llama_sampler_dist's draw: one canonical u (a single candidate too), then the first
    candidate, in their order, whose running sum of exp(logit - max) reaches u x the whole sum.
    `key` set: the order is by it, largest first, as llama.cpp's array is sorted (ties in the
    given order), and the index returned is into `logits` as given. On `logits`' device; the
    running sum in float64 is made of block (or bin) sums and one block's own running sum, so
    only the candidates in the block or bin the target falls in are sorted: the sums differ from
    llama.cpp's one-by-one float64 sum in rounding alone (about 1e-13 of the whole), which moves
    a draw only where u falls that close to a boundary."""
    u = canonical(gen)
    n = logits.numel()
    if n == 1:
        return 0
    p = (logits - logits.max()).exp_()
    if key is None:  # blocks of BLOCK candidates in their order (the last one short)
        wide, whole = p.double(), n - n % BLOCK
        sums = torch.cat([wide[:whole].view(-1, BLOCK).sum(1), wide[whole:].sum().reshape(1)])
    else:  # bins of the key, largest first
        group = ((key.max() - key) * (KEY_BINS / KEY_RANGE)).nan_to_num(KEY_BINS).clamp(max=KEY_BINS - 1).long()
        sums = torch.bincount(group, weights=p.double())
    cum = torch.cumsum(sums, 0)
    target = float(cum[-1]) * u
    g = min(int(torch.searchsorted(cum, cum.new_tensor([target]))), len(cum) - 1)
    before = float(cum[g - 1]) if g else 0.0
    if key is None:  # the block itself, in order
        run = torch.cumsum(wide[g * BLOCK:g * BLOCK + BLOCK], 0) + before
        return g * BLOCK + min(int(torch.searchsorted(run, run.new_tensor([target]))), len(run) - 1)
    index = torch.nonzero(group == g).flatten()
    index = index[torch.argsort(key[index], descending=True, stable=True)]
    run = torch.cumsum(p[index].double(), 0) + before
    return int(index[min(int(torch.searchsorted(run, run.new_tensor([target]))), len(run) - 1)])


@dataclass
class Streams:
    """A generation's generators, one per llama.cpp sampler that draws, each made at its first draw."""

    seed: int
    made: dict[str, StdMt19937] = field(default_factory=dict)

    def __getitem__(self, sampler: str) -> StdMt19937:  # "dist", "xtc", "mirostat", "adaptive_p"
        if sampler not in self.made:
            self.made[sampler] = StdMt19937(self.seed)
        return self.made[sampler]


_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def streams(gen: torch.Generator) -> Streams:
    """The generators of the generation `gen` stands for, seeded with its seed's low 32 bits (llama.cpp's
    seed is a uint32)."""
    if gen not in _STREAMS:
        _STREAMS[gen] = Streams(gen.initial_seed() & WORD)
    return _STREAMS[gen]
