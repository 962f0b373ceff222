"""The conversion job: checkpoint folder (or hub id) -> planned output files -> GGUF on disk.

Everything that can be wrong with the input is checked before the first byte is written:
config, tokenizer, shards, every tensor's presence and shape, the output folder and the free
space. Files are written as `<name>.partial` and renamed into place together at the end; on any
error (a full disk included) the partial files are removed and existing outputs are untouched.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .errors import ConvertError
from .hf_config import CheckpointConfig, load_config
from .layout import check_tensors, expected_hf_tensors, mmproj_tensors, ollama_tensors, text_tensors
from .lora import Adapter, open_merged, plan_adapters
from .metadata import KV, mmproj_kv, ollama_kv, text_kv
from .plan import CONVERT_TYPES, TEXT_TYPES, VISION_TYPES, PlannedTensor, plan_text, plan_vision
from .quant import BLOCK_QUANTIZERS, pool
from .quant.pool import worker_processes
from .safetensors_io import Checkpoint
from .vocab import load_vocab
from .writer import ChunkSource, GGUFStream, tensor_bytes

LAYOUTS = ("llamacpp", "ollama")


@dataclass(frozen=True)
class ConvertOptions:
    source: str
    out: Path | None
    type: str = "f16"
    layout: str = "llamacpp"
    vision_type: str = "f16"
    revision: str | None = None
    force: bool = False
    workers: int = max(1, min(4, os.cpu_count() or 1))
    lora: tuple[Path, ...] = ()  # PEFT LoRA folders merged into the weights (lora.py)
    lora_scale: float = 1.0


@dataclass(frozen=True)
class OutputFile:
    path: Path
    arch: str | None  # None: the metadata is `kvs` alone, in their order (writer.GGUFStream)
    kvs: list[KV]
    plan: list[PlannedTensor]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plan)


@dataclass(frozen=True)
class Job:
    folder: Path
    config: CheckpointConfig | None  # None: the source is a GGUF (requantize.py)
    files: list[OutputFile]
    lora: tuple[Adapter, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def resolve_source(source: str, revision: str | None) -> Path:
    """A local checkpoint folder, or a hub repo id downloaded into the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{source}: not a checkpoint folder")
    parts = source.split("/")
    if len(parts) != 2 or not all(parts) or source.startswith((".", "/", "~")):
        raise ConvertError(f"{source}: no such folder, and not a hub repo id like 'Qwen/Qwen2.5-VL-3B-Instruct'")
    return _download(source, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - a dependency
        raise ConvertError("huggingface_hub is not installed; pass a local checkpoint folder") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise ConvertError(f"{repo_id}: not in the Hugging Face cache and the hub cannot be reached "
                           "(offline); download it or pass a local folder") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{repo_id}: download failed: {first}") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{repo_id}: download failed: {e}") from None


def default_out(name: str, type_name: str) -> Path:
    return Path.cwd() / f"{name}-{type_name.upper()}.gguf"


def mmproj_path(out: Path) -> Path:
    return out.with_name(f"mmproj-{out.name}")


def check_options(opts: ConvertOptions) -> None:
    if opts.type in TEXT_TYPES and TEXT_TYPES[opts.type].needs_imatrix:
        raise ConvertError(f"--type {opts.type}: needs an importance matrix; convert to f16, make one with qvl "
                           f"imatrix, then qvl quantize MODEL-F16.gguf {opts.type} --imatrix imatrix.gguf")
    if opts.type not in CONVERT_TYPES:
        raise ConvertError(f"--type {opts.type!r}: choose one of {', '.join(CONVERT_TYPES)}")
    if opts.vision_type not in VISION_TYPES:
        raise ConvertError(f"--vision-type {opts.vision_type!r}: choose one of {', '.join(VISION_TYPES)}")
    if opts.layout not in LAYOUTS:
        raise ConvertError(f"--layout {opts.layout!r}: choose one of {', '.join(LAYOUTS)}")


def plan_job(opts: ConvertOptions) -> Job:
    check_options(opts)
    folder = resolve_source(opts.source, opts.revision)
    # a hub snapshot folder is named by its commit hash: name the model after the repo instead
    name = folder.name if Path(opts.source).expanduser().is_dir() else opts.source.split("/")[-1]
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    try:
        found = {n: ckpt.shape(n) for n in ckpt.names()}
        check_tensors(cfg, found, str(folder))
    finally:
        ckpt.close()
    adapters = plan_adapters(opts.lora, opts.lora_scale, expected_hf_tensors(cfg), found)
    return Job(folder, cfg, plan_files(folder, cfg, name, opts), adapters)


