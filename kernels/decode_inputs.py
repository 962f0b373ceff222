"""A decode step's inputs made on the device: the embedding row of the token the last step chose,
and the next step's cache slot, length, position and rotary angles.

Greedy decode on a GPU keeps the next token on the device (runtime/decode_graph.py): the step's
argmax writes the id (`advance`, which moves the slot, length and position on by one and
computes the next angles), and the next step reads its embedding row (`embed_row`) without
the host, so the host can queue the next step before it has read this one's token.
The table stays where it is cheapest: the embeddings' GGUF blocks in page-locked host memory,
which a kernel on a GPU reads directly (one row: a few KB a token, e.g. 2016 bytes of Q4_K for
the 7B), so the 7B's 0.29 GiB of Q4_K embeddings take no GPU memory; or blocks already on the
GPU (tied embeddings, which the output layer holds there). Quantized types decode as the GEMMs'
tiles do (qblocks.decode_tile); F32, F16 and BF16 rows are widened. Columns need not fill a
256-weight step (the decode reads only the row's own blocks). Torch reference: gguf-py's
`dequantize` of the row (`embed_row_ref`).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .qblocks import QTYPE_IDS, STEP, decode_tile
from .qgrids import type_grid

BLOCK_K = 64  # columns a program
DENSE = {T.F32: 1, T.F16: 2, T.BF16: 3}  # rows stored as floats: widened, not decoded


@triton.jit
def embed_row_kernel(w_ptr, g_ptr, id_ptr, out_ptr, k, row_bytes, step_bytes,
                     QTYPE: tl.constexpr, DENSE_TYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program c: columns c * BLOCK_K ... of row id_ptr[0] into out (float32)."""
    c = tl.program_id(0)
    tok = tl.load(id_ptr).to(tl.int64)
    col = c * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = col < k
    row = w_ptr + tok * row_bytes
    if DENSE_TYPE == 1:
        w = tl.load(row.to(tl.pointer_type(tl.float32)) + col, mask=mask, other=0.0)
    elif DENSE_TYPE == 2:
        w = tl.load(row.to(tl.pointer_type(tl.float16)) + col, mask=mask, other=0.0).to(tl.float32)
    elif DENSE_TYPE == 3:
        w = tl.load(row.to(tl.pointer_type(tl.bfloat16)) + col, mask=mask, other=0.0).to(tl.float32)
    else:
        e = tl.where(mask, col % 256, 0)  # past the row's end: its first weight again, not stored
        rn = tl.zeros((1,), dtype=tl.int64) + tok
        # the program's columns lie in one 256-weight step (BLOCK_K divides 256)
        w = tl.reshape(decode_tile(w_ptr, g_ptr, rn, e, c * BLOCK_K // 256, row_bytes, step_bytes, QTYPE),
                       (BLOCK_K,))
    tl.store(out_ptr + col, w, mask=mask)


@triton.jit
def advance_kernel(next_ptr, token_ptr, slot_ptr, length_ptr, pos_ptr, inv_freq_ptr, angles_ptr, half,
                   BLOCK: tl.constexpr):
    """One program: token <- next (the argmax), slot and length + 1, position + 1, and the
    angles position * inv_freq (float32, as the host computes them when it stages a step)."""
    tl.store(token_ptr, tl.load(next_ptr).to(tl.int64))
    tl.store(slot_ptr, tl.load(slot_ptr) + 1)
    tl.store(length_ptr, tl.load(length_ptr) + 1)
    pos = tl.load(pos_ptr) + 1.0
    tl.store(pos_ptr, pos)
    i = tl.arange(0, BLOCK)
    tl.store(angles_ptr + i, pos * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0), mask=i < half)


def advance(next_id: torch.Tensor, token: torch.Tensor, slot: torch.Tensor, length: torch.Tensor,
            pos: torch.Tensor, inv_freq: torch.Tensor, angles: torch.Tensor) -> None:
    """The next step's inputs, in place: token (int64) <- next_id (the argmax, int64), slot
    (int64) and length (int32) + 1, pos (float32) + 1, angles (half,) <- pos * inv_freq.
    Text tokens only (t = h = w: every M-RoPE section rotates by the one position)."""
    half = angles.numel()
    advance_kernel[(1,)](next_id, token, slot, length, pos, inv_freq, angles, half,
                         BLOCK=triton.next_power_of_2(half))


def supported(qtype: T) -> bool:
    return qtype in QTYPE_IDS or qtype in DENSE


def embed_row(raw: torch.Tensor, qtype: T, cols: int, token: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (cols,) or (1, cols) float32 <- row token[0] of raw (rows, row_bytes) uint8 in
    `qtype` (on the GPU, or page-locked host memory a GPU kernel can read; on the CPU in
    Triton's interpreter). token: one int64 on out's device."""
    blk, size = GGML_QUANT_SIZES[qtype]
    embed_row_kernel[(triton.cdiv(cols, BLOCK_K),)](
        raw, type_grid(qtype, out.device, raw), token, out, cols, raw.stride(0), STEP // blk * size,
        QTYPE=QTYPE_IDS.get(qtype, 0), DENSE_TYPE=DENSE.get(qtype, 0), BLOCK_K=BLOCK_K)
    return out


def embed_row_ref(raw: np.ndarray, qtype: T, token: int) -> torch.Tensor:
    """gguf-py's dequantization of row `token`, float32 (cols,)."""
    return torch.from_numpy(np.asarray(dequantize(raw[token:token + 1], qtype), dtype=np.float32).reshape(-1))
