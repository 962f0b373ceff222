"""`qvl imatrix` (runtime/imatrix.py, imatrix_cli.py): every decoder matrix's sum of squared inputs
equal to transformers' (forward hooks on the same tiny float32 model's Linear layers, the same
chunks; float32 on both sides: within 1e-4 relative for the order of the sums, measured equal), the
counts the tokens read, the file llama-imatrix's layout that `qvl quantize --imatrix` takes, and
one-line errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qvl.convert.imatrix import read_imatrix
from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.imatrix import ImatrixError, Sums, collect, merge
from qvl.runtime.loader import load
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=13)
SUM_TOL = 1e-4  # relative: the same float32 products, summed in whatever order (measured: equal)
HF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
      "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
      "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    return to_gguf(make_checkpoint(d / "ckpt", SPEC), d / "m-f32.gguf", "f32", "f32")


def _reference(ids: list[int], ctx: int, n_chunks: int) -> dict[str, np.ndarray]:
    """Sums of squared inputs of each text Linear over the chunks, by GGUF name (transformers)."""
    model = build_model(SPEC).float().eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        m = re.search(r"language_model\.layers\.(\d+)\.(.+)$", name)
        if m is None or m.group(2) not in HF:
            continue
        key = f"blk.{m.group(1)}.{HF[m.group(2)]}.weight"

        def hook(_mod, inputs, _out, key=key):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.square().sum(0)

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for c in range(n_chunks):
            model(input_ids=torch.tensor(ids[c * ctx:(c + 1) * ctx])[None])
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def test_sums_equal_transformers(tiny):
    ids = torch.randint(0, 1000, (3 * 40 + 9,), generator=torch.Generator().manual_seed(3)).tolist()
    model = load(tiny, device="cpu")
    seen = []
    sums = collect(model, ids, 40, 3, each=lambda i, n: seen.append((i, n)))
    want = _reference(ids, 40, 3)
    assert seen == [(0, 3), (1, 3), (2, 3)] and sorted(sums.squares) == sorted(want)
    assert len(want) == 7 * SPEC.layers
    for name, w in want.items():
        got = sums.squares[name].numpy()
        assert np.abs(got - w).max() <= SUM_TOL * np.abs(w).max(), name
        assert sums.rows[name] == 120
    assert collect(model, ids, 40, 1, output=True).rows["output.weight"] == 40  # its input is the final norm's


def test_products_of_fewer_than_16_rows_are_not_counted(tiny):
    model = load(tiny, device="cpu")
    ids = list(range(100, 130))
    with pytest.raises(ImatrixError, match="no input reached blk.0.attn_q.weight"):
        collect(model, ids, 15, 2)
    assert collect(model, ids, 16, 1).rows["blk.0.attn_q.weight"] == 16


def test_the_file_and_quantize_with_it(tiny, tmp_path):
    text = tmp_path / "calibration.txt"
    words = "a page of text about cats dogs hills and the weather over the sea".split()
    text.write_text(" ".join(np.random.default_rng(8).choice(words, 300)), encoding="utf-8")
    out = tmp_path / "m.imatrix.gguf"
    r = CliRunner().invoke(app, ["imatrix", str(tiny), "-f", str(text), "-c", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"written to {out}" in r.stderr and "[1/" in r.stderr
    g = GGUFFile(out)
    assert g.get("general.type") == "imatrix" and g.get("imatrix.datasets") == [str(text)]
    n = g.get("imatrix.chunk_count")
    assert g.get("imatrix.chunk_size") == 64 and n >= 2 and "general.architecture" not in g.fields
    names = sorted(g.tensors)
    assert names[:2] == ["blk.0.attn_k.weight.counts", "blk.0.attn_k.weight.in_sum2"]
    assert g.tensors["blk.0.ffn_down.weight.in_sum2"].ne == (SPEC.intermediate,)
    counts = g.raw("blk.0.ffn_down.weight.counts").view(np.float32)
    assert counts.tolist() == [64.0 * n]
    g.close()
    matrix = read_imatrix(out)
    assert len(matrix.values) == 7 * SPEC.layers and matrix.chunk_count == n
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    for path, extra in ((plain, []), (weighted, ["--imatrix", str(out)])):
        q = CliRunner().invoke(app, ["quantize", str(tiny), "q4_k_m", "-o", str(path), "-q", *extra])
        assert q.exit_code == 0, q.output
    a, b = GGUFFile(plain), GGUFFile(weighted)
    assert list(b.fields)[-4:] == ["quantize.imatrix.file", "quantize.imatrix.dataset",
                                   "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"]
    assert (b.get("quantize.imatrix.file"), b.get("quantize.imatrix.entries_count")) == (str(out), 7 * SPEC.layers)
    assert b.get("quantize.imatrix.chunks_count") == n and "quantize.imatrix.file" not in a.fields
    assert (a.raw("blk.0.ffn_up.weight") != b.raw("blk.0.ffn_up.weight")).any()  # the matrix weighed it
    assert (a.raw("token_embd.weight") == b.raw("token_embd.weight")).all()  # not in the matrix: as without


def test_errors_are_one_line(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("only a few words here", encoding="utf-8")
    for args, expect in (
        (["-f", str(tmp_path / "none.txt")], "none.txt: No such file or directory"),
        (["-f", str(text), "-c", "64"], "the text is"),
        (["-f", str(text), "-o", str(tmp_path)], "is a folder"),
        (["-f", str(text), "-o", str(tmp_path / "no" / "x.gguf")], "no folder"),
    ):
        r = CliRunner().invoke(app, ["imatrix", str(tiny), *args])
        assert r.exit_code == 2 and r.stderr.startswith("qvl imatrix: error: ") and expect in r.stderr \
            and r.stderr.count("\n") == 1, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_in_files_add_up(tiny, tmp_path):
    """--in-file: matrices made before added in (llama-imatrix's: GGUF sums and counts as they are,
    float32 additions; a legacy .dat's means times ncall times -c), with -f or alone (byte-checked
    against llama-imatrix --in-file in docs/benchmarks.md)."""
    import struct

    words = "a page of text about cats dogs hills and the weather over the sea".split()
    texts = []
    for seed in (1, 2):
        texts.append(tmp_path / f"t{seed}.txt")
        texts[-1].write_text(" ".join(np.random.default_rng(seed).choice(words, 200)), encoding="utf-8")
    a, b, both, combined = (tmp_path / f"{n}.gguf" for n in ("a", "b", "both", "combined"))
    for args in ([str(tiny), "-f", str(texts[0]), "-o", str(a)], [str(tiny), "-f", str(texts[1]), "-o", str(b)],
                 [str(tiny), "-f", str(texts[1]), "--in-file", str(a), "-o", str(both)],
                 ["--in-file", str(a), "--in-file", str(b), "-o", str(combined)]):
        r = CliRunner().invoke(app, ["imatrix", "-c", "64", *args])
        assert r.exit_code == 0, r.output
    g = {n: GGUFFile(p) for n, p in (("a", a), ("b", b), ("both", both), ("combined", combined))}
    name = "blk.1.ffn_down.weight"

    def sums(k: str) -> np.ndarray:
        return g[k].raw(f"{name}.in_sum2").view(np.float32)

    def count(k: str) -> float:
        return float(g[k].raw(f"{name}.counts").view(np.float32)[0])

    np.testing.assert_array_equal(sums("combined"), sums("a") + sums("b"))  # float32 additions
    np.testing.assert_allclose(sums("both"), sums("a") + sums("b"), rtol=1e-6)  # b's own sums in float64
    assert count("combined") == count("both") == count("a") + count("b")
    assert g["both"].get("imatrix.datasets") == [str(texts[0]), str(texts[1])]
    assert g["combined"].get("imatrix.chunk_count") == int(count("combined")) // 64
    dat = tmp_path / "old.dat"  # a legacy file: int32 count, name, ncall, nval, the means times ncall
    dat.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 3, 2)
                    + np.array([6.0, 9.0], np.float32).tobytes())
    sums_ = Sums({}, {})
    merge(sums_, read_imatrix(dat), 64)
    assert sums_.squares[name].tolist() == [384.0, 576.0] and sums_.rows[name] == 192
    for args, expect in ((["-o", str(tmp_path / "x.gguf")], "nothing to do"),
                         (["-f", str(texts[0])], "-f runs a model: give MODEL"),
                         (["--in-file", str(a), "--in-file", str(dat)], "'blk.1.ffn_down.weight' has 2 sums, the others")):
        r = CliRunner().invoke(app, ["imatrix", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr
