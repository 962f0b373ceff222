"""The sampler chain: the filters a sampled token's candidates go through, in an order, each as
llama.cpp's sampler of that name does it (src/llama-sampler.cpp), and the options of those
llama.cpp has beside top-k / top-p / min-p: locally typical sampling (typ_p), top-n-sigma, XTC,
dynamic temperature and DRY (dry.py).

A step takes the candidates (token ids and their logits; ids None: the whole vocabulary in id
order) and gives those it keeps. Steps that need probabilities take the softmax over the
candidates they are given, as llama.cpp's do. A filter drops a token rather than setting its
logit to -inf (top-n-sigma sets -inf in llama.cpp: the same distribution after it). The
candidates stay in the order llama.cpp's array holds them (its draw runs over that order,
llama_random.py): the vocabulary's, until top-k, top-p, XTC that fires or dynamic temperature
sorts them most likely first, or typical puts them in its own order. The order is
qvl's by default (ORDER: temperature first, as Ollama samples); llama.cpp's server and CLI order
(ORDER_LLAMACPP: temperature last) is what `qvl serve`'s /completion uses, and any order can be
asked for by llama.cpp's names (`samplers`, parse_order) or characters (its --sampling-seq).
The logit bias always comes first, and a draw from what is left last (sampling.py); the
penalties and DRY, which change logits by the tokens before, are sampling.py's steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .dry import DEFAULT_BREAKERS
from .llama_random import canonical_f32, streams

ORDER = ("penalties", "dry", "temperature", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc")
ORDER_LLAMACPP = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
CHARS = {"e": "penalties", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p", "m": "min_p", "x": "xtc",
         "t": "temperature", "d": "dry", "i": "infill", "a": "adaptive_p"}
NOT_HAD = ("infill",)  # llama.cpp's samplers qvl does not have (fill-in-the-middle)


def _aliases() -> dict[str, str]:
    """llama.cpp's names for its samplers: canonical, kebab-case, without the underscore, and
    nucleus / temp / typ (common_sampler_types_from_names)."""
    out = {"nucleus": "top_p", "temp": "temperature", "typ": "typ_p"}
    for name in CHARS.values():
        out.update({name: name, name.replace("_", "-"): name, name.replace("_", ""): name})
    return out


ALIASES = _aliases()


class SamplingError(ValueError):
    """A sampling parameter out of its range, or a sampler order qvl cannot follow."""


def parse_order(value: str | list[str] | tuple[str, ...], where: str = "samplers") -> tuple[str, ...]:
    """An order of samplers from llama.cpp's forms: a list of names (any case, its aliases) or a
    string of its characters ("edskypmxt"). A name it has that qvl does not (infill) and unknown
    ones are refused (llama.cpp warns and leaves an unknown one out)."""
    if isinstance(value, str):
        names = []
        for c in value:
            if c not in CHARS:
                raise SamplingError(f"{where} {value!r}: {c!r} is not a sampler's character (one of "
                                 f"{''.join(CHARS)})")
            names.append(CHARS[c])
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = []
        for v in value:
            if v.lower() not in ALIASES:
                known = ", ".join(n for n in CHARS.values() if n not in NOT_HAD)
                raise SamplingError(f"{where}: {v!r} is not a sampler (one of {known})")
            names.append(ALIASES[v.lower()])
    else:
        raise SamplingError(f"{where} {value!r}: a list of sampler names or a string of their characters")
    for name in names:
        if name in NOT_HAD:
            raise SamplingError(f"{where}: {name} is a sampler qvl does not have")
    return tuple(names)


@dataclass(frozen=True)
class ChainOptions:
    """The chain's order (None: ORDER) and the options of its samplers beyond top-k / top-p /
    min-p, llama.cpp's names, defaults and off values: typical_p 1 (or None), top_n_sigma <= 0
    (or None), xtc_probability 0 (or xtc_threshold above 0.5), dynatemp_range 0, dry_multiplier
    0 (dry.py; dry_penalty_last_n -1: every generated token), mirostat 0 (1 or 2: its version, in
    place of the order, `mirostat_kept`), adaptive_target below 0 (adaptive-p, where the order
    names adaptive_p: last, whatever its place, `adaptive_logits`)."""

    samplers: tuple[str, ...] | None = None
    typical_p: float | None = None
    top_n_sigma: float | None = None
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_BREAKERS
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    adaptive_target: float = -1.0
    adaptive_decay: float = 0.9
    prompt_seen: bool = False  # the penalties and DRY see the prompt's text tokens too, as llama-server's do
    post_sampling_probs: bool = False  # logprobs reported from the chain's distribution (llama-server's)

    def __post_init__(self) -> None:
        if self.samplers is not None:
            object.__setattr__(self, "samplers", parse_order(self.samplers))
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(b, str) for b in breakers):
            raise SamplingError(f"dry_sequence_breakers {self.dry_sequence_breakers!r}: a list of texts")
        object.__setattr__(self, "dry_sequence_breakers", tuple(self.dry_sequence_breakers))
        for name in ("dry_multiplier", "dry_base"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingError(f"{name} {getattr(self, name)}: a finite number")
        if self.mirostat not in (0, 1, 2):
            raise SamplingError(f"mirostat {self.mirostat}: 0 (off), 1 or 2")
        for name in ("mirostat_tau", "mirostat_eta"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingError(f"{name} {getattr(self, name)}: a finite number")
        if not (math.isfinite(self.adaptive_target) and self.adaptive_target <= 1):
            raise SamplingError(f"adaptive_target {self.adaptive_target}: 1 or below (below 0: off)")
        if not 0 <= self.adaptive_decay <= 0.99:
            raise SamplingError(f"adaptive_decay {self.adaptive_decay}: between 0 and 0.99")
        if self.dry_allowed_length < 0:
            raise SamplingError(f"dry_allowed_length {self.dry_allowed_length}: 0 or more")
        if self.dry_penalty_last_n < -1:
            raise SamplingError(f"dry_penalty_last_n {self.dry_penalty_last_n}: -1 (every generated token), 0 (off) "
                                "or more")
        for name in ("typical_p", "top_n_sigma", "dynatemp_range", "dynatemp_exponent"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise SamplingError(f"{name} {value}: a finite number")
        for name in ("xtc_probability", "xtc_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise SamplingError(f"{name} {getattr(self, name)}: between 0 and 1")

    @property
    def order(self) -> tuple[str, ...]:
        return ORDER if self.samplers is None else self.samplers


class Params(Protocol):
    """What the steps read of sampling.SamplingParams."""

    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    chain: ChainOptions


@dataclass
class Kept:
    """Candidate tokens: ids (None: the whole vocabulary in id order) and their logits; `key` set
    where llama.cpp's array is sorted by those values (most first) and this one not yet: the
    sort waits for the draw (`in_order`), and a later top-k or top-p makes it needless."""

    ids: torch.Tensor | None
    logits: torch.Tensor
    key: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> Kept:
        """The candidates at `index` (positions in this set, a bool mask or indices)."""
        key = None if self.key is None else self.key[index]
        if self.ids is None:  # the vocabulary: the positions are the ids
            ids = torch.nonzero(index).flatten() if index.dtype == torch.bool else index
            return Kept(ids, self.logits[ids], key)
        return Kept(self.ids[index], self.logits[index], key)

    def with_logits(self, logits: torch.Tensor) -> Kept:
        """The same candidates, in the same order, with new logits."""
        return Kept(self.ids, logits, self.key)

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)

    def descending(self) -> Kept:
        """The candidates most likely first, as llama.cpp's softmax sorts them (the sort itself
        waits: `in_order`)."""
        return Kept(self.ids, self.logits, self.logits)

    def in_order(self) -> Kept:
        """The candidates in llama.cpp's order (its sorts made; ties in their order)."""
        if self.key is None:
            return self
        return Kept(self.ids, self.logits).take(torch.argsort(self.key, descending=True, stable=True))


