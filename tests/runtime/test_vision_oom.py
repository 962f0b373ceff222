"""An image encode that runs out of GPU memory (runtime/vision_oom.py): the picture limit lowered,
the prompt read again with its pictures downscaled, and the answer the same as one asked under
that limit from the start. The CPU has no GPU to run out of: the tower's forward is made to fail
as a GPU's would (torch.OutOfMemoryError) on batches over a number of pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime import vision_oom
from qvl.runtime.loader import load
from qvl.runtime.placement import PATCH_PIXELS
from qvl.runtime.run_cli import app
from qvl.runtime.vision import VisionTower
from qvl.runtime.vision_cache import VisionCache
from qvl.runtime.vision_oom import ATTEMPTS, SHRINK, VisionOutOfMemory, lowered, retrying

PAIR = ("tiny-qwen2.5-vl", "llamacpp", "tiny-qwen2.5-vl-f16.gguf")
PROMPT = "What is in this picture?"


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture()
def gpu_of(monkeypatch):
    """gpu_of(pixels): the tower's forward fails as out of GPU memory on batches of more pixels
    from now on; returns a list of (pixels, failed) of each forward after that."""
    forward = VisionTower.forward

    def install(room: int) -> list[tuple[int, bool]]:
        calls: list[tuple[int, bool]] = []

        def limited(self, px, grids):
            pixels = px.shape[0] * PATCH_PIXELS
            calls.append((pixels, pixels > room))
            if pixels > room:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(self, px, grids)

        monkeypatch.setattr(VisionTower, "forward", limited)
        return calls

    return install


def _model(fixtures_dir, limit: int | None = None):
    model = load(fixtures_dir.joinpath(*PAIR), device="cpu")
    model.placement = dataclasses.replace(model.placement, vision_max_pixels=limit)
    model.vision_cache = VisionCache(budget=0)  # each picture encoded each time: these tests count the encodes
    warnings: list[str] = []
    model.on_warning = warnings.append
    return model, warnings


def test_an_image_that_runs_out_of_memory_is_downscaled_and_read_again(fixtures_dir, gpu_of):
    image = _image(448, 336)  # 150,528 pixels, 192 merged tokens
    reference, _ = _model(fixtures_dir)
    full = reference.generate(PROMPT, [image], max_new_tokens=6)
    calls = gpu_of(110_000)
    model, warnings = _model(fixtures_dir)
    out = model.generate(PROMPT, [image], max_new_tokens=6)
    limit = int(SHRINK * 448 * 336)
    assert calls == [(448 * 336, True), (calls[1][0], False)] and calls[1][0] <= limit
    assert model.placement.vision_max_pixels == limit
    assert len(warnings) == 2 and "ran out of GPU memory on 150,528 pixels" in warnings[0]
    assert f"limited to {limit:,} pixels" in warnings[0] and "downscaled" in warnings[1]
    assert out.prompt_tokens < full.prompt_tokens  # fewer image tokens
    # the same answer as a model asked under that limit from the start
    planned, _ = _model(fixtures_dir, limit)
    again = planned.generate(PROMPT, [image], max_new_tokens=6)
    assert (out.token_ids, out.prompt_tokens, out.text) == (again.token_ids, again.prompt_tokens, again.text)
    # the next prompt starts under the new limit: downscaled at once, no failed encode
    calls.clear()
    warnings.clear()
    model.generate(PROMPT, [image], max_new_tokens=2, cache_prompt=False)  # encoded again
    assert [failed for _, failed in calls] == [False] and len(warnings) == 1 and "downscaled" in warnings[0]


def test_pictures_that_each_fit_are_encoded_in_turn_not_downscaled(fixtures_dir, gpu_of):
    images = [_image(336, 224, 1), _image(224, 336, 2)]  # 75,264 pixels each
    reference, _ = _model(fixtures_dir)
    both = reference.generate(PROMPT, images, max_new_tokens=4)
    calls = gpu_of(100_000)
    model, warnings = _model(fixtures_dir)
    out = model.generate(PROMPT, images, max_new_tokens=4)
    assert calls == [(2 * 75_264, True), (75_264, False), (75_264, False)]
    assert len(warnings) == 1 and "ran out of GPU memory" in warnings[0]  # nothing downscaled
    assert out.prompt_tokens == both.prompt_tokens and out.token_ids == both.token_ids


def test_streamed_answer_after_an_encode_ran_out_of_memory(fixtures_dir, gpu_of):
    image = _image(448, 336)
    gpu_of(110_000)
    model, _ = _model(fixtures_dir)
    pieces = list(model.generate(PROMPT, [image], max_new_tokens=6, stream=True))
    planned, _ = _model(fixtures_dir, int(SHRINK * 448 * 336))
    assert "".join(pieces) == planned.generate(PROMPT, [image], max_new_tokens=6).text


def test_out_of_memory_below_the_smallest_picture_is_the_error(fixtures_dir, gpu_of):
    calls = gpu_of(1_000)  # not even a 56x56 picture (3,136 pixels, MIN_PIXELS)
    model, warnings = _model(fixtures_dir)
    with pytest.raises(torch.OutOfMemoryError, match="out of GPU memory encoding"):
        model.generate(PROMPT, [_image(448, 336)], max_new_tokens=2)
    assert 2 <= len(calls) <= ATTEMPTS and all(failed for _, failed in calls)
    assert len(warnings) >= 1 and all("ran out of GPU memory" in w or "downscaled" in w for w in warnings)


@pytest.mark.parametrize("room", [110_000, 1_000])
def test_cli_warns_and_answers_or_fails_in_one_line(fixtures_dir, gpu_of, tmp_path, room):
    gpu_of(room)
    path = tmp_path / "big.png"
    _image(448, 336).save(path)
    r = CliRunner().invoke(app, [str(fixtures_dir.joinpath(*PAIR)), "--image", str(path), "-p", "Hi", "-n", "3"])
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.output and "ran out of GPU memory on 150,528 pixels" in lines[0]
    assert all(line.startswith("qvl-run: warning: ") for line in lines[:-1])
    if room > 3136:  # answered, with a picture that fits
        assert r.exit_code == 0 and "downscaled" in lines[-1] and r.stdout.strip()
    else:
        assert r.exit_code == 2 and lines[-1].startswith("qvl-run: error: out of GPU memory answering")


def test_the_error_holds_no_frames_of_the_failed_encode():
    """The failed forward's tensors go with its frames: the error raised again has no context."""
    def forward() -> torch.Tensor:
        big = torch.zeros(1000)  # noqa: F841 (what a frame of the failed encode holds)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(VisionOutOfMemory) as info:
        vision_oom.encode(forward, 12_345)
    assert info.value.pixels == 12_345 and info.value.__context__ is None and info.value.__cause__ is None
    assert isinstance(info.value, torch.OutOfMemoryError)  # what the CLI turns into its one line


