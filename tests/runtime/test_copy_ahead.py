"""runtime/copy_ahead.py: each copy made on the worker while the caller holds the one before,
never more than OFFLOAD_COPIES alive, in order, and none left after a failure or an early stop.
The CPU stands in for the GPU (no streams; a GPU run is `gpu_session.sh followup`'s)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from qvl.runtime.copy_ahead import OFFLOAD_COPIES, CopiesAhead

CPU = torch.device("cpu")


class Copy:
    def __init__(self, i: int):
        self.i = i


class Maker:
    """make(i): a Copy, counted alive until it is collected; `started[i]` set when made."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.alive: set[int] = set()
        self.most = 0
        self.order: list[int] = []
        self.started = [threading.Event() for _ in range(n)]
        self.fail_at = fail_at

    def __call__(self, i: int) -> Copy:
        self.order.append(i)
        if i == self.fail_at:
            raise RuntimeError(f"copy {i} failed")
        copy = Copy(i)
        self.alive.add(i)
        weakref.finalize(copy, self.alive.discard, i)
        self.most = max(self.most, len(self.alive))
        self.started[i].set()
        return copy


def test_each_copy_is_made_while_the_one_before_is_held():
    make = Maker(5)
    copies = CopiesAhead(make, range(5), CPU)
    for i in range(5):
        copy = copies.take(i)
        assert copy.i == i
        if i + 1 < 5:  # the next one is made while this one is held, before it is asked for
            assert make.started[i + 1].wait(10)
        del copy
        gc.collect()
    copies.close()
    gc.collect()
    assert make.order == list(range(5)) and make.alive == set()
    assert make.most == OFFLOAD_COPIES == 2


def test_out_of_order_takes_are_refused():
    copies = CopiesAhead(Maker(3), [0, 1, 2], CPU)
    with pytest.raises(ValueError, match="copy 2 taken out of order"):
        copies.take(2)
    copies.close()


def test_a_failed_copy_raises_at_its_take_and_leaves_nothing():
    make = Maker(4, fail_at=2)
    copies = CopiesAhead(make, range(4), CPU)
    for i in range(2):
        copy = copies.take(i)
        del copy
    with pytest.raises(RuntimeError, match="copy 2 failed"):
        copies.take(2)
    copies.close()
    gc.collect()
    assert make.alive == set() and make.order == [0, 1, 2]


def test_an_early_stop_waits_for_the_copy_being_made_and_lets_it_go():
    make = Maker(4)
    copies = CopiesAhead(make, range(4), CPU)
    copy = copies.take(0)
    del copy
    copies.close()  # a caller that failed in layer 0: copy 1 was being made
    gc.collect()
    assert make.order == [0, 1] and make.alive == set()


def test_in_turn_each_copy_is_made_when_taken(monkeypatch):
    """QVL_COPY_IN_TURN=1 (copy_ahead.AHEAD False): nothing made ahead, one copy alive at a time."""
    from qvl.runtime import copy_ahead

    monkeypatch.setattr(copy_ahead, "AHEAD", False)
    make = Maker(3)
    copies = CopiesAhead(make, range(3), CPU)
    for i in range(3):
        assert make.order == list(range(i))
        copy = copies.take(i)
        assert copy.i == i and make.order == list(range(i + 1))
        del copy
        gc.collect()
    copies.close()
    assert make.most == 1 and make.alive == set()


DEVICES = [CPU] + ([torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_copy_is_not_overwritten_while_queued_work_reads_it(device):
    """Copy i + 2 may take copy i's memory once the caller lets copy i go, while the GPU may
    still be running the work queued on it: the copy's writes wait for that work. On a GPU,
    each read waits behind ~25 ms of the GPU's time, while the worker makes the next copies into
    the memory of the ones before (the test asserts that it does); without the copy stream's
    wait, a sum would read a later copy's values."""
    n, size = 6, 1 << 22

    def make(i: int) -> torch.Tensor:
        return torch.full((size,), float(i), device=device)

    copies = CopiesAhead(make, range(n), device)
    sums, addresses = [], []
    for i in range(n):
        copy = copies.take(i)
        addresses.append(copy.data_ptr())
        if device.type == "cuda":
            torch.cuda._sleep(50_000_000)  # cycles of the GPU's, queued before the read
        sums.append(copy.sum())
        del copy
    copies.close()
    assert [s.item() for s in sums] == [float(i) * size for i in range(n)]
    if device.type == "cuda":
        assert len(set(addresses)) < n  # copies reused the memory of those let go
