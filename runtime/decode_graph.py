"""Batch-1 decode as one fixed step, captured once in a CUDA graph and replayed per token.

A decode token on a GPU is ~30 small kernels per layer: launched one by one from Python, their
launch cost, not the weights they stream, would set the speed. `DecodeGraph` keeps every input
of a step in one fixed device buffer (the token id, the cache slot it takes and the cache's
length with it, its position and M-RoPE angles) and makes the rest on the device: the token's
embedding row (kernels/decode_inputs.embed_row, from the embeddings' GGUF blocks in page-locked
host memory, or on the GPU where the output layer holds them) and its first RMSNorm. The step
reads the cache length from the buffer (kernels/decode_attention.py), so it launches the same
kernels on the same addresses every time: it is captured as a CUDA graph on its first call and
replayed after. Elsewhere (the kernel path on the CPU, in Triton's interpreter) the same step
runs eagerly, which is how the tests check what the graph holds.

The step ends with the greedy choice: the argmax of its logits becomes the next token in the
buffer, and the slot, length, position and angles move on by one (decode_inputs.advance). So
greedy decoding needs the host only to read tokens: `decode_greedy` queues the next step
before it reads this one's token (one step ahead), and the host's part of a token (reading
it, the streamed text, the graph launch) overlaps the GPU's. A sampled token is staged by the
host instead (`step`: the logits come back for the sampler).

It serves a decoder wholly on one accelerator with the Triton kernels (every layer and the
output layer); anything else decodes through `Decoder.forward`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial

import torch

from ..kernels.decode_inputs import advance, embed_row, supported
from .decoder import Decoder, KVCache, rope_tables
from .packed import as_torch

_HEADER = 24  # bytes before the angles: slot (int64), length (int32), position (float32), token (int64)
READBACK_SLOTS = 4  # page-locked int64s the chosen tokens are copied to, reused in turn


def _fields(buf: torch.Tensor, half_dim: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a step's input buffer (uint8): (slot, length, position, token, angles (half_dim,))."""
    return (buf[0:8].view(torch.int64), buf[8:12].view(torch.int32), buf[12:16].view(torch.float32),
            buf[16:24].view(torch.int64), buf[_HEADER:_HEADER + 4 * half_dim].view(torch.float32))


def embedding_table(decoder: Decoder, dev: torch.device,
                    on_warning: Callable[[str], None] | None = None) -> torch.Tensor:
    """The token embeddings where embed_row reads them for a step on `dev`: the output layer's
    blocks when it is the embeddings (tied) and reads them on `dev`; else the mapped file's
    blocks copied once to page-locked host memory on a GPU (read there by the kernel: no GPU
    memory), or to `dev` elsewhere. Page-locked rows a GPU cannot read (checked once against
    the host's row) are copied to the GPU instead, with a warning."""
    out = decoder.output
    if decoder.output_is_embed and out.kernel is not None and out.kernel.raw.device == dev:
        return out.kernel.raw
    kept = decoder.embed_table
    if kept is not None and kept.device.type in ("cpu", dev.type):
        return kept
    raw = as_torch(decoder.embed.raw)
    if dev.type != "cuda":
        table = raw.to(dev)
    else:
        table = raw.pin_memory()
        try:
            row = torch.empty(1, decoder.cfg.n_embd, device=dev)
            embed_row(table, decoder.embed.qtype, decoder.cfg.n_embd, torch.zeros(1, dtype=torch.int64, device=dev),
                      row)
            ok = torch.equal(row.cpu(), decoder.embed.take_rows(torch.tensor([0])))
        except Exception as e:  # Triton's launcher refuses a pointer it cannot map (ValueError), CUDA errors...
            ok, why = False, (str(e).splitlines() or [type(e).__name__])[0]
        else:
            why = "its row differed from the host's"
        if not ok:
            if on_warning is not None:
                on_warning(f"the GPU cannot read the token embeddings from host memory ({why}); "
                           f"copying them to the GPU ({table.numel() / 2**30:.2f} GiB)")
            table = raw.to(dev)
    decoder.embed_table = table  # one copy for the decoder's caches
    return table


