"""A prompt that runs out of GPU memory: read again, taking less.

The plan (placement.py) counts one prompt pass of PREFILL_CHUNK tokens through a layer and,
with layers on the CPU, the copies of them a prompt runs on the GPU. Where the GPU has less
than planned when the prompt comes (another process took memory, or the allocator's cache and
fragmentation took more than counted), an allocation fails halfway through the prompt. Rather
than an error, the prompt is read again from its start (the KV cache's length put back, its
tokens overwritten): first with the offloaded layers' copies made one at a time (copy_ahead.py
holds two), then in passes half as long, down to MIN_PASS tokens. Each change is said in a
warning and kept for the model's later prompts. Past that, the error is raised as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from . import copy_ahead
from .decoder import PREFILL_CHUNK

if TYPE_CHECKING:
    from .decoder import Decoder

T = TypeVar("T")
MIN_PASS = 32  # tokens: passes are not made shorter (the prefill offload's OFFLOAD_MIN_TOKENS)


def shrink(decoder: Decoder) -> str | None:
    """Make the decoder's prompts take less GPU memory, one step; what changed, or None where
    nothing more can go."""
    if decoder.prefill_offload and decoder.copy_ahead and copy_ahead.AHEAD:
        decoder.copy_ahead = False
        return "the CPU layers' copies made one at a time"
    if PREFILL_CHUNK // (2 * decoder.pass_share) < MIN_PASS:
        return None
    decoder.pass_share *= 2
    return f"passes of {PREFILL_CHUNK // decoder.pass_share} tokens"


def retrying(forward: Callable[[], T], decoder: Decoder, reset: Callable[[], None],
             warn: Callable[[str], None]) -> T:
    """forward() (a prompt through `decoder`); where it runs out of GPU memory, reset() (the
    cache as it was before it), one `shrink` step and forward() again, until nothing more can go."""
    while True:
        try:
            return forward()
        except torch.OutOfMemoryError:
            pass  # handled outside: the failed try's frames, and the tensors they hold, are gone first
        reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed try's blocks, cached by the allocator
        change = shrink(decoder)
        if change is None:
            raise torch.OutOfMemoryError(f"out of GPU memory reading the prompt, in passes of "
                                         f"{PREFILL_CHUNK // decoder.pass_share} tokens")
        warn(f"out of GPU memory reading the prompt; reading it again with {change}")
