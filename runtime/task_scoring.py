"""What llama-perplexity's task scores share (hellaswag.py, winogrande.py, multiple_choice.py): its
random generator and draws, and a task's choices read after their shared first tokens, those
read once.

llama.cpp reads a task's choices as sequences of one batch, the shared tokens once for all; here
the shared tokens go into a cache once and each choice's own tokens after them, from that cache:
the same logits, a choice at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from .llama_random import StdMt19937
from .model import Model

T = TypeVar("T")
S = TypeVar("S")  # a scored task: has `right`


class TaskError(ValueError):
    """A task file that is not llama.cpp's layout, or a task the model cannot read; one line."""


def swap_draws(total: int, n: int) -> list[int]:
    """llama-perplexity's --winogrande-tasks / --multiple-choice-tasks draw of n of `total` indices:
    std::mt19937 seeded with 1, j = int(float(word) * 2^-32 * float(left)) in float32, the index
    at j taken and the last moved there."""
    gen, aux, picked = StdMt19937(1), list(range(total)), []
    scale = np.float32(1) / (np.float32(1) + np.float32(StdMt19937.max))
    for _ in range(n):
        j = min(int(scale * np.float32(gen()) * np.float32(len(aux))), len(aux) - 1)
        picked.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return picked


def common_prefix(seqs: list[list[int]]) -> int:
    """How many first tokens all the sequences share."""
    n = 0
    while all(n < len(s) for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def choices_log_probs(model: Model, seqs: list[list[int]], common: int,
                      last: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float32 log-probabilities (rows of the vocabulary): the row after the shared tokens' last,
    and for each sequence the rows after each of its own tokens (the last one's too, or not)."""
    cache = model.decoder.new_cache(max(len(s) for s in seqs), model.placement.kv_type)
    shared = model.token_hidden(seqs[0][:common], cache)[-1][-1:]
    first = torch.log_softmax(model.decoder.logits(shared).float(), -1)
    rows = []
    for s in seqs:
        cache.length = common
        own = s if last else s[:-1]
        if len(own) == common:
            rows.append(first[:0])
            continue
        hidden = torch.cat(model.token_hidden(own, cache))
        rows.append(torch.log_softmax(model.decoder.logits(hidden).float(), -1))
    return first, rows


def endings_mean_log_probs(model: Model, context: str, endings: Sequence[str]) -> tuple[float, ...]:
    """Each ending's mean log-probability of its tokens after those all share ("context ending",
    tokenized whole), the first of them from the shared tokens' last row: llama-perplexity's
    --hellaswag and --multiple-choice score."""
    seqs = [model.tokenizer.encode(f"{context} {e}", add_special_tokens=False).ids for e in endings]
    common = common_prefix(seqs)
    if common == 0 or any(len(s) == common for s in seqs):
        raise TaskError(f"task {context[:40]!r}: its endings share no first token, or one adds none")
    if max(len(s) for s in seqs) > model.cfg.context_length:
        raise TaskError(f"task {context[:40]!r}: {max(len(s) for s in seqs)} tokens, more than the model reads "
                        f"({model.cfg.context_length})")
    first, rows = choices_log_probs(model, seqs, common, last=False)
    means = []
    for s, r in zip(seqs, rows):
        rest = r.gather(1, torch.tensor(s[common + 1:], dtype=torch.long, device=r.device)[:, None])
        means.append((float(first[0, s[common]]) + float(rest.double().sum())) / (len(s) - common))
    return tuple(means)


def first_best(values: Sequence[float]) -> int:
    """The index of the highest value, the first of equals (llama.cpp's strict >)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_all(model: Model, tasks: Sequence[T], score: Callable[[Model, T], S],
              each: Callable[[int, S, int], None] | None = None) -> list[S]:
    """Each task's `score` in order (each scored result has `right`); `each(i, scored, right so
    far)` after each: the running line llama-perplexity prints."""
    out, right = [], 0
    for i, task in enumerate(tasks):
        scored = score(model, task)
        right += scored.right
        out.append(scored)
        if each is not None:
            each(i, scored, right)
    return out
