"""Pictures and videos read for a model's prompt: loaded and preprocessed at their smart_resize
size, made smaller (with a warning) where a GPU plan limits the pixels the vision tower may take."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from .image import ImageError, load_image, preprocess, smart_resize
from .video import VideoInput, VideoOptions, frame_size, load_video
from .vision import VisionConfig


def read_pictures(images: list[Any], cfg: VisionConfig, min_pixels: int, max_pixels: int, limit: int | None,
                  warn: Callable[[str], None]) -> list[Any]:
    """Each picture (a path, or a PIL image) preprocessed; `limit`: the plan's pixels a picture at most."""
    out = []
    for n, im in enumerate(images, 1):
        pil = im if isinstance(im, Image.Image) else load_image(im)
        try:
            use_max = max_pixels
            if limit is not None and max_pixels > limit:
                h, w = smart_resize(pil.height, pil.width, min_pixels=min_pixels, max_pixels=max_pixels)
                if h * w > limit:
                    use_max = max(limit, min_pixels)
                    h2, w2 = smart_resize(pil.height, pil.width, min_pixels=min_pixels, max_pixels=use_max)
                    warn(f"image {pil.width}x{pil.height} downscaled to {w2}x{h2} "
                         f"(instead of {w}x{h}) to fit the GPU memory budget")
            out.append(preprocess(pil, min_pixels, use_max, cfg.image_mean, cfg.image_std))
        except ImageError as e:  # which picture: its file, or its place among the given ones
            raise ImageError(f"{im if not isinstance(im, Image.Image) else f'image {n}'}: {e}") from None
    return out


def read_videos(videos: list[str | Path], cfg: VisionConfig, opts: VideoOptions, limit: int | None,
                warn: Callable[[str], None]) -> list[VideoInput]:
    """Each video's frames sampled and preprocessed; `limit`: the plan's pixels over all frame pairs."""
    limited = limit is not None and limit < opts.total_pixels
    use = replace(opts, total_pixels=limit) if limited else opts
    out = []
    for v in videos:
        item = load_video(v, use, cfg.image_mean, cfg.image_std)
        h, w = frame_size(*item.source_size, len(item.frame_indices), opts)
        if limited and (h, w) != item.size:
            warn(f"video {v}: frames downscaled to {item.size[1]}x{item.size[0]} (instead of "
                 f"{w}x{h}) to fit the GPU memory budget")
        out.append(item)
    return out