def plan_files(folder: Path, cfg: CheckpointConfig, name: str, opts: ConvertOptions) -> list[OutputFile]:
    """The output files of converting the checkpoint described by `cfg` (its tokenizer in
    `folder`): paths, metadata and every tensor's type. Reads no tensor data; `opts` as
    `check_options` passed them."""
    if opts.layout == "ollama" and not cfg.is_qwen2_5:
        raise ConvertError("--layout ollama: Ollama's single-file format exists for Qwen2.5-VL only; "
                           "use --layout llamacpp for Qwen2-VL")
    vocab = load_vocab(folder, cfg.text.vocab_size, cfg.text.bos_token_id)
    kind = TEXT_TYPES[opts.type]
    out = (opts.out or default_out(name, opts.type)).expanduser()
    if out.is_dir():  # as llama.cpp's converter: the default name, in that folder
        out = out / default_out(name, opts.type).name
    elif out.suffix != ".gguf":
        out = out.with_name(out.name + ".gguf")
    n_layer = cfg.text.num_hidden_layers
    n_gqa = cfg.text.num_attention_heads // cfg.text.num_key_value_heads
    if opts.layout == "ollama":
        tensors = ollama_tensors(cfg)
        text_part = [t for t in tensors if not t.name.startswith("v.")]
        vision_part = [t for t in tensors if t.name.startswith("v.")]
        plan = plan_text(text_part, kind, n_layer, n_gqa=n_gqa) + plan_vision(vision_part, opts.vision_type)
        return [OutputFile(out, "qwen25vl", ollama_kv(cfg, vocab, kind.file_type, name), plan)]
    vft = VISION_TYPES[opts.vision_type][0]
    return [
        OutputFile(out, "qwen2vl", text_kv(cfg, vocab, kind.file_type, name),
                   plan_text(text_tensors(cfg), kind, n_layer, n_gqa=n_gqa)),
        OutputFile(mmproj_path(out), "clip", mmproj_kv(cfg, vft, name),
                   plan_vision(mmproj_tensors(cfg), opts.vision_type)),
    ]


def check_destination(job: Job, force: bool) -> None:
    for f in job.files:
        parent = f.path.parent
        if not parent.is_dir():
            raise ConvertError(f"{parent}: output folder does not exist")
        try:  # os.access says yes to root even on a read-only file system: really try
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as e:
            raise ConvertError(f"{parent}: output folder is not writable ({e.strerror})") from None
        if f.path.exists() and not force:
            raise ConvertError(f"{f.path}: already exists (use --force to overwrite)")
    free = shutil.disk_usage(job.files[0].path.parent).free
    need = job.nbytes + (64 << 20)  # metadata and alignment, generously
    if free < need:
        raise ConvertError(f"{job.files[0].path.parent}: not enough free space "
                           f"({free / 2**30:.2f} GiB free, {need / 2**30:.2f} GiB needed)")


def run_job(job: Job, on_bytes: Callable[[PlannedTensor, int], None], workers: int,
            chunks: ChunkSource | None = None) -> None:
    """Write every file of the job; rename into place only when all are complete. Tensor data
    comes from the checkpoint's safetensors, quantized, unless `chunks` gives it."""
    partials = [f.path.with_name(f.path.name + ".partial") for f in job.files]
    ckpt = open_merged(job.folder, job.lora) if chunks is None else None
    source = chunks if chunks is not None else partial(tensor_bytes, ckpt)
    quantized = sum(math.prod(p.tensor.shape) for f in job.files for p in f.plan if p.qtype in BLOCK_QUANTIZERS)
    try:
        with worker_processes(workers if quantized >= pool.MIN_ELEMENTS else 1):
            for f, tmp in zip(job.files, partials):
                stream = GGUFStream(tmp, f.arch, f.kvs, f.plan)
                try:
                    stream.write(source, on_bytes, workers)
                finally:
                    stream.abort()
        for f, tmp in zip(job.files, partials):
            os.replace(tmp, f.path)
    except OSError as e:
        _remove(partials)
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"{job.files[0].path.parent}: no space left on device; nothing was written") from None
        raise ConvertError(f"writing {job.files[0].path}: {e.strerror or e}") from None
    except BaseException:
        _remove(partials)
        raise
    finally:
        if ckpt is not None:
            ckpt.close()


def run_counted(job: Job, progress: Callable[[int, int], None], workers: int,
                chunks: ChunkSource | None = None) -> None:
    """run_job, its progress told as (bytes written, bytes in all)."""
    done = [0]

    def on_bytes(p: PlannedTensor, n: int) -> None:
        done[0] += n
        progress(done[0], job.nbytes)

    run_job(job, on_bytes, workers, chunks)


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
