"""Where `qvl pull NAME` gets a model from.

- `ollama://model:tag`: a local Ollama install ($OLLAMA_MODELS, default ~/.ollama/models); its
  blobs are hard-linked into our store (copied across file systems), nothing is downloaded.
- `hf.co/<org>/<repo>:<quant>`: a Hugging Face repo. One that holds GGUF files is downloaded as
  is (the model file whose name contains the quant, plus its mmproj); a checkpoint is downloaded
  and converted with qvl-convert to that quant.
- Short aliases of the official models, `qwen2.5-vl:3b`, `qwen2-vl:7b-q8_0`..., resolve to the
  Hugging Face checkpoints (default quant q4_k_m).
- Anything else: an OCI / Ollama registry (registry.py).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..convert.official import HUB_REPOS
from ..convert.plan import CONVERT_TYPES
from .store import ModelName, Store, StoreError

QUANTS = CONVERT_TYPES  # qvl-convert's --type choices
DEFAULT_QUANT = "q4_k_m"


def alias_source(text: str) -> tuple[str, str] | None:
    """`qwen2.5-vl:3b[-quant]` -> (hub repo, quant), or None when `text` is not an alias."""
    m = re.fullmatch(r"(qwen2\.5-vl|qwen2-vl):(\d+b)(?:-([a-z0-9_]+))?", text.lower())
    if not m:
        return None
    key = f"{m.group(1)}-{m.group(2)}"
    if key not in HUB_REPOS:
        raise StoreError(f"{text}: no official model {key}; known: {', '.join(sorted(HUB_REPOS))}")
    quant = m.group(3) or DEFAULT_QUANT
    if quant not in QUANTS:
        raise StoreError(f"{text}: quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    return HUB_REPOS[key], quant


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".partial")
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def import_ollama(text: str, store: Store) -> ModelName:
    name = ModelName.parse(text)
    root = Path(os.environ.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models")).expanduser()
    theirs = Store(root)
    entry = theirs.get(str(name))
    for layer in entry.manifest["layers"] + [entry.manifest["config"]]:
        src = theirs.blob_path(layer["digest"])
        if not src.exists():
            raise StoreError(f"{src}: blob missing from the Ollama store")
        store.blobs.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, store.blob_path(layer["digest"]))
    store.write_manifest(name, entry.manifest)
    return name


def pull_hf(repo: str, quant: str, store_name: str, store: Store,
            progress: Callable[[str], None] | None = None) -> ModelName:
    """A GGUF repo downloaded as is, or a checkpoint converted; stored under `store_name`."""
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - a dependency
        raise StoreError("huggingface_hub is not installed") from None
    try:
        files = list_repo_files(repo)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise StoreError(f"hf.co/{repo}: cannot reach the Hugging Face hub ({type(e).__name__})") from None
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        models = [f for f in ggufs if "mmproj" not in f.lower() and quant.lower() in f.lower()]
        if not models:
            raise StoreError(f"hf.co/{repo}: no GGUF file matching {quant!r} among {ggufs}")
        projs = [f for f in ggufs if "mmproj" in f.lower()]
        proj = next((p for p in projs if "f16" in p.lower()), projs[0] if projs else None)
        model_path = Path(hf_hub_download(repo, models[0]))
        proj_path = Path(hf_hub_download(repo, proj)) if proj else None
        store.create(store_name, model_path, proj_path)
        return ModelName.parse(store_name)
    from ..convert.errors import ConvertError
    from ..convert.pipeline import ConvertOptions, check_destination, plan_job, run_job

    with tempfile.TemporaryDirectory(dir=store.root if store.root.exists() else None) as tmp:
        out = Path(tmp) / "model.gguf"
        try:
            job = plan_job(ConvertOptions(source=repo, out=out, type=quant))
            check_destination(job, force=True)
            if progress:
                progress(f"converting {repo} to {quant}")
            run_job(job, lambda p, n: None, workers=max(1, min(4, os.cpu_count() or 1)))
        except ConvertError as e:
            raise StoreError(str(e)) from None
        store.create(store_name, out, job.files[1].path if len(job.files) > 1 else None,
                     config={"model_family": job.files[0].arch, "file_type": quant.upper()})
    return ModelName.parse(store_name)


def pull_any(text: str, store: Store, insecure: bool = False,
             progress: Callable[[int, int], None] | None = None) -> ModelName:
    if text.startswith("ollama://"):
        return import_ollama(text[len("ollama://"):], store)
    alias = alias_source(text)
    if alias is not None:
        return pull_hf(alias[0], alias[1], text, store)
    name = ModelName.parse(text)
    if name.host in ("hf.co", "huggingface.co"):
        quant = name.tag if name.tag != "latest" else DEFAULT_QUANT
        return pull_hf(f"{name.namespace}/{name.model}", quant, text, store)
    from .registry import pull

    return pull(text, store, insecure, progress)

def stored_or_pulled(text: str) -> tuple[Path, Path | None] | None:
    """The (model, projector or None) GGUF blobs of a store name (qwen2.5-vl:3b, library/x:tag,
    host/ns/x:tag), pulled first when the store lacks it; None when `text` is not a store name."""
    try:
        ModelName.parse(text)
    except StoreError:
        return None
    store = Store()
    try:
        store.get(text)
    except StoreError:
        pull_any(text, store)
    return store.resolve(text)


def pull_with_progress(text: str, store: Store, insecure: bool = False) -> ModelName:
    """pull_any with a byte progress bar on stderr when it is a terminal (piped, the bar's closing
    line would come before the error message or the caller's own output)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    console = Console(stderr=True)
    bar = Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True, console=console,
                   disable=not console.is_terminal)
    with bar:
        task = bar.add_task("pull", total=None)
        return pull_any(text, store, insecure, lambda got, total: bar.update(task, completed=got, total=total))
