"""Last-to-arrive reduction: programs that each write a partial result count themselves in, and
the one that arrives last combines the partials, so a split reduction needs no second launch.

`last_to_arrive` (inside a kernel): a barrier (the whole program's partial stores are issued
before it is counted), then one atomic add on the group's counter with acquire-release
semantics at GPU scope: the count publishes this program's stores, and the last program's
add sees every earlier program's; that program resets the counter to zero for the next
launch. Partials are then read with `.cg` loads (from L2, not this SM's L1). Used by the split
GEMV (qgemv.py) and decode attention's splits (decode_attention.py); the cross-compile check
(cross_compile.py) fails on an atomic in any kernel's PTX without that ordering.

`counters(device, n)`: the zeroed int32 counters, one buffer per device that every launch
leaves zeroed; never freed or replaced, as a captured CUDA graph holds its address.

Triton's interpreter runs programs one after another, so the last program there is always the
last split; the memory-order part is for a GPU to exercise (the kernel tests' repeated launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_COUNTERS = 1 << 16  # groups; the largest split launch of the official models has ~2400

_counters: dict[torch.device, list[torch.Tensor]] = {}


@triton.jit
def last_to_arrive(count_ptr, n):
    """Count this program in at count_ptr (one of n in its group): True for the last, which
    finds the counter back at zero for the next launch."""
    tl.debug_barrier()  # every thread's partial is written before the count says so
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    last = done == n - 1
    tl.store(count_ptr, 0, mask=last)
    return last


def counters(device: torch.device, n: int) -> torch.Tensor:
    """n zero int32 counters on `device` (a larger buffer is added beside the old one when a
    launch needs more)."""
    held = _counters.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, MIN_COUNTERS), dtype=torch.int32, device=device))
    return held[-1][:n]
