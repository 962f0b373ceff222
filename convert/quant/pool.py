"""Quantizing in worker processes.

ggml's searches in numpy are many short array passes, and the GIL is held between them, so the
writer's threads scale poorly (2 threads on 2 cores, 2026-12-07: Q4_K 1.04x, IQ3_S 1.29x, IQ2_XS
1.78x one's speed). Inside `worker_processes(n)`, `quantize()` sends each chunk of rows (from
whichever thread) to one of n spawned processes and waits for its bytes: the writer's threads
become dispatchers and the cores all quantize. The bytes are the same (the same function runs
there). Spawned, not forked: the caller has threads (and may have torch) mid-state. A worker
ignores Ctrl-C; the caller's interrupt cancels what has not started.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

_POOL: ProcessPoolExecutor | None = None

# from how many elements to quantize a job is worth the processes: each starts in ~0.3 s and
# builds its grid tables again (up to 6 s for IQ1's); the tests' tiny models stay in-process
MIN_ELEMENTS = 1 << 25


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def worker_processes(n: int) -> Iterator[None]:
    """quantize() calls made inside (from any thread) run in n processes; n < 2: here, as outside."""
    global _POOL
    if n < 2 or _POOL is not None:
        yield
        return
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_interrupts)
    _POOL = pool
    try:
        yield
    finally:
        _POOL = None
        pool.shutdown(wait=True, cancel_futures=True)


def submit(fn: Callable, *args) -> Future | None:
    """fn(*args) in a worker process, when inside worker_processes; None otherwise."""
    return None if _POOL is None else _POOL.submit(fn, *args)