# top-p's bins (`_top_p_prefix`): 1024 over 32 nats below the most likely token
LOG_BINS = 1024
LOG_RANGE = 32.0


def _top_p_keep(vals: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the logits `vals` (most likely first) top-p keeps: those whose predecessors'
    probability is below top_p, and always the first."""
    probs = torch.exp(vals - log_norm)
    keep = torch.cumsum(probs, 0) - probs < top_p
    keep[0] = True
    return keep


def _top_p_prefix(scaled: torch.Tensor, log_norm: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, ids), most likely first, of a prefix of the vocabulary's sorted order that holds
    at least top_p of the probability, so top-p's cut falls inside it: tokens go to LOG_BINS bins
    by log-probability below the most likely (bincount adds each bin's mass), and the bins down
    to the one where the mass reaches top_p, and one more against rounding, are sorted."""
    log_p = scaled - log_norm
    below = (log_p.max() - log_p) * (LOG_BINS / LOG_RANGE)
    bins = below.clamp(max=LOG_BINS - 1).long()  # the last bin: everything below the range
    mass = torch.cumsum(torch.bincount(bins, weights=torch.exp(log_p).double(), minlength=LOG_BINS), 0)
    last = min(int(torch.searchsorted(mass, mass.new_tensor([top_p]))) + 1, LOG_BINS - 1)
    ids = torch.nonzero(bins <= last).flatten()
    vals, order = torch.sort(scaled[ids], descending=True)
    return vals, ids[order]


Step = Callable[[Kept, Params, torch.Generator], Kept]


def _top_k(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """The k likeliest, and any tied with the k-th (torch.topk, no sort of the rest)."""
    n = c.logits.numel()
    if p.top_k is None or not 0 < p.top_k < n:
        return c
    vals, index = torch.topk(c.logits, p.top_k)
    tied = int((c.logits >= vals[-1]).sum())
    if tied > p.top_k:
        vals, index = torch.topk(c.logits, tied)
    return Kept(c.ids, c.logits).take(index)  # most likely first: no sort due


def _top_p(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """The likeliest tokens whose probabilities before them add up to less than top_p (the first
    always); over the whole vocabulary only a prefix that holds the cut is sorted."""
    if p.top_p is None or p.top_p >= 1:
        return c
    log_norm = torch.logsumexp(c.logits, 0)
    if c.ids is None:
        vals, ids = _top_p_prefix(c.logits, log_norm, p.top_p)
        sorted_c = Kept(ids, vals)
    else:
        vals, order = torch.sort(c.logits, descending=True)
        sorted_c = Kept(c.ids[order], vals)
    keep = _top_p_keep(sorted_c.logits, log_norm, p.top_p)
    return Kept(sorted_c.ids[keep], sorted_c.logits[keep])


def _min_p(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """Tokens whose logit is at least the largest plus log(min_p): probability at least min_p
    times the likeliest's (llama.cpp compares logits)."""
    if p.min_p is None or p.min_p <= 0:
        return c
    return c.take(c.logits >= c.logits.max() + math.log(p.min_p))


def _typical(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """Locally typical sampling: tokens by how far their surprise -log p is from the entropy,
    closest first, until their probabilities add up to more than typical_p (llama.cpp's order of
    ties may differ). Only the tokens in a prefix of that order that holds the cut are sorted
    (`_closest`), as top-p sorts a prefix."""
    typical = p.chain.typical_p
    if typical is None or typical >= 1 or c.logits.numel() < 2:
        return c
    probs = c.probs()
    log_p = torch.log(probs)
    entropy = -(probs * log_p).nan_to_num(0.0).sum()
    shifted = (-log_p - entropy).abs()
    for sort in (lambda: _closest(shifted, probs, typical), lambda: torch.argsort(shifted, stable=True)):
        order = sort()  # the prefix first; the whole order where the prefix's mass stays at typical_p
        over = torch.nonzero(torch.cumsum(probs[order], 0) > typical)
        if len(over):
            return Kept(c.ids, c.logits).take(order[:int(over[0]) + 1])  # typical's order, no sort due
    return Kept(c.ids, c.logits).take(order)  # none cut: all of them, in typical's order


def _closest(shifted: torch.Tensor, probs: torch.Tensor, mass: float) -> torch.Tensor:
    """The positions of the smallest `shifted` scores, in their stable sorted order, down to a
    bin (LOG_BINS over LOG_RANGE) past the one where their probabilities reach `mass`."""
    bins = (shifted * (LOG_BINS / LOG_RANGE)).nan_to_num(LOG_BINS).clamp(max=LOG_BINS - 1).long()
    cum = torch.cumsum(torch.bincount(bins, weights=probs.double(), minlength=LOG_BINS), 0)
    last = min(int(torch.searchsorted(cum, cum.new_tensor([mass]), right=True)) + 1, LOG_BINS - 1)
    index = torch.nonzero(bins <= last).flatten()
    return index[torch.argsort(shifted[index], stable=True)]


def _top_n_sigma(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """Tokens whose logit is at least the largest minus n standard deviations of the logits
    (the population's, over the finite ones)."""
    n = p.chain.top_n_sigma
    if n is None or n <= 0 or c.logits.numel() < 2:
        return c
    finite = c.logits[torch.isfinite(c.logits)]
    if not len(finite):
        return c
    std = float(torch.sqrt(((finite - finite.mean()) ** 2).mean()))
    return c.take(c.logits >= finite.max() - n * std)


def _xtc(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """Exclude top choices: with probability xtc_probability (a float drawn from the generation's
    XTC generator, llama_random.streams), every token at or above xtc_threshold but the least
    likely of them is dropped; the candidates sorted, most likely first, whenever it fires."""
    o = p.chain
    if o.xtc_probability <= 0 or o.xtc_threshold > 0.5 or c.logits.numel() < 2:
        return c
    if canonical_f32(streams(gen)["xtc"]) > np.float32(o.xtc_probability):
        return c
    c = c.descending()
    probs = c.probs()
    above = probs >= o.xtc_threshold
    if int(above.sum()) < 2:
        return c
    last = int(torch.argmin(torch.where(above, probs, probs.new_tensor(float("inf")))))
    return c.take(~above | (torch.arange(len(probs), device=probs.device) == last))


def _temperature(c: Kept, p: Params, gen: torch.Generator) -> Kept:
    """Logits over the temperature; with dynatemp_range d > 0 the temperature is t - d (at least
    0) plus 2d times (the candidates' entropy over its largest, log n) to the dynatemp_exponent;
    a temperature of 0 keeps the likeliest token alone. Dynamic temperature sorts the candidates."""
    o = p.chain
    temp = float(p.temperature or 0.0)
    if o.dynatemp_range > 0:
        n = c.logits.numel()
        if n <= 1:
            return c
        c = c.descending()
        low, high = max(0.0, temp - o.dynatemp_range), temp + o.dynatemp_range
        probs = c.probs()
        entropy = float(-(probs * torch.log(probs)).nan_to_num(0.0).sum())
        temp = low + (high - low) * (entropy / math.log(n)) ** o.dynatemp_exponent
    if temp <= 0:
        return c.take(torch.argmax(c.logits).reshape(1))
    return c.with_logits(c.logits / temp)


STEPS: dict[str, Step] = {"temperature": _temperature, "top_n_sigma": _top_n_sigma, "top_k": _top_k, "typ_p": _typical,
                          "top_p": _top_p, "min_p": _min_p, "xtc": _xtc}
MODIFIERS = ("penalties", "dry")  # the steps that change logits by the tokens before (sampling.py's)


def run_chain(c: Kept, p: Params, modify: Callable[[str, Kept], Kept], gen: torch.Generator) -> Kept:
    """The candidates each step of p.chain's order keeps, in turn; `modify(name, c)` is the
    penalties' and DRY's step."""
    for name in p.chain.order:
        if name != "adaptive_p":  # llama.cpp puts it last, in place of the draw (sampling.py)
            c = modify(name, c) if name in MODIFIERS else STEPS[name](c, p, gen)
    return c


MIROSTAT_M = 100  # llama.cpp's m: the likeliest tokens mirostat 1 estimates the Zipf exponent from


def mirostat_kept(c: Kept, o: ChainOptions, mu: float, n_vocab: int) -> Kept:
    """Mirostat's truncation at surprise target `mu` (llama.cpp's, which runs it after the bias and
    the temperature alone): version 2 keeps the tokens whose surprise -log2 p is at most mu (the
    likeliest always), version 1 the k likeliest, k from the Zipf exponent s estimated over the
    first MIROSTAT_M (float32 as llama.cpp reckons it: the cut is a whole number of a power); the
    kept most likely first, as llama.cpp sorts them."""
    probs = c.probs()
    if o.mirostat == 2:
        index = torch.nonzero(-torch.log2(probs) <= mu).flatten()
        if not len(index):
            index = torch.argmax(probs).reshape(1)
        return c.take(index).descending()
    top = torch.topk(probs, min(MIROSTAT_M, len(probs))).values.cpu().numpy()
    f = np.float32
    num = den = f(0.0)
    for i in range(len(top) - 1):
        t = f(np.log(f(i + 2) / f(i + 1)))
        b = f(np.log(top[i] / top[i + 1]))
        num, den = f(num + t * b), f(den + t * t)
    s_hat = f(num / den)
    eps = f(s_hat - 1)
    with np.errstate(all="ignore"):
        k = f(np.power(f(eps * np.power(f(2), f(mu))) / f(1 - np.power(f(n_vocab), -eps)), f(1) / s_hat))
    # llama.cpp's int(k) on x86: INT_MIN for a NaN, an infinity or one past int32's range, so 1
    k = max(int(k), 1) if np.isfinite(k) and abs(k) < 2**31 else 1
    return c.take(torch.topk(c.logits, min(k, len(probs))).indices)


def mirostat_mu(mu: float, p_chosen: float, o: ChainOptions) -> float:
    """Mirostat's target after a token of probability p_chosen (among those it kept) was drawn:
    mu - eta x (its surprise - tau), in float32 as llama.cpp keeps it."""
    f = np.float32
    surprise = -np.log2(f(p_chosen))
    return float(f(f(mu) - f(o.mirostat_eta) * f(surprise - f(o.mirostat_tau))))


# adaptive-p's transform (llama.cpp's DISTRIBUTION_WIDTH, PEAK_LOGIT_VALUE, SHARPNESS), float32
ADAPTIVE_INV_WIDTH = np.float32(1) / np.float32(0.3)
ADAPTIVE_PEAK = 5.0
ADAPTIVE_SHARPNESS = 10.0


def adaptive_start(o: ChainOptions) -> tuple[float, float]:
    """adaptive-p's moving average at a generation's start: (weighted sum, total weight) as if
    the target had been drawn for ever."""
    decay = np.float32(o.adaptive_decay)
    return float(np.float32(o.adaptive_target) / (1 - decay)), float(np.float32(1) / (1 - decay))


def adaptive_logits(c: Kept, o: ChainOptions, state: tuple[float, float]) -> Kept:
    """adaptive-p (llama.cpp's): each candidate's new logit 5 - 10 d^2 / (1 + d), d its
    probability's distance from the adapted target over 0.3; the target moved against the
    average probability of the tokens drawn so far (`state`), so that they average the target."""
    probs = c.probs()
    f = np.float32
    weighted, total = state
    target = f(min(max(o.adaptive_target, 0.0), 1.0))
    adapted = target if total == 0 else f(f(2) * target - f(weighted) / f(total))
    adapted = f(min(max(adapted, f(0)), f(1)))
    d = ((probs - float(adapted)) * float(ADAPTIVE_INV_WIDTH)).abs()
    logits = ADAPTIVE_PEAK - ADAPTIVE_SHARPNESS * d * d / (1 + d)
    return c.with_logits(torch.where(torch.isfinite(c.logits), logits, c.logits))


def adaptive_next(state: tuple[float, float], p_original: float, o: ChainOptions) -> tuple[float, float]:
    """The moving average after a token of (untransformed) probability p_original was drawn."""
    f = np.float32
    decay = f(o.adaptive_decay)
    return float(f(f(p_original) + decay * f(state[0]))), float(f(f(1) + decay * f(state[1])))
