"""Our fast GGUF reader against gguf-py's GGUFReader (the independent oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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


def test_a_split_model_reads_as_one(fixtures_dir, tmp_path):
    """A model in 4 parts (gguf-py's split writer, as convert_hf_to_gguf.py --split-max-tensors
    writes one; llama.cpp reads these, docs/benchmarks.md) opened by its first part: every tensor
    of the whole file, the same bytes, the metadata the first part's; the parts' faults named."""
    import shutil

    from gguf_compare import differences, split_gguf

    src = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
    parts = split_gguf(src, tmp_path / "m.gguf", 12)
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    with GGUFFile(parts[0]) as g, GGUFFile(src) as whole:
        assert g.paths == parts and {t.part for t in g.tensors.values()} == {0, 1, 2, 3}
        assert len(g.tensors) == len(whole.tensors) == g.get("split.tensors.count")
    assert differences(parts[0], src) == [
        "metadata keys differ: only ours ['split.count', 'split.no', 'split.tensors.count'], only theirs []"]
    with pytest.raises(GGUFError, match="part 2 of 4 of a split model: open its first part, m-00001-of-00004.gguf"):
        GGUFFile(parts[1])
    renamed = tmp_path / "other.gguf"
    shutil.copy(parts[0], renamed)
    with pytest.raises(GGUFError, match="its name must be NAME-00001-of-00004.gguf"):
        GGUFFile(renamed)
    parts[2].rename(tmp_path / "gone.gguf")
    with pytest.raises(GGUFError, match="m-00003-of-00004.gguf: file not found"):
        GGUFFile(parts[0])
    (tmp_path / "gone.gguf").rename(parts[2])
    shutil.copy(parts[3], parts[2])  # part 4 where part 3 should be
    with pytest.raises(GGUFError, match="m-00003-of-00004.gguf: part 4 of 4 of a split model, not part 3"):
        GGUFFile(parts[0])


def test_a_split_model_runs_as_the_whole(fixtures_dir, tmp_path):
    """Loaded by its first part, the 4-part model's logits are the whole file's, bit for bit."""
    from gguf_compare import split_gguf
    from qvl.runtime.loader import load

    src = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
    first = split_gguf(src, tmp_path / "m.gguf", 12)[0]
    want = load(src, device="cpu").prompt_logits("Tell me a story about a fox.")
    got = load(first, device="cpu").prompt_logits("Tell me a story about a fox.")
    assert got.shape == want.shape and torch.equal(got, want)
