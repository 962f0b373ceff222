"""Compare two GGUF files: tensors (name, shape, type, bytes) and metadata (keys and values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType

# Descriptive keys whose values may differ between converters.
DESCRIPTIVE = {"general.name", "general.size_label", "general.basename", "general.finetune"}


def field_value(field):
    t = field.types
    if t[0] == GGUFValueType.ARRAY:
        if t[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def metadata(path: Path) -> dict:
    r = GGUFReader(path)
    return {k: (f.types, field_value(f)) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, t.shape.tolist(), np.asarray(t.data).tobytes()) for t in r.tensors}


def differences(ours: Path, theirs: Path) -> list[str]:
    problems = []
    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        problems.append(f"tensor names differ: only ours {sorted(set(a) - set(b))}, only theirs {sorted(set(b) - set(a))}")
    for name in sorted(set(a) & set(b)):
        ta, tb = a[name], b[name]
        if ta[0] != tb[0] or ta[1] != tb[1]:
            problems.append(f"{name}: ours {ta[0]} {ta[1]}, theirs {tb[0]} {tb[1]}")
        elif ta[2] != tb[2]:
            problems.append(f"{name}: tensor bytes differ")
    ma, mb = metadata(ours), metadata(theirs)
    if set(ma) != set(mb):
        problems.append(f"metadata keys differ: only ours {sorted(set(ma) - set(mb))}, only theirs {sorted(set(mb) - set(ma))}")
    for key in sorted(set(ma) & set(mb)):
        if key in DESCRIPTIVE:
            continue
        if ma[key] != mb[key]:
            va, vb = ma[key][1], mb[key][1]
            show = (str(va)[:80], str(vb)[:80])
            problems.append(f"{key}: ours {ma[key][0]} {show[0]!r}, theirs {mb[key][0]} {show[1]!r}")
    return problems
