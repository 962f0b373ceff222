"""`qvl gguf-split` (convert/gguf_split.py): llama-gguf-split's rules for where a part ends, its
metadata in each part, its merge; the parts read back as the whole (byte-identical files to
llama-gguf-split's own: docs/benchmarks.md); refusals in one line, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from typer.testing import CliRunner

from gguf_compare import differences
from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile

runner = CliRunner()
SPLIT = ["split.no", "split.tensors.count", "split.count"]


@pytest.fixture
def model(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"  # 38 tensors


def _split(*args: str) -> None:
    r = runner.invoke(app, ["gguf-split", *args, "-q"])
    assert r.exit_code == 0, r.output


def test_split_by_tensors_and_merge(model, tmp_path):
    _split("--split-max-tensors", "12", str(model), str(tmp_path / "t"))
    parts = [tmp_path / f"t-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert sorted(tmp_path.iterdir()) == parts
    with GGUFFile(model) as whole:
        keys, names = list(whole.fields), list(whole.tensors)
    with GGUFFile(parts[0]) as g:  # the first part's metadata: the whole file's, then the split keys
        assert list(g.fields) == keys + SPLIT and [g.get(k) for k in SPLIT] == [0, 38, 4]
        held = [[n for n, t in g.tensors.items() if t.part == i] for i in range(4)]
    assert held[0] == names[:12]
    for i, p in enumerate(parts[1:], 1):  # the others alone, read by gguf-py's reader: the split keys only
        r = GGUFReader(p)
        assert list(r.fields)[3:] == SPLIT and [int(r.fields[k].parts[-1][0]) for k in SPLIT] == [i, 38, 4]
        assert [t.name for t in r.tensors] == held[i] == names[12 * i:12 * (i + 1)]
    assert differences(parts[0], model) == [f"metadata keys differ: only ours {sorted(SPLIT)}, only theirs []"]
    _split("--merge", str(parts[0]), str(tmp_path / "m.gguf"))
    with GGUFFile(tmp_path / "m.gguf") as m:
        assert list(m.fields) == keys + SPLIT and m.get("split.count") == 0 and len(m.parts) == 1
    assert differences(tmp_path / "m.gguf", model) == [
        f"metadata keys differ: only ours {sorted(SPLIT)}, only theirs []"]


def _sized(path, floats: list[int]) -> None:
    """A GGUF of F32 vectors of these lengths."""
    w = GGUFWriter(path, "qwen2vl")
    for i, n in enumerate(floats):
        w.add_tensor(f"t{i}", np.zeros(n, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("first_alone", [False, True])
def test_split_by_size(tmp_path, first_alone):
    """A new part before the tensor that would take its tensors (each padded to 32 bytes) past
    the size; --no-tensor-first-split: the first part holds the metadata alone (padded to 32)."""
    floats = [175_000, 175_001, 100_000, 400_000, 600_000, 10, 7, 250_000, 249_993]
    _sized(tmp_path / "in.gguf", floats)
    sizes = [-(-4 * n // 32) * 32 for n in floats]
    (tmp_path / "parts").mkdir()
    _split("--split-max-size", "2M", *(["--no-tensor-first-split"] if first_alone else []), str(tmp_path / "in.gguf"),
           str(tmp_path / "parts" / "s"))
    parts = sorted((tmp_path / "parts").iterdir())
    groups = [[int(t.name[1:]) for t in GGUFReader(p).tensors] for p in parts]
    if first_alone:
        assert groups[0] == [] and parts[0].stat().st_size % 32 == 0
        groups = groups[1:]
    # 1,800,032 + 1,600,000 > 2,000,000; t4's 2,400,000 alone; 64 + 32 + 1,000,000 + 1,000,000 > it
    assert groups == [[0, 1, 2], [3], [4], [5, 6, 7], [8]]  # llama-gguf-split's parts of this file
    for a, b in zip(groups, groups[1:]):
        assert sum(sizes[i] for i in a) <= 2_000_000 or len(a) == 1
        assert sum(sizes[i] for i in a) + sizes[b[0]] > 2_000_000


def test_refusals(model, tmp_path):
    out = tmp_path / "t"
    for args, expect in ((["--merge", str(model), str(tmp_path / "m.gguf")], "not a split model's first part"),
                         (["--split-max-size", "4T", str(model), str(out)], "a positive whole number and M or G"),
                         (["--split-max-size", "0M", str(model), str(out)], "a positive whole number"),
                         (["--split-max-tensors", "2", "--split-max-size", "1G", str(model), str(out)], "one of them"),
                         (["--split-max-tensors", "0", str(model), str(out)], "1 or more"),
                         (["--merge", "--split-max-tensors", "2", str(model), str(out)], "--merge: not with"),
                         (["--split-max-size", "1M", "--no-tensor-first-split", str(model), str(out)],
                          "'token_embd.weight' alone is over it")):
        r = runner.invoke(app, ["gguf-split", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, (args, r.output)
        assert list(tmp_path.iterdir()) == []
    _split("--split-max-tensors", "20", str(model), str(out))
    r = runner.invoke(app, ["gguf-split", "--split-max-tensors", "20", str(model), str(out)])
    assert r.exit_code == 2 and "already exists (use --force" in r.stderr
    r = runner.invoke(app, ["gguf-split", str(tmp_path / "t-00001-of-00002.gguf"), str(tmp_path / "again")])
    assert r.exit_code == 2 and "a split model already" in r.stderr
