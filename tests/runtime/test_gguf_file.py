"""Our fast GGUF reader against gguf-py's GGUFReader (the independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from qvl.runtime.gguf_file import GGUFError, GGUFFile


def _reader_value(field):
    t = field.types
    if t[0] == GGUFValueType.ARRAY:
        if t[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def test_agrees_with_gguf_py(fixtures_dir, model):
    path = fixtures_dir / model / "llamacpp" / f"mmproj-{model}-f16.gguf"
    ref = GGUFReader(path)
    with GGUFFile(path) as ours:
        ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.fields) == list(ref_fields)
        for key, f in ref_fields.items():
            assert ours.fields[key].type == f.types[0], key
            assert ours.get(key) == pytest.approx(_reader_value(f)) if isinstance(ours.get(key), float) else \
                ours.get(key) == _reader_value(f), key
        assert [t.name for t in ref.tensors] == list(ours.tensors)
        for t in ref.tensors:
            mine = ours.tensors[t.name]
            assert mine.type == t.tensor_type and list(mine.ne) == t.shape.tolist()
            assert mine.offset == t.data_offset  # absolute in both
            assert ours.raw(t.name).tobytes() == np.asarray(t.data).tobytes()


def test_bad_files(tmp_path, fixtures_dir):
    with pytest.raises(GGUFError, match="not found"):
        GGUFFile(tmp_path / "none.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF"):
        GGUFFile(junk)
    src = (fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "mmproj-tiny-qwen2-vl-f16.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[: len(src) - 5000])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(cut)
    cut.write_bytes(src[:3000])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(cut)