class DecodeGraph:
    """Decode steps for `cache` (which it serves until the cache is replaced)."""

    def __init__(self, decoder: Decoder, cache: KVCache, graphs: bool = True,
                 on_warning: Callable[[str], None] | None = None):
        if not self.supports(decoder):
            raise ValueError("DecodeGraph needs every decoder layer and the output layer on one accelerator "
                             "with the Triton kernels, and token embeddings of a type kernels/decode_inputs.py reads")
        cfg = decoder.cfg
        dev = decoder.norm.device
        self.decoder = decoder
        self.cache = cache
        half = cfg.head_dim // 2
        self.inputs = torch.zeros(_HEADER + 4 * half, dtype=torch.uint8, device=dev)
        # written on the host, then copied in one transfer (pinned: without a staging copy of its own)
        self.host_inputs = torch.zeros(self.inputs.numel(), dtype=torch.uint8, pin_memory=dev.type == "cuda")
        self.index, self.length, self.pos, self.token, self.angles = _fields(self.inputs, half)
        self.host_fields = _fields(self.host_inputs, half)
        self.inv_freq = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)[0]  # on the CPU
        self.inv_freq_dev = self.inv_freq.to(dev)
        self.table = embedding_table(decoder, dev, on_warning)
        self.x = torch.zeros(1, cfg.n_embd, device=dev)
        self.first_norm = decoder.layers[0].attn_norm.float()
        self.use_graph = graphs and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        # recorded after each step's input copy: the host buffer is written again only once it is done
        self.sent = torch.cuda.Event() if dev.type == "cuda" else None
        self.logits: torch.Tensor | None = None
        self.capture_s: float | None = None  # the capture's wall time (warm-up step included), once captured
        self.on_warning = on_warning
        # decode_greedy's chosen tokens: copied to page-locked slots, read in order
        self.readback = torch.zeros(READBACK_SLOTS, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.queued: deque[tuple[int, torch.cuda.Event | None]] = deque()  # (slot, copied event), oldest first
        self.next_slot = 0
        self.expect: tuple[int, int, int] | None = None  # (token, position, cache length) the queued step decodes

    @staticmethod
    def supports(decoder: Decoder) -> bool:
        dev = decoder.norm.device
        return (decoder.output_on_accel and all(layer.kernels and layer.device == dev for layer in decoder.layers)
                and supported(decoder.embed.qtype))

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, n_head, head_dim), k, v (1, n_head_kv, head_dim) before the rotary: rotated and
        stored in one launch (kernels/kv_store.py), then decode attention over the cache."""
        from ..kernels.decode_attention import decode_attention

        self.cache.write_at(i, self.index, k.transpose(0, 1), v.transpose(0, 1), q.transpose(0, 1), self.angles)
        keys, values, k_scale, v_scale = self.cache.stored(i)
        return decode_attention(q[0], keys, values, self.length, k_scale, v_scale)[None]

    def _step(self) -> torch.Tensor:
        """Logits (1, vocab) for the token in self.token at the slot, position and angles in the
        input buffer; then the buffer holds the next greedy step's inputs (its argmax)."""
        from ..kernels.rmsnorm import rmsnorm

        dec = self.decoder
        embed_row(self.table, dec.embed.qtype, dec.cfg.n_embd, self.token, self.x)
        normed = rmsnorm(self.x, self.first_norm, dec.cfg.rms_eps)[0]
        hidden = dec.layers_forward(self.x, lambda i, layer: partial(self._attend, i), normed)
        logits = dec.output.matmul(hidden)
        advance(torch.argmax(logits, dim=-1), self.token, self.index, self.length, self.pos, self.inv_freq_dev,
                self.angles)
        return logits

    def _capture(self) -> None:
        """Run the step once on a side stream (Triton compiles its kernels, the allocator warms
        up; it writes only the cache slot the replay writes again), then capture it. The warm-up
        moves the input buffer on: the caller stages the step again after."""
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

    def stage(self, token: int, position: int) -> None:
        """Write a step's inputs on the host (the token, at the cache's end, at `position`) and
        send them in one copy."""
        index, length, pos, tok, angles = self.host_fields
        if self.sent is not None:
            self.sent.synchronize()
        index.fill_(self.cache.length)
        length.fill_(self.cache.length + 1)
        pos.fill_(float(position))
        tok.fill_(token)
        # a text token's t, h and w positions are equal, so every M-RoPE section rotates by it:
        # mrope_angles is position * inv_freq
        angles.copy_(float(position) * self.inv_freq)
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        if self.sent is not None:
            self.sent.record()

    def _run(self) -> torch.Tensor:
        """One step on the inputs in the buffer: the captured graph's replay, or the step run
        eagerly where there is no graph (`_ready` captures it)."""
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits
        return self._step()

    def _ready(self, token: int, position: int) -> None:
        """Capture the step if it is not yet (a graph's warm-up runs it), then stage it."""
        if self.use_graph and self.graph is None:
            self.stage(token, position)
            try:
                self._capture()
            except RuntimeError as e:  # run on without the graph rather than stop the answer
                self.use_graph = False
                if self.on_warning is not None:
                    self.on_warning(f"CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without it")
        self.stage(token, position)

    def _check_room(self) -> None:
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"context full: {self.cache.length + 1} tokens > capacity {self.cache.capacity}")

    def step(self, token: int, position: int) -> torch.Tensor:
        """Decode `token` at `position` (a text token: t = h = w) -> float32 logits (1, vocab)
        on the accelerator (a copy: the graph's own buffer is written again by the next replay),
        left there for sampling (an argmax there and one id back, not 600 KB of logits to the
        host); the cache grows by one."""
        self._check_room()
        self.drain()
        self._ready(token, position)
        out = self._run()
        self.cache.length += 1
        return out.clone() if out is self.logits else out.float()

    def _queue_readback(self) -> None:
        """Copy the token the last queued step chose to the next page-locked slot."""
        slot = self.next_slot
        self.next_slot = (slot + 1) % READBACK_SLOTS
        done = torch.cuda.Event() if self.sent is not None else None
        self.readback[slot:slot + 1].copy_(self.token, non_blocking=done is not None)
        if done is not None:
            done.record()
        self.queued.append((slot, done))

    def decode_greedy(self, token: int, position: int, ahead: bool) -> int:
        """Decode `token` at `position` and return the greedy next token (the argmax of its
        logits, as `sample` picks greedily); the cache grows by one. With `ahead` the step after
        is queued before this one's token is read (it decodes that token: the caller's next
        call, with it, finds it queued). The one step queued when the caller stops instead is
        dropped by `drain` (it wrote only the cache slot past the length)."""
        if self.queued and self.expect != (token, position, self.cache.length):
            self.drain()  # the queued step decodes another token than this (the caller went elsewhere)
        if not self.queued:
            self._check_room()
            self._ready(token, position)
            self._run()
            self._queue_readback()
        self.cache.length += 1
        queued_ahead = ahead and self.cache.length < self.cache.capacity
        if queued_ahead:
            self._run()
            self._queue_readback()
        slot, done = self.queued.popleft()
        if done is not None:
            done.synchronize()
        chosen = int(self.readback[slot])
        # what the step queued ahead decodes: the token just chosen, at the next position and slot
        self.expect = (chosen, position + 1, self.cache.length) if queued_ahead else None
        return chosen

    def drain(self) -> None:
        """Drop the steps queued ahead (and wait for their token copies: their slots are reused)."""
        while self.queued:
            _, done = self.queued.popleft()
            if done is not None:
                done.synchronize()
        self.expect = None
