"""Log-probabilities of tokens (OpenAI's `logprobs`): of each generated token under the model's
own distribution (the raw logits' log-softmax: before the repeat penalty, temperature and
filters), with the likeliest alternatives; and of each prompt token given the ones before it
(`echo`, as lm-evaluation-harness scores a continuation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from .json_format import piece_bytes

if TYPE_CHECKING:
    from .model import Model

MAX_TOP = 20  # OpenAI's (and Ollama's) limit on top_logprobs
Speller = Callable[[int], tuple[str, bytes]]  # a token id -> its text and its bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top` likeliest tokens at that step and their log-probabilities, likeliest first


def token_logprob(logits: torch.Tensor, token: int, top: int,
                  drawn: tuple[torch.Tensor | None, torch.Tensor] | None = None) -> TokenLogprob:
    """`token`'s log-probability under logits (vocab,) and the `top` likeliest ones; with `drawn`
    (ids, probabilities; ids None: the vocabulary), under that distribution instead (llama-server's
    post_sampling_probs: the sampler chain's), its tokens of probability 0 left out."""
    if drawn is not None:
        ids, probs = drawn
        probs = probs.float().cpu()
        ids = torch.arange(len(probs)) if ids is None else ids.cpu()
        values, order = torch.topk(probs, min(top, len(probs)))
        ranked = [(int(ids[i]), float(v)) for i, v in zip(order, values) if v > 0]
        where = torch.nonzero(ids == token).flatten()
        p = float(probs[where[0]]) if len(where) else 0.0
        return TokenLogprob(token, math.log(p) if p > 0 else -math.inf, [(i, math.log(v)) for i, v in ranked])
    lp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(lp, top) if top else None
    alternatives = [(int(i), float(v)) for v, i in zip(best.values, best.indices)] if best is not None else []
    return TokenLogprob(token, float(lp[token]), alternatives)


LOGIT_ROWS = 128  # prompt positions made logits at a time when scoring one: 128 x 152k float32, 78 MB


def prompt_logprobs(model: Model, text: str, top: int) -> tuple[list[int], list[TokenLogprob | None]]:
    """A raw prompt's token ids and each token's log-probability given the ones before it (the
    first has none); the logits made LOGIT_ROWS positions at a time, never all of them at once."""
    ids = model.tokenize(text, [])[0]
    if not ids:
        return [], []
    hidden = torch.cat(model.token_hidden(ids))
    scores: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, LOGIT_ROWS):
        logits = model.decoder.logits(hidden[start:min(start + LOGIT_ROWS, len(ids) - 1)])
        scores += [token_logprob(row, ids[start + j + 1], top) for j, row in enumerate(logits)]
    return ids, scores


def speller(tokenizer: Tokenizer) -> Speller:
    """A token's text and its bytes (a byte-level token may hold part of a character); the
    tokenizer's added tokens (their text as it is) looked up once, not a token at a time."""
    added = set(tokenizer.get_added_tokens_decoder())

    def piece(token: int) -> tuple[str, bytes]:
        text = tokenizer.id_to_token(token) or ""
        data = None if token in added else piece_bytes(text)
        return (text, text.encode()) if data is None else (data.decode(errors="replace"), data)

    return piece


def entries(piece: Speller, scored: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' logprobs as OpenAI's chat `logprobs.content` and Ollama's `logprobs` spell them:
    [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text, data = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in scored]


def new_scores(model: Model, sent: list[int]) -> list[TokenLogprob]:
    """The tokens a stream (generate/chat with logprobs=) scored since its last chunk; sent[0]
    of them went out before, and counts these too."""
    new = model.scored[sent[0]:]
    sent[0] += len(new)
    return new
