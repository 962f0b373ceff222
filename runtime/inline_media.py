"""Pictures and videos sent inside a request to `qvl serve`: base64 (Ollama's `images`) or
data: URLs (OpenAI's `image_url`, vLLM's `video_url` parts). qvl serve fetches nothing.

A video goes to a temporary file (PyAV seeks in files) that is deleted once nothing refers to
its path any more, that is when the request's messages are let go; messages name it by its
place in the request, not by the file."""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from typing import IO, Any

from PIL import Image

from .image import ImageError, load_image
from .video import VideoError, probe


def inline_bytes(data: Any, where: str, error: type[ValueError]) -> bytes:
    """The bytes of a base64 string or a data: URL; `error` (ImageError, VideoError) names `where`."""
    if not isinstance(data, str):
        raise error(f"{where}: a base64 string")
    if data.startswith(("http://", "https://", "file:")):
        raise error(f"{where}: qvl serve fetches nothing; send it inline (base64 or a data: URL)")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise error(f"{where}: a data: URL wants ;base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{where}: not base64") from None


def decode_image(data: Any, where: str) -> Image.Image:
    """A base64 image or a data: URL, as an RGB picture (ImageError naming `where`)."""
    return load_image(io.BytesIO(inline_bytes(data, where, ImageError)), where)


class UploadedVideo(str):
    """The path of a request's video in a temporary file, which goes when this path does; in
    f-strings (the video module's messages) it reads as its place in the request."""

    name: str
    file: IO[bytes]

    def __new__(cls, file: IO[bytes], name: str) -> UploadedVideo:
        path = super().__new__(cls, file.name)
        path.name, path.file = name, file
        return path

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


def decode_video(data: Any, where: str) -> UploadedVideo:
    """A base64 video or a data: URL in a temporary file, checked to be a video PyAV decodes
    (VideoError naming `where`)."""
    raw = inline_bytes(data, where, VideoError)
    file = tempfile.NamedTemporaryFile(prefix="qvl-video-")
    try:
        file.write(raw)
        file.flush()
    except OSError as e:
        file.close()
        raise VideoError(f"{where}: cannot keep the video ({e.strerror})") from None
    video = UploadedVideo(file, where)
    probe(video)
    return video
