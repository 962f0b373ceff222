"""Pictures and videos sent with a request to `qvl serve`: base64 (Ollama's `images`), data: URLs
(OpenAI's `image_url`, vLLM's `video_url` parts), or, as llama-server takes them, http(s) and
file:// URLs where the server's MediaAccess allows (media_fetch.py).

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
from .media_fetch import MediaAccess, is_url, url_bytes
from .video import VideoError, probe


def inline_bytes(data: Any, where: str, error: type[ValueError], access: MediaAccess) -> bytes:
    """The bytes of a base64 string, a data: URL, or an http(s) / file:// URL as `access` allows;
    `error` (ImageError, VideoError) names `where`."""
    if not isinstance(data, str):
        raise error(f"{where}: a base64 string or a URL")
    if is_url(data):
        return url_bytes(data, where, error, access)
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise error(f"{where}: a data: URL wants ;base64")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{where}: not base64") from None


def decode_image(data: Any, where: str, access: MediaAccess) -> Image.Image:
    """A base64 image or a URL (inline_bytes), as an RGB picture (ImageError naming `where`)."""
    return load_image(io.BytesIO(inline_bytes(data, where, ImageError, access)), where)


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


def decode_video(data: Any, where: str, access: MediaAccess) -> UploadedVideo:
    """A base64 video or a URL (inline_bytes) in a temporary file, checked to be a video PyAV
    decodes (VideoError naming `where`)."""
    raw = inline_bytes(data, where, VideoError, access)
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
