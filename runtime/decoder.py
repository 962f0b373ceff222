"""The Qwen2 decoder of both families: GQA attention with q/k/v biases, M-RoPE, SwiGLU, RMSNorm.

Matches transformers' Qwen2_5_VLTextModel / Qwen2VLTextModel in float32. Positions are
`(3, seq)`: temporal, height and width indices (equal for text tokens). M-RoPE rotates the
first `mrope_section[0]` frequency pairs by the temporal index, the next `[1]` by the height and
the last `[2]` by the width (rotate-half layout).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.nn.functional as F

from .config import TextConfig
from .copy_ahead import CopiesAhead
from .offload_kv import KVMirror, Span
from .stack import Stack
from .weights import EXACT, Matrix, Weights, half_dtype, kernel_dtype

CPU = torch.device("cpu")
PREFILL_CHUNK = 512  # prompt tokens per forward pass (model.py's prefill; placement.py sizes activations by it)
# a forward pass of at least this many tokens runs the CPU's layers on the accelerator, each
# copied there for the pass (Decoder.prefill_offload; llama.cpp offloads a batch of 32 or more)
OFFLOAD_MIN_TOKENS = 32
# prompt tokens whose passes go through the layers together when CPU layers are offloaded: each
# layer copied once for them (Decoder.prompt_forward; placement.py keeps room for their hidden states)
OFFLOAD_GROUP = 2048
EMBED_CACHE_BYTES = 16 << 20  # decode's embedding rows kept (Decoder.embed_tokens): 1170 of the 7B's
KV_TYPES = ("f32", "bf16", "f16", "q8_0")  # KV cache element types
Q8_BLOCK = 32  # values per scale in a q8_0 cache (as ggml's Q8_0; a whole head when its dim is not a multiple)


def q8_block(dim: int) -> int:
    return Q8_BLOCK if dim % Q8_BLOCK == 0 else dim


def quantize_q8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., dim) -> int8 (..., dim // block, block) and float16 scales (..., dim // block, 1):
    d = amax|x| / 127 per block, q = round(x / d) (half to even)."""
    blocks = x.float().unflatten(-1, (-1, block))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d.clamp_min(1e-30), 0).round()
    return q.to(torch.int8), d.to(torch.float16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(head_dim: int, theta: float, sections: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq (head_dim / 2,) and, per frequency pair, which of (t, h, w) rotates it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    section = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(sections)])
    return inv_freq, section


def mrope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                 sections: tuple[int, int, int]) -> torch.Tensor:
    """Rotation angles `(seq, head_dim / 2)` for positions `(3, seq)`: each section of frequency
    pairs takes the temporal, height or width position, as transformers assigns them."""
    inv_freq, section = rope_tables(head_dim, theta, sections)
    return positions.float()[section.to(positions.device)].T * inv_freq.to(positions.device)


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                  sections: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `(seq, head_dim)` for positions `(3, seq)`."""
    rope = Rope.from_angles(mrope_angles(positions, head_dim, theta, sections))
    return rope.cos, rope.sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (heads, seq, head_dim)."""
    return x * cos + rotate_half(x) * sin


def causal_mask(seq: int, end: int, past: int, segments: Sequence[int] | None, device: torch.device) -> torch.Tensor:
    """(seq, end) bool: query j (absolute past + j) sees keys 0..past + j; with `segments`
    (past 0) only those of its own segment."""
    mask = torch.ones(seq, end, dtype=torch.bool, device=device).tril(diagonal=past)
    if segments is not None:
        owner = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                        torch.tensor(list(segments), device=device))
        mask &= owner[:, None] == owner[None, :]
    return mask


