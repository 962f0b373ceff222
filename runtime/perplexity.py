"""A text's perplexity under a model, and how far a quantized model's next-token distributions are
from a base model's (KL divergence): what llama.cpp's llama-perplexity measures, the same way.

The text's tokens are cut into chunks of `ctx` tokens (the tokens after the last whole chunk are
not read); each chunk is read from an empty cache, and the tokens of its second half are scored:
the logits at position j, for j from ctx/2 to ctx-2, give the probability of token j+1, so every
scored token has at least ctx/2 tokens before it. Perplexity is exp of the mean negative
log-likelihood; its uncertainty is llama.cpp's (the standard error of that mean, times the
perplexity). With a base (the same model, less quantized) every scored position also gives
KL(base || model) of the two next-token distributions, Δp (the model's probability of the right
token less the base's) and whether both put the same token on top; llama.cpp reads the base's
log-probabilities back from a file stored as 16-bit steps and leaves out those below e^-16, where
here both models' log-probabilities are float32 and the sums are over every token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

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


def chunk_count(n_tokens: int, ctx: int, chunks: int | None, max_ctx: int | None = None) -> int:
    """The chunks of `ctx` tokens to read: every whole one, or the first `chunks`; llama.cpp's
    floor of two chunks' tokens, and the model's context `max_ctx` (a PerplexityError past them)."""
    if ctx < MIN_CTX:
        raise PerplexityError(f"context {ctx}: {MIN_CTX} tokens or more")
    if max_ctx is not None and ctx > max_ctx:
        raise PerplexityError(f"context {ctx}: the model reads at most {max_ctx} tokens")
    if n_tokens < 2 * ctx:
        raise PerplexityError(f"the text is {n_tokens} tokens: a context of {ctx} needs {2 * ctx} or more "
                              "(a longer text, or a smaller --ctx-size)")
    if chunks is not None and chunks < 1:
        raise PerplexityError(f"chunks {chunks}: 1 or more")
    return min(n_tokens // ctx, chunks or n_tokens)


def _log_probs(model: Model, ids: list[int], first: int) -> Iterator[torch.Tensor]:
    """float32 log-softmax rows of positions first..len(ids)-2, LOGIT_ROWS at a time."""
    hidden = torch.cat(model.token_hidden(ids))
    for start in range(first, len(ids) - 1, LOGIT_ROWS):
        logits = model.decoder.logits(hidden[start:min(start + LOGIT_ROWS, len(ids) - 1)])
        yield torch.log_softmax(logits.float(), dim=-1)


def score_chunk(model: Model, ids: list[int], base: Model | None = None) -> Scores:
    """One chunk's scores: its second half's tokens, under `model` (and `base`)."""
    first = len(ids) // 2
    rows = _log_probs(model, ids, first)
    base_rows = _log_probs(base, ids, first) if base is not None else None
    at = first
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")}
    for lp in rows:
        target = torch.tensor(ids[at + 1:at + 1 + lp.shape[0]])
        right = lp.gather(1, target[:, None])[:, 0]
        parts["nll"].append((-right).double().numpy())
        if base_rows is not None:
            lb = next(base_rows)
            right_base = lb.gather(1, target[:, None])[:, 0]
            parts["nll_base"].append((-right_base).double().numpy())
            kld = (lb.exp() * (lb - lp)).sum(dim=-1, dtype=torch.float64)
            parts["kld"].append(kld.numpy())
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
            each: Callable[[int, int, Scores], None] | None = None) -> Scores:
    """Every scored token's scores over the text's chunks; `each(i, n, so_far)` after chunk i of n."""
    if base is not None and base.cfg.n_vocab != model.cfg.n_vocab:
        raise PerplexityError(f"the base's vocabulary is {base.cfg.n_vocab} tokens, the model's "
                              f"{model.cfg.n_vocab}: not the same model")
    n = chunk_count(len(ids), ctx, chunks, model.cfg.context_length)
    done: list[Scores] = []
    for i in range(n):
        done.append(score_chunk(model, ids[i * ctx:(i + 1) * ctx], base))
        if each is not None:
            each(i, n, _join(done))
    return _join(done)