@pytest.mark.parametrize("limit, failed, min_pixels, expected", [
    (None, 1_000_000, 3136, 700_000),       # no limit yet: SHRINK of the batch
    (800_000, 1_000_000, 3136, None),       # a batch over the limit (a picture at its floor): no lower
    (2_000_000, 1_000_000, 3136, 700_000),  # a batch under the limit
    (1_000_000, 1_000_000, 3136, 700_000),  # at it
    (None, 4_000, 3136, None),              # 2,800 < min_pixels: no lower
    (None, 4_480, 3136, 3136),              # exactly min_pixels
])
def test_lowered_limit(limit, failed, min_pixels, expected):
    assert lowered(limit, failed, min_pixels) == expected


def test_retrying_tries_again_only_before_the_first_item():
    tries: list[int] = []
    lowered_for: list[int] = []

    def attempt():
        tries.append(len(tries))
        if len(tries) <= 2:
            raise VisionOutOfMemory(10 * len(tries))
        yield "a"
        yield "b"

    assert list(retrying(attempt, lambda e: lowered_for.append(e.pixels))) == ["a", "b"]
    assert tries == [0, 1, 2] and lowered_for == [10, 20]

    def late():  # after an item went out, an error is the caller's
        yield "a"
        raise VisionOutOfMemory(5)

    it = retrying(late, lambda e: pytest.fail("lowered after the answer began"))
    assert next(it) == "a"
    with pytest.raises(VisionOutOfMemory):
        next(it)


def test_retrying_gives_up_after_attempts_or_when_lower_raises():
    tries = []

    def never():
        tries.append(1)
        raise VisionOutOfMemory(1)
        yield  # a generator

    with pytest.raises(VisionOutOfMemory):
        list(retrying(never, lambda e: None))
    assert len(tries) == ATTEMPTS
    tries.clear()

    def give_up(e: VisionOutOfMemory) -> None:
        raise e

    with pytest.raises(VisionOutOfMemory):
        list(retrying(never, give_up))
    assert len(tries) == 1


def test_a_bad_request_fails_at_generate_not_at_the_first_piece(fixtures_dir):
    """The retry wraps the answer's pieces, not the request's checks: a streamed generate
    still raises its ModelError when called."""
    from qvl.runtime.model import ModelError

    model, _ = _model(fixtures_dir)
    with pytest.raises(ModelError, match=r"\{image2\}"):
        model.generate("{image2}?", [_image(56, 56)], stream=True)


def test_a_video_is_sampled_again_smaller_or_the_error_comes_back(fixtures_dir, gpu_of, tmp_path):
    """A video's frames shrink with the limit down to their floor (1.05 x --video-min-pixels
    each, video.py); a video that fails at its floor is the error, after one more try."""
    from videos import make_video

    path = make_video(tmp_path / "v.mp4", frames=8, fps=2, size=(448, 672))
    reference, _ = _model(fixtures_dir)
    whole = reference.generate(PROMPT, videos=[str(path)], max_new_tokens=3)
    big = whole.videos[0].pixels.shape[0] * PATCH_PIXELS
    calls = gpu_of(int(0.9 * big))
    model, warnings = _model(fixtures_dir)
    out = model.generate(PROMPT, videos=[str(path)], max_new_tokens=3)
    assert [failed for _, failed in calls] == [True, False] and calls[0][0] == big
    assert "ran out of GPU memory" in warnings[0] and "frames downscaled" in warnings[1]
    assert out.videos[0].pixels.shape[0] * PATCH_PIXELS == calls[1][0] <= int(SHRINK * big)
    assert out.prompt_tokens < whole.prompt_tokens
    calls = gpu_of(1_000)
    floor, _ = _model(fixtures_dir)
    with pytest.raises(torch.OutOfMemoryError):
        floor.generate(PROMPT, videos=[str(path)], max_new_tokens=3)
    assert len(calls) < ATTEMPTS and all(failed for _, failed in calls)
