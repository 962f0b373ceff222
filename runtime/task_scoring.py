"""What llama-perplexity's multiple-choice scores share (hellaswag.py, winogrande.py): its random
generator, and a task's choices read after their shared first tokens, those read once.

llama.cpp reads a task's choices as sequences of one batch, the shared tokens once for all; here
the shared tokens go into a cache once and each choice's own tokens after them, from that cache:
the same logits, a choice at a time."""

from __future__ import annotations

import random

import torch

from .model import Model

_WORD = 0xFFFFFFFF


class StdMt19937:
    """std::mt19937(seed)'s 32-bit words (CPython's generator is MT19937: its state set as
    init_genrand(seed) leaves it, getrandbits(32) is genrand_uint32)."""

    max = _WORD

    def __init__(self, seed: int):
        state = [seed & _WORD]
        for i in range(1, 624):
            state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) & _WORD)
        self._r = random.Random()
        self._r.setstate((3, (*state, 624), None))

    def __call__(self) -> int:
        return self._r.getrandbits(32)


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
