"""Copies of the CPU's decoder layers on the GPU, each made while the one before it runs.

A prompt through layers left on the CPU runs each of them on the GPU from a copy of its GGUF
blocks (decoder.prefill_offload): 142 MiB a layer for the 7B Q4_K_M, ~6-12 ms over PCIe. Made
in turn, each copy waits for the layer before it to finish and the layer waits for its copy.
Here copy i + 1 is made on a worker thread, on a CUDA stream of its own, while the caller runs
layer i; the caller's stream waits for a copy's event before its first kernel reads it.

Two copies are on the GPU at once, where the memory plan has room for the second after the
layers it places (placement.py: a layer on the GPU needs no copy at all, so layers come first);
otherwise each copy is made when it is taken (`ahead` False). Copy i + 2 is made once the
caller has let go of copy i, and may reuse its memory (the allocator hands freed blocks of the
copy stream back to it at once): the copy stream first waits for an event the caller's stream
records then, after all of layer i's work, so no write lands before that work is done. On the CPU (the tests' stand-in accelerator) the worker thread makes the copies with no
streams. QVL_COPY_IN_TURN=1 makes each copy when it is taken instead, on the caller's stream
(as before this file: to time one against the other, `scripts/profile_prefill.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
OFFLOAD_COPIES = 2  # copies on the device at once: the one running and the next, being made
AHEAD = os.environ.get("QVL_COPY_IN_TURN") != "1"  # else each copy is made when taken, nothing ahead


class CopiesAhead(Generic[T]):
    """`make(i)` for i in `order`, each started when the one before it is taken (`take`), on a
    worker thread and a copy stream of `device`; `close()` lets the last ones go. With `ahead`
    False (or QVL_COPY_IN_TURN=1), each is made when taken, on the caller's stream."""

    def __init__(self, make: Callable[[int], T], order: Sequence[int], device: torch.device, ahead: bool = True):
        self._make, self._order, self._device = make, list(order), device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qvl-copy") if ahead and AHEAD else None
        self._next = 0  # index into order of the copy `take` hands out next
        self._pending: Future[tuple[T, torch.cuda.Event | None]] | None = None  # the copy being made
        if self._order and self._pool is not None:
            self._pending = self._pool.submit(self._made, self._order[0], None)

    def _made(self, i: int, after: torch.cuda.Event | None) -> tuple[T, torch.cuda.Event | None]:
        if self._stream is None:
            return self._make(i), None
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)  # the caller's work on the copy it let go is done
            made = self._make(i)
            return made, self._stream.record_event()

    def take(self, i: int) -> T:
        """Copy i, ready for work queued on the current stream; starts the next one. The caller
        lets go of the copy it took before (every reference) before it takes this one."""
        if self._next >= len(self._order) or self._order[self._next] != i:
            raise ValueError(f"copy {i} taken out of order (next: {self._order[self._next:][:1]})")
        self._next += 1
        if self._pool is None:
            return self._make(i)
        pending, self._pending = self._pending, None
        assert pending is not None
        made, ready = pending.result()  # the next copy starts after this one: the worker makes one at a time
        if self._next < len(self._order):
            after = torch.cuda.current_stream(self._device).record_event() if self._stream is not None else None
            self._pending = self._pool.submit(self._made, self._order[self._next], after)
        if ready is not None:
            torch.cuda.current_stream(self._device).wait_event(ready)
        return made

    def close(self) -> None:
        """Waits for a copy still being made and lets it go (after a failure, or an early stop)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception:  # a copy that failed after its caller stopped: its error is moot
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
