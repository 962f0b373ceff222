"""Video: sampling and sizing equal qwen-vl-utils' own functions; the pipeline equals transformers.

qwen-vl-utils imports torchvision at module level (not installable here); its pure functions
(`smart_nframes`, `calculate_video_frame_range`, `smart_resize`) do not use it, so the test
imports the module with a stand-in torchvision and calls those functions.
"""

from __future__ import annotations

import sys
import types

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime.chat import media_order
from qvl.runtime.loader import load
from qvl.runtime.video import VideoError, VideoOptions, frame_range, frame_size, load_video, sample_indices, smart_nframes
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf
from videos import make_video


@pytest.fixture(scope="module")
def qvu():
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0"
    tv.io = types.ModuleType("torchvision.io")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    stubs = {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}
    sys.modules.update(stubs)
    try:
        from qwen_vl_utils import vision_process
    finally:  # transformers probes for torchvision; it must not find the stand-in
        for name in stubs:
            sys.modules.pop(name, None)
    return vision_process


@pytest.mark.parametrize("total,video_fps,fps,max_frames,start,end", [
    (30, 10.0, 2.0, 32, None, None),
    (300, 30.0, 2.0, 32, None, None),       # 10 s at 2 fps = 20 frames
    (3000, 25.0, 2.0, 32, None, None),      # capped at 32
    (7, 7.0, 2.0, 32, None, None),          # short: min frames 4
    (600, 29.97, 1.0, 768, 2.5, 11.0),      # a window of the video
    (91, 30.0, 4.0, 10, 0.4, None),
])
def test_sampling_equals_qwen_vl_utils(qvu, total, video_fps, fps, max_frames, start, end):
    ele = {"fps": fps, "max_frames": max_frames}
    if start is not None:
        ele["video_start"] = start
    if end is not None:
        ele["video_end"] = end
    s0, s1, count = qvu.calculate_video_frame_range(ele, total, video_fps)
    n_ref = qvu.smart_nframes(ele, total_frames=count, video_fps=video_fps)
    idx_ref = torch.linspace(s0, s1, n_ref).round().long().tolist()
    first, last = frame_range(total, video_fps, start, end)
    n = smart_nframes(last - first + 1, video_fps, fps, 4, max_frames)
    assert (first, last, n) == (s0, s1, n_ref)
    assert sample_indices(first, last, n) == idx_ref


@pytest.mark.parametrize("h,w,n", [(1080, 1920, 32), (480, 640, 8), (90, 3000, 4), (2000, 2000, 768)])
def test_frame_size_equals_qwen_vl_utils(qvu, h, w, n):
    min_pixels = qvu.VIDEO_MIN_TOKEN_NUM * 28 * 28
    total = qvu.MODEL_SEQ_LEN * 28 * 28 * 0.9
    max_pixels = max(min(qvu.VIDEO_MAX_TOKEN_NUM * 28 * 28, total / n * 2), int(min_pixels * 1.05))
    assert frame_size(h, w, n, VideoOptions()) == qvu.smart_resize(h, w, factor=28, min_pixels=min_pixels,
                                                                   max_pixels=max_pixels)


