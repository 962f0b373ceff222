"""The keys and values of a decoder layer offloaded for a prompt, mirrored on the accelerator.

A prompt through the CPU's layers runs each of them on the accelerator from a copy
(decoder.prefill_offload, copy_ahead.py); the layer's KV cache stays on the CPU, where its decode
steps read it. Each of the prompt's passes stores its k, v there and attends to every key so
far. Before this file each pass copied the layer's whole cache so far, tokens [0, end), back to
the accelerator, in its own turn on the compute stream, from pageable memory: a 4096-token prompt
(two groups of four 512-token passes) read 18,432 tokens' keys and values a layer, 72 MiB of the
7B's float32 cache, a GiB over 14 CPU layers.

Here the layer's copy carries a mirror of its cache on the accelerator, with room for the
tokens its passes add (`Span`): the tokens cached before them are copied with the layer's
weights (on the copy worker, a layer ahead, where copies are made ahead), and each pass's k, v
are written into it beside the cache's store. A float cache's mirror takes them converted on the
accelerator as the cache's store converts them; a q8_0 cache's reads the pass's tokens back
from the cache, dequantized as the cache rounded them. The 4096-token prompt now copies the
2048 tokens before its second group, once a layer: 8 MiB of the 7B's, 1/9 as much.

The mirror holds its keys and values in the dtype the attention multiplies them in (`dtype`:
bf16 on the kernel path, where kernels/attention.py made a bf16 copy of float32 keys each pass),
converted from what the cache reads, so the products are those of the cache's own keys: half
the memory of a float32 mirror, which placement.py counts a token of a copy's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .decoder import KVCache


@dataclass(frozen=True)
class Span:
    """The tokens [start, end) that passes through offloaded copies add to `cache`."""

    cache: KVCache
    start: int
    end: int


class KVMirror:
    """Layer `layer`'s keys and values in `span.cache`, tokens [0, filled), on `device` in
    `dtype` (None: as the cache reads them), with room for the span's tokens (at most the
    cache's capacity)."""

    def __init__(self, span: Span, layer: int, device: torch.device, dtype: torch.dtype | None = None):
        self.cache, self.layer = span.cache, layer
        keys, values = span.cache.read(layer, span.start)  # float32 for a q8_0 cache, else as stored
        self.read_dtype = keys.dtype
        room = min(span.end, span.cache.capacity)
        self.k, self.v = (torch.empty((t.shape[0], room, t.shape[2]), dtype=dtype or t.dtype, device=device)
                          for t in (keys, values))
        self.k[:, :span.start] = keys
        self.v[:, :span.start] = values
        self.filled = span.start

    def extend(self, past: int, end: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After the cache stored k, v (n_head_kv, seq, head_dim) as tokens [past, end): keys
        and values of tokens [0, end) on the accelerator, as cache.read gives them converted to
        the mirror's dtype."""
        if past != self.filled or end > self.k.shape[1]:
            raise RuntimeError(f"offloaded layer {self.layer}: tokens [{past}, {end}) after {self.filled} "
                               f"mirrored, with room for {self.k.shape[1]}")
        if self.cache.quantized(self.layer):
            k, v = self.cache.read(self.layer, end, past)
        else:  # as the cache stores them (a float16 cache's, say, before a bf16 mirror's rounding)
            k, v = k.to(self.read_dtype), v.to(self.read_dtype)
        self.k[:, past:end] = k
        self.v[:, past:end] = v
        self.filled = end
        return self.k[:, :end], self.v[:, :end]
