"""Image preprocessing against transformers' Qwen2VLImageProcessorPil: pixel values within 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qvl.runtime.image import ImageError, load_image, preprocess, smart_resize

rng = np.random.default_rng(0)


def _rgb(h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


CASES = {
    "rgb": lambda: _rgb(300, 451),
    "tiny-20x33": lambda: _rgb(20, 33),
    "one-pixel-row": lambda: _rgb(3, 500),
    "rgba": lambda: Image.fromarray(rng.integers(0, 256, (100, 80, 4), dtype=np.uint8), "RGBA"),
    "grayscale": lambda: Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8), "L"),
    "palette": lambda: _rgb(64, 64).convert("P"),
    "16-bit": lambda: Image.fromarray(rng.integers(0, 65535, (50, 60), dtype=np.uint16)),
    "wide-150:1": lambda: _rgb(20, 3000),
    "large": lambda: _rgb(1500, 1100),
}


@pytest.fixture(scope="module")
def processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)


@pytest.mark.parametrize("name", CASES)
def test_pixels_equal_transformers(processor, name):
    img = CASES[name]()
    ref = processor(images=img, return_tensors="np")
    ours = preprocess(img, min_pixels=3136, max_pixels=12845056)
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert np.abs(ours.pixels - ref["pixel_values"]).max() <= 1e-6


def test_min_max_pixels_per_call(processor):
    img = _rgb(600, 800)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=320 * 28 * 28)(images=img, return_tensors="np")
    ours = preprocess(img, min_pixels=256 * 28 * 28, max_pixels=320 * 28 * 28)
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert np.abs(ours.pixels - ref["pixel_values"]).max() <= 1e-6
    assert ours.size[0] * ours.size[1] <= 320 * 28 * 28


def test_exif_rotation_is_applied(tmp_path):
    img = _rgb(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (40, 100)  # width and height swapped


def test_bad_images(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "none.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk)
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 2500)
