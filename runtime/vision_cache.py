"""The vision tower's features of the pictures and videos seen lately, by what the tower sees of
them (prompt_cache.media_digest: a hash of the pixel patches and grid): a picture asked about
again where the KV cache cannot serve (another conversation, other text before it, a chat after
/clear, qvl serve's requests taking turns) is not encoded again. Kept in host memory up to a
budget (VISION_CACHE_BYTES), the least recently used dropped first; a video or picture larger
than the budget is not kept."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from .prompt_cache import MediaSpan, media_digest

VISION_CACHE_BYTES = 256 * 2**20  # ~24 pictures of 1024 x 1024 for a 3B (2048 floats a token)


class VisionCache:
    def __init__(self, budget: int = VISION_CACHE_BYTES):
        self.budget = budget
        self.size = 0
        self.hits = 0
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def get(self, key: bytes) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return feats

    def put(self, key: bytes, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.budget or key in self._items:
            return
        self._items[key] = feats.detach().to("cpu", copy=True)
        self.size += size
        while self.size > self.budget:
            _, old = self._items.popitem(last=False)
            self.size -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.size = 0


def cached_features(items: list[MediaSpan], cache: VisionCache, device: torch.device,
                    encode: Callable[[list[MediaSpan]], torch.Tensor]) -> torch.Tensor:
    """The features of `items` in order, on `device`: those `cache` holds, the others from
    `encode(others)` (their features in order, a run of `length` rows each) and kept."""
    keys = [media_digest(m) for m in items]
    held = [cache.get(k) for k in keys]
    todo = [m for m, f in zip(items, held) if f is None]
    fresh = iter(encode(todo).split([m.length for m in todo])) if todo else iter(())
    out = []
    for key, feats in zip(keys, held):
        if feats is None:
            feats = next(fresh)
            cache.put(key, feats)
        out.append(feats.to(device))
    return torch.cat(out)
