"""A local, content-addressed model store laid out exactly like Ollama's.

    $QVL_MODELS (default ~/.qvl/models)
      manifests/<host>/<namespace>/<model>/<tag>   OCI image manifest (JSON)
      blobs/sha256-<64 hex>                        content, named by its sha256

A model is a `application/vnd.ollama.image.model` layer (the text GGUF), optionally a
`...projector` layer (the mmproj GGUF), `...adapter` layers (LoRA adapter GGUFs, applied at run
time) and `template` / `system` / `params` / `license` layers, plus a config blob. Blobs are
written to a temporary file, hashed, and renamed into place; the manifest is written last, so an
interrupted `create` leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .go_template import TemplateError
from .ollama_template import stored_template

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.ollama.image."

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?$")


class StoreError(ValueError):
    """A bad name, a missing model or a damaged store; the message says which."""


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        """Ollama's grammar: [host/][namespace/]model[:tag]."""
        if not text or text.startswith("/") or "\\" in text or ".." in text:
            raise StoreError(f"invalid model name {text!r}")
        name, tag = text, DEFAULT_TAG
        last = text.rsplit("/", 1)[-1]
        if ":" in last:
            name, tag = text.rsplit(":", 1)
        parts = name.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, (namespace, model) = DEFAULT_HOST, parts
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise StoreError(f"invalid model name {text!r}: at most host/namespace/model:tag")
        if not _HOST.match(host) or not _PART.match(namespace) or not _PART.match(model):
            raise StoreError(f"invalid model name {text!r}: empty part or characters outside [A-Za-z0-9._-]")
        if not _TAG.match(tag):
            raise StoreError(f"invalid tag {tag!r} in {text!r}")
        return cls(host, namespace, model, tag)

    def __str__(self) -> str:
        prefix = "" if self.host == DEFAULT_HOST else f"{self.host}/"
        ns = "" if self.namespace == DEFAULT_NAMESPACE and not prefix else f"{self.namespace}/"
        return f"{prefix}{ns}{self.model}:{self.tag}"

    @property
    def path(self) -> Path:
        return Path(self.host) / self.namespace / self.model / self.tag


@dataclass(frozen=True)
class Entry:
    name: ModelName
    manifest: dict[str, Any]
    digest: str
    modified: float

    @property
    def size(self) -> int:
        return sum(int(layer["size"]) for layer in self.manifest["layers"]) + int(self.manifest["config"]["size"])

    def layer(self, kind: str) -> dict[str, Any] | None:
        return next((x for x in self.manifest["layers"] if x["mediaType"] == LAYER + kind), None)


def default_root() -> Path:
    return Path(os.environ.get("QVL_MODELS", Path.home() / ".qvl" / "models")).expanduser()


