"""Activations quantized for the int8 GEMV (qgemv_q8.py), and where a tensor's quantized form is
kept so that it is made once.

Per 32 values of x (ggml's q8_1 blocks, plus per-16 sums for Q6_K): int8 codes q = round(x *
127 / max|x|) (half away from zero), the scale dx = max|x| / 127, dx * sum(q), and the integer
sums of q's two halves. `q8_blocks` computes them inside any kernel (qgemv_q8.quantize_q8's own
launch, and the RMSNorm that a decode GEMV applies to its output, rmsnorm.norm_row, so the next
GEMV's input needs no launch of its own).

ENABLED (QVL_INT8_GEMV=1; off by default): decode's batch-1 Q4_K / Q6_K products take the int8
GEMV (kernels/qmatmul.py), and the kernels whose outputs feed them write those outputs' int8
form too: the RMSNorm after an o / down GEMV, the SwiGLU GEMV (the down projection's x), decode
attention (the o projection's x). Read at each call, so a test or script may set it.

`remember(x, q8)` / `recall(x)`: the quantized form of a tensor, found again from the tensor or a
view of all of it, while it lives and is not written to (its version counter unchanged): a
layer's q / k / v, whose types may differ (Q4_K_M's attn_v is Q6_K in some layers) and so be
two GEMVs on one x, quantize it once, and a norm's output is not quantized again.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

Q8_BLOCK = 32  # activations a scale
ENABLED = os.environ.get("QVL_INT8_GEMV") == "1"


@dataclass(frozen=True)
class Q8Activations:
    """x (K,) quantized: codes (K,) int8, dx (K / 32,) float32, dx * sum(codes) (K / 32,) and the
    codes' sums per 16 (K / 16,) int32."""

    q: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor
    s16: torch.Tensor

    @staticmethod
    def empty(k: int, device: torch.device) -> Q8Activations:
        return Q8Activations(torch.empty(k, dtype=torch.int8, device=device),
                             torch.empty(k // Q8_BLOCK, dtype=torch.float32, device=device),
                             torch.empty(k // Q8_BLOCK, dtype=torch.float32, device=device),
                             torch.empty(k // 16, dtype=torch.int32, device=device))


@triton.jit
def q8_blocks(x, BLOCKS: tl.constexpr):
    """x (BLOCKS, 32) float32 -> (codes int8, dx (BLOCKS,), dx * sum(codes) (BLOCKS,), sums of
    each half (BLOCKS, 2) int32)."""
    amax = tl.max(tl.abs(x), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    q = (x * inv[:, None] + tl.where(x >= 0, 0.5, -0.5)).to(tl.int32)  # rounded half away from zero
    halves = tl.sum(tl.reshape(q, (BLOCKS, 2, 16)), axis=2)
    return q.to(tl.int8), d, d * tl.sum(q, axis=1).to(tl.float32), halves


@triton.jit
def store_q8(x, start, end, q_ptr, d_ptr, s_ptr, s16_ptr, BLOCKS: tl.constexpr):
    """Quantize x (BLOCKS * 32,), values start ... of a vector (start and end multiples of 32),
    and store its blocks' codes, scales and sums: those before `end` only."""
    q, d, s, halves = q8_blocks(tl.reshape(x, (BLOCKS, 32)), BLOCKS)
    b = start // 32 + tl.arange(0, BLOCKS)
    offs = b[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(q_ptr + offs, q, mask=offs < end)
    tl.store(d_ptr + b, d, mask=b * 32 < end)
    tl.store(s_ptr + b, s, mask=b * 32 < end)
    h = 2 * b[:, None] + tl.arange(0, 2)[None, :]
    tl.store(s16_ptr + h, halves, mask=h * 16 < end)


def form_for(out: torch.Tensor, wanted: bool) -> Q8Activations | None:
    """A launch's output `out` (a vector's worth of values) to be written with its int8 form:
    that form's buffers, remembered as out's; None when not `wanted`."""
    if not wanted:
        return None
    q8 = Q8Activations.empty(out.numel(), out.device)
    remember(out, q8)
    return q8


def pointers(q8: Q8Activations | None, dummy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A kernel's four int8-form pointer arguments (codes, dx, dx * sum, sums per 16): `dummy`
    (never written) for each without a form."""
    return (q8.q, q8.d, q8.s, q8.s16) if q8 is not None else (dummy,) * 4


_known: dict[int, tuple[weakref.ref, int, int, int, Q8Activations]] = {}


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x._base if x._base is not None else x


def remember(x: torch.Tensor, q8: Q8Activations) -> None:
    """x's quantized form is q8 (as long as x lives unchanged)."""
    base = _whole(x)
    key = id(base)
    _known[key] = (weakref.ref(base, lambda _, key=key: _known.pop(key, None)), base._version, x.data_ptr(),
                   x.numel(), q8)


def recall(x: torch.Tensor) -> Q8Activations | None:
    """The quantized form remembered for x (or for the tensor x views, with the same start and
    size), if that tensor is alive and unchanged since. Unchanged as torch counts writes (its
    version): a kernel's later store into the tensor would not count, so only outputs are
    remembered, when made, by the launch that writes both them and their int8 form."""
    base = _whole(x)
    entry = _known.get(id(base))
    if entry is None:
        return None
    ref, version, ptr, numel, q8 = entry
    if ref() is not base or base._version != version or x.data_ptr() != ptr or x.numel() != numel:
        return None
    return q8
