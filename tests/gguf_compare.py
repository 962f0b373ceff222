"""Compare two GGUF files: tensors (name, shape, type, bytes) and metadata (keys, types, values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qvl.runtime.gguf_file import GGUFFile

# Descriptive keys whose values may differ between converters.
DESCRIPTIVE = {"general.name", "general.size_label", "general.basename", "general.finetune"}


def differences(ours: Path, theirs: Path) -> list[str]:
    problems = []
    with GGUFFile(ours) as fa, GGUFFile(theirs) as fb:
        a, b = fa.tensors, fb.tensors
        if set(a) != set(b):
            problems.append(f"tensor names differ: only ours {sorted(set(a) - set(b))}, only theirs {sorted(set(b) - set(a))}")
        for name in sorted(set(a) & set(b)):
            ta, tb = a[name], b[name]
            if ta.type != tb.type or ta.ne != tb.ne:
                problems.append(f"{name}: ours {ta.type.name} {list(ta.ne)}, theirs {tb.type.name} {list(tb.ne)}")
            elif fa.raw(name).tobytes() != fb.raw(name).tobytes():
                problems.append(f"{name}: tensor bytes differ")
        ma, mb = fa.fields, fb.fields
        if set(ma) != set(mb):
            problems.append(f"metadata keys differ: only ours {sorted(set(ma) - set(mb))}, only theirs {sorted(set(mb) - set(ma))}")
        for key in sorted((set(ma) & set(mb)) - DESCRIPTIVE):
            if ma[key] != mb[key]:
                problems.append(f"{key}: ours {str(ma[key])[:120]}, theirs {str(mb[key])[:120]}")
    return problems


def split_gguf(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """`src` written again as a split model (gguf-py's writer, as convert_hf_to_gguf.py
    --split-max-tensors writes one): OUT's stem-0000i-of-0000N.gguf, the metadata in the first."""
    from gguf import GGUFValueType, GGUFWriter

    with GGUFFile(src) as g:
        w = GGUFWriter(out, g.architecture or "", split_max_tensors=max_tensors)
        for key, kv in g.fields.items():
            if key not in ("general.architecture", "general.alignment"):
                w.add_key_value(key, kv.value, kv.type, kv.sub_type if kv.type == GGUFValueType.ARRAY else None)
        for name, t in g.tensors.items():
            w.add_tensor(name, np.array(g.raw(name)), raw_dtype=t.type)  # bytes: rows x row bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


def as_qwen2(src: Path, out: Path) -> Path:
    """A Qwen2-VL text GGUF written again as llama.cpp's text-only `qwen2` (a Qwen2 / Qwen2.5 LLM's
    layout: the same tensors and tokenizer, `qwen2.*` keys, no rope sections). Returns `out`."""
    from gguf import GGUFValueType, GGUFWriter

    with GGUFFile(src) as g:
        arch = g.architecture or ""
        w = GGUFWriter(out, "qwen2")
        for key, kv in g.fields.items():
            if key in ("general.architecture", "general.alignment", f"{arch}.rope.dimension_sections"):
                continue
            name = "qwen2" + key[len(arch):] if key.startswith(arch + ".") else key
            w.add_key_value(name, kv.value, kv.type, kv.sub_type if kv.type == GGUFValueType.ARRAY else None)
        for name, t in g.tensors.items():
            w.add_tensor(name, np.array(g.raw(name)), raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