class Store:
    def __init__(self, root: Path | None = None):
        self.root = root or default_root()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"

    def blob_path(self, digest: str) -> Path:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise StoreError(f"invalid digest {digest!r}")
        return self.blobs / digest.replace(":", "-")

    def _atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add_blob(self, source: Path | bytes) -> tuple[str, int]:
        """Copy a file (or bytes) into the store; returns (digest, size). Existing blobs are reused."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            digest = "sha256:" + hashlib.sha256(source).hexdigest()
            if not self.blob_path(digest).exists():
                self._atomic_write(self.blob_path(digest), source)
            return digest, len(source)
        source = Path(source)
        if source.parent.resolve() == self.blobs.resolve() and re.fullmatch(r"sha256-[0-9a-f]{64}", source.name):
            return source.name.replace("-", ":"), source.stat().st_size  # a blob of this store (FROM a stored model)
        try:
            with open(source, "rb") as src:
                digest, final = self._take(iter(lambda: src.read(16 << 20), b""))
        except FileNotFoundError:
            raise StoreError(f"{source}: file not found") from None
        return digest, final.stat().st_size

    def _take(self, chunks: Iterable[bytes], expect: str | None = None) -> tuple[str, Path]:
        """Write `chunks` to a temporary file in the blob folder, hashing them, then rename it to
        its digest (or drop it where that blob is there already); (digest, its path). With
        `expect`, a different digest is a StoreError and nothing is kept."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    h.update(chunk)
                    out.write(chunk)
            digest = "sha256:" + h.hexdigest()
            if expect is not None and digest != expect:
                raise StoreError(f"digest mismatch, expected {expect!r}, got {digest!r}")
            final = self.blob_path(digest)
            if final.exists():
                Path(tmp).unlink()
            else:
                os.replace(tmp, final)
            return digest, final
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def receive_blob(self, digest: str, chunks: Iterable[bytes]) -> None:
        """A blob sent by its digest (Ollama's POST /api/blobs/DIGEST): kept only where its
        bytes hash to `digest` (else a StoreError, nothing left behind)."""
        self.blob_path(digest)  # an invalid digest is refused before a byte is read
        self._take(chunks, expect=digest)

    def create(self, name: str, model: Path, mmproj: Path | None = None, template: str | None = None,
               params: dict[str, Any] | None = None, license_text: str | None = None,
               config: dict[str, Any] | None = None, system: str | None = None,
               messages: list[dict[str, str]] | tuple = (), adapters: Sequence[Path] = ()) -> Entry:
        parsed = ModelName.parse(name)
        try:
            stored_template(template, "TEMPLATE")  # one that would not render is refused, not stored
        except TemplateError as e:
            raise StoreError(str(e)) from None
        for p in [model] + ([mmproj] if mmproj else []) + list(adapters):
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise StoreError(f"{p}: not a GGUF file")
        merged = self._merged(Path(model))
        try:
            return self._create(parsed, merged or model, mmproj, template, params, license_text, config, system,
                                messages, adapters)
        finally:
            if merged is not None:
                merged.unlink(missing_ok=True)

    def scratch_path(self, prefix: str) -> Path:
        """A free name for a GGUF written in the store's folder (not there yet: run_job writes
        <name>.partial and renames it), on the blobs' file system."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=prefix, suffix=".gguf")
        os.close(fd)
        Path(tmp).unlink()
        return Path(tmp)

    def _merged(self, model: Path) -> Path | None:
        """A split model's parts joined into one file (llama-gguf-split --merge's) in the store's
        folder, to be stored as one blob; None for a model in one file."""
        from ..convert.errors import ConvertError
        from ..convert.gguf_split import plan_merge
        from ..convert.pipeline import ConvertOptions, run_job
        from ..convert.requantize import Requantize
        from .gguf_file import GGUFError, GGUFFile

        try:
            g = GGUFFile(model)
        except GGUFError as e:
            raise StoreError(str(e)) from None
        try:
            if len(g.parts) < 2:
                return None
            out = self.scratch_path(".merge-")
            copied = Requantize(g, frozenset(g.tensors))  # every tensor's bytes as they are
            run_job(plan_merge(g, out), lambda p, n: None, ConvertOptions.workers, copied.chunks)
            return out
        except ConvertError as e:
            raise StoreError(str(e)) from None
        finally:
            g.close()

    def _create(self, parsed: ModelName, model: Path, mmproj: Path | None, template: str | None,
                params: dict[str, Any] | None, license_text: str | None, config: dict[str, Any] | None,
                system: str | None, messages: list[dict[str, str]] | tuple, adapters: Sequence[Path] = ()) -> Entry:
        if config is None:
            from .gguf_file import GGUFError

            try:
                config = gguf_config(model)
            except GGUFError as e:
                raise StoreError(str(e)) from None
        layers = []
        for kind, src in (("model", model), ("projector", mmproj), *(("adapter", a) for a in adapters)):
            if src is not None:
                digest, size = self.add_blob(Path(src))
                layers.append({"mediaType": LAYER + kind, "digest": digest, "size": size})
        for kind, text in (("template", template), ("system", system), ("license", license_text)):
            if text is not None:
                digest, size = self.add_blob(text.encode())
                layers.append({"mediaType": LAYER + kind, "digest": digest, "size": size})
        if params is not None:
            digest, size = self.add_blob(json.dumps(params).encode())
            layers.append({"mediaType": LAYER + "params", "digest": digest, "size": size})
        if messages:  # Ollama's MESSAGE lines: [{"role", "content"}]
            digest, size = self.add_blob(json.dumps(list(messages)).encode())
            layers.append({"mediaType": LAYER + "messages", "digest": digest, "size": size})
        cfg = {"model_format": "gguf", "architecture": "amd64", "os": "linux", **(config or {}),
               "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}}
        cdigest, csize = self.add_blob(json.dumps(cfg).encode())
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                    "config": {"mediaType": CONFIG_TYPE, "digest": cdigest, "size": csize}, "layers": layers}
        self.write_manifest(parsed, manifest)
        return self.get(str(parsed))

    def text(self, entry: Entry, kind: str) -> str | None:
        """The text of a model's `kind` layer (template, system, license, params), or None."""
        layer = entry.layer(kind)
        if layer is None:
            return None
        try:
            return self.blob_path(layer["digest"]).read_text(errors="replace")
        except FileNotFoundError:
            raise StoreError(f"{self.blob_path(layer['digest'])}: blob missing from the store "
                             "(pull the model again)") from None

    def params(self, entry: Entry) -> dict[str, Any]:
        """A model's params layer as JSON ({} without one)."""
        text = self.text(entry, "params")
        try:
            params = json.loads(text) if text is not None else {}
        except json.JSONDecodeError:
            params = None
        if not isinstance(params, dict):
            raise StoreError(f"model {str(entry.name)!r}: damaged params layer")
        return params

    def messages(self, entry: Entry) -> list[dict[str, str]]:
        """A model's messages layer ([] without one): the conversation its prompts follow."""
        text = self.text(entry, "messages")
        try:
            messages = json.loads(text) if text is not None else []
        except json.JSONDecodeError:
            messages = None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise StoreError(f"model {str(entry.name)!r}: damaged messages layer")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def write_manifest(self, name: ModelName, manifest: dict[str, Any]) -> None:
        self._atomic_write(self.manifests / name.path, json.dumps(manifest).encode())

    def get(self, name: str) -> Entry:
        parsed = ModelName.parse(name)
        path = self.manifests / parsed.path
        try:
            raw = path.read_bytes()
            manifest = json.loads(raw)
        except FileNotFoundError:
            raise StoreError(f"model {str(parsed)!r} not found in {self.root}") from None
        except json.JSONDecodeError:
            raise StoreError(f"{path}: damaged manifest") from None
        return Entry(parsed, manifest, "sha256:" + hashlib.sha256(raw).hexdigest(), path.stat().st_mtime)

    def list(self) -> list[Entry]:
        out = []
        if not self.manifests.is_dir():
            return out
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if path.is_file() and not path.name.startswith(".partial-"):
                host, ns, model, tag = path.relative_to(self.manifests).parts
                out.append(self.get(f"{host}/{ns}/{model}:{tag}"))
        return out

    def resolve(self, name: str) -> tuple[Path, Path | None]:
        """(model GGUF, projector GGUF or None) of a stored model."""
        entry = self.get(name)
        model = entry.layer("model")
        if model is None:
            raise StoreError(f"model {str(entry.name)!r} has no model layer")
        proj = entry.layer("projector")
        return self._stored_blob(model), (self._stored_blob(proj) if proj else None)

    def adapters(self, entry: Entry) -> list[Path]:
        """A model's adapter GGUFs, in their layers' order (Ollama's ADAPTER lines)."""
        return [self._stored_blob(x) for x in entry.manifest["layers"] if x["mediaType"] == LAYER + "adapter"]

    def _stored_blob(self, layer: dict[str, Any]) -> Path:
        """A layer's blob, a StoreError where the store lacks it."""
        path = self.blob_path(layer["digest"])
        if not path.exists():
            raise StoreError(f"{path}: blob missing from the store (pull the model again)")
        return path

    def copy(self, src: str, dst: str) -> Entry:
        entry = self.get(src)
        target = ModelName.parse(dst)
        self.write_manifest(target, entry.manifest)
        return self.get(str(target))

    def remove(self, name: str) -> list[str]:
        """Delete a manifest, then every blob no remaining manifest uses; returns removed digests."""
        entry = self.get(name)
        (self.manifests / entry.name.path).unlink()
        for parent in list((self.manifests / entry.name.path).parents)[:3]:
            try:
                parent.rmdir()
            except OSError:
                break
        used = set()
        for e in self.list():
            used.add(e.manifest["config"]["digest"])
            used.update(x["digest"] for x in e.manifest["layers"])
        removed = []
        for layer in entry.manifest["layers"] + [entry.manifest["config"]]:
            if layer["digest"] not in used and self.blob_path(layer["digest"]).exists():
                self.blob_path(layer["digest"]).unlink()
                removed.append(layer["digest"])
        return removed


def gguf_config(model: Path) -> dict[str, Any]:
    """The config blob's description of a model GGUF, as Ollama writes it (family, size, file type)."""
    from gguf import LlamaFileType

    from .gguf_file import GGUFFile

    with GGUFFile(model) as g:
        ft = g.get("general.file_type")
        return {"model_family": g.architecture, "model_families": [g.architecture],
                "model_type": g.get("general.size_label", ""),
                "file_type": LlamaFileType(ft).name.replace("MOSTLY_", "").replace("ALL_", "") if ft is not None else ""}


def human_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))

