"""Pictures and videos inside a request to qvl serve: vLLM's `video_url` part in OpenAI's chat
answered as Model.chat answers the same video from its file; bad ones a 400 naming the part;
the temporary file gone with the request."""

from __future__ import annotations

import base64
import gc
import glob
import json
import os
import tempfile

import pytest

from qvl.runtime.image import ImageError
from qvl.runtime.inline_media import UploadedVideo, decode_image, decode_video, inline_bytes
from qvl.runtime.media_fetch import NO_ACCESS
from qvl.runtime.video import VideoError
from videos import make_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=8, fps=4)


def _url(path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(open(path, "rb").read()).decode()


def _leftovers() -> list[str]:
    gc.collect()
    return glob.glob(os.path.join(tempfile.gettempdir(), "qvl-video-*"))


def test_video_url_part_answers_as_the_file_does(running, reference, clip):
    before = _leftovers()
    want = reference.chat([{"role": "user", "content": [{"type": "video", "video": str(clip)},
                                                        {"type": "text", "text": "What moves?"}]}], max_new_tokens=5)
    body = {"model": "tiny:1", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": _url(clip)}}, {"type": "text", "text": "What moves?"}]}]}
    got = running.json("/v1/chat/completions", body)
    assert got["choices"][0]["message"]["content"] == want.text
    assert got["usage"]["prompt_tokens"] == want.prompt_tokens > 20  # the video's tokens are in
    status, data = running.request("/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and b"[DONE]" in data
    assert _leftovers() == before  # each request's temporary file went with it


@pytest.mark.parametrize("url,expect", [
    ("data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode(),
     "messages[0].content[1]: not a readable video"),
    ("file:///a.mp4", "messages[0].content[1]: file:///a.mp4: file:// URLs are read only with qvl serve --media-path"),
    ("data:video/mp4,abc", "messages[0].content[1]: a data: URL wants ;base64"),
    ("@@", "messages[0].content[1]: not base64"),
])
def test_bad_video_urls(running, url, expect):
    before = _leftovers()
    body = {"model": "tiny:1", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "video_url", "video_url": {"url": url}}]}]}
    status, data = running.request("/v1/chat/completions", body)
    assert status == 400 and expect in json.loads(data)["error"], data
    assert _leftovers() == before


def test_uploaded_video_reads_as_its_place_in_messages(clip):
    video = decode_video(_url(clip), "messages[2].content[0]", NO_ACCESS)
    assert isinstance(video, UploadedVideo) and os.path.isfile(video)
    assert f"{video}: x" == "messages[2].content[0]: x" and str(video) == video.file.name
    path = str(video)
    del video
    gc.collect()
    assert not os.path.exists(path)


def test_inline_bytes_and_images():
    assert inline_bytes("aGk=", "w", ImageError, NO_ACCESS) == b"hi"
    assert inline_bytes("data:text/plain;base64,aGk=", "w", VideoError, NO_ACCESS) == b"hi"
    for bad, expect, error in [(3, "w: a base64 string or a URL", ImageError),
                               ("file:///etc/passwd", "file:// URLs are read only", VideoError),
                               ("https://example.com/a.png", "this qvl serve fetches no URLs", ImageError)]:
        with pytest.raises(error, match=expect):
            inline_bytes(bad, "w", error, NO_ACCESS)
    with pytest.raises(ImageError, match="images\\[0\\]: not a readable image"):
        decode_image("aGVsbG8=", "images[0]", NO_ACCESS)
