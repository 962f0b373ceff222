"""Small test videos written with PyAV."""

from __future__ import annotations

import av
import numpy as np


def make_video(path, frames: int, fps: int, size=(96, 128), codec="mpeg4"):
    """frames of random blocks (size: height, width) with a bar that moves, so frames differ."""
    h, w = size
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(frames)
        for i in range(frames):
            img = (rng.integers(0, 256, (h, w, 3)) // 64 * 64).astype(np.uint8)
            img[: 8 + i % 40] = 255  # a moving bar so frames differ
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
