"""Importance matrix files (convert/imatrix.py) read as llama-quantize reads them: llama-imatrix's
GGUF (sums over counts, 1 where a count is 0) and its legacy .dat (values over ncall), the
datasets and chunk count kept; files that are not whole, of another model or not finite refused
with one line, before anything is written."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter
from typer.testing import CliRunner

from qvl.convert.errors import ConvertError
from qvl.convert.imatrix import read_imatrix
from qvl.runtime.cli import app


def _gguf(path, entries: dict[str, tuple[np.ndarray, list[float]]], keys: bool = True) -> None:
    w = GGUFWriter(path, "imatrix")
    w.kv_data[0].pop("general.architecture", None)
    if keys:
        w.add_key_value("imatrix.datasets", ["wiki.txt"], GGUFValueType.ARRAY, GGUFValueType.STRING)
        w.add_key_value("imatrix.chunk_count", 7, GGUFValueType.UINT32)
        w.add_key_value("imatrix.chunk_size", 512, GGUFValueType.UINT32)
    for name, (sums, counts) in entries.items():
        if sums is not None:
            w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        if counts is not None:
            w.add_tensor(f"{name}.counts", np.array(counts, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _dat(entries: dict[str, tuple[int, np.ndarray]], tail: bytes = b"") -> bytes:
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += values.astype(np.float32).tobytes()
    return out + tail


def test_gguf_values_are_sums_over_counts(tmp_path):
    path = tmp_path / "m.imatrix.gguf"
    _gguf(path, {"blk.0.ffn_up.weight": (np.array([2.0, 4.0, 6.0]), [2.0]),
                 "blk.1.ffn_up.weight": (np.array([5.0, 7.0]), [0.0]),
                 "blk.2.ffn_up.weight": (np.array([[1.0, 2.0], [9.0, 12.0]]), [1.0, 3.0])})  # two experts
    m = read_imatrix(path)
    assert m.values["blk.0.ffn_up.weight"].tolist() == [1.0, 2.0, 3.0]
    assert m.values["blk.1.ffn_up.weight"].tolist() == [1.0, 1.0]  # count 0: llama-quantize's 1
    assert m.values["blk.2.ffn_up.weight"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert m.datasets == ("wiki.txt",) and m.chunk_count == 7


def test_legacy_values_are_over_ncall(tmp_path):
    path = tmp_path / "m.dat"
    tail = struct.pack("<ii", 12, 8) + b"wiki.txt"
    path.write_bytes(_dat({"blk.0.attn_q.weight": (4, np.array([4.0, 8.0])), "output.weight": (0, np.array([3.0]))},
                          tail))
    m = read_imatrix(path)
    assert m.values == {"blk.0.attn_q.weight": pytest.approx(np.array([1.0, 2.0])), "output.weight": [3.0]}
    assert m.chunk_count == 12 and m.datasets == ("wiki.txt",)
    path.write_bytes(_dat({"blk.0.attn_q.weight": (1, np.array([4.0]))}))  # no trailing chunk count or name
    assert read_imatrix(path).chunk_count == 0


def test_bad_files_are_refused(tmp_path):
    cases = []
    p = tmp_path / "nokeys.gguf"
    _gguf(p, {"a.weight": (np.ones(2), [1.0])}, keys=False)
    cases.append((p, "without imatrix.datasets"))
    p = tmp_path / "nocounts.gguf"
    _gguf(p, {"a.weight": (np.ones(2), None)})
    cases.append((p, "'a.weight' has no .counts"))
    p = tmp_path / "nan.gguf"
    _gguf(p, {"a.weight": (np.array([1.0, np.nan]), [1.0])})
    cases.append((p, "not finite"))
    p = tmp_path / "short.dat"
    p.write_bytes(_dat({"a.weight": (1, np.ones(4))})[:-3])
    cases.append((p, "cut short"))
    p = tmp_path / "text.dat"
    p.write_bytes(b"hello, not a matrix at all")
    cases.append((p, "not an importance matrix"))
    cases.append((tmp_path / "none.dat", "No such file"))
    for path, expect in cases:
        with pytest.raises(ConvertError, match=expect):
            read_imatrix(path)


def test_quantize_refuses_another_models_matrix(tmp_path, fixtures_dir):
    model = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"  # 64-wide rows
    wrong, unrelated = tmp_path / "wrong.gguf", tmp_path / "unrelated.gguf"
    _gguf(wrong, {"blk.0.attn_q.weight": (np.ones(128), [1.0])})
    _gguf(unrelated, {"blk.99.attn_q.weight": (np.ones(64), [1.0])})
    for matrix, expect in ((wrong, "128 values for 'blk.0.attn_q.weight', whose rows are 64 long"),
                           (unrelated, "no tensor of the model is in it")):
        out = tmp_path / "out.gguf"
        r = CliRunner().invoke(app, ["quantize", str(model), "q4_k_m", "-o", str(out), "--imatrix", str(matrix)])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists() and not any(p.name.startswith("out.gguf") for p in tmp_path.iterdir())
