"""Importance matrix files (convert/imatrix.py) read as llama-quantize reads them: llama-imatrix's
GGUF (sums over counts, 1 where a count is 0) and its legacy .dat (values over ncall), the
datasets and chunk count kept; files that are not whole, of another model or not finite refused
with one line, before anything is written."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from imatrix_files import write_imatrix
from qvl.convert.errors import ConvertError
from qvl.convert.imatrix import read_imatrix
from qvl.runtime.cli import app


def _dat(entries: dict[str, tuple[int, np.ndarray]], tail: bytes = b"") -> bytes:
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += values.astype(np.float32).tobytes()
    return out + tail


def test_gguf_values_are_sums_over_counts(tmp_path):
    path = tmp_path / "m.imatrix.gguf"
    write_imatrix(path, {"blk.0.ffn_up.weight": (np.array([2.0, 4.0, 6.0]), [2.0]),
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
    write_imatrix(p, {"a.weight": (np.ones(2), [1.0])}, keys=False)
    cases.append((p, "without imatrix.datasets"))
    p = tmp_path / "nocounts.gguf"
    write_imatrix(p, {"a.weight": (np.ones(2), None)})
    cases.append((p, "'a.weight' has no .counts"))
    p = tmp_path / "nan.gguf"
    write_imatrix(p, {"a.weight": (np.array([1.0, np.nan]), [1.0])})
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
    write_imatrix(wrong, {"blk.0.attn_q.weight": (np.ones(128), [1.0])})
    write_imatrix(unrelated, {"blk.99.attn_q.weight": (np.ones(64), [1.0])})
    for matrix, expect in ((wrong, "128 values for 'blk.0.attn_q.weight', whose rows are 64 long"),
                           (unrelated, "no tensor of the model is in it")):
        out = tmp_path / "out.gguf"
        r = CliRunner().invoke(app, ["quantize", str(model), "q4_k_m", "-o", str(out), "--imatrix", str(matrix)])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists() and not any(p.name.startswith("out.gguf") for p in tmp_path.iterdir())


def test_include_and_exclude_weights(tmp_path, fixtures_dir):
    """llama-quantize's filters: entries whose name holds an excluded string dropped, then only those
    holding an included one kept (the entries count says how many); none left: no matrix at all."""
    from qvl.runtime.gguf_file import GGUFFile

    model = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"  # 3 layers, 64-wide
    matrix = tmp_path / "m.gguf"
    rng = np.random.default_rng(1)
    write_imatrix(matrix, {f"blk.{i}.{n}.weight": (np.exp(rng.normal(0, 2, 320 if n == "ffn_down" else 64)), [1.0])
                   for i in range(3) for n in ("attn_q", "attn_v", "ffn_up", "ffn_down")})
    runs = {"plain": [], "all": ["--imatrix", str(matrix)],
            "ffn": ["--imatrix", str(matrix), "--include-weights", "ffn"],
            "no_v": ["--imatrix", str(matrix), "--exclude-weights", "attn_v", "--exclude-weights", "blk.2"],
            "none": ["--imatrix", str(matrix), "--include-weights", "nothing"]}
    files = {}
    for name, args in runs.items():
        files[name] = tmp_path / f"{name}.gguf"
        r = CliRunner().invoke(app, ["quantize", str(model), "q4_0", "-o", str(files[name]), "-q", *args])
        assert r.exit_code == 0, r.output
    g = {name: GGUFFile(path) for name, path in files.items()}
    assert [g[n].get("quantize.imatrix.entries_count") for n in runs] == [None, 12, 6, 6, None]

    def same(a: str, b: str, tensor: str) -> bool:
        return bool((g[a].raw(tensor) == g[b].raw(tensor)).all())

    assert not same("all", "plain", "blk.0.attn_q.weight") and not same("all", "plain", "blk.0.ffn_up.weight")
    assert same("ffn", "plain", "blk.0.attn_q.weight") and same("ffn", "all", "blk.0.ffn_up.weight")
    assert same("no_v", "plain", "blk.0.attn_v.weight") and same("no_v", "plain", "blk.2.ffn_up.weight")
    assert same("no_v", "all", "blk.1.attn_q.weight")
    assert files["none"].read_bytes() == files["plain"].read_bytes()


def test_override_kv():
    from gguf import GGUFValueType as V

    from qvl.convert.requantize import kv_override

    assert (kv_override("general.name=str:mine").value, kv_override("general.name=str:mine").vtype) == ("mine", V.STRING)
    assert (kv_override("a.b=int:-7").value, kv_override("a.b=int:-7").vtype) == (7, V.UINT32)  # llama-quantize's abs
    assert kv_override("a.f=float:0.5").value == 0.5 and kv_override("a.t=bool:true").value is True
    for bad, expect in (("nokey", "KEY=TYPE:VALUE"), ("a=str", "KEY=TYPE:VALUE"), ("a=int:x", "'x' is not a int"),
                        ("a=bool:yes", "true or false"), ("a=str:" + "x" * 128, "at most 127"),
                        ("a=list:1", "TYPE is int, float, bool or str")):
        with pytest.raises(ConvertError, match=expect):
            kv_override(bad)
