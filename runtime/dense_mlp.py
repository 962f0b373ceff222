"""The vision tower's SwiGLU MLP on an accelerator as two GEMMs over 16-byte-aligned rows.

Qwen2.5-VL's vision MLP is 1280 -> 3420 -> 1280. A bf16 row of 3420 values is 6840 bytes, not
a multiple of 16, and cuBLAS's Hopper GEMMs (TMA loads) need 16-byte-aligned rows: on an H200
the gate, up and down products of a 2530x1000 image ran in an sm_80 kernel at ~230 TFLOP/s,
484 us each, 46 of the tower's 126 ms, while the aligned q/k/v and o products ran in Hopper
kernels at ~700 (scripts/profile_vision.py, docs/benchmarks.md). Here the hidden width is
padded with zeros to a multiple of ALIGN: gate and up stacked into one (2 x width, 1280) weight
(one GEMM, their biases added by it), the hidden layer `silu(gate) * up` over the two halves,
and down (1280, width) with zero columns. Padded hidden units are silu(0) * 0 = 0 and meet
zero weights in down, so the output is the unpadded MLP's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import Matrix, dense_linear

ALIGN = 8  # hidden units: 16 bytes of bf16 / f16 (32 of float32)


class DenseMLP:
    """`down(silu(gate(x)) * up(x))` (with biases) from three weights' dense accelerator copies
    (Matrix.to_device's); the copies become views into the padded ones (no extra memory)."""

    def __init__(self, gate: Matrix, up: Matrix, down: Matrix, gate_b: torch.Tensor | None,
                 up_b: torch.Tensor | None, down_b: torch.Tensor):
        g, u, d = gate._device_dense, up._device_dense, down._device_dense
        assert g is not None and u is not None and d is not None
        inter = up.rows
        self.width = width = -(-inter // ALIGN) * ALIGN
        self.gate_up = torch.zeros(2 * width, up.cols, dtype=u.dtype, device=u.device)
        self.gate_up[:inter] = g
        self.gate_up[width:width + inter] = u
        self.gate_up_b = torch.zeros(2 * width, dtype=u.dtype, device=u.device)
        if gate_b is not None:
            self.gate_up_b[:inter] = gate_b
        if up_b is not None:
            self.gate_up_b[width:width + inter] = up_b
        self.down = torch.zeros(down.rows, width, dtype=d.dtype, device=d.device)
        self.down[:, :inter] = d
        self.down_b = down_b.to(d.dtype)
        gate._device_dense, up._device_dense = self.gate_up[:inter], self.gate_up[width:width + inter]
        down._device_dense = self.down[:, :inter]

    @staticmethod
    def supports(gate: Matrix | None, up: Matrix, down: Matrix) -> bool:
        """Dense copies on one device, of one dtype, with no quantized kernel in front of them."""
        mats = [m for m in (gate, up, down) if m is not None]
        dense = [m._device_dense for m in mats]
        return (gate is not None and all(m.kernel is None for m in mats) and all(t is not None for t in dense)
                and len({(t.dtype, t.device) for t in dense if t is not None}) == 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, cols) -> (n, down rows) in the copies' dtype."""
        gu = dense_linear(x, self.gate_up, self.gate_up_b)
        # over the gate half in place: down's GEMM reads it with gu's row stride (16-byte aligned)
        h = F.silu(gu[:, :self.width], inplace=True).mul_(gu[:, self.width:])
        return dense_linear(h, self.down, self.down_b)
