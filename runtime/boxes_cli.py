"""qvl-run's `--boxes FILE`: its checks before a model is loaded, and the drawing after an
answer (grounding.py reads and draws the boxes). With --each, FILE names each picture's file
with {stem} or {name}."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from PIL import Image

from .grounding import Box, answer_boxes, draw_boxes
from .image import load_image
from .model import Generation


def boxes_path(template: Path, picture: Path) -> Path:
    """--boxes' file for a picture: with --each, {stem} and {name} stand for the picture's."""
    return Path(str(template).replace("{stem}", picture.stem).replace("{name}", picture.name))


def boxes_problem(path: Path, images: list[Path], prompt: str | None, each: bool) -> str | None:
    """What is wrong with --boxes `path` for these pictures (None: nothing), before a model is loaded."""
    if each:
        if "{stem}" not in str(path) and "{name}" not in str(path):
            return (f"--boxes {path} with --each: name each picture's file with {{stem}} or {{name}}, "
                    "e.g. boxes/{stem}.png")
        path = boxes_path(path, images[0])
    elif len(images) != 1:
        return f"--boxes: give one --image (got {len(images)}), or each with --each"
    if prompt is None and sys.stdin is not None and sys.stdin.isatty():
        return "--boxes: give the question with --prompt or --file (not in the interactive chat)"
    if path.is_dir():
        return f"--boxes {path}: is a folder"
    if not path.parent.is_dir():
        return f"--boxes {path}: folder {path.parent} not found"
    if path.suffix.lower() not in Image.registered_extensions():
        return f"--boxes {path}: no image format has the extension {path.suffix or '(none)'!r} (try .png or .jpg)"
    return None


def draw_answer_boxes(model: Any, out: Generation, picture_path: str | Path, path: Path, index: int = 0) -> list[Box]:
    """The answer's boxes in the pixels of its `index`th picture (at `picture_path`), drawn on it
    into `path` (nothing written when there are none); ImageError / GroundingError when it cannot be."""
    picture = load_image(picture_path)
    found = answer_boxes(model, out, picture, index)
    if found:
        draw_boxes(picture, found, path)
    return found
