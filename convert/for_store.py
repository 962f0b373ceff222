"""A Hugging Face checkpoint converted straight into the model store: `qvl create` from a
Modelfile whose FROM is a checkpoint folder, and `qvl serve`'s /api/create whose `files` are a
checkpoint's (config.json, tokenizer files, *.safetensors sent to /api/blobs/, as `ollama create`
sends a safetensors folder). The conversion is qvl-convert's (f16, or the `quantize` type
straight from the checkpoint), written into a temporary folder of the store's and removed once the
model is stored."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..runtime.store import Store
from .errors import ConvertError
from .pipeline import ConvertOptions, plan_job, run_counted
from .requantize import type_name

CHECKPOINT_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.(safetensors|json|jinja|txt|model)")


def is_checkpoint(names: list[str]) -> bool:
    """Whether uploaded files are a checkpoint's (a config.json, or safetensors) rather than GGUFs."""
    return any(n == "config.json" or n.endswith(".safetensors") for n in names)


class Conversion:
    """A checkpoint folder planned for the store (every refusal a ConvertError, nothing written);
    `run` writes the text model and projector, `close` removes them (and the upload's links)."""

    def __init__(self, store: Store, folder: Path, name: str, kind: str | None, lora: tuple[Path, ...] = (),
                 links: bool = False):
        store.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=store.root, prefix=".convert-"))
        self.links = folder if links else None
        try:
            opts = ConvertOptions(source=str(folder), out=self.tmp / f"{name}.gguf",
                                  type=type_name(kind) if kind else "f16", lora=lora)
            self.job = plan_job(opts)
        except BaseException:
            self.close()
            raise
        self.total = self.job.nbytes

    @classmethod
    def of_uploads(cls, store: Store, files: dict[str, Path], name: str, kind: str | None) -> "Conversion":
        """A checkpoint sent as blobs: linked under their file names in a folder named `name`."""
        for file in files:
            if not CHECKPOINT_FILE.fullmatch(file):
                raise ConvertError(f"{file!r}: a checkpoint's file name (config.json, *.safetensors, "
                                   "tokenizer files), no folders")
        store.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=store.root, prefix=".upload-")) / name
        folder.mkdir()
        for file, blob in files.items():
            os.symlink(blob, folder / file)
        try:
            return cls(store, folder, name, kind, links=True)
        except BaseException:
            shutil.rmtree(folder.parent, ignore_errors=True)
            raise

    def run(self, progress: Callable[[int, int], None], workers: int = ConvertOptions.workers
            ) -> tuple[Path, Path | None]:
        """Write the files (progress: bytes done, bytes in all); (text model, projector or None)."""
        run_counted(self.job, progress, workers)
        paths = [f.path for f in self.job.files]
        return paths[0], paths[1] if len(paths) > 1 else None

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.links is not None:
            shutil.rmtree(self.links.parent, ignore_errors=True)


def checked_name(name: str) -> str:
    """A model name's last part as a file name (general.name of the converted files)."""
    base = name.split("/")[-1].split(":")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "-", base) or "model"

