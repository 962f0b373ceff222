"""ggml-exact quantizers: one table of formats, one entry point.

`quantize(rows, qtype)` turns float32 rows into the bytes ggml's reference quantizer writes
(`quantize_row_*_ref`); `quantize(rows, qtype, imatrix)` into those ggml writes with an
importance matrix (`quantize_row_*_impl`, as llama-quantize --imatrix calls them). Block sizes
and bytes come from gguf-py's `GGML_QUANT_SIZES`, the single source of truth; `dequantize` is
gguf-py's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from . import pool
from .common import F32, seq_sum
from .iq1 import quantize_iq1_m, quantize_iq1_s
from .iq2 import quantize_iq2_s, quantize_iq2_xs, quantize_iq2_xxs
from .iq3 import quantize_iq3_s, quantize_iq3_xxs
from .iq4 import quantize_iq4_nl, quantize_iq4_xs
from .k_minmax import quantize_q4_k, quantize_q5_k
from .legacy import (quantize_q4_0, quantize_q4_0_weighted, quantize_q4_1, quantize_q4_1_weighted, quantize_q5_0,
                     quantize_q5_0_weighted, quantize_q5_1, quantize_q5_1_weighted, quantize_q8_0, row_weights)
from .low_k import quantize_q2_k, quantize_q3_k
from .q6_k import quantize_q6_k

T = GGMLQuantizationType

BLOCK_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.Q8_0: quantize_q8_0,
    T.Q4_0: quantize_q4_0,
    T.Q4_1: quantize_q4_1,
    T.Q5_0: quantize_q5_0,
    T.Q5_1: quantize_q5_1,
    T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k,
    T.Q6_K: quantize_q6_k,
    T.Q3_K: quantize_q3_k,
    T.Q2_K: quantize_q2_k,
    T.IQ4_NL: quantize_iq4_nl,
    T.IQ4_XS: quantize_iq4_xs,
    T.IQ3_XXS: quantize_iq3_xxs,
    T.IQ3_S: quantize_iq3_s,
    T.IQ2_XXS: quantize_iq2_xxs,
    T.IQ2_XS: quantize_iq2_xs,
    T.IQ2_S: quantize_iq2_s,
    T.IQ1_S: quantize_iq1_s,
    T.IQ1_M: quantize_iq1_m,
}

# With an importance matrix: the K-types weigh each element by its value (and the block's
# statistics); the 32-element types by its value and the row's mean square (row_weights); Q8_0
# takes none, as in ggml.
K_WEIGHTED: dict[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    t: q for t, q in BLOCK_QUANTIZERS.items() if t not in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
}  # their block quantizers take the matrix's values as a second argument (K-quants, IQ4 and the grid types)
ROW_WEIGHTED: dict[GGMLQuantizationType, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    T.Q4_0: quantize_q4_0_weighted,
    T.Q4_1: quantize_q4_1_weighted,
    T.Q5_0: quantize_q5_0_weighted,
    T.Q5_1: quantize_q5_1_weighted,
}

NEEDS_IMATRIX = (T.IQ2_XXS, T.IQ2_XS, T.IQ1_S)  # ggml_quantize_requires_imatrix (of qvl's types)

FLOAT_TYPES: dict[GGMLQuantizationType, np.dtype] = {
    T.F32: np.dtype(np.float32),
    T.F16: np.dtype(np.float16),
}

# Elements per call of a block quantizer: small enough that the K-quants' few temporaries stay
# in cache (measured fastest here), large enough that numpy's per-call overhead does not show.
CHUNK_ELEMENTS = 1 << 17


class QuantError(ValueError):
    """A tensor that cannot take the requested type (row length not a multiple of the block)."""


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` elements in `qtype`."""
    if qtype == T.BF16:
        return 2 * n_per_row
    blk, size = GGML_QUANT_SIZES[qtype]
    if n_per_row % blk:
        raise QuantError(f"row of {n_per_row} elements is not a multiple of {qtype.name}'s block of {blk}")
    return n_per_row // blk * size


def can_hold(qtype: GGMLQuantizationType, n_per_row: int) -> bool:
    return n_per_row % block_size(qtype) == 0


def to_bf16(rows: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even, NaN kept quiet), as gguf-py does."""
    bits = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16
    out = np.where(nan, (bits >> 16) | 64, rounded).astype(np.uint16)
    return out.view(np.uint8).reshape(*rows.shape[:-1], rows.shape[-1] * 2)


def _blocks(chunk: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    """One chunk of rows as `qtype`'s blocks, with the importance matrix where given and taken."""
    blk = block_size(qtype)
    x = chunk.reshape(-1, blk)
    if imatrix is None or qtype == T.Q8_0:
        return BLOCK_QUANTIZERS[qtype](x)
    qw = np.broadcast_to(imatrix, chunk.shape).reshape(-1, blk)
    if qtype in K_WEIGHTED:
        return K_WEIGHTED[qtype](x, qw)
    # the row's sum of squares in ggml's order, then its mean, for each of the row's blocks
    sigma2 = (seq_sum(np.ascontiguousarray(chunk.T) ** 2) / F32(chunk.shape[1])).astype(F32)
    return ROW_WEIGHTED[qtype](x, row_weights(x, qw, np.repeat(sigma2, chunk.shape[1] // blk)))


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 `(n_rows, n_per_row)` -> uint8 `(n_rows, row_bytes)` in `qtype`'s ggml layout;
    with `imatrix` (float32 `(n_per_row,)`: an importance matrix's values for the columns) as
    ggml_quantize_chunk weighs them (Q8_0 and the float types take none). Inside
    pool.worker_processes, a block type's rows are quantized in a worker process."""
    if qtype in BLOCK_QUANTIZERS:
        done = pool.submit(quantize_here, rows, qtype, imatrix)
        if done is not None:
            return done.result()
    return quantize_here(rows, qtype, imatrix)


def quantize_here(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """quantize() in this process."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if qtype in FLOAT_TYPES:
        return rows.astype(FLOAT_TYPES[qtype]).view(np.uint8).reshape(n_rows, -1)
    if qtype == T.BF16:
        return to_bf16(rows)
    if qtype not in BLOCK_QUANTIZERS:  # every one of them takes an importance matrix (or, Q8_0, ignores it)
        raise QuantError(f"qvl has no quantizer for {qtype.name}")
    if imatrix is None and qtype in NEEDS_IMATRIX:
        raise QuantError(f"{qtype.name} is quantized only with an importance matrix (ggml's has no other way)")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise QuantError(f"an importance matrix of {imatrix.size} values for rows of {n_per_row}")
    nbytes = row_bytes(qtype, n_per_row)
    out = np.empty((n_rows, nbytes), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // n_per_row)
    # Zero, huge and flat groups divide by zero on purpose (ggml's branches pick the result).
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, n_rows, step):
            chunk = rows[start : start + step]
            out[start : start + step] = _blocks(chunk, qtype, imatrix).reshape(chunk.shape[0], nbytes)
    return out


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """uint8 rows in `qtype` -> float32 (gguf-py's dequantizers)."""
    return _gguf_dequantize(data, qtype).astype(np.float32, copy=False)
