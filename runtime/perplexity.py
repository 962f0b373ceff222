"""A text's perplexity under a model, and how far a quantized model's next-token distributions are
from a base model's (KL divergence): what llama.cpp's llama-perplexity measures, the same way.

The text's tokens are cut into chunks of `ctx` tokens (the tokens after the last whole chunk are
not read); each chunk is read from an empty cache, and the tokens of its second half are scored:
the logits at position j, for j from ctx/2 to ctx-2, give the probability of token j+1, so every
scored token has at least ctx/2 tokens before it. Perplexity is exp of the mean negative
log-likelihood; its uncertainty is llama.cpp's (the standard error of that mean, times the
perplexity). With a base (the same model, less quantized) every scored position also gives
KL(base || model) of the two next-token distributions, Δp (the model's probability of the right
token less the base's) and whether both put the same token on top. The base is either run beside
the model (both models' log-probabilities float32, the sums over every token) or read back from
llama-perplexity's file of the base's log-probabilities (logits_file.py: 16-bit steps, those at
e^-16 or below left out, as llama.cpp leaves them), which a run of the base writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .logits_file import FLOOR, Stored
from .logprobs import LOGIT_ROWS
from .model import Model

MIN_CTX = 4  # the least chunk that scores a token after one of context


class PerplexityError(ValueError):
    """A text, context size or pair of models that cannot be measured; one line."""


@dataclass(frozen=True)
class Scores:
    """Per scored token, in text order: the model's negative log-likelihood and, with a base, the
    base's, the KL divergence, Δp and whether the top tokens agree (None without a base)."""
    nll: np.ndarray
    nll_base: np.ndarray | None = None
    kld: np.ndarray | None = None
    p_diff: np.ndarray | None = None
    same_top: np.ndarray | None = None


def chunk_count(n_tokens: int, ctx: int, chunks: int | None, max_ctx: int | None = None, at_least: int = 2) -> int:
    """The chunks of `ctx` tokens to read: every whole one, or the first `chunks`; llama.cpp's
    floor of two chunks' tokens (`at_least`), and the model's context `max_ctx` (a PerplexityError
    past them)."""
    if ctx < MIN_CTX:
        raise PerplexityError(f"context {ctx}: {MIN_CTX} tokens or more")
    if max_ctx is not None and ctx > max_ctx:
        raise PerplexityError(f"context {ctx}: the model reads at most {max_ctx} tokens")
    if n_tokens < at_least * ctx:
        raise PerplexityError(f"the text is {n_tokens} tokens: a context of {ctx} needs {at_least * ctx} or more "
                              "(a longer text, or a smaller --ctx-size)")
    if chunks is not None and chunks < 1:
        raise PerplexityError(f"chunks {chunks}: 1 or more")
    return min(n_tokens // ctx, chunks or n_tokens)


def _logits(model: Model, ids: list[int], first: int) -> Iterator[torch.Tensor]:
    """float32 logits rows of positions first..len(ids)-2, LOGIT_ROWS at a time."""
    hidden = torch.cat(model.token_hidden(ids))
    for start in range(first, len(ids) - 1, LOGIT_ROWS):
        yield model.decoder.logits(hidden[start:min(start + LOGIT_ROWS, len(ids) - 1)]).float()


StoredRows = Callable[[int, int], torch.Tensor]  # a chunk's base log-probabilities, scored rows start..stop


def score_chunk(model: Model, ids: list[int], base: Model | None = None, stored: StoredRows | None = None,
                keep: Callable[[torch.Tensor], None] | None = None) -> Scores:
    """One chunk's scores: its second half's tokens, under `model`, and against the base's
    distributions (`base` run beside it, or `stored` rows read from a file, whose log-probabilities
    at FLOOR or lower are left out of the KL divergence, as llama.cpp leaves them); `keep` is given
    each batch of the model's logits (for a file of them)."""
    first = len(ids) // 2
    base_rows = _logits(base, ids, first) if base is not None else None
    floor = FLOOR if stored is not None else -math.inf
    at = first
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")}
    for logits in _logits(model, ids, first):
        if keep is not None:
            keep(logits)
        lp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[at + 1:at + 1 + lp.shape[0]])
        right = lp.gather(1, target[:, None])[:, 0]
        parts["nll"].append((-right).double().numpy())
        lb = (torch.log_softmax(next(base_rows), dim=-1) if base_rows is not None
              else stored(at - first, at - first + lp.shape[0]) if stored is not None else None)
        if lb is not None:
            right_base = lb.gather(1, target[:, None])[:, 0]
            parts["nll_base"].append((-right_base).double().numpy())
            terms = torch.where(lb > floor, lb.exp() * (lb - lp), 0.0)
            parts["kld"].append(terms.sum(dim=-1, dtype=torch.float64).numpy())
            parts["p_diff"].append((right.double().exp() - right_base.double().exp()).numpy())
            parts["same_top"].append((lp.argmax(dim=-1) == lb.argmax(dim=-1)).numpy())
        at += lp.shape[0]
    joined = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Scores(**joined)