def test_load_video_decodes_the_sampled_frames(tmp_path):
    path = make_video(tmp_path / "a.mp4", frames=30, fps=10)
    v = load_video(path, VideoOptions(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert v.frame_indices == tuple(torch.linspace(0, 29, 6).round().long().tolist())
    assert v.grid_thw == (3, v.size[0] // 14, v.size[1] // 14)
    assert v.second_per_grid_t == pytest.approx(2 / (6 / 30 * 10))
    assert v.pixels.shape == (3 * (v.size[0] // 14) * (v.size[1] // 14), 3 * 2 * 14 * 14)


@pytest.mark.parametrize("codec,suffix", [("libvpx-vp9", "webm"), ("gif", "gif"), ("libx264", "mp4"),
                                          ("libx264", "mkv"), ("mpeg4", "mov"), ("mpeg4", "avi")])
def test_other_containers(tmp_path, codec, suffix):
    path = make_video(tmp_path / f"a.{suffix}", frames=12, fps=6, codec=codec) if codec != "gif" else None
    if path is None:
        path = tmp_path / "a.gif"
        with av.open(str(path), "w") as c:
            s = c.add_stream("gif", rate=6)
            s.width, s.height, s.pix_fmt = 64, 64, "rgb8"
            for i in range(12):
                img = np.full((64, 64, 3), i * 20, np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    v = load_video(path, VideoOptions(), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert v.grid_thw[0] == 2 and len(v.frame_indices) == 4


def test_audio_only_file_is_refused(tmp_path):
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoError, match="no video stream"):
        load_video(path, VideoOptions(), (0.5,) * 3, (0.5,) * 3)


def test_bad_videos(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "none.mp4", VideoOptions(), (0.5,) * 3, (0.5,) * 3)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match="not a readable video|no decodable"):
        load_video(junk, VideoOptions(), (0.5,) * 3, (0.5,) * 3)
    path = make_video(tmp_path / "a.mp4", frames=30, fps=10)
    with pytest.raises(VideoError, match="not before"):
        load_video(path, VideoOptions(start=2.5, end=1.0), (0.5,) * 3, (0.5,) * 3)
    short = make_video(tmp_path / "one.mp4", frames=1, fps=10)
    with pytest.raises(VideoError):
        load_video(short, VideoOptions(), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_video_prompt_logits_match_transformers(tmp_path, family):
    spec = TinySpec(family=family, dtype=torch.float32, seed=9)
    src = make_checkpoint(tmp_path / "ckpt", spec)
    model = load(to_gguf(src, tmp_path / "m.gguf", "f32", "f32"))
    video = make_video(tmp_path / "v.mp4", frames=40, fps=8, size=(84, 112))
    from qvl.runtime.chat import render

    opts = VideoOptions(fps=1.5, min_pixels=64 * 28 * 28)  # 6 frames, 1.67 s per temporal step
    img = Image.new("RGB", (90, 60), "red")
    prompt = "What happens in {video1}? Compare with {image1}."
    ours = model.prompt_logits(prompt, [img], videos=[video], video_options=opts)
    vid = model._videos([video], opts)[0]
    text = render(model.chat_template, model.messages_for(prompt, 1, None, 1))
    ids, _, pre = model.tokenize(text, [img], videos=[vid])
    input_ids = torch.tensor([ids])
    video_id = model.tokenizer.token_to_id("<|video_pad|>")
    mm = (input_ids == model.image_pad_id).int() + 2 * (input_ids == video_id).int()
    hf = build_model(spec).float().eval()
    kwargs = dict(input_ids=input_ids, mm_token_type_ids=mm,
                  pixel_values=torch.from_numpy(pre[0].pixels), image_grid_thw=torch.tensor([pre[0].grid_thw]),
                  pixel_values_videos=torch.from_numpy(vid.pixels), video_grid_thw=torch.tensor([vid.grid_thw]))
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([vid.second_per_grid_t])
    with torch.no_grad():
        ref = hf(**kwargs).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert vid.grid_thw[0] >= 2  # several temporal steps, so the time positions matter
    assert vid.second_per_grid_t == pytest.approx(2 / (6 / 40 * 8))  # fractional time steps


def test_rotation_metadata_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 448, 224, "yuv420p"
        s.set_display_rotation(90)  # stored landscape, shown portrait
        for _ in range(8):
            img = np.zeros((224, 448, 3), np.uint8)
            img[:, :112] = 255  # white band on the left of the stored frame
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = load_video(path, VideoOptions(min_pixels=4 * 28 * 28), (0.0,) * 3, (1.0,) * 3)
    h, w = v.size
    assert h > w  # portrait after rotation
    # counter-clockwise quarter turn: the stored left edge ends up at the bottom
    t, gh, gw = v.grid_thw
    patches = v.pixels.reshape(t, gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)
    first_row = patches[0, 0, :, 0, :].mean()
    last_row = patches[0, -1, :, 1, :].mean()
    assert last_row > 0.9 and first_row < 0.1


def test_variable_frame_rate(tmp_path):
    """Irregular timestamps: frames are sampled by decode order, as qwen-vl-utils' readers do."""
    from fractions import Fraction

    path = tmp_path / "vfr.mkv"
    times = [0.0, 0.1, 0.15, 0.5, 0.55, 0.6, 1.2, 1.25, 1.3, 2.0, 2.1, 2.5]
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 112, 112, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((112, 112, 3), 20 * k, np.uint8), format="rgb24")
            frame.pts = int(t * 1000)
            frame.time_base = Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = load_video(path, VideoOptions(fps=2.0), (0.0,) * 3, (1.0,) * 3)
    assert len(v.frame_indices) % 2 == 0 and max(v.frame_indices) <= len(times) - 1
    assert v.frame_indices == tuple(sorted(v.frame_indices))


def test_seeking_gives_the_frames_decoding_in_order_gives(tmp_path):
    from qvl.runtime import video as V

    path = make_video(tmp_path / "long.mp4", frames=900, fps=30, size=(64, 96))
    idx = V.sample_indices(0, 899, 32)
    by_seek = V._seek_frames(path, idx, 30.0, 900)
    assert by_seek is not None  # long, constant rate: the seeking path is taken
    in_order = V._sequential_frames(path, idx)
    assert [i for i, _ in by_seek] == [i for i, _ in in_order] == sorted(set(idx))
    for (_, a), (_, b) in zip(by_seek, in_order):
        np.testing.assert_array_equal(a.to_ndarray(format="rgb24"), b.to_ndarray(format="rgb24"))
    assert V._seek_frames(path, idx[:4], 30.0, 60) is None  # short videos decode in order


def test_two_videos_and_placeholders(tmp_path, fixtures_dir):
    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    a = make_video(tmp_path / "a.mp4", frames=20, fps=10, size=(56, 84))
    b = make_video(tmp_path / "b.webm", frames=12, fps=6, size=(84, 56), codec="libvpx-vp9")
    opts = VideoOptions(min_pixels=16 * 28 * 28)
    vids = model._videos([a, b], opts)
    from qvl.runtime.chat import render

    text = render(model.chat_template, model.messages_for("First {video2}, then {video1}.", 0, None, 2))
    assert text.count("<|video_pad|>") == 2
    assert media_order("First {video2}, then {video1}.", vids, "video") == [vids[1], vids[0]]
    ids, spans, _ = model.tokenize(text, [], videos=[vids[1], vids[0]])
    pads = sum(1 for i in ids if i == model.tokenizer.token_to_id("<|video_pad|>"))
    assert pads == sum(t * (h // 2) * (w // 2) for t, h, w in (v.grid_thw for v in vids))
    logits = model.prompt_logits("First {video2}, then {video1}.", videos=[a, b], video_options=opts)
    assert logits.shape[0] == len(ids)
