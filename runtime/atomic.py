"""Files written whole or not at all: the data goes to a temporary name beside the file, renamed
onto it when the writing ends without an error and removed when it raises (^C included)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gguf import GGUFWriter


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """The temporary path to write `path`'s data to (`.<name>.<pid>.part` in its folder)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


@contextmanager
def gguf_written(path: Path, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter for `path`: what the block adds to it is written (header, metadata, tensors)
    when it ends, whole or not at all (`replacing`)."""
    with replacing(path) as part:
        writer = GGUFWriter(part, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