@dataclass(frozen=True)
class Rope:
    """M-RoPE for a run of tokens: the angles (seq, head_dim / 2) for kernels/rope.py, and
    cos/sin (seq, head_dim) for the torch path, computed on first use (the kernel path, a
    captured decode step included, never pays for them)."""

    angles: torch.Tensor

    @staticmethod
    def from_angles(angles: torch.Tensor) -> Rope:
        return Rope(angles.contiguous())

    @staticmethod
    def at(positions: torch.Tensor, cfg: TextConfig) -> Rope:
        """For positions (3, seq)."""
        return Rope.from_angles(mrope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section))

    @cached_property
    def _doubled(self) -> torch.Tensor:
        return torch.cat((self.angles, self.angles), dim=-1)  # each frequency for both halves

    @cached_property
    def cos(self) -> torch.Tensor:
        return self._doubled.cos()

    @cached_property
    def sin(self) -> torch.Tensor:
        return self._doubled.sin()

    def to(self, device: torch.device) -> Rope:
        return Rope(self.angles.to(device))


@dataclass
class Layer:
    attn_norm: torch.Tensor
    wq: Matrix
    bq: torch.Tensor
    wk: Matrix
    bk: torch.Tensor
    wv: Matrix
    bv: torch.Tensor
    wo: Matrix
    ffn_norm: torch.Tensor
    gate: Matrix
    up: Matrix
    down: Matrix
    device: torch.device = CPU
    kernels: bool = False  # Triton kernels for its norms, rotary and attention (the layer is on an accelerator)
    kv: KVMirror | None = None  # a copy offloaded for a prompt: its cache's keys and values there (offload_kv.py)

    def __post_init__(self) -> None:
        # stacked where they are GGUF blocks of one type on an accelerator (stack.py)
        self.qkv = Stack([self.wq, self.wk, self.wv], [self.bq, self.bk, self.bv])
        self.gate_up = Stack([self.gate, self.up])


def kv_bytes_per_token(cfg: TextConfig, kind: str) -> int:
    """Bytes one token adds to one layer's cache (keys and values)."""
    values = 2 * cfg.n_head_kv * cfg.head_dim
    if kind == "q8_0":
        return values + values // q8_block(cfg.head_dim) * 2  # int8 values, a float16 scale per block
    return values * (4 if kind == "f32" else 2)


