"""Batch-1 decode as one fixed step, captured once in a CUDA graph and replayed per token.

A decode token on a GPU is ~30 small kernels per layer: launched one by one from Python, their
launch cost, not the weights they stream, would set the speed. `DecodeGraph` keeps every input
of a step in one fixed device buffer (the cache slot the token takes and the cache's length
with it, the token's embedding, the embedding through the first layer's RMSNorm, its M-RoPE
angles: all computed on the host, sent in one copy a token) and reads the cache length from it
(kernels/decode_attention.py), so the step launches the same kernels on the same addresses
every time: it is captured as a CUDA graph on its first call and replayed after. Elsewhere
(the kernel path on the CPU, in Triton's interpreter) the same step runs eagerly, which is how
the tests check what the graph holds.

It serves a decoder wholly on one accelerator with the Triton kernels (every layer and the
output layer); anything else decodes through `Decoder.forward`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from .decoder import Decoder, KVCache, rms_norm, rope_tables

_HEADER = 16  # bytes before the floats: the slot (int64), the length (int32), padding


def _fields(buf: torch.Tensor, n_embd: int, half_dim: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a step's input buffer (uint8): (slot, length, embedding (1, n_embd),
    normalized embedding (1, n_embd), angles (half_dim,))."""
    floats = buf[_HEADER:].view(torch.float32)
    return (buf[0:8].view(torch.int64), buf[8:12].view(torch.int32), floats[:n_embd].view(1, n_embd),
            floats[n_embd:2 * n_embd].view(1, n_embd), floats[2 * n_embd:2 * n_embd + half_dim])


class DecodeGraph:
    """Decode steps for `cache` (which it serves until the cache is replaced)."""

    def __init__(self, decoder: Decoder, cache: KVCache, graphs: bool = True,
                 on_warning: Callable[[str], None] | None = None):
        if not self.supports(decoder):
            raise ValueError("DecodeGraph needs every decoder layer and the output layer on one accelerator "
                             "with the Triton kernels")
        cfg = decoder.cfg
        dev = decoder.norm.device
        self.decoder = decoder
        self.cache = cache
        size = _HEADER + 4 * (2 * cfg.n_embd + cfg.head_dim // 2)
        self.inputs = torch.zeros(size, dtype=torch.uint8, device=dev)
        # written on the host, then copied in one transfer (pinned: without a staging copy of its own)
        self.host_inputs = torch.zeros(size, dtype=torch.uint8, pin_memory=dev.type == "cuda")
        self.index, self.length, self.x, self.normed, self.angles = _fields(self.inputs, cfg.n_embd,
                                                                           cfg.head_dim // 2)
        self.host_fields = _fields(self.host_inputs, cfg.n_embd, cfg.head_dim // 2)
        self.inv_freq = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)[0]  # on the CPU
        self.use_graph = graphs and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        # recorded after each step's input copy: the host buffer is written again only once it is done
        self.sent = torch.cuda.Event() if dev.type == "cuda" else None
        self.logits: torch.Tensor | None = None
        self.capture_s: float | None = None  # the capture's wall time (warm-up step included), once captured
        self.on_warning = on_warning

    @staticmethod
    def supports(decoder: Decoder) -> bool:
        dev = decoder.norm.device
        return decoder.output_on_accel and all(layer.kernels and layer.device == dev for layer in decoder.layers)

    def _attend(self, i: int, angles: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, n_head, head_dim), k, v (1, n_head_kv, head_dim) before the rotary: rotated and
        stored in one launch (kernels/kv_store.py), then decode attention over the cache."""
        from ..kernels.decode_attention import decode_attention

        self.cache.write_at(i, self.index, k.transpose(0, 1), v.transpose(0, 1), q.transpose(0, 1), angles)
        keys, values, k_scale, v_scale = self.cache.stored(i)
        return decode_attention(q[0], keys, values, self.length, k_scale, v_scale)[None]

    def _step(self) -> torch.Tensor:
        """Logits (1, vocab) for the token in self.x with the angles in self.angles, stored at self.index."""
        dec = self.decoder
        hidden = dec.layers_forward(self.x, lambda i, layer: partial(self._attend, i, self.angles), self.normed)
        return dec.output.matmul(hidden)

    def _capture(self) -> None:
        """Run the step once on a side stream (Triton compiles its kernels, the allocator warms
        up; it writes only the cache slot the replay writes again), then capture it."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph
        self.capture_s = time.perf_counter() - start

    def stage(self, embedding: torch.Tensor, position: int) -> None:
        """Write the next step's inputs on the host and send them in one copy."""
        index, length, x, normed, angles = self.host_fields
        if self.sent is not None:
            self.sent.synchronize()
        index.fill_(self.cache.length)
        length.fill_(self.cache.length + 1)
        x.copy_(embedding)
        normed.copy_(rms_norm(embedding, self.decoder.first_norm_host, self.decoder.cfg.rms_eps))
        # a text token's t, h and w positions are equal, so every M-RoPE section rotates by it:
        # mrope_angles is position * inv_freq
        angles.copy_(float(position) * self.inv_freq)
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        if self.sent is not None:
            self.sent.record()

    def step(self, embedding: torch.Tensor, position: int) -> torch.Tensor:
        """The next token's embedding (1, n_embd) at `position` (a text token: t = h = w) ->
        float32 logits (1, vocab) on the accelerator (a copy: the graph's own buffer is
        written again by the next replay), left there for sampling (an argmax there and one
        id back, not 600 KB of logits to the host); the cache grows by one."""
        cache = self.cache
        if cache.length >= cache.capacity:
            raise ValueError(f"context full: {cache.length + 1} tokens > capacity {cache.capacity}")
        self.stage(embedding, position)
        out: torch.Tensor | None = None
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # run on without the graph rather than stop the answer
                self.use_graph = False
                if self.on_warning is not None:
                    self.on_warning(f"CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without it")
        if self.graph is not None:
            self.graph.replay()
            out = self.logits
        else:
            out = self._step()
        cache.length += 1
        assert out is not None
        return out.clone() if out is self.logits else out.float()
