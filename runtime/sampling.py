"""Next-token choice: greedy, or a draw from what the sampler chain keeps.

The logit bias first (OpenAI's logit_bias, llama.cpp's --logit-bias: added to the raw logits),
then the chain's samplers in their order (sampler_chain.py; by default the penalties: the repeat
penalty, then the frequency and presence penalties, OpenAI's logit - count * frequency -
presence; DRY, dry.py; temperature; top-n-sigma, top-k, typical, top-p, min-p, XTC), then a draw
from the remaining distribution (adaptive-p's transform of it where the order names it); with
mirostat, the temperature and its truncation alone. Greedy
(temperature 0 or below) takes the argmax after the bias, the penalties and DRY, the other
samplers off. The logits may be on any device.

The draw is llama.cpp's (llama_random.py): the seed's std::mt19937 and llama_sampler_dist's
running sum over the candidates in llama.cpp's order (mirostat's and adaptive-p's
std::discrete_distribution from their own), so that the same seed and the same logits give the
tokens llama.cpp gives.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol

import torch

from .dry import Breakers, breakers, dry_penalties
from .llama_random import discrete, dist_pick, softmax_f32, streams
from .sampler_chain import (MODIFIERS, ChainOptions, Kept, SamplingError, adaptive_logits, adaptive_next,
                            adaptive_start, mirostat_kept, mirostat_mu, run_chain)


RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED (and -1): a random seed a generation


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
    With DRY on, its sequence breakers are found in `tokenizer`'s vocabulary (dry.breakers). A seed
    of -1 (or its 32 bits, 4294967295: llama.cpp's LLAMA_DEFAULT_SEED) is a random one, as llama.cpp
    and Ollama take it."""
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
    if values["seed"] in (-1, RANDOM_SEED):
        values["seed"] = int.from_bytes(os.urandom(4), "little") % RANDOM_SEED  # never the random seed itself
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
    return c.with_logits(full if c.ids is None else full[c.ids])


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


def _drew(gen: torch.Generator, p: SamplingParams, ids: torch.Tensor | None, probs: torch.Tensor | None,
          pick: int) -> None:
    """A token drawn, `pick` among the kept `probs` (ids None: the vocabulary; probs None where
    neither post_sampling_probs nor mirostat is on, the only readers of them): with
    post_sampling_probs the distribution kept for its report (drawn_from); mirostat's target moved
    by its surprise, or adaptive-p's average by its probability before the transform."""
    if p.chain.post_sampling_probs:
        _DRAWN[gen] = (ids, probs)
    if p.greedy:
        return
    if p.chain.mirostat:
        assert probs is not None
        _MU[gen] = mirostat_mu(_mu(gen, p), float(probs[pick]), p.chain)
    elif _adaptive(p) and gen in _ADAPTIVE:
        state, original = _ADAPTIVE[gen]
        _ADAPTIVE[gen] = (adaptive_next(state, float(original[pick]), p.chain), original)


def _kept(logits: torch.Tensor, history: list[int], p: SamplingParams, gen: torch.Generator) -> Kept:
    """What the sampler chain keeps of `logits` for a non-greedy `p`, in llama.cpp's order: with
    mirostat on, llama.cpp's chain is the bias, the temperature and mirostat's truncation
    (sampler_chain.mirostat_kept), the order not run; with adaptive-p, its transform of what the
    order kept. `gen` stands for the generation: its XTC draws, mirostat target and adaptive-p average.
    Where the draw is a discrete_distribution (mirostat, adaptive-p) they are sorted as llama.cpp's
    are; dist's draw (llama_random.dist_pick) sorts only what it must of a sort still due."""
    if p.chain.mirostat:
        kept = mirostat_kept(Kept(None, _biased(logits, p) / p.temperature), p.chain, _mu(gen, p), logits.numel())
        return kept.in_order()  # its draw takes them in order (few: sorting them costs little)
    kept = run_chain(Kept(None, _biased(logits, p)), p, lambda name, c: _modified(name, c, history, p, logits.numel()),
                     gen)
    if _adaptive(p):  # adaptive-p: the draw's distribution transformed, the moving average kept by `gen`
        state = _ADAPTIVE[gen][0] if gen in _ADAPTIVE else adaptive_start(p.chain)
        _ADAPTIVE[gen] = (state, kept.probs())
        kept = adaptive_logits(kept, p.chain, state)
    return kept.in_order() if "adaptive_p" in p.chain.order else kept


