"""Boxes and points an answer gives for a picture (grounding), in the picture's own pixels, and
the picture drawn with them (`qvl-run --boxes FILE`).

The two families write them differently (docs/models.md):
- Qwen2.5-VL answers JSON, `{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}` (or `"point_2d":
  [x, y]`), usually a list of them in a ```json fence, in absolute pixels of the picture *as the
  model saw it* (smart_resize's multiple of 28), so they are scaled by source / seen size.
- Qwen2-VL writes `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
  (special tokens, so read from the answer's token ids, not its text) on a 0-1000 scale of the
  picture's width and height.
Either form is read from either family's answer; the scale is the family's. Objects that are
cut off (an answer that ran out of tokens mid-list) are skipped, the complete ones kept.
Coordinates are clamped to the picture and a box's corners ordered.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .model import Generation, Model

RELATIVE_SCALE = 1000  # Qwen2-VL's coordinates: thousandths of the width and height

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_BOX = re.compile(rf"<\|box_start\|>\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)<\|box_end\|>")
# hues for labels in the order they first appear (matplotlib's tab10)
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


class GroundingError(ValueError):
    """A picture that cannot be written with its boxes; the message names the file."""


@dataclass(frozen=True)
class Box:
    """A box (x1 <= x2, y1 <= y2) or, with `point`, a point (x1 == x2, y1 == y2), in pixels of
    the picture as given."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    point: bool = False

    def as_json(self) -> dict[str, object]:
        coords = [self.x1, self.y1] if self.point else [self.x1, self.y1, self.x2, self.y2]
        return {"label": self.label, "point_2d" if self.point else "bbox_2d": [round(v, 1) for v in coords]}


@dataclass(frozen=True)
class Frame:
    """How coordinates map to the picture's pixels: its (width, height), the (width, height) the
    model saw it at, and whether the family writes thousandths (Qwen2-VL) or seen pixels."""

    source: tuple[int, int]
    seen: tuple[int, int]
    relative: bool

    def place(self, label: str, coords: list[float], point: bool) -> Box:
        w, h = self.source
        sx, sy = (w / RELATIVE_SCALE, h / RELATIVE_SCALE) if self.relative else (w / self.seen[0], h / self.seen[1])
        xs = [min(max(x * sx, 0.0), float(w)) for x in coords[0::2]]
        ys = [min(max(y * sy, 0.0), float(h)) for y in coords[1::2]]
        return Box(label, min(xs), min(ys), max(xs), max(ys), point)


def _numbers(value: object, n: int) -> list[float] | None:
    if not isinstance(value, list) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def _json_boxes(text: str, frame: Frame) -> list[Box]:
    """Every JSON object in `text` with a bbox_2d or point_2d (inside lists or other objects too)."""
    decoder = json.JSONDecoder()
    out: list[Box] = []
    pos = text.find("{")
    while pos >= 0:
        end = pos + 1
        try:
            obj, stop = decoder.raw_decode(text, pos)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            label = obj.get("label")
            label = label if isinstance(label, str) else ""
            if (box := _numbers(obj.get("bbox_2d"), 4)) is not None:
                out.append(frame.place(label, box, False))
                end = stop
            elif (at := _numbers(obj.get("point_2d"), 2)) is not None:
                out.append(frame.place(label, at + at, True))
                end = stop
        pos = text.find("{", end)
    return out


def _token_boxes(text: str, frame: Frame) -> list[Box]:
    """Qwen2-VL's <|box_start|>(x1,y1),(x2,y2)<|box_end|>, each named by the object reference before it."""
    out: list[Box] = []
    label = ""
    refs = [(m.start(), m.group(1).strip()) for m in _REF.finditer(text)]
    for m in _BOX.finditer(text):
        label = next((name for at, name in reversed(refs) if at < m.start()), label)
        out.append(frame.place(label, [float(g) for g in m.groups()], False))
    return out


def find_boxes(raw: str, frame: Frame) -> list[Box]:
    """The boxes and points in an answer's text, special tokens left in (tokenizer.decode(ids,
    skip_special_tokens=False)), in the order they come."""
    return _token_boxes(raw, frame) + _json_boxes(raw, frame)


def counted(boxes: list[Box]) -> str:
    """"2 boxes, 1 point": what `boxes` holds, for a message."""
    points = sum(b.point for b in boxes)
    return ", ".join(f"{n} {kind}{'' if n == 1 else 'es' if kind == 'box' else 's'}"
                     for n, kind in ((len(boxes) - points, "box"), (points, "point")) if n)


def answer_boxes(model: Model, out: Generation, picture: Image.Image, index: int = 0) -> list[Box]:
    """The boxes `out` (an answer of `model` about pictures, `picture` the `index`th of them in the
    prompt) gives, in `picture`'s pixels."""
    if model.vision_cfg is None or index >= len(out.image_sizes):
        raise GroundingError(f"the answer is about {len(out.image_sizes)} pictures; picture {index + 1} is not one")
    h, w = out.image_sizes[index]
    frame = Frame((picture.width, picture.height), (w, h), relative=not model.vision_cfg.qwen2_5)
    return find_boxes(model.tokenizer.decode(out.token_ids, skip_special_tokens=False), frame)


def draw_boxes(picture: Image.Image, boxes: list[Box], path: Path) -> None:
    """`picture` with `boxes` drawn on it (a colour a label, its name above the box), written to
    `path` in the format its extension names; written whole or not at all."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise GroundingError(f"{path}: no image format has the extension {path.suffix or '(none)'!r}")
    img = picture.convert("RGB")
    draw = ImageDraw.Draw(img)
    side = max(img.size)
    width = max(2, round(side / 400))
    font = ImageFont.load_default(size=max(12, round(side / 50)))
    colours: dict[str, tuple[int, int, int]] = {}
    for b in boxes:
        colour = colours.setdefault(b.label, PALETTE[len(colours) % len(PALETTE)])
        if b.point:
            r = 3 * width
            draw.ellipse((b.x1 - r, b.y1 - r, b.x1 + r, b.y1 + r), fill=colour, outline=(255, 255, 255))
        else:
            draw.rectangle((b.x1, b.y1, b.x2, b.y2), outline=colour, width=width)
        if b.label:
            left, top, right, bottom = draw.textbbox((0, 0), b.label, font=font)
            x, y = b.x1, max(0.0, b.y1 - (bottom - top) - 2 * width)
            draw.rectangle((x, y, x + right - left + 2 * width, y + bottom - top + 2 * width), fill=colour)
            draw.text((x + width - left, y + width - top), b.label, fill=(255, 255, 255), font=font)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        img.save(tmp, format=fmt)
        os.replace(tmp, path)
    except (OSError, ValueError, KeyError) as e:
        tmp.unlink(missing_ok=True)
        raise GroundingError(f"{path}: cannot write the picture ({getattr(e, 'strerror', None) or e})") from None
