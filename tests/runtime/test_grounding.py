"""Grounding: an answer's boxes and points in the picture's pixels, and `qvl-run --boxes`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime.grounding import PALETTE, Box, Frame, GroundingError, answer_boxes, draw_boxes, find_boxes
from qvl.runtime.image import smart_resize
from qvl.runtime.loader import load
from qvl.runtime.model import Generation
from qvl.runtime.run_cli import app

runner = CliRunner()
GREY = (128, 128, 128)
# a 130x90 picture is seen at 140x84 (smart_resize, multiples of 28): x scales by 130/140, y by 90/84
SEEN_130x90 = Frame((130, 90), (140, 84), relative=False)


def test_smart_resize_of_the_test_picture():
    assert smart_resize(90, 130) == (84, 140)


def test_qwen2_5_json_list_in_a_fence_is_scaled_to_the_picture():
    answer = ('Here:\n```json\n[\n\t{"bbox_2d": [28, 14, 84, 70], "label": "cat"},\n'
              '\t{"point_2d": [140, 0], "label": "tip"}\n]\n```')
    assert find_boxes(answer, SEEN_130x90) == [Box("cat", 26.0, 15.0, 78.0, 75.0),
                                               Box("tip", 130.0, 0.0, 130.0, 0.0, point=True)]


def test_qwen2_vl_box_tokens_are_thousandths_named_by_the_reference_before():
    answer = ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,200),(500,1000)<|box_end|>"
              " and <|object_ref_start|>dog<|object_ref_end|><|box_start|>(0, 0),(250,500)<|box_end|>"
              "<|box_start|>(500,500),(1000,1000)<|box_end|>")
    frame = Frame((200, 100), (0, 0), relative=True)
    assert find_boxes(answer, frame) == [Box("the cat", 20.0, 20.0, 100.0, 100.0), Box("dog", 0.0, 0.0, 50.0, 50.0),
                                         Box("dog", 100.0, 50.0, 200.0, 100.0)]


def test_corners_ordered_and_clamped_to_the_picture():
    assert find_boxes('{"bbox_2d": [280, 42, -14, 28]}', SEEN_130x90) == [Box("", 0.0, 30.0, 130.0, 45.0)]


@pytest.mark.parametrize("answer", [
    '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": ["1", 2, 3, 4]}', '{"bbox_2d": [true, 2, 3, 4]}',
    '{"point_2d": [1, 2, 3]}', '{"box": [1, 2, 3, 4]}', 'bbox_2d: [1, 2, 3, 4]',
    '<|box_start|>(1,2),(3)<|box_end|>'])
def test_malformed_ones_are_no_boxes(answer):
    assert find_boxes(answer, SEEN_130x90) == []


def test_an_answer_cut_off_mid_list_keeps_its_whole_objects():
    answer = '[{"bbox_2d": [0, 0, 14, 14], "label": "a"}, {"bbox_2d": [14, 14, 28, 28], "label": "b'
    assert [b.label for b in find_boxes(answer, SEEN_130x90)] == ["a"]


def test_boxes_nested_in_another_object_and_a_label_that_is_no_string():
    answer = '{"objects": [{"bbox_2d": [0, 0, 140, 84], "label": 3}], "note": "{"}'
    assert find_boxes(answer, SEEN_130x90) == [Box("", 0.0, 0.0, 130.0, 90.0)]


def test_as_json_rounds_to_a_tenth():
    assert Box("a", 1.04, 2.06, 3.0, 4.0).as_json() == {"label": "a", "bbox_2d": [1.0, 2.1, 3.0, 4.0]}
    assert Box("p", 5.55, 6.0, 5.55, 6.0, point=True).as_json() == {"label": "p", "point_2d": [5.5, 6.0]}


def _grey(w: int = 130, h: int = 90) -> Image.Image:
    return Image.new("RGB", (w, h), GREY)


def test_draw_boxes_outlines_each_label_in_its_colour(tmp_path):
    out = tmp_path / "drawn.png"
    draw_boxes(_grey(), [Box("cat", 26, 40, 78, 75), Box("dog", 90, 50, 120, 80), Box("cat", 5, 60, 20, 85),
                         Box("", 100, 10, 100, 10, point=True)], out)
    img = Image.open(out).convert("RGB")
    assert img.size == (130, 90)
    assert img.getpixel((26, 60)) == PALETTE[0] and img.getpixel((77, 60)) == PALETTE[0]  # cat's left, right edge
    assert img.getpixel((5, 75)) == PALETTE[0]  # the second cat: the same colour
    assert img.getpixel((90, 70)) == PALETTE[1]  # dog
    assert img.getpixel((100, 10)) == PALETTE[2]  # the point (its own, unnamed label)
    assert img.getpixel((50, 60)) == GREY and img.getpixel((105, 65)) == GREY  # inside the boxes: the picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png"]


def test_draw_boxes_to_a_jpeg(tmp_path):
    draw_boxes(_grey(), [Box("a", 10, 10, 60, 60)], tmp_path / "a.JPG")
    assert Image.open(tmp_path / "a.JPG").format == "JPEG"


@pytest.mark.parametrize("name,why", [("out.nope", "no image format has the extension '.nope'"),
                                      ("missing/out.png", "cannot write the picture")])
def test_draw_boxes_refuses_and_leaves_nothing(tmp_path, name, why):
    with pytest.raises(GroundingError, match=why):
        draw_boxes(_grey(), [Box("a", 1, 1, 5, 5)], tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_answer_boxes_reads_qwen2_vl_special_tokens_from_the_token_ids(fixtures_dir):
    model = load(fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "tiny-qwen2-vl-f16.gguf")
    raw = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,800)<|box_end|>"
    ids = model.tokenizer.encode(raw, add_special_tokens=False).ids
    out = Generation(model.tokenizer.decode(ids, skip_special_tokens=True), ids, 10, image_sizes=[(84, 140)])
    assert out.text == "cat(100,200),(500,800)"  # the answer as shown: the markers are special tokens
    assert answer_boxes(model, out, _grey()) == [Box("cat", 13.0, 18.0, 65.0, 72.0)]
    with pytest.raises(GroundingError, match="picture 2 is not one"):
        answer_boxes(model, out, _grey(), index=1)


# --- qvl-run --boxes: a grammar makes the tiny random model answer a box -----------------------

@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("pic") / "grey.png"
    _grey().save(p)
    return str(p)


def _forced(text: str) -> str:
    return "root ::= " + json.dumps(text)


def test_run_draws_the_answers_box_in_the_pictures_pixels(tiny_gguf, picture, tmp_path):
    out = tmp_path / "boxes.png"
    answer = '[{"bbox_2d": [28, 14, 84, 70], "label": "cat"}]'
    r = runner.invoke(app, [tiny_gguf, "--image", picture, "-p", "Outline the cat.", "-n", "60",
                            "--grammar", _forced(answer), "--boxes", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["text"] == answer
    assert reply["boxes"] == [{"label": "cat", "bbox_2d": [26.0, 15.0, 78.0, 75.0]}]
    assert f"1 box drawn on {out}" in r.stderr
    img = Image.open(out).convert("RGB")
    assert img.size == (130, 90)
    assert img.getpixel((26, 45)) == PALETTE[0] and img.getpixel((77, 45)) == PALETTE[0]
    assert img.getpixel((52, 45)) == GREY and img.getpixel((25, 80)) == GREY


def test_run_streamed_draws_too(tiny_gguf, picture, tmp_path):
    out = tmp_path / "boxes.png"
    r = runner.invoke(app, [tiny_gguf, "--image", picture, "-p", "Point at it.", "-n", "60", "--stream",
                            "--grammar", _forced('{"point_2d": [70, 42]}'), "--boxes", str(out)])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == '{"point_2d": [70, 42]}\n'
    assert f"1 point drawn on {out}" in r.stderr
    assert Image.open(out).convert("RGB").getpixel((65, 45)) == PALETTE[0]


def test_run_without_boxes_in_the_answer_writes_nothing(tiny_gguf, picture, tmp_path):
    out = tmp_path / "boxes.png"
    r = runner.invoke(app, [tiny_gguf, "--image", picture, "-p", "Any cats?", "-n", "10",
                            "--grammar", _forced("No."), "--boxes", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["boxes"] == []
    assert f"no boxes or points; {out} not written" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("images,target,message", [
    (0, "b.png", "--boxes: give one --image (got 0)"),
    (2, "b.png", "--boxes: give one --image (got 2)"),
    (1, "b.txt", "no image format has the extension '.txt'"),
    (1, "nowhere/b.png", "nowhere not found"),
    (1, ".", "is a folder"),
])
def test_run_refuses_bad_boxes_options_in_one_line(tiny_gguf, picture, tmp_path, images, target, message):
    target_path = tmp_path if target == "." else tmp_path / target
    r = runner.invoke(app, [tiny_gguf, *["--image", picture] * images, "-p", "x", "--boxes", str(target_path)])
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_run_boxes_picture_under_exif_rotation_uses_the_upright_size(tiny_gguf, tmp_path):
    """A photo stored sideways (EXIF orientation 6) is seen upright: boxes land in the upright picture."""
    src = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(np.full((130, 90, 3), 128, np.uint8)).save(src, exif=exif, quality=95)  # stored 90x130
    out = tmp_path / "boxes.png"
    r = runner.invoke(app, [tiny_gguf, "--image", str(src), "-p", "x", "-n", "60", "--json",
                            "--grammar", _forced('{"bbox_2d": [0, 0, 140, 84]}'), "--boxes", str(out)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["boxes"] == [{"label": "", "bbox_2d": [0.0, 0.0, 130.0, 90.0]}]
    assert Image.open(out).size == (130, 90)


def test_run_draws_qwen2_vls_box_tokens(fixtures_dir, picture, tmp_path):
    """Qwen2-VL's form (special tokens, thousandths), forced through GBNF token references."""
    out = tmp_path / "boxes.png"
    grammar = ('root ::= <|object_ref_start|> "cat" <|object_ref_end|> <|box_start|> "(100,200),(500,800)" '
               '<|box_end|>')
    r = runner.invoke(app, [str(fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "tiny-qwen2-vl-f16.gguf"),
                            "--image", picture, "-p", "Outline the cat.", "-n", "40", "--grammar", grammar,
                            "--boxes", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["text"] == "cat(100,200),(500,800)"
    assert reply["boxes"] == [{"label": "cat", "bbox_2d": [13.0, 18.0, 65.0, 72.0]}]
    img = Image.open(out).convert("RGB")
    assert img.getpixel((13, 45)) == PALETTE[0] and img.getpixel((40, 45)) == GREY
