"""The vision tower's block weights kept in host memory and copied to the GPU a block ahead.

The 7B's (and 3B's) vision tower is 1.26 GiB of F16 weights, 32 blocks of ~39 MB, which a GPU
holds through the whole conversation for the few moments an image is encoded. Streamed, each
block's matrices live in page-locked host memory; while block i runs, block i + 1's are copied
to the GPU on a stream of their own, and block i's GPU copy is let go once its work is queued
(the allocator reuses it when that work is done). The GPU holds two blocks' matrices (~78 MB)
instead of 32, plus the placeholder blocks at rest view (below: their largest stack, ~17 MB), the
norms and biases (small, kept there) and the patch embedding and merger.
The cost is the copy: 1.26 GiB over the bus an encode (~50 ms at 25 GB/s), hidden behind the
blocks' work where that is longer.

Mechanics: every tensor of a block's matrices (dense copies, GGUF blocks, the q/k/v and gate/up
stacks and the views into them) is grouped by the storage it views. Offloading copies each
storage to host memory and points its tensors (`Tensor.set_`: the same tensor objects, so the
Matrix, Stack and DenseMLP objects need not know) at one placeholder buffer on the device, as
large as the largest storage, that every block at rest shares (torch lets a tensor's storage be
swapped only for one on the same device); fetching points them at a fresh device copy of their
host storage, releasing back at the placeholder. On the CPU (the tests' stand-in accelerator)
the same swaps happen, the host copies in ordinary memory: a weight read at rest reads the
placeholder, so the tests see it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .dense_mlp import DenseMLP
from .stack import DenseStack
from .weights import DeviceBlocks, Matrix

if TYPE_CHECKING:
    from .vision import Block


def block_weights(block: Block) -> list[torch.Tensor]:
    """The tensors of a block's matrices on its device: what streaming moves (norm weights and
    biases stay)."""
    out: list[torch.Tensor] = []

    def blocks(k: DeviceBlocks) -> None:
        out.append(k.raw)
        if k.tail is not None:
            out.append(k.tail)

    def matrix(m: Matrix | None) -> None:
        if m is None:
            return
        if m._device_dense is not None:
            out.append(m._device_dense)
        if m.kernel is not None:
            blocks(m.kernel)

    for m in (block.q, block.k, block.v, block.out, block.up, block.down, block.gate):
        matrix(m)
    for weight, _, _ in block.qkv.groups:
        if isinstance(weight, DenseStack):
            out.append(weight.dense)
        elif isinstance(weight, DeviceBlocks):
            blocks(weight)
        else:
            matrix(weight)
    if isinstance(block.mlp, DenseMLP):
        out += [block.mlp.gate_up, block.mlp.down]
    return out


class _Storage:
    """One storage a block's weights view: its host copy and the tensors viewing it."""

    def __init__(self, tensors: list[torch.Tensor], pinned: bool):
        storage = tensors[0].untyped_storage()
        self.tensors = tensors
        self.nbytes = storage.nbytes()
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.host.copy_(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage))
        self.gpu: torch.Tensor | None = None

    def point(self, buffer: torch.Tensor) -> None:
        """The tensors view `buffer` (on their device, at least nbytes) as they viewed their storage."""
        storage = buffer.untyped_storage()
        for t in self.tensors:
            t.set_(storage, t.storage_offset(), t.size(), t.stride())

    def fetch(self, device: torch.device, copy_stream: torch.cuda.Stream | None) -> None:
        self.gpu = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self.gpu.copy_(self.host, non_blocking=copy_stream is not None)
        self.point(self.gpu)

    def release(self, compute_stream: torch.cuda.Stream | None, rest: torch.Tensor) -> None:
        if self.gpu is None:
            return
        if compute_stream is not None:
            self.gpu.record_stream(compute_stream)  # freed for reuse once the queued work is done
        self.point(rest)
        self.gpu = None


class BlockStream:
    """Blocks' matrices on `device` moved to host memory as each block is built (`offload`);
    `each()` brings them back a block at a time while the tower runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._copy = torch.cuda.Stream(device) if self._cuda else None
        self._parts: list[list[_Storage]] = []
        self._ready: list[torch.cuda.Event | None] = []
        self._rest = torch.empty(0, dtype=torch.uint8, device=device)  # what blocks at rest view

    def offload(self, block: Block) -> None:
        """Move `block`'s matrices to host memory (page-locked on a GPU machine); appended in order."""
        groups: dict[int, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for t in block_weights(block):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.device != self.device:
                raise ValueError(f"vision block {len(self._parts)}: a weight on {t.device}, not {self.device}")
            groups.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        part = [_Storage(ts, self._cuda) for ts in groups.values()]
        largest = max((st.nbytes for st in part), default=0)
        if largest > self._rest.numel():  # a larger placeholder: every block at rest moves to it
            self._rest = torch.empty(largest, dtype=torch.uint8, device=self.device)
            for earlier in self._parts:
                for st in earlier:
                    st.point(self._rest)
        for st in part:
            st.point(self._rest)  # the device copies go when nothing else holds them
        self._parts.append(part)
        self._ready.append(None)

    @property
    def host_bytes(self) -> int:
        return sum(s.nbytes for part in self._parts for s in part)

    @property
    def placeholder_bytes(self) -> int:
        return self._rest.numel()

    def resident(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now."""
        return [i for i, part in enumerate(self._parts) if part and part[0].gpu is not None]

    def _fetch(self, i: int) -> None:
        if self._copy is None:
            for s in self._parts[i]:
                s.fetch(self.device, None)
            return
        with torch.cuda.stream(self._copy):
            for s in self._parts[i]:
                s.fetch(self.device, self._copy)
            self._ready[i] = self._copy.record_event()

    def _release(self, i: int) -> None:
        compute = torch.cuda.current_stream(self.device) if self._cuda else None
        for s in self._parts[i]:
            s.release(compute, self._rest)
        self._ready[i] = None

    def each(self) -> Iterator[int]:
        """Block indices in order, each block's weights on the device (the work queued on the
        current stream waits for their copy) while the caller runs it, the next one copying."""
        n = len(self._parts)
        fetched = []
        try:
            if n:
                self._fetch(0)
                fetched.append(0)
            for i in range(n):
                if i + 1 < n:
                    self._fetch(i + 1)
                    fetched.append(i + 1)
                ready = self._ready[i]
                if ready is not None:
                    torch.cuda.current_stream(self.device).wait_event(ready)
                yield i
                self._release(i)
                fetched.remove(i)
        finally:
            for i in fetched:  # a run that stopped early (an error) leaves no block on the device
                self._release(i)
