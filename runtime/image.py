"""Image loading and preprocessing, identical to transformers' Qwen2-VL image processor (PIL).

smart_resize picks a size that is a multiple of 28 (patch 14 x merge 2) inside
[min_pixels, max_pixels] keeping the aspect ratio; the image is resized with PIL's bicubic
filter, scaled to [0, 1], normalized with the CLIP mean/std and cut into 14x14 patches ordered by
2x2 merge unit. A still image fills both temporal slots of a patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_PIXELS = 56 * 56  # the processor's defaults (preprocessor_config.json: 3136, 12845056)
MAX_PIXELS = 28 * 28 * 16384
MAX_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be read or used; the message names the file."""


@dataclass(frozen=True)
class Preprocessed:
    pixels: np.ndarray  # (grid_h * grid_w, channels * temporal * patch * patch) float32
    grid_thw: tuple[int, int, int]
    size: tuple[int, int]  # resized (height, width)


def pixel_limits_ok(min_pixels: int, max_pixels: int) -> bool:
    """Whether an area range can be met: a positive largest area, no smaller than the smallest."""
    return 0 < max_pixels and min_pixels <= max_pixels


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    if not pixel_limits_ok(min_pixels, max_pixels):
        raise ImageError(f"pixel limits min {min_pixels}, max {max_pixels}: want 0 < max and min <= max")
    if min(height, width) < 1:
        raise ImageError(f"image of {width}x{height} pixels has no area")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is beyond {MAX_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb does it (transparent pixels composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # as transformers does: PIL's own conversion, which clips 16-bit values at 255
        return img.convert("RGB")
    img = img.convert("RGBA")
    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, img).convert("RGB")


def load_image(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image file (or an open binary stream, called `name` in errors), apply its EXIF
    orientation and convert it to RGB."""
    name = name or str(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    return to_rgb(img)


def preprocess(img: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
               std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
               patch: int = 14, merge: int = 2, temporal: int = 2) -> Preprocessed:
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, patch * merge, min_pixels, max_pixels)
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(resized).astype(np.float32).transpose(2, 0, 1)  # CHW
    arr = arr * np.float32(1 / 255)
    arr = (arr - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    c = arr.shape[0]
    gh, gw = h // patch, w // patch
    p = arr.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)  # merge rows, merge cols, in-unit row, col, channel, py, px
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], temporal, patch, patch))
    pixels = np.ascontiguousarray(p.reshape(gh * gw, c * temporal * patch * patch), dtype=np.float32)
    return Preprocessed(pixels, (1, gh, gw), (h, w))
