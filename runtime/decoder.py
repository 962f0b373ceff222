"""The Qwen2 decoder of both families: GQA attention with q/k/v biases, M-RoPE, SwiGLU, RMSNorm.

Matches transformers' Qwen2_5_VLTextModel / Qwen2VLTextModel in float32. Positions are
`(3, seq)`: temporal, height and width indices (equal for text tokens). M-RoPE rotates the
first `mrope_section[0]` frequency pairs by the temporal index, the next `[1]` by the height and
the last `[2]` by the width (rotate-half layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TextConfig
from .weights import Matrix, Weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def mrope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                 sections: tuple[int, int, int]) -> torch.Tensor:
    """Rotation angles `(seq, head_dim / 2)` for positions `(3, seq)`: each section of frequency
    pairs takes the temporal, height or width position, as transformers assigns them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (3, seq, head_dim/2)
    parts = freqs.split(list(sections), dim=-1)
    return torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                  sections: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `(seq, head_dim)` for positions `(3, seq)`."""
    freqs = mrope_angles(positions, head_dim, theta, sections)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (heads, seq, head_dim)."""
    return x * cos + rotate_half(x) * sin


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


class KVCache:
    """Per-layer keys and values `(n_head_kv, capacity, head_dim)`, filled left to right."""

    def __init__(self, cfg: TextConfig, capacity: int):
        shape = (cfg.n_layer, cfg.n_head_kv, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=torch.float32)
        self.v = torch.zeros(shape, dtype=torch.float32)
        self.capacity = capacity
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"context full: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class Decoder:
    def __init__(self, cfg: TextConfig, w: Weights):
        self.cfg = cfg
        self.embed = w.matrix("token_embd.weight")
        self.output = w.matrix("output.weight") if w.has("output.weight") else self.embed
        self.norm = w.vector("output_norm.weight")
        self.layers = []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            self.layers.append(Layer(
                attn_norm=w.vector(p + "attn_norm.weight"),
                wq=w.matrix(p + "attn_q.weight"), bq=w.vector(p + "attn_q.bias"),
                wk=w.matrix(p + "attn_k.weight"), bk=w.vector(p + "attn_k.bias"),
                wv=w.matrix(p + "attn_v.weight"), bv=w.vector(p + "attn_v.bias"),
                wo=w.matrix(p + "attn_output.weight"),
                ffn_norm=w.vector(p + "ffn_norm.weight"),
                gate=w.matrix(p + "ffn_gate.weight"), up=w.matrix(p + "ffn_up.weight"),
                down=w.matrix(p + "ffn_down.weight"),
            ))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed.take_rows(ids)

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        cfg = self.cfg
        seq = x.shape[0]
        q = (layer.wq.matmul(x) + layer.bq).view(seq, cfg.n_head, cfg.head_dim).transpose(0, 1)
        k = (layer.wk.matmul(x) + layer.bk).view(seq, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)
        v = (layer.wv.matmul(x) + layer.bv).view(seq, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = cache.length
        keys, values = cache.append(i, k, v)
        if seq == 1:  # decode: the query sees every key; heads of one KV head as one matmul
            qg = q.reshape(cfg.n_head_kv, -1, cfg.head_dim)  # heads h*g..h*g+g-1 use KV head h
            probs = torch.softmax((qg @ keys.transpose(1, 2)) * cfg.head_dim ** -0.5, dim=-1)
            out = (probs @ values).reshape(1, cfg.n_head, 1, cfg.head_dim)
        else:  # causal over the whole cache: query j (absolute past + j) sees keys 0..past + j
            mask = torch.ones(seq, past + seq, dtype=torch.bool).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask[None, None],
                                                 enable_gqa=cfg.n_head != cfg.n_head_kv)
        return layer.wo.matmul(out[0].transpose(0, 1).reshape(seq, cfg.n_embd))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Embeddings (seq, n_embd) at positions (3, seq) -> final-norm hidden states (seq, n_embd)."""
        cfg = self.cfg
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_eps)
            x = x + self._attention(i, layer, h, cos, sin, cache)
            h = rms_norm(x, layer.ffn_norm, cfg.rms_eps)
            x = x + layer.down.matmul(F.silu(layer.gate.matmul(h)) * layer.up.matmul(h))
        cache.length += x.shape[0]
        return rms_norm(x, self.norm, cfg.rms_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output.matmul(hidden)
