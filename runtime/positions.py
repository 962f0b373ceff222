"""M-RoPE positions of a prompt, exactly as transformers' `get_rope_index` computes them.

Text tokens advance all three indices together. An image (or video) of merged grid
`t x h x w` starting at position p gets t-index p + floor(k * interval) for frame k (interval 1
for images, `tokens_per_second * second_per_grid_t` for Qwen2.5-VL videos), h-index p + row,
w-index p + column; the text after it resumes at p + max(h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Span:
    """A run of the prompt: `length` text tokens, or one image/video of merged grid (t, h, w)."""

    length: int
    grid: tuple[int, int, int] | None = None
    interval: float = 1.0  # temporal position step per merged frame


def rope_positions(spans: list[Span], start: int = 0) -> torch.Tensor:
    """(3, total length) int64 positions for the spans in order."""
    parts = []
    pos = start
    for s in spans:
        if s.grid is None:
            parts.append(torch.arange(pos, pos + s.length).expand(3, -1))
            pos += s.length
            continue
        t, h, w = s.grid
        tt = (torch.arange(t) * s.interval).long()
        hh = torch.arange(h) + pos
        ww = torch.arange(w) + pos
        T, H, W = torch.meshgrid(tt, hh, ww, indexing="ij")
        grid = torch.stack([T, H, W]).reshape(3, -1)
        grid[0] += pos
        parts.append(grid)
        pos += max(h, w)
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(parts, dim=1)
