"""qvl-run's --image and --video given as http(s) URLs, as mlx-vlm and transformers take them:
each fetched once (at most CLI_MAX_BYTES, media_fetch.py) into a temporary folder that goes when
qvl-run ends, kept under its own name, then read as the file it now is."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from .image import ImageError
from .media_fetch import MediaAccess, is_remote, url_bytes
from .video import VideoError

CLI_MAX_BYTES = 512 * 2**20  # a picture or a video fetched for qvl-run


def local_paths(args: list[str], kind: str, folder: Path, urls: dict[Path, str]) -> list[Path]:
    """`args` (--image or --video values) as files: paths as they are, URLs fetched into `folder`
    under their own names (each fetched file's URL put in `urls`, for what qvl-run prints);
    ImageError / VideoError naming the flag and the URL when one cannot be fetched."""
    out = []
    for i, arg in enumerate(args):
        if not is_remote(arg):
            out.append(Path(arg))
            continue
        name = Path(urllib.parse.unquote(urllib.parse.urlparse(arg).path)).name or kind
        target = folder / f"{kind}{i + 1}" / name  # its own name: --boxes' {stem} and {name} read it
        error = ImageError if kind == "image" else VideoError
        data = url_bytes(arg, f"--{kind}", error, MediaAccess(), CLI_MAX_BYTES)
        target.parent.mkdir()
        target.write_bytes(data)
        urls[target] = arg
        out.append(target)
    return out
