"""Next-token choice: greedy, or temperature with top-k / top-p / min-p, and a repeat penalty.

Order as in llama.cpp's and candle's samplers: repeat penalty on the raw logits, then
temperature, top-k, top-p, min-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float | None = None  # None or 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 299792458


def apply_repeat_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not recent:
        return logits
    logits = logits.clone()
    ids = torch.tensor(sorted(set(recent)))
    vals = logits[ids]
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def sample(logits: torch.Tensor, history: list[int], p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from float32 logits (vocab,)."""
    recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else []
    logits = apply_repeat_penalty(logits.float(), recent, p.repeat_penalty)
    if not p.temperature:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k is not None and 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p is not None and 0 < p.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p  # always keeps the first
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    if p.min_p is not None and p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
