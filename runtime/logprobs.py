"""Log-probabilities of tokens (OpenAI's `logprobs`): of each generated token under the model's
own distribution (the raw logits' log-softmax: before the repeat penalty, temperature and
filters), with the likeliest alternatives; and of each prompt token given the ones before it
(`echo`, as lm-evaluation-harness scores a continuation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import Model

MAX_TOP = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top` likeliest tokens at that step and their log-probabilities, likeliest first


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under logits (vocab,) and the `top` likeliest ones."""
    lp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(lp, top) if top else None
    alternatives = [(int(i), float(v)) for v, i in zip(best.values, best.indices)] if best is not None else []
    return TokenLogprob(token, float(lp[token]), alternatives)


def prompt_logprobs(model: Model, text: str, top: int) -> tuple[list[int], list[TokenLogprob | None]]:
    """A raw prompt's token ids and each token's log-probability given the ones before it (the
    first has none). Holds the prompt's logits at once: (tokens x 152k) float32."""
    ids = model.tokenize(text, [])[0]
    if not ids:
        return [], []
    logits = model.prompt_logits(text, template=False)
    return ids, [None] + [token_logprob(logits[i - 1], ids[i], top) for i in range(1, len(ids))]
