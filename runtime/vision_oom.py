"""An image encode that runs out of GPU memory: the picture limit lowered and the prompt read again.

The plan (placement.py) sizes the largest picture the vision tower may take on a GPU from its
counted peak per pixel plus a slack (placement.VISION_SLACK). Where the caching allocator or a
GPU's own overheads take more than that slack, an image at the limit fails its allocation. It
should come out downscaled with a warning, as one over the limit does, not as an error: so an
encode's torch.OutOfMemoryError becomes a VisionOutOfMemory naming the pixels of the batch that
failed, the model lowers its limit to SHRINK of them (Model._lower_vision_limit), and the
generation starts again from its prompt: the pictures are resized to the new limit (so their
token count changes), batches split under it, and nothing of the failed try is kept. Where the
pictures cannot shrink further (the limit would go below the prompt's min_pixels, or a batch
already over the limit failed), the error is raised as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

SHRINK = 0.7  # a new limit is this share of the pixels that failed
ATTEMPTS = 8  # tries of one generation at most (0.7^7: a limit ~12 times smaller)

T = TypeVar("T")


class VisionOutOfMemory(torch.OutOfMemoryError):
    """The vision tower's allocation failed on a batch of `pixels` pixels."""

    def __init__(self, pixels: int):
        super().__init__(f"out of GPU memory encoding {pixels:,} pixels")
        self.pixels = pixels


def encode(forward: Callable[[], torch.Tensor], pixels: int) -> torch.Tensor:
    """forward() (a batch of `pixels` pixels through the tower), its out-of-memory error as a
    VisionOutOfMemory raised outside the handler, so that neither it nor its context holds the
    failed encode's frames and their tensors while the caller tries again."""
    try:
        return forward()
    except torch.OutOfMemoryError:
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed try's blocks, cached by the allocator
    raise VisionOutOfMemory(pixels)


def lowered(limit: int | None, failed: int, min_pixels: int) -> int | None:
    """The new picture limit after a batch of `failed` pixels ran out of memory under `limit`
    (None: no limit), or None where it cannot go lower: below min_pixels, or where the batch was
    already over the limit (one picture at its floor, min_pixels, or a video's frames at theirs,
    which a lower limit would not shrink)."""
    if limit is not None and failed > limit:
        return None
    new = int(SHRINK * failed)
    return new if new >= min_pixels else None


def retrying(attempt: Callable[[], Iterator[T]], lower: Callable[[VisionOutOfMemory], None]) -> Iterator[T]:
    """attempt()'s items; where it raises VisionOutOfMemory before its first item, lower(error)
    (which raises to give up) and attempt() again, up to ATTEMPTS tries."""
    for tries in range(1, ATTEMPTS + 1):
        it = attempt()
        try:
            first = next(it)
        except VisionOutOfMemory as e:
            if tries == ATTEMPTS:
                raise
            error = e  # lowered outside the handler: the next try runs with no exception being handled
        else:
            yield first
            yield from it
            return
        lower(error)
        del error
