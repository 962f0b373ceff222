"""Next-token choice: greedy, or a draw from what the sampler chain keeps.

The logit bias first (OpenAI's logit_bias, llama.cpp's --logit-bias: added to the raw logits),
then the chain's samplers in their order (sampler_chain.py; by default the penalties: the repeat
penalty, then the frequency and presence penalties, OpenAI's logit - count * frequency -
presence; DRY, dry.py; temperature; top-n-sigma, top-k, typical, top-p, min-p, XTC), then a draw
from the remaining distribution (adaptive-p's transform of it where the order names it); with
mirostat, the temperature and its truncation alone. Greedy
(temperature 0 or below) takes the argmax after the bias, the penalties and DRY, the other
samplers off. The logits may be on any device.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol

import torch

from .dry import Breakers, breakers, dry_penalties
from .sampler_chain import (MODIFIERS, ChainOptions, Kept, SamplingError, adaptive_logits, adaptive_next,
                            adaptive_start, mirostat_kept, mirostat_mu, run_chain)


@dataclass(frozen=True)
class SamplingParams:
    """As llama.cpp reads them: temperature None or <= 0 is greedy; top_k None or 0, top_p None
    or 1, min_p None or 0 turn their filter off (top_p 0 keeps only the most likely token);
    repeat_last_n 0 turns the penalties off and -1 covers every generated token; the frequency
    and presence penalties (0: off) see the same tokens as the repeat penalty, as llama.cpp's."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 299792458
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit): -inf bans it
    chain: ChainOptions = ChainOptions()  # the samplers' order, typical / top-n-sigma / XTC / dynamic temperature / DRY
    dry_breakers: Breakers | None = field(default=None, compare=False, repr=False)  # DRY's (None: none)

    def __post_init__(self) -> None:
        def fail(name: str, value: object, allowed: str) -> None:
            raise SamplingError(f"{name} {value}: {allowed}")

        if self.temperature is not None and not math.isfinite(self.temperature):
            fail("temperature", self.temperature, "a finite number (0 or below: greedy)")
        if self.top_k is not None and self.top_k < 0:
            fail("top_k", self.top_k, "0 (off) or more")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            fail("top_p", self.top_p, "between 0 and 1 (1: off)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            fail("min_p", self.min_p, "between 0 (off) and 1")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            fail("repeat_penalty", self.repeat_penalty, "above 0 (1: off)")
        if self.repeat_last_n < -1:
            fail("repeat_last_n", self.repeat_last_n, "-1 (every generated token), 0 (off) or more")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                fail(name, getattr(self, name), "a finite number (0: off)")
        for token, bias in self.logit_bias:
            if token < 0 or math.isnan(bias) or bias == math.inf:
                fail("logit_bias", f"{token}: {bias}", "a token id of 0 or more, and a number or -inf (banned)")

    @property
    def adjusted(self) -> bool:
        """Whether the bias or a penalty changes the logits (else greedy's token is the raw argmax)."""
        dry = self.chain.dry_multiplier != 0 and "dry" in self.chain.order
        return bool(self.logit_bias) or dry or self.repeat_last_n != 0 and "penalties" in self.chain.order and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0)

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0


def sampling_params(defaults: dict[str, Any], given: dict[str, Any], n_vocab: int,
                    tokenizer: Any = None) -> SamplingParams:
    """SamplingParams of Model.generate's arguments: one given as None takes `defaults`' value (a
    stored model's), else the built-in one; `logit_bias` a {token id: bias} dict (ids below n_vocab).
    With DRY on, its sequence breakers are found in `tokenizer`'s vocabulary (dry.breakers)."""
    values = {}
    for f in fields(SamplingParams):
        v = given.get(f.name)
        values[f.name] = v if v is not None else defaults.get(f.name, None if f.default is MISSING else f.default)
    try:
        values["logit_bias"] = tuple(sorted((int(k), float(b)) for k, b in dict(values["logit_bias"]).items()))
    except (TypeError, ValueError):
        raise SamplingError(f"logit_bias {values['logit_bias']!r}: {{token id: bias}}") from None
    for token, _ in values["logit_bias"]:
        if token >= n_vocab:
            raise SamplingError(f"logit_bias {token}: not a token id of this model (0 to {n_vocab - 1})")
    chain = values["chain"]
    if chain.dry_multiplier != 0 and tokenizer is not None:
        values["dry_breakers"] = breakers(tokenizer, chain.dry_sequence_breakers)
    return SamplingParams(**values)


def apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not recent:
        return logits
    logits = logits.clone()
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    vals = logits[ids]
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_count_penalties(logits: torch.Tensor, recent: list[int], frequency: float, presence: float) -> torch.Tensor:
    """logit - count * frequency - presence for each token in `recent` (OpenAI's penalties)."""
    if (frequency == 0 and presence == 0) or not recent:
        return logits
    ids, counts = torch.unique(torch.tensor(recent), return_counts=True)
    ids = ids.to(logits.device)
    logits = logits.clone()
    logits[ids] -= counts.to(logits.device, logits.dtype) * frequency + presence
    return logits


def _biased(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """float32 logits with the logit bias added."""
    logits = logits.float()
    if p.logit_bias:
        logits = logits.clone()
        for token, bias in p.logit_bias:
            logits[token] += bias
    return logits


def _penalties(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """The repeat, frequency and presence penalties over the last `repeat_last_n` tokens of history."""
    recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:] if p.repeat_last_n > 0 else []
    logits = apply_repeat_penalty(logits, recent, p.repeat_penalty)
    return apply_count_penalties(logits, recent, p.frequency_penalty, p.presence_penalty)


def _modified(name: str, c: Kept, history: list[int], p: SamplingParams, vocab: int) -> Kept:
    """The penalties' or DRY's step on the candidates (those of the whole vocabulary, or the
    candidates' logits set in a vocabulary of -inf for the step and read back)."""
    if name == "dry":
        o = p.chain
        cut = dry_penalties(history, o.dry_multiplier, o.dry_base, o.dry_allowed_length, o.dry_penalty_last_n,
                            p.dry_breakers or {})
        if not cut:
            return c
    full = c.logits if c.ids is None else torch.full((vocab,), float("-inf"), device=c.logits.device).index_copy(
        0, c.ids, c.logits)
    if name == "penalties":
        full = _penalties(full, history, p)
    else:
        full = full.clone()
        tokens = [t for t in cut if t < len(full)]
        index = torch.tensor(tokens, dtype=torch.long, device=full.device)
        full[index] -= torch.tensor([cut[t] for t in tokens], dtype=full.dtype, device=full.device)
    return Kept(None, full) if c.ids is None else Kept(c.ids, full[c.ids])


def _penalized(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """float32 logits after the bias, and the penalties and DRY where the sampler order has them
    (greedy's scores)."""
    c = Kept(None, _biased(logits, p))
    for name in p.chain.order:
        if name in MODIFIERS:
            c = _modified(name, c, history, p, logits.numel())
    return c.logits


# a generation's state, by its generator: mirostat's target; adaptive-p's average and the last
# draw's untransformed probabilities
_MU: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADAPTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DRAWN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the last draw's (ids, probabilities)


def drawn_from(gen: torch.Generator, p: SamplingParams) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """With post_sampling_probs, the distribution the last token of `gen`'s generation was drawn
    from (ids None: the vocabulary; greedy: its token alone at 1), else None."""
    return _DRAWN.get(gen) if p.chain.post_sampling_probs else None


def _adaptive(p: SamplingParams) -> bool:
    return "adaptive_p" in p.chain.order and p.chain.adaptive_target >= 0 and not p.chain.mirostat


def _mu(gen: torch.Generator | None, p: SamplingParams) -> float:
    """Mirostat's target in `gen`'s generation: 2 tau before its first token."""
    start = 2 * p.chain.mirostat_tau
    return _MU.get(gen, start) if gen is not None else start


def _drew(gen: torch.Generator, p: SamplingParams, ids: torch.Tensor | None, probs: torch.Tensor, pick: int) -> None:
    """A token drawn, `pick` among the kept `probs` (ids None: the vocabulary): with
    post_sampling_probs the distribution kept for its report (drawn_from); mirostat's target moved
    by its surprise, or adaptive-p's average by its probability before the transform."""
    if p.chain.post_sampling_probs:
        _DRAWN[gen] = (ids, probs)
    if p.greedy:
        return
    if p.chain.mirostat:
        _MU[gen] = mirostat_mu(_mu(gen, p), float(probs[pick]), p.chain)
    elif _adaptive(p) and gen in _ADAPTIVE:
        state, original = _ADAPTIVE[gen]
        _ADAPTIVE[gen] = (adaptive_next(state, float(original[pick]), p.chain), original)


def candidates(logits: torch.Tensor, history: list[int], p: SamplingParams,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For a non-greedy `p`: (ids, probabilities) of the tokens the sampler chain keeps (ids None:
    the whole vocabulary, in id order), the probabilities the softmax over them (sampler_chain.py:
    the bias first, then each sampler of the order). `gen` draws XTC's chance (a fresh one if None)
    and holds a generation's mirostat target and adaptive-p average: with mirostat on, llama.cpp's
    chain is the bias, the temperature and mirostat's truncation (sampler_chain.mirostat_kept), the
    order not run; with adaptive-p, the probabilities are its transform of what the order kept."""
    if p.chain.mirostat:
        kept = mirostat_kept(Kept(None, _biased(logits, p) / p.temperature), p.chain, _mu(gen, p), logits.numel())
        return kept.ids, kept.probs()
    gen = gen if gen is not None else torch.Generator()
    kept = run_chain(Kept(None, _biased(logits, p)), p, lambda name, c: _modified(name, c, history, p, logits.numel()),
                     gen)
    if _adaptive(p):  # adaptive-p: the draw's distribution transformed, the moving average kept by `gen`
        state = _ADAPTIVE[gen][0] if gen in _ADAPTIVE else adaptive_start(p.chain)
        _ADAPTIVE[gen] = (state, kept.probs())
        kept = adaptive_logits(kept, p.chain, state)
    return kept.ids, kept.probs()


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """An index into `probs` (not all zero), drawn with one uniform number from `gen`."""
    cdf = torch.cumsum(probs, 0)
    u = float(torch.rand(1, generator=gen, dtype=torch.float64))
    pick = int(torch.searchsorted(cdf, cdf.new_tensor([u * float(cdf[-1])]), right=True))
    if pick >= len(cdf):  # u * total rounded up to the total: the last token that can be drawn
        pick = int(torch.nonzero(probs).max())
    return pick


def sample(logits: torch.Tensor, history: list[int], p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from float32 logits (vocab,), on any device: the argmax, or one uniform number from `gen`
    against the cumulative probabilities of the `candidates` (a multinomial draw over the
    whole vocabulary costs ~5-25 ms on a CPU)."""
    if p.greedy:
        tok = int(torch.argmax(_penalized(logits, history, p)))
        _drew(gen, p, torch.tensor([tok]), torch.ones(1), 0)  # greedy's report: its token alone
        return tok
    ids, probs = candidates(logits, history, p, gen)
    pick = _draw(probs, gen)
    _drew(gen, p, ids, probs, pick)
    return pick if ids is None else int(ids[pick])


LOOKS = 64  # a format's greedy choice: the likeliest tokens checked one by one before the whole vocabulary is
REDRAWS = 32  # a format's draw: refused draws before the whole vocabulary is checked


class Format(Protocol):
    """What a format (json_format.JsonConstraint) tells the sampler."""

    def allows(self, token: int) -> bool: ...

    def admitted(self, n_vocab: int) -> torch.Tensor: ...  # bool, (n_vocab,): the tokens it allows


class FormatError(ValueError):
    """No token of the vocabulary continues the answer in its format."""


def _admitted(form: Format, logits: torch.Tensor) -> torch.Tensor:
    ok = form.admitted(logits.numel()).to(logits.device)
    if not bool(ok.any()):
        raise FormatError("no token of the vocabulary continues the answer in its format")
    return ok


def sample_allowed(logits: torch.Tensor, history: list[int], p: SamplingParams, gen: torch.Generator,
                   form: Format) -> int:
    """`sample` among the tokens `form` allows, the likeliest checked first, so that a model
    keeping to the format costs a check or two a token. Greedy: the likeliest allowed token
    after the repeat penalty. A draw: from what the filters keep, renormalized over the allowed
    ones (a refused draw is taken out and the draw made again, which gives exactly that
    distribution; after REDRAWS refusals the whole vocabulary is checked at once); where the
    filters keep no allowed token, they run again with the refused ones' logits at -inf."""
    if p.greedy:
        scores = _penalized(logits, history, p)
        best = int(torch.argmax(scores))
        if form.allows(best):
            return best
        for tok in torch.topk(scores, min(LOOKS, scores.numel())).indices.tolist():
            if form.allows(tok):
                return tok
        return int(torch.argmax(scores.masked_fill(~_admitted(form, logits), float("-inf"))))
    ids, first = candidates(logits, history, p, gen)

    def tid(i: int) -> int:
        return i if ids is None else int(ids[i])

    def token(i: int) -> int:  # the one chosen
        _drew(gen, p, ids, first, i)  # the chain's distribution, as llama.cpp's when its draw keeps to the grammar
        return tid(i)

    probs = first.double()
    for _ in range(REDRAWS):
        if not float(probs.sum()) > 0:
            break
        pick = _draw(probs, gen)
        if form.allows(tid(pick)):
            return token(pick)
        probs[pick] = 0
    ok = _admitted(form, logits)
    kept = probs * (ok if ids is None else ok[ids])
    if float(kept.sum()) > 0:
        return token(_draw(kept, gen))
    return sample(logits.float().masked_fill(~ok, float("-inf")), history, p, gen)