class _Q8:
    """int8 values with a float16 scale per block of the last dimension: (heads, capacity, dim)."""

    def __init__(self, heads: int, capacity: int, dim: int, device: torch.device):
        self.block = q8_block(dim)
        self.q = torch.zeros(heads, capacity, dim // self.block, self.block, dtype=torch.int8, device=device)
        self.d = torch.zeros(heads, capacity, dim // self.block, 1, dtype=torch.float16, device=device)

    def write(self, start: int, x: torch.Tensor) -> None:
        q, d = quantize_q8(x, self.block)
        self.q[:, start:start + x.shape[1]] = q
        self.d[:, start:start + x.shape[1]] = d

    def read(self, end: int, start: int = 0) -> torch.Tensor:
        return (self.q[:, start:end].float() * self.d[:, start:end].float()).flatten(-2)

    def values(self) -> torch.Tensor:
        """int8 (heads, capacity, dim), a view."""
        return self.q.flatten(-2)

    def scales(self) -> torch.Tensor:
        """float16 (heads, capacity, dim // block), a view."""
        return self.d[..., 0]


class KVCache:
    """Per-layer keys and values `(n_head_kv, capacity, head_dim)`, filled left to right, each
    layer's on that layer's device. `kind`: f32, bf16, f16 or q8_0; default float32 on the CPU
    and the accelerator's `half_dtype` (bf16, or f16 on GPUs before Ampere) there."""

    def __init__(self, cfg: TextConfig, capacity: int, devices: Sequence[torch.device] | None = None,
                 kind: str | None = None):
        if kind is not None and kind not in KV_TYPES:
            raise ValueError(f"KV cache type {kind!r}: one of {', '.join(KV_TYPES)}")
        devices = list(devices) if devices is not None else [CPU] * cfg.n_layer
        self.k: list[torch.Tensor | _Q8] = []
        self.v: list[torch.Tensor | _Q8] = []
        shape = (cfg.n_head_kv, capacity, cfg.head_dim)
        for dev in devices:
            layer_kind = kind or ("f32" if dev.type == "cpu" else
                                  "bf16" if half_dtype(dev) == torch.bfloat16 else "f16")
            for store in (self.k, self.v):
                if layer_kind == "q8_0":
                    store.append(_Q8(*shape, dev))
                else:
                    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[layer_kind]
                    store.append(torch.zeros(shape, dtype=dtype, device=dev))
        self.capacity = capacity
        self.length = 0

    def take_prefix(self, other: KVCache, n: int) -> None:
        """Hold `other`'s first n tokens (same model and cache type, capacity >= n) and no more."""
        for mine, theirs in zip(self.k + self.v, other.k + other.v):
            if isinstance(mine, _Q8) and isinstance(theirs, _Q8):
                mine.q[:, :n] = theirs.q[:, :n]
                mine.d[:, :n] = theirs.d[:, :n]
            elif isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor):
                mine[:, :n] = theirs[:, :n]
            else:
                raise ValueError("KV caches of different types")
        self.length = n

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store k, v (n_head_kv, n, head_dim) after the cached tokens; the length with them
        (`length` itself moves once per forward pass, after every layer)."""
        end = self.length + k.shape[1]
        if end > self.capacity:
            raise ValueError(f"context full: {end} tokens > capacity {self.capacity}")
        for store, x in ((self.k[layer], k), (self.v[layer], v)):
            if isinstance(store, _Q8):
                store.write(self.length, x)
            else:
                store[:, self.length:end] = x
        return end

    def write_at(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 q: torch.Tensor | None = None, angles: torch.Tensor | None = None) -> None:
        """Store one token's k, v (n_head_kv, 1, head_dim) at `index`, a long tensor (1,) on the
        layer's device (no host synchronization: a CUDA graph can hold it). For the kernel path
        (decode_graph.py): through kernels/kv_store.py, one launch for both, which with the
        token's rotary `angles` (head_dim / 2) and its q (n_head, 1, head_dim) also rotates k
        before storing it and q in place."""
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(kc, _Q8) and isinstance(vc, _Q8):
            from ..kernels.kv_store import kv_store_q8

            kv_store_q8(k, v, kc.values(), vc.values(), kc.scales(), vc.scales(), index, q, angles)
            return
        assert isinstance(kc, torch.Tensor) and isinstance(vc, torch.Tensor)
        from ..kernels.kv_store import kv_store

        kv_store(k, v, kc, vc, index, q, angles)

    def read(self, layer: int, end: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens [start, end), as stored (q8_0 dequantized to float32)."""
        return tuple(s.read(end, start) if isinstance(s, _Q8) else s[:, start:end]  # type: ignore[return-value]
                     for s in (self.k[layer], self.v[layer]))

    def quantized(self, layer: int) -> bool:
        """Whether layer's keys and values are stored as q8_0 (read back dequantized)."""
        return isinstance(self.k[layer], _Q8)

    def stored(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The whole buffers as kernels/decode_attention.py reads them: k, v and, for q8_0, their scales."""
        k, v = self.k[layer], self.v[layer]
        if isinstance(k, _Q8) and isinstance(v, _Q8):
            return k.values(), v.values(), k.scales(), v.scales()
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        return k, v, None, None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v after the cached tokens; all keys and values so far."""
        return self.read(layer, self.write(layer, k, v))


class Decoder:
    """`accel`/`gpu_layers`: the last `gpu_layers` layers live on `accel` (the output layer too
    when gpu_layers > n_layer, as llama.cpp's -ngl counts it), their matmuls through the Triton
    kernels when `kernels`; the token embeddings always stay in the mapped file. Weights in
    EXACT mode keep the kernels' products in float32; otherwise prefill's GEMMs and attention
    on the accelerator take bf16 operands (float32 accumulation)."""

    def __init__(self, cfg: TextConfig, w: Weights, accel: torch.device | None = None, gpu_layers: int = 0,
                 kernels: bool = True, prefill_offload: bool = True, copy_ahead: bool = True):
        """`prefill_offload`: with layers on the CPU and the rest on `accel`, a forward pass of
        OFFLOAD_MIN_TOKENS or more (a prompt) runs each CPU layer on `accel` from a copy of its
        GGUF blocks made for the pass and let go after it, as llama.cpp's op offload does; the
        layer's KV cache stays on the CPU. Decode steps stay where the layers live. `copy_ahead`:
        each layer's copy is made while the one before runs (two on `accel` at once)."""
        self.cfg = cfg
        self._weights = w
        self._accel = accel
        self._kernels = kernels
        first = cfg.n_layer - gpu_layers if accel is not None else cfg.n_layer
        self.attn_dtype = kernel_dtype(w.mode, accel or CPU)  # prefill GEMMs and attention on the accelerator
        self.embed = w.matrix("token_embd.weight")
        self._embed_rows: dict[int, torch.Tensor] = {}  # token -> row, least recently used first
        self.output_on_accel = accel is not None and gpu_layers > cfg.n_layer
        self.output_is_embed = not w.has("output.weight")  # tied: the output layer multiplies by the embeddings
        self.embed_table: torch.Tensor | None = None  # where DecodeGraph's steps read rows (decode_graph.embedding_table)
        if self.output_on_accel:
            name = "output.weight" if w.has("output.weight") else "token_embd.weight"
            self.output = w.matrix(name, EXACT).to_device(accel, kernels, self.attn_dtype)
            self.norm = w.vector("output_norm.weight").to(accel)
        else:
            self.output = w.matrix("output.weight") if w.has("output.weight") else self.embed
            self.norm = w.vector("output_norm.weight")
        self.layers = [self._layer(i, accel if accel is not None and i >= first else None) for i in range(cfg.n_layer)]
        self.first_on_accel = first  # layers before it live on the CPU
        self.prefill_offload = prefill_offload and accel is not None and first > 0
        self.copy_ahead = copy_ahead
        self.pass_share = 1  # prompt passes take chunk / pass_share tokens (prefill_oom.py halves them)

    def _layer(self, i: int, accel: torch.device | None) -> Layer:
        """Decoder layer i from the file: on the CPU, or on `accel` (its GGUF blocks or dense
        copies uploaded, through the kernels when the decoder uses them)."""
        w, p = self._weights, f"blk.{i}."
        dev = accel or CPU

        def mat(name: str) -> Matrix:
            if accel is None:
                return w.matrix(p + name)
            return w.matrix(p + name, EXACT).to_device(dev, self._kernels, self.attn_dtype)

        def vec(name: str) -> torch.Tensor:
            return w.vector(p + name).to(dev)

        return Layer(
            attn_norm=vec("attn_norm.weight"),
            wq=mat("attn_q.weight"), bq=vec("attn_q.bias"),
            wk=mat("attn_k.weight"), bk=vec("attn_k.bias"),
            wv=mat("attn_v.weight"), bv=vec("attn_v.bias"),
            wo=mat("attn_output.weight"),
            ffn_norm=vec("ffn_norm.weight"),
            gate=mat("ffn_gate.weight"), up=mat("ffn_up.weight"), down=mat("ffn_down.weight"),
            device=dev, kernels=self._kernels and accel is not None,
        )

    def new_cache(self, capacity: int, kind: str | None = None) -> KVCache:
        """A KV cache with each layer's part on that layer's device."""
        return KVCache(self.cfg, capacity, [layer.device for layer in self.layers], kind)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows (len(ids), n_embd) float32 on the CPU. A decode step's one row comes
        from a cache of the EMBED_CACHE_BYTES most recently used (dequantizing one Q4_K row of
        the 7B: ~0.1-0.17 ms a token, here on every token before)."""
        if ids.numel() != 1:
            return self.embed.take_rows(ids)
        token = int(ids.reshape(-1)[0])
        row = self._embed_rows.pop(token, None)
        if row is None:
            row = self.embed.take_rows(ids.reshape(1))
            if len(self._embed_rows) * self.cfg.n_embd * 4 >= EMBED_CACHE_BYTES:
                del self._embed_rows[next(iter(self._embed_rows))]  # the least recently used
        self._embed_rows[token] = row  # last: the most recently used
        return row.clone()  # the caller may write to it

    def layer_forward(self, layer: Layer, x: torch.Tensor,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      normed: torch.Tensor | None = None,
                      next_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer on x (seq, n_embd); `attend(q, k, v)` with q (seq, n_head, head_dim)
        and k, v (seq, n_head_kv, head_dim) before M-RoPE rotates q and k, stores k and v in a
        cache and returns the attention output (seq, n_head, head_dim). `normed`: x through this
        layer's attn_norm already (the previous layer's down projection did it). Returns (x, x
        through `next_norm`, or None without one). A layer on the kernel path normalizes through
        kernels/rmsnorm.py, and the o and down projections' GEMVs apply the norm after them in
        their own launch."""
        cfg = self.cfg
        seq = x.shape[0]
        if normed is None:
            if layer.kernels:
                from ..kernels.rmsnorm import rmsnorm

                normed = rmsnorm(x, layer.attn_norm, cfg.rms_eps)[0]
            else:
                normed = rms_norm(x, layer.attn_norm, cfg.rms_eps)
        q, k, v = layer.qkv.matmul(normed)
        out = attend(q.view(seq, cfg.n_head, cfg.head_dim), k.view(seq, cfg.n_head_kv, cfg.head_dim),
                     v.view(seq, cfg.n_head_kv, cfg.head_dim))
        x, h = layer.wo.matmul_norm(out.reshape(seq, cfg.n_embd), layer.ffn_norm, cfg.rms_eps, residual=x)
        del q, k, v, out  # not beside the MLP's products (a prompt's 512 tokens: 24 MiB for the 7B)
        mlp = layer.gate_up.swiglu(h)
        if next_norm is None:
            return layer.down.matmul(mlp, residual=x), None
        return layer.down.matmul_norm(mlp, next_norm, cfg.rms_eps, residual=x)

    def layers_forward(self, x: torch.Tensor,
                       attend_for: Callable[[int, Layer], Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                   torch.Tensor]],
                       normed: torch.Tensor | None = None, offload: Span | None = None) -> torch.Tensor:
        """x (seq, n_embd) through every layer (`attend_for(i, layer)`: layer i's rotary and
        attention) -> the final-norm hidden states. Each layer hands the next its input already
        normalized where both are on one device; `normed`: x through the first layer's
        attn_norm, where the caller has it. `offload`: the CPU's layers run on the accelerator
        from copies made for this pass (prefill_offload), each made while the one before runs
        where `copy_ahead` (copy_ahead.py), with their caches' keys and values for the span's
        tokens (offload_kv.py)."""
        return self._passes_forward([x], lambda j, i, layer: attend_for(i, layer), [normed], offload)[0]

    def _passes_forward(self, xs: Sequence[torch.Tensor],
                        attend_for: Callable[[int, int, Layer], Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                         torch.Tensor]],
                        normed: Sequence[torch.Tensor | None], offload: Span | None) -> list[torch.Tensor]:
        """Passes xs[j] through every layer, layer by layer: each layer takes every pass, in
        order, before the next layer takes any (`attend_for(j, i, layer)`: pass j's attention
        in layer i), so that an offloaded copy is made once for them all."""
        xs, normed = list(xs), list(normed)
        copies = None
        if offload is not None and self._accel is not None:  # each CPU layer's copy made while the one before runs
            copies = CopiesAhead(partial(self._offload_copy, offload), range(self.first_on_accel), self._accel,
                                 self.copy_ahead)
        try:
            for i, layer in enumerate(self.layers):
                run = copies.take(i) if copies is not None and i < self.first_on_accel else layer
                nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
                for j, x in enumerate(xs):
                    given = normed[j] if normed[j] is not None and normed[j].device == run.device else None
                    xs[j], normed[j] = self.layer_forward(run, x.to(run.device), attend_for(j, i, run), given,
                                                          nxt if nxt.device == run.device else None)
                del run  # an offloaded copy goes before the one after the next is made
        finally:
            if copies is not None:
                copies.close()
        return [n if n is not None else rms_norm(x.to(self.norm.device), self.norm, self.cfg.rms_eps)
                for x, n in zip(xs, normed)]

    def _offload_copy(self, span: Span, i: int) -> Layer:
        """Layer i on the accelerator for the passes that add `span` to its cache, with the keys
        and values cached before them (offload_kv.py)."""
        layer = self._layer(i, self._accel)
        layer.kv = KVMirror(span, i, layer.device, self.attn_dtype if layer.kernels else None)
        return layer

    @staticmethod
    def rotate(layer: Layer, rope: Rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE on q (seq, n_head, head_dim) and k (seq, n_head_kv, head_dim) -> (heads, seq,
        head_dim) each; on the kernel path in place, q and k in one launch (kernels/rope.py)."""
        if layer.kernels:
            from ..kernels.rope import apply_rope_

            apply_rope_(q, rope.angles, k)
            return q.transpose(0, 1), k.transpose(0, 1)
        return apply_rope(q.transpose(0, 1), rope.cos, rope.sin), apply_rope(k.transpose(0, 1), rope.cos, rope.sin)

    def _attend(self, i: int, layer: Layer, cache: KVCache, rope: Rope, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
        """M-RoPE, then causal attention over the cache after storing k, v there -> (seq,
        n_head, head_dim). With `segments` (lengths, in an empty cache) each segment of the
        tokens attends only to itself: several prompts side by side (embeddings)."""
        cfg = self.cfg
        seq = q.shape[0]
        q, k = self.rotate(layer, rope, q, k)
        v = v.transpose(0, 1)
        past = cache.length
        end = cache.write(i, k, v)
        cu_q, cu_k = ([0, seq], [0, end]) if segments is None else ([0, *itertools.accumulate(segments)],) * 2
        if layer.kv is not None:  # a copy offloaded for the prompt (prefill_offload): the cache stays put
            keys, values = (t.transpose(0, 1) for t in layer.kv.extend(past, end, k, v))
            if layer.kernels:
                from ..kernels.attention import attention

                return attention(q.transpose(0, 1), keys, values, cu_q, cu_k, causal=True, dtype=self.attn_dtype)
            mask = causal_mask(seq, end, past, segments, q.device)
            keys, values = keys.transpose(0, 1).to(q.dtype), values.transpose(0, 1).to(q.dtype)
            return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask[None, None],
                                                  enable_gqa=cfg.n_head != cfg.n_head_kv)[0].float().transpose(0, 1)
        if layer.kernels:  # the cache read where it is stored (q8_0 included), no dequantized copy
            from ..kernels.attention import attention
            from ..kernels.decode_attention import decode_attention

            keys, values, k_scale, v_scale = cache.stored(i)
            if seq == 1:  # decode: split-K over the cache
                # filled on the device: a tensor from a host list is a copy that waits for the GPU's queue
                n = torch.full((1,), end, dtype=torch.int32, device=q.device)
                return decode_attention(q[:, 0], keys, values, n, k_scale, v_scale)[None]
            # prefill: causal over the keys so far in one varlen call, on (tokens, heads, d) views
            keys, values, k_scale, v_scale = (t.transpose(0, 1)[:end] if t is not None else None
                                              for t in (keys, values, k_scale, v_scale))
            return attention(q.transpose(0, 1), keys, values, cu_q, cu_k, causal=True, dtype=self.attn_dtype,
                             k_scale=k_scale, v_scale=v_scale)
        keys, values = cache.read(i, end)
        kd = keys.dtype  # float32, or bf16 / f16 in an accelerator's cache
        if seq == 1:  # decode: the query sees every key; heads of one KV head as one matmul
            qg = q.reshape(cfg.n_head_kv, -1, cfg.head_dim).to(kd)  # heads h*g..h*g+g-1 use KV head h
            probs = torch.softmax((qg @ keys.transpose(1, 2)).float() * cfg.head_dim ** -0.5, dim=-1)
            return (probs.to(kd) @ values).float().reshape(cfg.n_head, 1, cfg.head_dim).transpose(0, 1)
        mask = causal_mask(seq, end, past, segments, q.device)
        out = F.scaled_dot_product_attention(q.to(kd)[None], keys[None], values[None], attn_mask=mask[None, None],
                                             enable_gqa=cfg.n_head != cfg.n_head_kv)[0]
        return out.float().transpose(0, 1)

    def _ropes(self, positions: torch.Tensor) -> Callable[[torch.device], Rope]:
        """Rotary for positions (3, seq) on a layer's device, moved there once."""
        ropes = {CPU: Rope.at(positions, self.cfg)}

        def rope_on(device: torch.device) -> Rope:
            if device not in ropes:
                ropes[device] = ropes[CPU].to(device)
            return ropes[device]

        return rope_on

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                segments: Sequence[int] | None = None) -> torch.Tensor:
        """Embeddings (seq, n_embd) at positions (3, seq) -> final-norm hidden states (seq, n_embd);
        with `segments` (lengths, into an empty cache) several prompts, each attending to itself."""
        rope_on = self._ropes(positions)
        seq = x.shape[0]
        if segments is not None and (cache.length or sum(segments) != seq):
            raise ValueError(f"segments {list(segments)}: lengths of all {seq} tokens, into an empty cache")
        offload = (Span(cache, cache.length, cache.length + seq)
                   if self.prefill_offload and seq >= OFFLOAD_MIN_TOKENS else None)
        out = self.layers_forward(x, lambda i, layer: partial(self._attend, i, layer, cache, rope_on(layer.device),
                                                              segments=segments), offload=offload)
        cache.length += x.shape[0]
        return out

    def prompt_forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       chunk: int = PREFILL_CHUNK) -> list[torch.Tensor]:
        """Embeddings (seq, n_embd) at positions (3, seq) in passes of `chunk` tokens -> each
        pass's final-norm hidden states. With prefill offload, up to OFFLOAD_GROUP tokens' passes
        go through the layers together, layer by layer, so that each CPU layer is copied to the
        accelerator once for them all rather than once a pass (llama.cpp's op offload copies
        once a ubatch of 512). Their hidden states wait on the accelerator meanwhile. Passes and
        groups are `pass_share` times smaller after a prompt ran out of memory (prefill_oom.py)."""
        per = max(1, OFFLOAD_GROUP // chunk)  # passes a group
        chunk = max(1, chunk // self.pass_share)
        bounds = [(lo, min(lo + chunk, x.shape[0])) for lo in range(0, x.shape[0], chunk)]
        if not self.prefill_offload or x.shape[0] < OFFLOAD_MIN_TOKENS:
            return [self.forward(x[lo:hi], positions[:, lo:hi], cache) for lo, hi in bounds]
        out: list[torch.Tensor] = []
        for g in range(0, len(bounds), per):
            group = bounds[g:g + per]
            if len(group) == 1:
                lo, hi = group[0]
                out.append(self.forward(x[lo:hi], positions[:, lo:hi], cache))
            else:
                out += self._group_forward(x, positions, cache, group)
        return out

    def _group_forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                       group: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """The passes x[lo:hi] of `group` (consecutive, the first at the cache's end) layer by
        layer, the CPU's layers offloaded: each pass attends to the cache up to its own start."""
        base, first = cache.length, group[0][0]
        ropes = [self._ropes(positions[:, lo:hi]) for lo, hi in group]

        def attend_for(j: int, i: int, layer: Layer) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                 torch.Tensor]:
            attend = partial(self._attend, i, layer, cache, ropes[j](layer.device))

            def at_start(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                cache.length = base + group[j][0] - first  # pass j's keys go after the passes before it
                return attend(q, k, v)

            return at_start

        try:
            out = self._passes_forward([x[lo:hi] for lo, hi in group], attend_for, [None] * len(group),
                                       Span(cache, base, base + group[-1][1] - first))
        except BaseException:
            cache.length = base  # as a failed forward leaves it
            raise
        cache.length = base + group[-1][1] - first
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits on the CPU."""
        return self.output.matmul(hidden.to(self.norm.device)).cpu()
