"""`dot`: the one matrix product the kernels use, in the precision their caller picked.

- float32 operands: multiplied as float32 (`input_precision="ieee"`), never silently as TF32,
  so the float32 path is exact up to summation order on a GPU too;
- bfloat16 / float16 operands (`LOW`): tensor-core products, float32 accumulation.

Triton's interpreter (the CI, on the CPU) gets bfloat16 dots wrong (it reads the operands'
bits as the wrong type: errors of 1e10 on N(0,1) inputs, triton 3.9), so there (`EMULATE`)
the bf16 operands are widened to float32 first: a bf16 x bf16 product is exact in float32,
so this is the same arithmetic up to summation order.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, LOW: tl.constexpr, EMULATE: tl.constexpr):
    if LOW:
        if EMULATE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)
    return tl.dot(a, b, input_precision="ieee")