def _join(scores: list[Scores]) -> Scores:
    def cat(name: str) -> np.ndarray | None:
        values = [getattr(s, name) for s in scores]
        return None if values[0] is None else np.concatenate(values)

    return Scores(*(cat(n) for n in ("nll", "nll_base", "kld", "p_diff", "same_top")))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error, as llama.cpp reckons them (0 for one value)."""
    n = len(values)
    mean = float(values.mean())
    var = float((values * values).mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if n > 1 and var > 0 else 0.0


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's: linear between the two nearest of the sorted values."""
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[min(i + 1, len(sorted_values) - 1)])


PERCENTILES = (0.999, 0.99, 0.95, 0.9, 0.5, 0.1, 0.05, 0.01, 0.001)


def summary(scores: Scores) -> dict[str, float | dict[str, float]]:
    """The figures llama-perplexity prints: PPL ± its uncertainty; with a base, PPL(base), the
    correlation and ratio of their logs, mean KLD (and its maximum, percentiles and minimum), mean
    and RMS Δp, and the share of positions whose top tokens agree, each ± its uncertainty."""
    log_ppl, log_unc = mean_and_uncertainty(scores.nll)
    out: dict[str, float | dict[str, float]] = {"tokens": len(scores.nll), "ppl": math.exp(log_ppl),
                                                "ppl_uncertainty": math.exp(log_ppl) * log_unc}
    if scores.nll_base is None:
        return out
    assert scores.kld is not None and scores.p_diff is not None and scores.same_top is not None
    n = len(scores.nll)
    base, base_unc = mean_and_uncertainty(scores.nll_base)
    cov = (float((scores.nll * scores.nll_base).mean()) - log_ppl * base) / (n - 1) if n > 1 else 0.0
    ratio_unc = math.sqrt(max(log_unc ** 2 + base_unc ** 2 - 2 * cov, 0.0))
    kld, kld_unc = mean_and_uncertainty(scores.kld)
    p_diff, p_diff_unc = mean_and_uncertainty(scores.p_diff)
    mse, mse_unc = mean_and_uncertainty(scores.p_diff ** 2)
    rms = math.sqrt(mse)
    same = float(scores.same_top.mean())
    ordered = np.sort(scores.kld)
    out.update({
        "ppl_base": math.exp(base), "ppl_base_uncertainty": math.exp(base) * base_unc,
        "ln_ppl_correlation": cov / (log_unc * base_unc) if log_unc and base_unc else 1.0,
        "ln_ppl_ratio": log_ppl - base, "ln_ppl_ratio_uncertainty": ratio_unc,
        "kld": kld, "kld_uncertainty": kld_unc, "kld_max": float(ordered[-1]), "kld_min": float(ordered[0]),
        "kld_percentiles": {f"{100 * f:.1f}": _percentile(ordered, f) for f in PERCENTILES},
        "p_diff": p_diff, "p_diff_uncertainty": p_diff_unc,
        "p_diff_rms": rms, "p_diff_rms_uncertainty": 0.5 / rms * mse_unc if rms else 0.0,
        "same_top": same, "same_top_uncertainty": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    })
    return out


def measure(model: Model, ids: list[int], ctx: int, chunks: int | None = None, base: Model | None = None,
            each: Callable[[int, int, Scores], None] | None = None, stored: Stored | None = None,
            keep: Callable[[torch.Tensor], None] | None = None) -> Scores:
    """Every scored token's scores over the text's chunks, against `base` run beside the model or the
    `stored` file's chunks (whose tokens are then the text); `keep` is given the model's logits rows
    in order; `each(i, n, so_far)` after chunk i of n."""
    n_vocab = stored.n_vocab if stored is not None else base.cfg.n_vocab if base is not None else None
    if n_vocab is not None and n_vocab != model.cfg.n_vocab:
        raise PerplexityError(f"the base's vocabulary is {n_vocab} tokens, the model's "
                              f"{model.cfg.n_vocab}: not the same model")
    if stored is not None:
        if ctx != stored.n_ctx:
            raise PerplexityError(f"context {ctx}: {stored.path} was made with chunks of {stored.n_ctx} tokens")
        if chunks is not None and chunks > stored.n_chunk:
            raise PerplexityError(f"chunks {chunks}: {stored.path} holds {stored.n_chunk}")
        ids = stored.tokens
    n = chunk_count(len(ids), ctx, chunks, model.cfg.context_length, at_least=1 if stored is not None else 2)
    done: list[Scores] = []
    for i in range(n):
        rows = partial(stored.log_probs, i) if stored is not None else None
        done.append(score_chunk(model, ids[i * ctx:(i + 1) * ctx], base, rows, keep))
        if each is not None:
            each(i, n, _join(done))
    return _join(done)