def candidates(logits: torch.Tensor, history: list[int], p: SamplingParams,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For a non-greedy `p`: (ids, probabilities) of the tokens the sampler chain keeps (ids None:
    the whole vocabulary, in id order; else in llama.cpp's order), the probabilities the softmax
    over them (sampler_chain.py: the bias first, then each sampler of the order; `_kept`). `gen`
    is the generation's (a fresh one if None)."""
    kept = _kept(logits, history, p, gen if gen is not None else torch.Generator())
    return kept.ids, kept.probs()


def _pick(kept: Kept, gen: torch.Generator, p: SamplingParams) -> int:
    """An index into the candidates `kept`, drawn from their float32 logits (-inf: never drawn, not
    all) as llama.cpp draws from the generation's generators: mirostat's or adaptive-p's
    discrete_distribution over softmax_impl's probabilities where the chain ends in them (the
    candidates in order, `_kept`), else llama_sampler_dist's draw (in the order of kept.key where set)."""
    if p.chain.mirostat:
        return discrete(streams(gen)["mirostat"], softmax_f32(kept.logits.cpu().numpy()))
    if "adaptive_p" in p.chain.order:  # llama.cpp's adaptive-p sampler draws in place of dist, its target below 0 too
        return discrete(streams(gen)["adaptive_p"], softmax_f32(kept.logits.cpu().numpy()))
    return dist_pick(streams(gen)["dist"], kept.logits, kept.key)


def _chosen(gen: torch.Generator, p: SamplingParams, kept: Kept, pick: int) -> int:
    """The id drawn at `pick`, its updates made (`_drew`; mirostat's from softmax_impl's float32
    probability of it, as llama.cpp's). The candidates' probabilities are taken only where mirostat
    or the post-sampling report reads them (llama.cpp's draw needs none)."""
    probs = None
    if p.chain.mirostat:
        probs = torch.from_numpy(softmax_f32(kept.logits.cpu().numpy())).to(kept.logits.device)
    elif p.chain.post_sampling_probs:
        probs = kept.probs()
    _drew(gen, p, kept.ids, probs, pick)
    return pick if kept.ids is None else int(kept.ids[pick])


def sample(logits: torch.Tensor, history: list[int], p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from float32 logits (vocab,), on any device: the argmax, or llama.cpp's draw
    (`_pick`) among the candidates the chain keeps."""
    if p.greedy:
        tok = int(torch.argmax(_penalized(logits, history, p)))
        _drew(gen, p, torch.tensor([tok]), torch.ones(1), 0)  # greedy's report: its token alone
        return tok
    kept = _kept(logits, history, p, gen)
    return _chosen(gen, p, kept, _pick(kept, gen, p))


LOOKS = 64  # a format's greedy choice: the likeliest tokens checked one by one before the whole vocabulary is


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
    """`sample` among the tokens `form` allows, as llama.cpp's common_sampler keeps to a grammar:
    the token drawn from the whole chain is taken if the format allows it (a check a token for a
    model that keeps to it); else the chain runs again over the allowed tokens alone (the others'
    logits at -inf) and draws again, from the same generators (mirostat's target moved by the
    refused draw too, as llama.cpp's mirostat moves it at each draw). Greedy: the likeliest
    allowed token after the bias, the penalties and DRY."""
    if p.greedy:
        scores = _penalized(logits, history, p)
        best = int(torch.argmax(scores))
        if form.allows(best):
            return best
        for tok in torch.topk(scores, min(LOOKS, scores.numel())).indices.tolist():
            if form.allows(tok):
                return tok
        return int(torch.argmax(scores.masked_fill(~_admitted(form, logits), float("-inf"))))
    kept = _kept(logits, history, p, gen)
    pick = _pick(kept, gen, p)
    if form.allows(pick if kept.ids is None else int(kept.ids[pick])):
        return _chosen(gen, p, kept, pick)
    if p.chain.mirostat:
        _chosen(gen, p, kept, pick)
    return sample(logits.float().masked_fill(~_admitted(form, logits), float("-inf")), history, p, gen)
