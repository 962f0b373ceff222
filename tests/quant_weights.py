"""GGUF weight rows for tests and benchmarks: quantized by qvl's ggml-exact quantizers, or (Q2_K,
Q3_K, IQ4_NL, IQ4_XS and the grid types IQ1_S ... IQ3_S, where speed matters more than ggml's
choices) random blocks and round-to-nearest encoders in llama.cpp's layouts (the grid types:
grid_encoders.py)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL

from grid_encoders import encode_grid
from qvl.convert.quant import quantize
from qvl.runtime.iq_grids import GRID_TYPES

# "huge" multiplies N(0, 1) rows by 3e4; Q4_1 / Q5_1 store each block's minimum (about -3e4 x 3
# here) as a float16, which overflows to -inf past 65504 (ggml's quantizers do the same), so
# theirs by 1e4
HUGE = {T.Q4_1: 1e4, T.Q5_1: 1e4}
# Where the float16 (super-)scale(s) sit in the types built from random bytes (byte offsets in a
# block; no quantizer of qvl's writes these types)
RANDOM_BLOCK_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}
# their range: weights of about N(0, 1)'s size (Q3_K's and IQ4_XS's 6-bit scales, less 32, are
# 16 on average; the IQ4 levels 64)
RANDOM_BLOCK_D = {T.Q2_K: (0.02, 0.08), T.Q3_K: (0.01, 0.04), T.IQ4_NL: (0.005, 0.02), T.IQ4_XS: (0.0005, 0.002)}


def quant_weights(n: int, k: int, qtype: T, kind: str, seed: int) -> torch.Tensor:
    """(n, row_bytes) uint8 of N(0, 1) rows; `kind`: normal, zero-blocks (the first 256 columns
    zero), huge (x 3e4; Q4_1, Q5_1: HUGE) or tiny (x 1e-5) scales. Q2_K, Q3_K, IQ4_NL, IQ4_XS:
    random_blocks; the grid types: encode_grid."""
    rng = np.random.default_rng(seed)
    if qtype in RANDOM_BLOCK_SCALES:
        return random_blocks(n, k, qtype, kind, rng)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "zero-blocks":
        w[:, :256] = 0
    elif kind == "huge":
        w *= HUGE.get(qtype, 3e4)
    elif kind == "tiny":
        w *= 1e-5
    return torch.from_numpy(encode_grid(w, qtype) if qtype in GRID_TYPES else quantize(w, qtype))


def random_blocks(n: int, k: int, qtype: T, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """(n, row_bytes) uint8 of blocks with random bytes (codes, sub-block scales, masks: every
    bit pattern is a valid block) and float16 (super-)scales in RANDOM_BLOCK_D (Q2_K's d and
    dmin, the others' d), scaled by 3e4 for huge and 1e-5 for tiny (float16 subnormals); with
    zero-blocks the first 256 weights of each row are all zero bytes (d = 0: zero weights)."""
    blk, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n, k // blk, size), dtype=np.uint8)
    factor = {"huge": 3e4, "tiny": 1e-5}.get(kind, 1.0)
    for at in RANDOM_BLOCK_SCALES[qtype]:
        d = (rng.uniform(*RANDOM_BLOCK_D[qtype], (n, k // blk)) * factor).astype(np.float16)
        blocks[:, :, at:at + 2] = d[:, :, None].view(np.uint8)
    if kind == "zero-blocks":
        blocks[:, :256 // blk] = 0
    return torch.from_numpy(blocks.reshape(n, -1))


def random_grid_blocks(n: int, k: int, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """(n, row_bytes) uint8 of a grid type's blocks (IQ1_S ... IQ3_S) with random bytes (every
    grid index, sign pattern, scale and delta bit) and float16 super-scales d in [1e-3, 1e-2)
    (IQ1_M's d: the top nibbles of its four scale words). For tests of every bit pattern and
    for benchmarks, which need no encoder's search."""
    blk, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n, k // blk, size), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, (n, k // blk)).astype(np.float16)
    if qtype == T.IQ1_M:
        sc = blocks[..., 48:56].copy().view(np.uint16) & 0x0FFF
        sc |= ((d.view(np.uint16)[..., None] >> (4 * np.arange(4, dtype=np.uint16))) & 15) << 12
        blocks[..., 48:56] = sc.view(np.uint8)
    else:
        blocks[..., 0:2] = d[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


def encode_q2_k(w: np.ndarray) -> np.ndarray:
    """(n, k) float32 rows -> Q2_K blocks by plain rounding (not ggml's search, which qvl does
    not port: it writes no Q2_K): a 16-weight sub-block's min (at most 0) and scale (its range
    / 3) as 4-bit multiples of the super-block's dmin and d. For models in llama.cpp's Q2_K
    layout (qblocks.py), whose bytes both of qvl's paths read."""
    n, k = w.shape
    b = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    low = np.minimum(b.min(-1), 0)
    scale = (b.max(-1) - low) / 3
    d = (scale.max(-1) / 15).astype(np.float16)
    dmin = ((-low).max(-1) / 15).astype(np.float16)
    sc = np.clip(np.round(_ratio(scale, d.astype(np.float32)[..., None])), 0, 15)
    m = np.clip(np.round(_ratio(-low, dmin.astype(np.float32)[..., None])), 0, 15)
    step = (d.astype(np.float32)[..., None] * sc)[..., None]
    base = (dmin.astype(np.float32)[..., None] * m)[..., None]
    q = np.clip(np.round(_ratio(b + base, step)), 0, 3).astype(np.uint8).reshape(n, k // 256, 2, 4, 32)  # h, j, l
    qs = _qs_2bit(q)
    scales = sc.astype(np.uint8) | m.astype(np.uint8) << 4
    return np.concatenate([scales, qs, d[..., None].view(np.uint8), dmin[..., None].view(np.uint8)],
                          axis=-1).reshape(n, -1)


def encode_q3_k(w: np.ndarray) -> np.ndarray:
    """(n, k) float32 rows -> Q3_K blocks by plain rounding (as encode_q2_k): a 16-weight
    sub-block's scale max|w| / 4 as a 6-bit multiple (stored + 32) of the super-block's d,
    codes q - 4 in -4..3 (q's bit 2 in hmask)."""
    n, k = w.shape
    b = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    scale = np.abs(b).max(-1) / 4
    d = (scale.max(-1) / 31).astype(np.float16)
    sc = np.clip(np.round(_ratio(scale, d.astype(np.float32)[..., None])), 0, 31)
    step = (d.astype(np.float32)[..., None] * sc)[..., None]
    q = (np.clip(np.round(_ratio(b, step)), -4, 3) + 4).astype(np.uint8).reshape(n, k // 256, 2, 4, 32)
    qs = _qs_2bit(q & 3)
    hmask = np.zeros((n, k // 256, 32), dtype=np.uint8)
    for h in range(2):
        for j in range(4):
            hmask |= (q[:, :, h, j] >> 2) << (4 * h + j)
    v = sc.astype(np.uint8) + 32  # (n, S, 16) 6-bit
    scales = np.zeros((n, k // 256, 12), dtype=np.uint8)
    scales[..., :8] = (v[..., :8] & 15) | (v[..., 8:] & 15) << 4
    for t in range(4):
        scales[..., 8:] |= ((v[..., 4 * t:4 * t + 4] >> 4) & 3) << (2 * t)
    return np.concatenate([hmask, qs, scales, d[..., None].view(np.uint8)], axis=-1).reshape(n, -1)


def _qs_2bit(q: np.ndarray) -> np.ndarray:
    """2-bit codes (n, blocks, 2, 4, 32) indexed (h, j, l) -> Q2_K / Q3_K's qs (n, blocks, 64):
    field j (bits 2j) of byte 32h + l."""
    return (q[:, :, :, 0] | q[:, :, :, 1] << 2 | q[:, :, :, 2] << 4 | q[:, :, :, 3] << 6).reshape(*q.shape[:2], 64)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32), where=b > 0)


def encode_iq4(w: np.ndarray, xs: bool) -> np.ndarray:
    """(n, k) float32 rows -> IQ4_NL blocks (xs False) or IQ4_XS (True) by plain rounding (as
    encode_q2_k): a 32-weight block's scale maps its largest-magnitude weight to level -127 (IQ4_XS:
    as a 6-bit multiple, stored + 32, of the super-block's d), each weight takes the nearest level."""
    n, k = w.shape
    levels = np.array(IQ4_NL.kvalues, dtype=np.float32)  # gguf-py's: importing qvl.kernels here would
    # create the Triton kernels before a kernel test sets TRITON_INTERPRET
    b = w.reshape(n, k // 32, 32).astype(np.float32)
    extreme = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / levels[0]
    if xs:
        s = scale.reshape(n, k // 256, 8)
        d = (np.abs(s).max(-1) / 31).astype(np.float16)
        ls = np.clip(np.round(_ratio(s, d.astype(np.float32)[..., None])), -32, 31)
        scale = (d.astype(np.float32)[..., None] * ls).reshape(n, k // 32)
    else:
        d = scale.astype(np.float16)
        scale = d.astype(np.float32)
    ratio = _ratio(b, np.abs(scale)[..., None]) * np.sign(scale)[..., None]
    q = np.abs(ratio[..., None] - levels).argmin(-1).astype(np.uint8)  # (n, blocks, 32)
    qs = q[..., :16] | q[..., 16:] << 4  # (n, blocks, 16)
    if not xs:
        return np.concatenate([d[..., None].view(np.uint8), qs], axis=-1).reshape(n, -1)
    v = (ls + 32).astype(np.uint16)  # (n, S, 8) 6-bit
    scales_h = np.zeros((n, k // 256), dtype=np.uint16)
    for ib in range(8):
        scales_h |= (v[..., ib] >> 4) << (2 * ib)
    low = (v & 15).astype(np.uint8)
    scales_l = low[..., 0::2] | low[..., 1::2] << 4
    return np.concatenate([d[..., None].view(np.uint8), scales_h[..., None].view(np.uint8), scales_l,
                           qs.reshape(n, k // 256, 128)], axis=-1).reshape(n, -1)


# Simple encoders of the low-bit types (float32 rows -> blocks), independent of qvl's quantizers (which
# write Q2_K, Q3_K, IQ4_NL, IQ4_XS since 2026-12-06 and the grid types since 2026-12-07, the grid types
# by ggml's searches: minutes for a 7B's matrices where these take seconds)
ENCODERS = {T.Q2_K: encode_q2_k, T.Q3_K: encode_q3_k, T.IQ4_NL: partial(encode_iq4, xs=False),
            T.IQ4_XS: partial(encode_iq4, xs=True), **{qt: partial(encode_grid, qtype=qt) for qt in GRID_TYPES}}


# A low-bit mix of llama.cpp's types that qvl-convert does not write, by the tensor names'
# parts (first match): where a q4_k_m conversion plans Q4_K, Q3_K q/k/v, IQ4_NL attn_output,
# Q2_K gate/up and IQ4_XS ffn_down (the token embedding stays Q4_K)
LOW_BIT = (("attn_output", T.IQ4_NL), ("attn_", T.Q3_K), ("ffn_down", T.IQ4_XS), ("ffn_", T.Q2_K))
# and one of every grid type (llama.cpp's IQ1_S ... IQ3_M files)
GRID_MIX = (("attn_q", T.IQ3_S), ("attn_k", T.IQ3_XXS), ("attn_v", T.IQ2_S), ("attn_output", T.IQ2_XS),
            ("ffn_gate", T.IQ2_XXS), ("ffn_up", T.IQ1_M), ("ffn_down", T.IQ1_S))


def use_low_bit_types(monkeypatch, mix: tuple[tuple[str, T], ...] = LOW_BIT) -> None:
    """Make a q4_k_m conversion write `mix`'s types where it plans Q4_K, with this module's
    encoders (pytest's monkeypatch undoes it after the test)."""
    from qvl.convert import pipeline, quant
    from qvl.convert.plan import PlannedTensor, plan_text
    from qvl.convert.quant import BLOCK_QUANTIZERS

    def low_bit(p: PlannedTensor) -> PlannedTensor:
        if p.qtype != T.Q4_K:
            return p
        return PlannedTensor(p.tensor, next((qt for part, qt in mix if f".{part}" in p.tensor.name), p.qtype))

    monkeypatch.setattr(pipeline, "plan_text", lambda *args, n_gqa=1: [low_bit(p) for p in plan_text(*args, n_gqa=n_gqa)])
    for _, qt in mix:
        monkeypatch.setitem(BLOCK_QUANTIZERS, qt, ENCODERS[qt])
    monkeypatch.setattr(quant, "NEEDS_IMATRIX", ())  # the encoders take no importance values
