"""Next-token choice: greedy, or temperature with top-k / top-p / min-p, and a repeat penalty.

Order as in llama.cpp's and candle's samplers: repeat penalty on the raw logits, then
temperature, top-k, top-p, min-p, then a draw from the remaining distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """A sampling parameter out of its range."""


@dataclass(frozen=True)
class SamplingParams:
    """As llama.cpp reads them: temperature None or <= 0 is greedy; top_k None or 0, top_p None
    or 1, min_p None or 0 turn their filter off (top_p 0 keeps only the most likely token);
    repeat_last_n 0 turns the penalty off and -1 covers every generated token."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 299792458

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

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0


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
    recent = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:] if p.repeat_last_n > 0 else []
    logits = apply_repeat_penalty(logits.float(), recent, p.repeat_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k is not None and 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p is not None and p.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
        keep[0] = True  # the most likely token always stays
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    if p.min_p is not None and p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
