"""Weights that multiply the same input (a layer's q, k and v; its gate and up), as few launches.

On an accelerator with the kernels, neighbouring weights of one GGUF type are stacked into one
block of rows (weights.DeviceBlocks.stack: the parts become views, no extra memory) and
multiplied in one launch, their biases concatenated and added by the kernel; a decode token's
q/k/v then costs one GEMV (two where the Q4_K_M mix gives v another type), and gate/up one GEMV
whose epilogue is `silu(gate) * up`. Dense copies on an accelerator (the vision tower's F16 /
F32 weights) are stacked the same way (`DenseStack`): the vision tower's q/k/v are one GEMM,
their input converted to the half type once, not three times. Anywhere else each weight
multiplies alone, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .weights import DeviceBlocks, Matrix, dense_linear


class DenseStack:
    """Dense copies of neighbouring weights on one device (Matrix.to_device's, same dtype and
    columns) stacked into one (rows, cols) tensor; each part's copy becomes a view into it."""

    def __init__(self, parts: Sequence[Matrix]):
        self.dense = torch.cat([m._device_dense for m in parts])  # type: ignore[misc]
        start = 0
        for m in parts:
            m._device_dense = self.dense[start:start + m.rows]
            start += m.rows

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., cols) -> `x @ W.T + bias` float32, as Matrix.matmul for one dense copy."""
        y = (x.to(self.dense.dtype) @ self.dense.T).float()
        return y if bias is None else y + bias

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T + bias` left in the copies' dtype, the bias added by the GEMM (Matrix.linear):
        no float32 output pass, no bias pass."""
        return dense_linear(x, self.dense, bias)


class Stack:
    """`mats` with their `biases` (None for none), multiplied by one input."""

    def __init__(self, mats: Sequence[Matrix], biases: Sequence[torch.Tensor | None] | None = None):
        biases = list(biases) if biases is not None else [None] * len(mats)
        # groups of neighbours: (the weight to multiply by, its bias, how many outputs it holds)
        self.groups: list[tuple[Matrix | DeviceBlocks | DenseStack, torch.Tensor | None, list[int]]] = []
        run: list[tuple[Matrix, torch.Tensor | None]] = []
        for mat, bias in [*zip(mats, biases), (None, None)]:
            if run and (mat is None or not self._joins(run[-1][0], mat, run[-1][1], bias)):
                self._close(run)
                run = []
            if mat is not None:
                run.append((mat, bias))

    @staticmethod
    def _joins(prev: Matrix, mat: Matrix, prev_bias: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
        if (prev_bias is None) != (bias is None) or prev.loras or mat.loras:  # an adapter's term: alone
            return False
        a, b = prev.kernel, mat.kernel
        if a is not None and b is not None:
            return a.qtype == b.qtype and a.cols == b.cols and a.raw.device == b.raw.device
        da, db = prev._device_dense, mat._device_dense
        return (da is not None and db is not None and da.dtype == db.dtype and da.shape[1] == db.shape[1]
                and da.device == db.device)

    def _close(self, run: list[tuple[Matrix, torch.Tensor | None]]) -> None:
        if len(run) == 1:
            self.groups.append((run[0][0], run[0][1], [run[0][0].rows]))
            return
        kernels = [m.kernel for m, _ in run]
        if kernels[0] is None:
            blocks: DeviceBlocks | DenseStack = DenseStack([m for m, _ in run])
        else:
            blocks = DeviceBlocks.stack(kernels)  # type: ignore[arg-type]
        bias = torch.cat([b for _, b in run]) if run[0][1] is not None else None  # type: ignore[misc]
        self.groups.append((blocks, bias, [m.rows for m, _ in run]))

    def matmul(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., cols) -> each weight's `x @ W.T + bias` (..., rows_i), float32."""
        out: list[torch.Tensor] = []
        for weight, bias, rows in self.groups:
            y = weight.matmul(x, bias)
            out.extend(y.split(rows, dim=-1) if len(rows) > 1 else [y])
        return out

    def linear(self, x: torch.Tensor) -> list[torch.Tensor]:
        """As `matmul`, each output left in its product's precision (Matrix.linear: bf16 / f16
        where the weights are dense half copies, float32 from quantized blocks)."""
        out: list[torch.Tensor] = []
        for weight, bias, rows in self.groups:
            y = weight.matmul(x, bias) if isinstance(weight, DeviceBlocks) else weight.linear(x, bias)
            out.extend(y.split(rows, dim=-1) if len(rows) > 1 else [y])
        return out

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """For [gate, up] without biases: `silu(x @ gate.T) * (x @ up.T)`, in the kernel's
        epilogue when they are one stacked group of equal halves."""
        if len(self.groups) == 1 and isinstance(self.groups[0][0], DeviceBlocks) and self.groups[0][1] is None:
            rows = self.groups[0][2]
            if len(rows) == 2 and rows[0] == rows[1]:
                return self.groups[0][0].matmul(x, swiglu=True)
        gate, up = self.matmul(x)
        return F.silu(gate, inplace=True).mul_(up)  # over the gate's own product: no buffers beside it
