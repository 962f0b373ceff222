"""`qvl inspect FILE.gguf`: metadata (long arrays summarised) and the tensor table of any GGUF."""

from __future__ import annotations

from collections import Counter
from typing import Any, TextIO

from gguf import GGUFValueType

from .gguf_file import GGUFFile, KeyValue

MAX_ITEMS = 6
MAX_CHARS = 72


def _short(text: str, full: bool) -> str:
    if full or len(text) <= MAX_CHARS:
        return repr(text)
    return f"{text[:MAX_CHARS]!r}... ({len(text)} chars)"


def format_value(kv: KeyValue, full: bool = False) -> str:
    v: Any = kv.value
    if kv.type == GGUFValueType.STRING:
        return _short(v, full)
    if kv.type == GGUFValueType.ARRAY:
        sub = kv.sub_type.name.lower() if kv.sub_type is not None else "?"
        shown = v if full else v[:MAX_ITEMS]
        items = ", ".join(_short(x, full) if isinstance(x, str) else f"{x:g}" if isinstance(x, float) else str(x)
                          for x in shown)
        more = "" if len(shown) == len(v) else ", ..."
        return f"[{items}{more}] ({len(v)} x {sub})"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def inspect_file(path: str, out: TextIO, full: bool = False) -> None:
    with GGUFFile(path) as f:
        split = len(f.parts) > 1
        parts = f" in {len(f.parts)} files ({', '.join(p.name for p in f.paths[1:])} after it)" if split else ""
        out.write(f"{f.path}: GGUF v{f.version}, {len(f.fields)} metadata keys, {len(f.tensors)} tensors{parts}, "
                  f"data at byte {f.data_start}\n\nmetadata:\n")
        width = max((len(k) for k in f.fields), default=0)
        for key, kv in f.fields.items():
            out.write(f"  {key:<{width}}  {kv.type.name.lower():<7} {format_value(kv, full)}\n")
        out.write("\ntensors:\n")
        nwidth = max((len(n) for n in f.tensors), default=0)
        twidth = max((len(t.type.name) for t in f.tensors.values()), default=0)  # IQ2_XXS: 7
        total = 0
        types: Counter[str] = Counter()
        for name, t in f.tensors.items():
            where = f"  part {t.part + 1}" if split else ""
            out.write(f"  {name:<{nwidth}}  {t.type.name:<{twidth}} {str(list(t.ne)):<24} "
                      f"{human_bytes(t.nbytes):>10}{where}\n")
            total += t.nbytes
            types[t.type.name] += 1
        mix = ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
        out.write(f"\n{len(f.tensors)} tensors, {human_bytes(total)} ({mix})\n")


def model_rows(text: GGUFFile, projector: GGUFFile | None) -> list[tuple[str, Any]]:
    """`qvl show`'s and the chat's `/show info` rows of a text model GGUF and its projector (if any):
    architecture, parameters, quantization, context and embedding lengths, projector."""
    from gguf import LlamaFileType

    arch = text.architecture
    ft = text.get("general.file_type")
    rows = [("architecture", arch), ("parameters", text.get("general.size_label", "?")),
            ("quantization", LlamaFileType(ft).name if ft is not None else "?"),
            ("context length", text.get(f"{arch}.context_length", "?")),
            ("embedding length", text.get(f"{arch}.embedding_length", "?"))]
    if projector is not None and projector is not text:
        rows.append(("projector", projector.get("clip.projector_type", projector.architecture)))
    elif arch == "qwen25vl":
        rows.append(("projector", "in the model file (Ollama layout)"))
    else:
        rows.append(("projector", "none (text only)"))
    return rows
