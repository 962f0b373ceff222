"""Video input: frames sampled as qwen-vl-utils samples them, decoded one at a time with PyAV.

Sampling (qwen-vl-utils `smart_nframes`, `calculate_video_frame_range`): the frames between
`start` and `end` seconds, `fps` per second of video, clamped to [min_frames, max_frames] and to
the frames available, rounded down to an even count (the temporal patch is 2); indices are
`linspace(first, last, n).round()`. Each frame is resized to one size inside the per-frame pixel
limits and the total budget, normalized, and frame pairs are cut into patches. Long
constant-rate videos are read by seeking to the sampled frames (others are decoded in order);
only the sampled frames are kept, resized, so memory stays at the size of the model input. (qwen-vl-utils resizes with torchvision's antialiased bicubic; we use PIL's
bicubic, so pixel values differ slightly from its output while indices and sizes are equal.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    import av

from .image import pixel_limits_ok, smart_resize

FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


class VideoError(ValueError):
    """A video that cannot be used; one line naming the file."""


@dataclass(frozen=True)
class VideoOptions:
    fps: float = 2.0
    max_frames: int = 32
    min_frames: int = FPS_MIN_FRAMES
    start: float | None = None
    end: float | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int = VIDEO_TOTAL_PIXELS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise VideoError(f"fps {self.fps}: frames a second must be above 0")
        if self.max_frames < FRAME_FACTOR:
            raise VideoError(f"max_frames {self.max_frames}: at least {FRAME_FACTOR} (frames go in pairs)")
        if not pixel_limits_ok(self.min_pixels, self.max_pixels):
            raise VideoError(f"frame pixel limits min {self.min_pixels}, max {self.max_pixels}: want 0 < max and "
                             "min <= max")


@dataclass(frozen=True)
class VideoInput:
    pixels: np.ndarray  # (grid_t * grid_h * grid_w, C * 2 * P * P)
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    size: tuple[int, int]  # (height, width) of the frames as resized
    source_size: tuple[int, int] = (0, 0)  # (height, width) as decoded (upright)


def _round(n: float, f: int) -> int:
    return round(n / f) * f


def _ceil(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def _floor(n: float, f: int) -> int:
    return math.floor(n / f) * f


def smart_nframes(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    """qwen-vl-utils' frame count for `fps` sampling."""
    lo = _ceil(min_frames, FRAME_FACTOR)
    hi = _floor(min(max_frames, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * fps
    n = min(min(max(n, lo), hi), total_frames)
    n = _floor(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise VideoError(f"{n} frames to sample is outside [{FRAME_FACTOR}, {total_frames}]")
    return n


def frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """qwen-vl-utils' calculate_video_frame_range: (first, last) frame index."""
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1) if end is not None \
        else total_frames - 1
    if first >= last:
        raise VideoError(f"start {start}s is not before end {end if end is not None else duration:.2f}s "
                         f"({total_frames} frames at {video_fps:.3f} fps)")
    return first, last


def sample_indices(first: int, last: int, n: int) -> list[int]:
    return torch.linspace(first, last, n).round().long().tolist()


def frame_size(height: int, width: int, n_frames: int, opts: VideoOptions) -> tuple[int, int]:
    max_pixels = max(min(VIDEO_MAX_PIXELS, opts.total_pixels / n_frames * FRAME_FACTOR), int(opts.min_pixels * 1.05))
    max_pixels = min(opts.max_pixels, max_pixels)
    return smart_resize(height, width, 28, opts.min_pixels, int(max_pixels))


def _open(path: str | Path):
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise VideoError(f"{path}: file not found") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream (audio only?)")
    return container


def probe(path: str | Path) -> tuple[int, float]:
    """(frame count, average fps): the container's count, or a count of decoded frames when it has none."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        count = stream.frames or sum(1 for _ in container.decode(stream))
    except Exception as e:  # PyAV raises its own error types from decoding
        raise VideoError(f"{path}: cannot decode ({e})") from None
    finally:
        container.close()
    if count == 0 or fps <= 0:
        raise VideoError(f"{path}: no decodable frames")
    return count, fps


# Seek only when decoding everything would cost much more than the sampled frames need.
SEEK_WHEN_FRAMES_PER_SAMPLE = 24


def _sequential_frames(path: str | Path, idx: list[int]) -> list[tuple[int, "av.VideoFrame"]]:
    """Decode in order, keep the wanted indices (right for any frame timing)."""
    wanted, out = set(idx), []
    container = _open(path)
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i > idx[-1]:
                break
            if i in wanted:
                out.append((i, frame))
    except Exception as e:  # PyAV's decode errors
        raise VideoError(f"{path}: cannot decode ({e})") from None
    finally:
        container.close()
    return out


def _seek_frames(path: str | Path, idx: list[int], fps: float, total: int) -> list | None:
    """Frames by seeking, for long constant-frame-rate videos; None when not safe or not worth it.

    A frame's index is taken from its timestamp (exact at a constant rate); the container's frame
    count must agree with duration x rate, and any frame whose timestamp does not land on the
    wanted index makes the caller fall back to decoding in order.
    """
    if total < SEEK_WHEN_FRAMES_PER_SAMPLE * len(idx):
        return None
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        if not stream.frames or stream.duration is None or tb is None:
            return None
        if abs(float(stream.duration * tb) * fps - stream.frames) > 2:
            return None  # variable frame rate: timestamps do not give decode order
        start = stream.start_time or 0
        out = []
        for i in sorted(set(idx)):
            container.seek(start + int(i / fps / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    return None
                j = round(float((frame.pts - start) * tb) * fps)
                if j < i:
                    continue
                if j > i:
                    return None
                out.append((i, frame))
                break
            else:
                return None
        return out
    except Exception:  # any seek/decode trouble: decode in order instead
        return None
    finally:
        container.close()


def load_video(path: str | Path, opts: VideoOptions, mean: tuple[float, ...], std: tuple[float, ...],
               patch: int = 14, merge: int = 2) -> VideoInput:
    total, video_fps = probe(path)
    if total < FRAME_FACTOR:
        raise VideoError(f"{path}: {total} frame(s); a video needs {FRAME_FACTOR} or more (a picture goes in as an "
                         "image)")
    first, last = frame_range(total, video_fps, opts.start, opts.end)
    count = last - first + 1
    max_frames = max(FPS_MIN_FRAMES, min(opts.max_frames, FPS_MAX_FRAMES))
    n = smart_nframes(count, video_fps, opts.fps, opts.min_frames, max_frames)
    idx = sample_indices(first, last, n)
    frames: list[np.ndarray | None] = [None] * n
    size: tuple[int, int] | None = None
    source = (0, 0)
    picked = _seek_frames(path, idx, video_fps, total) or _sequential_frames(path, idx)
    for i, frame in picked:
        img = frame.to_image()
        if frame.rotation:  # display matrix (phone videos): counter-clockwise degrees to show upright
            img = img.rotate(frame.rotation, expand=True)
        if size is None:
            source = (img.height, img.width)
            size = frame_size(img.height, img.width, n, opts)
        arr = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC))
        for k, j in enumerate(idx):
            if j == i:
                frames[k] = arr
    if size is None or any(f is None for f in frames):
        raise VideoError(f"{path}: fewer decodable frames than the container reported")
    # Normalize and patchify one temporal pair at a time: only the output is held in float32.
    h, w = size
    c = 3
    gt, gh, gw = n // FRAME_FACTOR, h // patch, w // patch
    per_pair = gh * gw
    pixels = np.empty((gt * per_pair, c * FRAME_FACTOR * patch * patch), dtype=np.float32)
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for k in range(gt):
        pair = np.stack(frames[FRAME_FACTOR * k:FRAME_FACTOR * (k + 1)]).astype(np.float32) * np.float32(1 / 255)
        pair = ((pair - mean_a) / std_a).transpose(0, 3, 1, 2)  # (2, C, H, W)
        p = pair.reshape(FRAME_FACTOR, c, gh // merge, merge, patch, gw // merge, merge, patch)
        p = p.transpose(2, 5, 3, 6, 1, 0, 4, 7)  # merge rows, merge cols, in-unit row, col, C, t, py, px
        pixels[k * per_pair:(k + 1) * per_pair] = p.reshape(per_pair, -1)
    sample_fps = n / max(count, 1e-6) * video_fps
    return VideoInput(pixels, (gt, gh, gw), FRAME_FACTOR / sample_fps, tuple(idx),
                      tuple(i / video_fps for i in idx), size, source)
