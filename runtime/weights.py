"""Weights straight from a memory-mapped GGUF, kept in their file type.

`Matrix` holds one weight as stored (F32/F16/BF16 as a tensor view of the mapping, quantized
types as their raw blocks) and multiplies by it; quantized blocks are dequantized a slice of
rows at a time, so the model is never held dequantized in memory. The torch path here is the
reference; the PACKED and STREAMED modes run bf16 CPU matmuls (packed.py; float32 GEMMs on CPUs
without native bf16, cpu_gemm.py). `Matrix.to_device`
moves a weight to an accelerator once: supported GGUF blocks as they are, multiplied by the
Triton kernel (kernels/qmatmul.py), anything else as a dense bf16 copy (float32 for F32).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .cpu_gemm import gemm_dtype
from .gguf_file import GGUFFile, TensorInfo
from .lora import LoraFactor
from .packed import PackedMatrix, as_torch

# Rows dequantized per step of a quantized matmul: ~16 MB of float32 for a 4096-wide weight.
ROWS_PER_STEP = 1024


# How non-F32 weights are multiplied (F32 weights are always float32 matmuls):
EXACT = "exact"  # float32, dequantized a slice of rows at a time: the reference
PACKED = "packed"  # repacked once for bf16 CPU matmuls (packed.py): decoders, many small-M calls
STREAMED = "streamed"  # converted to bf16 (cpu_gemm) per call, pages released after: vision (large M)
MODES = (EXACT, PACKED, STREAMED)


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The 16-bit type an accelerator multiplies natively: bf16 on CUDA compute capability 8.0
    and up (Ampere, Hopper) and on the CPU, float16 on older GPUs (Turing, Volta, Pascal: no
    bf16 tensor cores, and Triton does not compile bf16 dots for them)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def kernel_dtype(mode: str, device: torch.device | str) -> torch.dtype:
    """What an accelerator's GEMMs and attention multiply in for weights in `mode`: float32 for
    EXACT (products as exact as the CPU's), else `half_dtype` (tensor cores); accumulation is
    float32."""
    return torch.float32 if mode == EXACT else half_dtype(device)


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w.T + bias` (..., rows) in w's dtype, x converted to it, the bias added by the GEMM
    (addmm: one rounding of the output, no pass of its own)."""
    flat = x.reshape(-1, w.shape[1]).to(w.dtype)
    y = flat @ w.T if bias is None else torch.addmm(bias.to(w.dtype), flat, w.T)
    return y.reshape(*x.shape[:-1], w.shape[0])


def kernel_reads(qtype: T, cols: int) -> bool:
    """Whether kernels/qmatmul.py multiplies by these GGUF blocks directly: the kernels walk K
    in steps of STEP; past the last whole step (32-weight types in rows that are not a multiple
    of 256 wide, as the 72B's 29568-wide ffn_down fallbacks) a dense tail makes up the rest
    (`DeviceBlocks`)."""
    from ..kernels.qmatmul import STEP, SUPPORTED

    return qtype in SUPPORTED and cols >= STEP


def device_bytes(info: TensorInfo, kernels: bool) -> int:
    """Bytes a tensor takes on an accelerator once moved (`Matrix.to_device`, `Weights.vector`)."""
    if len(info.ne) == 2 and kernels and kernel_reads(info.type, info.shape[1]):
        from ..kernels.qmatmul import STEP

        return info.nbytes + info.shape[0] * (info.shape[1] % STEP) * 2  # the tail in bf16 / f16
    n = 1
    for d in info.ne:
        n *= int(d)
    return n * (4 if info.type == T.F32 or len(info.ne) != 2 else 2)


class DeviceBlocks:
    """A weight's GGUF blocks on an accelerator, multiplied by kernels/qmatmul.py: raw (rows,
    row_bytes) uint8. `gemm_dtype`: what x is multiplied in by the tiled GEMM (more than
    GEMV_MAX_M rows of x); the GEMV takes float32. The kernels read the first `head` columns
    (whole 256-weight steps); `tail` (rows, cols - head) in gemm_dtype, or None when head =
    cols, holds the rest dense, multiplied by torch and added before the epilogue."""

    def __init__(self, raw: torch.Tensor, qtype: T, rows: int, cols: int, gemm_dtype: torch.dtype,
                 tail: torch.Tensor | None = None):
        from ..kernels.qmatmul import STEP

        self.raw, self.qtype, self.rows, self.cols, self.gemm_dtype = raw, qtype, rows, cols, gemm_dtype
        self.head = cols - cols % STEP
        self.tail = tail
        if (tail is None) != (self.head == cols) or (tail is not None and tail.shape != (rows, cols - self.head)):
            raise ValueError(f"a {rows} x {cols} weight needs a ({rows}, {cols - self.head}) tail past column "
                             f"{self.head}, got {None if tail is None else tuple(tail.shape)}")

    def _head_raw(self) -> torch.Tensor:
        blk, size = GGML_QUANT_SIZES[self.qtype]
        return self.raw if self.tail is None else self.raw[:, :self.head // blk * size]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               swiglu: bool = False) -> torch.Tensor:
        """x (..., cols) -> float32 `x @ W.T + bias + residual` (..., rows), or with `swiglu`
        (rows stacked as [gate; up]) `silu(x @ gate.T) * (x @ up.T)` (..., rows / 2)."""
        from ..kernels.qmatmul import qmatmul

        if self.tail is not None:
            y = self._with_tail(x)
            if swiglu:
                y = torch.nn.functional.silu(y[..., :self.rows // 2], inplace=True).mul_(y[..., self.rows // 2:])
            if bias is not None:
                y = y + bias
            return y if residual is None else y + residual
        flat, residual = self._operands(x, residual)
        y = qmatmul(flat, self.raw, self.qtype, self.rows, self.cols, bias, residual, swiglu)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _with_tail(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` float32 (..., rows): the kernels on the head columns, torch on the tail."""
        from ..kernels.qmatmul import qmatmul

        assert self.tail is not None
        flat = x.reshape(-1, self.cols)
        head, _ = self._operands(flat[:, :self.head], None)
        y = qmatmul(head, self._head_raw(), self.qtype, self.rows, self.head)
        y += (flat[:, self.head:].to(self.tail.dtype) @ self.tail.T).float()
        return y.reshape(*x.shape[:-1], self.rows)

    def _operands(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x as (M, K) rows (in the GEMM's dtype past the GEMV's M) and residual as (M, rows)."""
        from ..kernels.qmatmul import GEMV_MAX_M

        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > GEMV_MAX_M:
            flat = flat.to(self.gemm_dtype)
        return flat, residual.reshape(flat.shape[0], self.rows) if residual is not None else None

    def matmul_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, RMSNorm(y) * norm_weight) for y = `x @ W.T + residual` (..., rows): one launch
        for decode (kernels/qmatmul.qmatmul_norm)."""
        from ..kernels.qmatmul import qmatmul_norm

        if self.tail is not None:  # the norm after the tail's share: the rmsnorm kernel
            from ..kernels.rmsnorm import rmsnorm

            y = self.matmul(x, residual=residual)
            return y, rmsnorm(y.reshape(-1, self.rows), norm_weight, eps)[0].reshape(y.shape)
        flat, residual = self._operands(x, residual)
        y, normed = qmatmul_norm(flat, self.raw, self.qtype, self.rows, self.cols, norm_weight, eps,
                                 residual=residual)
        return y.reshape(*x.shape[:-1], self.rows), normed.reshape(*x.shape[:-1], self.rows)

    @staticmethod
    def stack(parts: list[DeviceBlocks]) -> DeviceBlocks:
        """One block of rows holding `parts` in order (same type and columns); each part's raw
        becomes a view into it, so the stack costs no memory beyond the parts'."""
        first = parts[0]
        raw = torch.cat([p.raw for p in parts])
        tail = torch.cat([p.tail for p in parts]) if first.tail is not None else None  # type: ignore[misc]
        start = 0
        for p in parts:
            p.raw = raw[start:start + p.rows]
            if tail is not None:
                p.tail = tail[start:start + p.rows]
            start += p.rows
        return DeviceBlocks(raw, first.qtype, start, first.cols, first.gemm_dtype, tail)


class Matrix:
    """A 2-D weight `(rows, cols)` in its GGUF type; `x @ W.T` without a full float copy."""

    def __init__(self, info: TensorInfo, raw: np.ndarray, mode: str = EXACT,
                 release: Callable[[], None] | None = None):
        if len(info.ne) != 2:
            raise ValueError(f"tensor '{info.name}' is not 2-D: ne = {list(info.ne)}")
        self.name = info.name
        self.qtype = info.type
        self.rows, self.cols = info.shape
        self.raw = raw.reshape(self.rows, -1)
        self._dense: torch.Tensor | None = None
        self.kernel: DeviceBlocks | None = None  # GGUF blocks on self.device, for qmatmul
        self._device_dense: torch.Tensor | None = None  # bf16 (or float32) copy on self.device
        self.device = torch.device("cpu")
        self._packed: PackedMatrix | None = None
        self._release = release
        self.loras: list[LoraFactor] = []  # run-time adapters' terms (lora.py), on this weight's device
        self.mode = EXACT if self.qtype == T.F32 else mode
        if self.mode == PACKED:
            self._packed = PackedMatrix(self.qtype, self.raw, self.rows, self.cols)
            if release is not None:
                release()  # the packed copy serves matmuls; row lookups fault pages back in
        if self.qtype == T.F32:
            self._dense = as_torch(self.raw, torch.float32)
        elif self.qtype == T.F16:
            self._dense = as_torch(self.raw, torch.float16)
        elif self.qtype == T.BF16:
            self._dense = as_torch(self.raw, torch.bfloat16)

    def to_device(self, device: torch.device | str, kernels: bool = True,
                  dtype: torch.dtype = torch.bfloat16) -> Matrix:
        """Hold this weight on `device` from now on (matmuls take x there): GGUF blocks of the
        types kernels/qmatmul.py reads when `kernels`, else a dense copy (float32 for F32
        weights, `half_dtype` for the rest). Row lookups keep reading the mapped file. The kernel's tiled
        GEMM (more than GEMV_MAX_M rows of x) takes x in `dtype` (`kernel_dtype`)."""
        self.device = torch.device(device)
        self._packed = None
        if kernels and kernel_reads(self.qtype, self.cols):
            from ..kernels.qmatmul import STEP

            from ..kernels.qgrids import GRID_IDS, grid_table

            raw = as_torch(self.raw, torch.uint8).to(self.device)
            if self.qtype in GRID_IDS:  # the grid types' level table, made now: not inside a CUDA graph capture
                grid_table(raw.device)
            tail = None
            if self.cols % STEP:  # only the tail's own blocks are dequantized
                blk, size = GGML_QUANT_SIZES[self.qtype]
                tail_blocks = np.ascontiguousarray(self.raw[:, (self.cols - self.cols % STEP) // blk * size:])
                tail = torch.from_numpy(dequantize(tail_blocks, self.qtype).reshape(self.rows, -1)).to(self.device, dtype)
            self.kernel = DeviceBlocks(raw, self.qtype, self.rows, self.cols, dtype, tail)
        else:
            dtype = torch.float32 if self.qtype == T.F32 else half_dtype(self.device)
            dense = torch.empty(self.rows, self.cols, dtype=dtype, device=self.device)
            for start in range(0, self.rows, ROWS_PER_STEP):
                stop = min(start + ROWS_PER_STEP, self.rows)
                dense[start:stop] = self.rows_f32(start, stop).to(self.device, dtype)
            self._device_dense = dense
        if self._release is not None:
            self._release()
        self.loras = [f.to(self.device, torch.float32 if dtype == torch.float32 else half_dtype(self.device))
                      for f in self.loras]
        return self

    def rows_f32(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32."""
        if self._dense is not None:
            return self._dense[start:stop].float()
        return torch.from_numpy(dequantize(self.raw[start:stop], self.qtype).reshape(stop - start, self.cols))

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows by index (embedding lookup), float32."""
        if self._dense is not None:
            return self._dense[ids].float()
        idx = ids.cpu().numpy()
        return torch.from_numpy(dequantize(self.raw[idx], self.qtype).reshape(len(idx), self.cols))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., cols) float32 -> `x @ W.T + bias + residual` (..., rows) float32, on this
        weight's device (bias and residual added by the kernel on the kernel path), plus any
        run-time adapter's term."""
        if self.kernel is not None:
            y = self.kernel.matmul(x, bias, residual)
        else:
            y = self._product(x)
            if bias is not None:
                y = y + bias
            y = y if residual is None else residual + y
        for f in self.loras:
            y = f.add_to(y, x)
        return y

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias` (..., rows) left in the product's own precision: bf16 / f16 where
        the weight is multiplied as a dense half copy (STREAMED, or on a device without the
        kernels), the bias added by the GEMM (one rounding, no float32 pass over the output);
        float32 otherwise, as `matmul`. For activations that feed the next matmul (the vision
        MLP's hidden layer), which rounds them to its half type anyway."""
        if self.kernel is None and self._packed is None and not self.loras:
            if self._device_dense is not None and self._device_dense.dtype != torch.float32:
                return dense_linear(x, self._device_dense, bias)
            if self.mode == STREAMED and self.qtype != T.F32:
                return self._streamed_linear(x, bias)
        return self.matmul(x, bias)

    def _streamed_linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear` by a copy made for this call (`_streamed`), the mapping's pages let go after."""
        y = dense_linear(x, self._streamed(), bias)
        if self._release is not None:
            self._release()
        return y

    def _streamed(self) -> torch.Tensor:
        """The whole weight in the CPU's GEMM type (cpu_gemm.py: bf16, or float32 where bf16
        GEMMs are emulated), converted now (F16 in one pass)."""
        dtype = gemm_dtype()
        if self._dense is not None:
            return self._dense.to(dtype)
        return self.rows_f32(0, self.rows).to(dtype)

    def matmul_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, rms_norm(y) * norm_weight) for y = `self.matmul(x, residual=residual)`: the
        residual stream and the norm that reads it next, fused on the kernel path (without a
        run-time adapter: its term comes after the product)."""
        if self.kernel is not None and not self.loras:
            return self.kernel.matmul_norm(x, norm_weight, eps, residual)
        y = self.matmul(x, residual=residual)
        if self.kernel is not None:
            from ..kernels.rmsnorm import rmsnorm

            return y, rmsnorm(y.reshape(-1, self.rows), norm_weight, eps)[0].reshape(y.shape)
        from .decoder import rms_norm

        return y, rms_norm(y, norm_weight, eps)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self._device_dense is not None:
            return (x.to(self._device_dense.dtype) @ self._device_dense.T).float()
        if self._packed is not None:
            return self._packed.matmul(x)
        if self.mode == STREAMED:
            return self._streamed_linear(x).float()
        if self._dense is not None and self._dense.dtype == torch.float32:
            return x @ self._dense.T
        out = torch.empty(*x.shape[:-1], self.rows, dtype=torch.float32)
        for start in range(0, self.rows, ROWS_PER_STEP):
            stop = min(start + ROWS_PER_STEP, self.rows)
            out[..., start:stop] = x @ self.rows_f32(start, stop).T
        return out


class Weights:
    """Named tensors of one or more GGUF files."""

    def __init__(self, *files: GGUFFile, mode: str = EXACT, loras: dict[str, list[LoraFactor]] | None = None):
        """`loras`: run-time adapters' terms by tensor name (lora.load_loras), given to those matrices."""
        if mode not in MODES:
            raise ValueError(f"weights mode {mode!r}: one of {', '.join(MODES)}")
        self.files = files
        self.mode = mode
        self.loras = loras or {}  # float32 on the CPU (bf16 products there took twice as long, 2026-12-07)

    def _find(self, name: str) -> tuple[GGUFFile, TensorInfo]:
        for f in self.files:
            if name in f.tensors:
                return f, f.tensors[name]
        raise KeyError(f"tensor '{name}' not found in {', '.join(str(f.path) for f in self.files)}")

    def has(self, name: str) -> bool:
        return any(name in f.tensors for f in self.files)

    def matrix(self, name: str, mode: str | None = None) -> Matrix:
        """A weight in this set's mode, or in `mode` (EXACT for one that moves to a device)."""
        f, info = self._find(name)
        m = Matrix(info, f.raw(name), mode or self.mode, lambda: f.release(name))
        m.loras = list(self.loras.get(name, ()))
        return m

    def vector(self, name: str) -> torch.Tensor:
        """A small tensor (norm weight, bias, patch embedding) as float32, any shape."""
        f, info = self._find(name)
        raw = f.raw(name)
        if info.type == T.F32:
            data = raw.view(np.float32)
        elif info.type == T.F16:
            data = raw.view(np.float16).astype(np.float32)
        else:
            data = dequantize(raw, info.type)
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(info.shape))
