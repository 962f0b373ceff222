"""`qvl quantize` (convert/requantize.py): a bf16 or f32 GGUF quantized to a type is, tensor for
tensor and byte for byte, what qvl-convert writes converting the checkpoint straight to that type
(whose plan and bytes test_plan.py and test_quant.py check against llama.cpp); refusals leave
nothing on disk."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from gguf_compare import differences
from qvl.convert.cli import app as convert_app
from qvl.convert.quant import dequantize
from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile
from tiny_models import TinySpec, make_checkpoint

runner = CliRunner()
SPEC = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, vision_hidden=64, vision_width=96,
                vocab_size=1280)  # rows of 256 and 512: every k-quant holds them


def convert(*args: str):
    r = runner.invoke(convert_app, [*args, "-q"])
    assert r.exit_code == 0, r.output
    return r


def quantize(*args: str):
    return runner.invoke(app, ["quantize", *args, "-q"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny bf16 checkpoint as bf16 and f32 GGUFs (both exact), llama.cpp's layout and Ollama's."""
    folder = tmp_path_factory.mktemp("requantize")
    ckpt = make_checkpoint(folder / "ckpt", SPEC)
    for kind in ("bf16", "f32"):
        convert(str(ckpt), "-o", str(folder / f"m-{kind}.gguf"), "--type", kind)
    convert(str(ckpt), "-o", str(folder / "ollama-bf16.gguf"), "--type", "bf16", "--layout", "ollama")
    return ckpt, folder


@pytest.mark.parametrize("kind,source", [("q4_k_m", "bf16"), ("q4_k_m", "f32"), ("q8_0", "bf16"),
                                         ("q6_k", "bf16"), ("q4_k", "bf16"), ("q5_k_m", "f32"), ("q4_0", "bf16"),
                                         ("q3_k_m", "bf16"), ("q2_k", "f32"), ("q5_k_s", "bf16"), ("q5_1", "bf16"),
                                         ("iq4_xs", "bf16"), ("iq3_m", "bf16")])
def test_quantized_gguf_equals_the_direct_conversion(sources, tmp_path, kind, source):
    ckpt, folder = sources
    direct = tmp_path / "direct.gguf"
    convert(str(ckpt), "-o", str(direct), "--type", kind)
    r = quantize(str(folder / f"m-{source}.gguf"), kind, "-o", str(tmp_path / "q.gguf"))
    assert r.exit_code == 0, r.output
    assert differences(tmp_path / "q.gguf", direct) == []


def test_worker_processes_write_the_same_file(sources, tmp_path, monkeypatch):
    """A job big enough for worker processes (here: any, the threshold lowered) quantizes its
    chunks there, and the file is the one the threads write: q4_k_m, and iq3_m's grid search."""
    from qvl.convert.quant import pool

    _, folder = sources
    for kind in ("q4_k_m", "iq3_m"):
        here = tmp_path / f"here-{kind}.gguf"
        assert quantize(str(folder / "m-bf16.gguf"), kind, "-o", str(here), "-t", "2").exit_code == 0
        monkeypatch.setattr(pool, "MIN_ELEMENTS", 0)
        started = []
        monkeypatch.setattr(pool, "ProcessPoolExecutor",
                            lambda *a, **k: started.append(1) or ProcessPoolExecutor(*a, **k))
        there = tmp_path / f"there-{kind}.gguf"
        r = quantize(str(folder / "m-bf16.gguf"), kind, "-o", str(there), "-t", "2")
        assert r.exit_code == 0, r.output
        assert started == [1] and pool._POOL is None  # one pool, gone with the job
        assert there.read_bytes() == here.read_bytes()
        monkeypatch.undo()


def test_ollama_layout_keeps_its_vision_tensors(sources, tmp_path):
    ckpt, folder = sources
    direct = tmp_path / "direct.gguf"
    convert(str(ckpt), "-o", str(direct), "--type", "q4_k_m", "--layout", "ollama")
    r = quantize(str(folder / "ollama-bf16.gguf"), "q4_k_m", "-o", str(tmp_path / "q.gguf"))
    assert r.exit_code == 0, r.output
    assert differences(tmp_path / "q.gguf", direct) == []
    with GGUFFile(tmp_path / "q.gguf") as g:
        assert g.tensors["v.blk.0.attn_v.weight"].type == T.F16 and g.tensors["blk.2.attn_v.weight"].type == T.Q6_K


def test_the_default_name_and_the_dry_run(sources, tmp_path):
    _, folder = sources
    src = tmp_path / "m-bf16.gguf"
    src.write_bytes((folder / "m-bf16.gguf").read_bytes())
    r = runner.invoke(app, ["quantize", str(src), "q8_0", "--dry-run"])
    assert r.exit_code == 0 and "blk.0.ffn_down.weight" in r.stdout and "Q8_0" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-bf16.gguf"]  # nothing written
    assert quantize(str(src), "Q8_0").exit_code == 0
    assert (tmp_path / "m-Q8_0.gguf").exists()


def test_requantizing_is_refused_unless_allowed(sources, tmp_path):
    _, folder = sources
    q8 = tmp_path / "m-q8.gguf"
    assert quantize(str(folder / "m-bf16.gguf"), "q8_0", "-o", str(q8)).exit_code == 0
    r = quantize(str(q8), "q4_k_m", "-o", str(tmp_path / "again.gguf"))
    assert r.exit_code == 2 and "tensor 'output.weight' is Q8_0 already" in r.output
    assert "qvl quantize --allow-requantize" in r.output and not (tmp_path / "again.gguf").exists()
    r = quantize(str(q8), "q4_k_m", "-o", str(tmp_path / "again.gguf"), "--allow-requantize")
    assert r.exit_code == 0, r.output
    with GGUFFile(q8) as a, GGUFFile(tmp_path / "again.gguf") as b, GGUFFile(folder / "m-f32.gguf") as f:
        info = b.tensors["blk.1.ffn_up.weight"]
        assert info.type == T.Q4_K
        values = dequantize(b.raw(info.name), T.Q4_K)
        want = f.raw(info.name).view(np.float32)
        assert np.abs(values - want).max() / np.abs(want).max() < 0.2  # Q8_0's error and Q4_K's
        assert a.tensors["blk.0.attn_norm.weight"].type == b.tensors["blk.0.attn_norm.weight"].type == T.F32


@pytest.mark.parametrize("case,expect", [
    ("mmproj", "a vision projector (mmproj); qvl quantize takes a text model"),
    ("type", "type 'q3_k': choose one of"),
    ("missing", "file not found"),
    ("same", "the output would overwrite MODEL"),
    ("exists", "already exists (use --force to overwrite)"),
])
def test_refusals_write_nothing(fixtures_dir, sources, tmp_path, case, expect):
    _, folder = sources
    model = folder / "m-bf16.gguf"
    (tmp_path / "taken.gguf").write_bytes(b"not ours")
    args = {"mmproj": [str(fixtures_dir / "tiny-qwen2.5-vl/llamacpp/mmproj-tiny-qwen2.5-vl-f16.gguf"), "q8_0"],
            "type": [str(model), "q3_k"], "missing": [str(tmp_path / "nope.gguf"), "q8_0"],
            "same": [str(model), "q8_0", "-o", str(model)],
            "exists": [str(model), "q8_0", "-o", str(tmp_path / "taken.gguf")]}[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = quantize(*args) if case != "mmproj" else quantize(*args, "-o", str(tmp_path / "x.gguf"))
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken.gguf").read_bytes() == b"not ours"


def test_qvl_create_quantize_stores_the_quantized_file(sources, tmp_path, monkeypatch):
    """`qvl create NAME MODEL --quantize TYPE` (Ollama's -q): the stored text model is `qvl
    quantize`'s output, byte for byte, and no temporary file is left in the store."""
    from qvl.runtime.store import Store

    _, folder = sources
    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    assert quantize(str(folder / "m-bf16.gguf"), "q4_k_m", "-o", str(tmp_path / "want.gguf")).exit_code == 0
    r = runner.invoke(app, ["create", "small:q4", str(folder / "m-bf16.gguf"), "--quantize", "q4_K_M"])
    assert r.exit_code == 0, r.output
    store = Store()
    model, projector = store.resolve("small:q4")
    assert model.read_bytes() == (tmp_path / "want.gguf").read_bytes()
    assert projector is not None and projector.read_bytes() == (folder / "mmproj-m-bf16.gguf").read_bytes()
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
    for kind, expect in [("q3_k", "type 'q3_k': choose one of"), ("q8_0", None)]:
        r = runner.invoke(app, ["create", f"small:{kind}", str(tmp_path / "want.gguf"), "--quantize", kind])
        assert r.exit_code == 2 and (expect or "tensor 'output.weight' is Q6_K already") in r.output, r.output
    assert [str(e.name) for e in store.list()] == ["small:q4"]



@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])  # the other four by hand, 2026-12-06 (docs/benchmarks.md)
def test_llama_cpps_own_f16_file(fixtures_dir, tmp_path, kind):
    """The fixture's F16 file, made by llama.cpp's converter, quantized: what qvl-convert makes of
    the checkpoint (which scripts/check_llamacpp.py found byte-identical, tensor for tensor, to
    llama-quantize's output of that same F16 file)."""
    model = fixtures_dir / "tiny-qwen2.5-vl"
    assert quantize(str(model / "llamacpp/tiny-qwen2.5-vl-f16.gguf"), kind, "-o", str(tmp_path / "q.gguf")).exit_code == 0
    convert(str(model / "hf"), "-o", str(tmp_path / "c.gguf"), "--type", kind)
    assert differences(tmp_path / "q.gguf", tmp_path / "c.gguf") == []


def test_llama_quantizes_layout(fixtures_dir, tmp_path):
    """The order llama-quantize writes (with which scripts/check_llamacpp.py found our files
    byte-identical to its own, 2026-12-06): the source's keys in place but general.quantization_version
    and general.file_type, which come last; tensors outside the blocks first, then block by block
    (blk.2 before blk.10), by name within each."""
    import re

    source = fixtures_dir / "tiny-qwen2.5-vl/llamacpp/tiny-qwen2.5-vl-f16.gguf"
    assert quantize(str(source), "q4_k_m", "-o", str(tmp_path / "q.gguf")).exit_code == 0
    with GGUFFile(source) as src, GGUFFile(tmp_path / "q.gguf") as out:
        moved = ["general.quantization_version", "general.file_type"]
        assert list(out.fields) == [k for k in src.fields if k not in moved] + moved
        names = list(out.tensors)
        blocks = [int(m.group(1)) if (m := re.match(r"blk\.(\d+)\.", n)) else -1 for n in names]
        assert names[:2] == ["output_norm.weight", "token_embd.weight"] and blocks == sorted(blocks)
        assert all(a < b for a, b, x, y in zip(names, names[1:], blocks, blocks[1:]) if x == y)
        assert out.get("general.file_type") == 15 and out.get("general.size_label") == src.get("general.size_label")


def test_llama_quantizes_per_tensor_options(sources, tmp_path):
    _, folder = sources
    model = folder / "m-bf16.gguf"
    r = quantize(str(model), "q4_k_m", "-o", str(tmp_path / "a.gguf"), "--output-tensor-type", "Q8_0",
                 "--token-embedding-type", "q6_k", "--tensor-type", "attn_v=q5_k", "--tensor-type", "ATTN=q8_0")
    assert r.exit_code == 0, r.output
    with GGUFFile(tmp_path / "a.gguf") as a, GGUFFile(model) as src:
        assert a.tensors["output.weight"].type == T.Q8_0 and a.tensors["token_embd.weight"].type == T.Q6_K
        assert a.tensors["blk.2.attn_v.weight"].type == T.Q5_K and a.tensors["blk.0.attn_q.weight"].type == T.Q8_0
        assert a.tensors["blk.2.ffn_down.weight"].type == T.Q6_K  # the mix, where no pattern names it
    r = quantize(str(model), "q4_k_m", "-o", str(tmp_path / "b.gguf"), "--leave-output-tensor", "--pure")
    assert r.exit_code == 0, r.output
    with GGUFFile(tmp_path / "b.gguf") as b, GGUFFile(model) as src:
        assert b.tensors["output.weight"].type == T.BF16
        assert (b.raw("output.weight") == src.raw("output.weight")).all()  # copied as it is
        assert b.tensors["blk.0.ffn_down.weight"].type == T.Q4_K and b.tensors["token_embd.weight"].type == T.Q4_K
    for args, expect in (
        (["--output-tensor-type", "tq1_0"], "type 'tq1_0': qvl writes f32, f16, bf16, q8_0"),
        (["--output-tensor-type", "iq2_xs"], "'output.weight' is quantized to IQ2_XS, which takes importance values"),
        (["--tensor-type", "attn_v"], "--tensor-type 'attn_v': NAME=TYPE"),
        (["--tensor-type", "attn_v="], "NAME=TYPE"),
        (["--tensor-type", "(attn=q8_0"], "is not a regular expression"),
        (["--token-embedding-type", "q4_0", "--tensor-type", "ffn_down=q4_k"], None),
    ):
        r = quantize(str(model), "q4_k_m", "-o", str(tmp_path / "c.gguf"), *args)
        if expect is None:
            assert r.exit_code == 0, r.output
            (tmp_path / "c.gguf").unlink()
            continue
        assert r.exit_code == 2 and expect in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "c.gguf").exists()


def test_a_named_type_that_cannot_hold_the_rows_is_refused(fixtures_dir, tmp_path):
    """llama-quantize aborts (no fallback for a type given by name); here one line, nothing written."""
    model = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"  # 64-wide rows
    r = quantize(str(model), "q4_k_m", "-o", str(tmp_path / "x.gguf"), "--token-embedding-type", "q4_k")
    assert r.exit_code == 2 and "tensor 'token_embd.weight': rows of 64 do not fill Q4_K's blocks of 256" in r.output
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_type_file(sources, tmp_path):
    """--tensor-type-file: NAME=TYPE entries separated by spaces or lines, after any --tensor-type."""
    _, folder = sources
    listing = tmp_path / "types.txt"
    listing.write_text("attn_v=q8_0\nffn_down=q5_k  attn=q6_k\n", encoding="utf-8")
    r = quantize(str(folder / "m-bf16.gguf"), "q4_k_m", "-o", str(tmp_path / "a.gguf"), "--tensor-type", "attn_q=q4_0",
                 "--tensor-type-file", str(listing))
    assert r.exit_code == 0, r.output
    with GGUFFile(tmp_path / "a.gguf") as a:
        got = {n: a.tensors[f"blk.1.{n}.weight"].type for n in ("attn_q", "attn_v", "ffn_down", "attn_k", "ffn_up")}
    assert got == {"attn_q": T.Q4_0, "attn_v": T.Q8_0, "ffn_down": T.Q5_K, "attn_k": T.Q6_K, "ffn_up": T.Q4_K}
    r = quantize(str(folder / "m-bf16.gguf"), "q4_k_m", "-o", str(tmp_path / "b.gguf"), "--tensor-type-file",
                 str(tmp_path / "none.txt"))
    assert r.exit_code == 2 and "--tensor-type-file" in r.output and "No such file" in r.output


def _with_a_matrix(folder, tmp_path, seed: int):
    """The f32 source, its block matrices' row lengths, and an importance matrix of log-normal
    values for each of them."""
    from imatrix_files import write_imatrix

    src = folder / "m-f32.gguf"
    with GGUFFile(src) as g:
        rows = {n: t.ne[0] for n, t in g.tensors.items() if n.startswith("blk.") and n.endswith("weight")
                and len(t.ne) == 2}
    rng = np.random.default_rng(seed)
    matrix = tmp_path / "m.imatrix.gguf"
    write_imatrix(matrix, {n: (np.exp(rng.normal(0, 2, k)), [1.0]) for n, k in rows.items()})
    return src, rows, matrix


def test_q2_k_s_takes_an_importance_matrix(sources, tmp_path):
    """llama.cpp's Q2_K_S quantizes its Q2_K matrices only with importance values: without a
    matrix, or with one that lacks a tensor's, qvl quantize refuses with one line and writes
    nothing (llama-quantize refuses too); a dry run plans it and warns. With them, a Q2_K matrix is
    the very bytes q2_k's weighted Q2_K gives it; qvl-convert and the store's tags refuse the type.
    (Whole files byte-identical to llama-quantize --imatrix Q2_K_S: docs/benchmarks.md.)"""
    from qvl.runtime.sources import alias_source
    from qvl.runtime.store import StoreError

    ckpt, folder = sources
    src, rows, matrix = _with_a_matrix(folder, tmp_path, seed=3)
    out = tmp_path / "q.gguf"
    for args, expect in (((), "which takes importance values: give --imatrix FILE"),
                         (("--imatrix", str(matrix), "--exclude-weights", "blk.1.ffn_up"),
                          "no values for 'blk.1.ffn_up.weight', which is quantized to Q2_K")):
        r = quantize(str(src), "q2_k_s", "-o", str(out), *args)
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.imatrix.gguf"]
    r = runner.invoke(app, ["quantize", str(src), "q2_k_s", "--dry-run"])
    assert r.exit_code == 0 and "blk.0.attn_q.weight" in r.stdout and "Q2_K" in r.stdout
    assert f"q2_k_s quantizes {len(rows)} tensors" in r.stderr and "needs --imatrix FILE" in r.stderr
    files = {}
    for kind in ("q2_k_s", "q2_k"):
        files[kind] = tmp_path / f"{kind}.gguf"
        assert quantize(str(src), kind, "-o", str(files[kind]), "--imatrix", str(matrix)).exit_code == 0
    with GGUFFile(files["q2_k_s"]) as s, GGUFFile(files["q2_k"]) as k:
        assert s.get("general.file_type") == 21 and s.tensors["output.weight"].type == T.Q6_K
        both = [n for n in rows if s.tensors[n].type == k.tensors[n].type == T.Q2_K]
        assert {n.split(".")[2] for n in both} == {"attn_q", "attn_k", "ffn_gate", "ffn_up"}
        assert all((s.raw(n) == k.raw(n)).all() for n in both)
        # 2 heads per KV head, 3 layers (3 // 8 = 0): attn_v and ffn_down stay Q2_K (q2_k: Q3_K)
        assert s.tensors["blk.0.attn_v.weight"].type == s.tensors["blk.0.ffn_down.weight"].type == T.Q2_K
    r = runner.invoke(convert_app, [str(ckpt), "--type", "q2_k_s", "-o", str(tmp_path / "c.gguf")])
    assert r.exit_code == 2 and "needs an importance matrix" in r.stderr and not (tmp_path / "c.gguf").exists()
    with pytest.raises(StoreError, match="quantization 'q2_k_s'"):
        alias_source("qwen2.5-vl:3b-q2_k_s")


# llama-quant.cpp's choices for a 3-layer model, 2 heads per KV head, untied (3 // 8 = 0 layers take
# ffn_down's first-eighth types; IQ3_XS's ffn_gate / ffn_up: layers 0 and 1 of [0, 7 * 3 // 8 = 2)):
# (token_embd, output, attn_q/k, attn_v, attn_output, ffn_down, ffn_gate/up of layers 0-1, of layer 2)
IQ_MIXES = {
    "iq3_xxs": (T.IQ3_S, T.Q5_K, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ3_XXS, T.IQ3_XXS, T.IQ3_XXS),
    "iq3_xs": (T.IQ3_S, T.Q6_K, T.IQ3_XXS, T.IQ3_S, T.IQ3_S, T.IQ3_S, T.IQ3_XXS, T.IQ3_S),
    "iq2_m": (T.IQ3_S, T.Q5_K, T.IQ2_S, T.IQ3_S, T.IQ3_S, T.IQ2_S, T.IQ2_S, T.IQ2_S),
    "iq2_s": (T.IQ3_S, T.Q5_K, T.IQ2_XS, T.IQ3_S, T.IQ3_S, T.IQ2_XS, T.IQ2_XS, T.IQ2_XS),
    "iq2_xs": (T.Q2_K, T.Q5_K, T.IQ2_XS, T.Q2_K, T.IQ2_XS, T.IQ2_XS, T.IQ2_XS, T.IQ2_XS),
    "iq2_xxs": (T.Q2_K, T.Q5_K, T.IQ2_XXS, T.Q2_K, T.IQ2_XXS, T.IQ2_XXS, T.IQ2_XXS, T.IQ2_XXS),
    "iq1_m": (T.Q2_K, T.Q5_K, T.IQ1_M, T.Q2_K, T.IQ2_XXS, T.IQ1_M, T.IQ1_M, T.IQ1_M),
    "iq1_s": (T.Q2_K, T.Q5_K, T.IQ1_S, T.Q2_K, T.IQ2_XXS, T.IQ1_S, T.IQ1_S, T.IQ1_S),
}


@pytest.mark.parametrize("kind", list(IQ_MIXES))
def test_iq_mixes_take_an_importance_matrix(sources, tmp_path, kind):
    """llama.cpp's IQ3_XXS, IQ3_XS, IQ2 and IQ1 mixes: refused without importance values (one line,
    nothing written), as llama-quantize refuses them; with them each matrix takes the mix's type
    and its bytes are quantize()'s of its rows with its values (ggml's bytes: test_quant_imatrix.py;
    whole files byte-identical to llama-quantize --imatrix's: docs/benchmarks.md)."""
    from qvl.convert.quant import quantize as quantize_rows
    from qvl.convert.imatrix import read_imatrix

    _, folder = sources
    src, rows, matrix = _with_a_matrix(folder, tmp_path, seed=4)
    out = tmp_path / "q.gguf"
    r = quantize(str(src), kind, "-o", str(out))
    assert r.exit_code == 2 and "which takes importance values: give --imatrix FILE" in r.stderr, r.output
    assert r.stderr.count("\n") == 1 and not out.exists()
    assert quantize(str(src), kind, "-o", str(out), "--imatrix", str(matrix)).exit_code == 0
    embd, output, qk, v, attn_output, down, early, late = IQ_MIXES[kind]
    values = read_imatrix(matrix).values
    with GGUFFile(out) as q, GGUFFile(src) as f:
        role = {"attn_q": qk, "attn_k": qk, "attn_v": v, "attn_output": attn_output, "ffn_down": down}
        want = {n: role.get(n.split(".")[2], early if n.startswith(("blk.0.", "blk.1.")) else late) for n in rows}
        want |= {"token_embd.weight": embd, "output.weight": output}
        assert {n: q.tensors[n].type for n in want} == want
        for name in ("blk.2.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight"):
            np.testing.assert_array_equal(q.raw(name), quantize_rows(f.raw(name).view(np.float32), want[name],
                                                                     values[name]), err_msg=name)


def test_a_split_source_quantizes_as_the_whole(sources, tmp_path):
    """Its first part given, a 4-part model quantizes to the very file the whole one does (its
    split.* keys dropped, as llama-quantize drops them: byte-identical to it, docs/benchmarks.md)."""
    from gguf_compare import split_gguf

    _, folder = sources
    parts = split_gguf(folder / "m-bf16.gguf", tmp_path / "m.gguf", 12)
    first = parts[0]
    assert len(parts) == 4 and first.name == "m-00001-of-00004.gguf"
    for src, out in ((first, "split.gguf"), (folder / "m-bf16.gguf", "whole.gguf")):
        r = quantize(str(src), "q4_k_m", "-o", str(tmp_path / out))
        assert r.exit_code == 0, r.output
    assert (tmp_path / "split.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_keep_split(sources, tmp_path):
    """--keep-split: each part of the source gives a part of the output, OUT-0000i-of-0000N.gguf
    (OUT's .gguf dropped), the metadata in the first, split.no / split.count / split.tensors.count
    last (alone in the others); read by its first part, the very tensors of the one-file output.
    A one-file source: OUT-00001-of-00001.gguf, no split keys. (Byte-identical to llama-quantize
    --keep-split: docs/benchmarks.md.)"""
    from gguf import GGUFReader

    from gguf_compare import differences, split_gguf

    _, folder = sources
    parts = split_gguf(folder / "m-bf16.gguf", tmp_path / "m.gguf", 12)
    assert quantize(str(parts[0]), "q4_k_m", "-o", str(tmp_path / "one.gguf")).exit_code == 0
    r = quantize(str(parts[0]), "q4_k_m", "-o", str(tmp_path / "out.gguf"), "--keep-split")
    assert r.exit_code == 0, r.output
    out = [tmp_path / f"out-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert all(p.exists() for p in out) and not (tmp_path / "out.gguf").exists()
    assert differences(out[0], tmp_path / "one.gguf") == [
        "metadata keys differ: only ours ['split.count', 'split.no', 'split.tensors.count'], only theirs []"]
    for i, (p, q) in enumerate(zip(parts, out)):
        mine, source = GGUFReader(q), GGUFReader(p)
        assert [t.name for t in mine.tensors] == [t.name for t in source.tensors]
        assert list(mine.fields)[-3:] == ["split.no", "split.count", "split.tensors.count"]
        if i:
            assert len(mine.fields) == 6  # GGUF's own three and the split keys
    r = quantize(str(folder / "m-bf16.gguf"), "q4_k_m", "-o", str(tmp_path / "single.gguf"), "--keep-split")
    assert r.exit_code == 0, r.output
    with GGUFFile(tmp_path / "single-00001-of-00001.gguf") as g, GGUFFile(tmp_path / "one.gguf") as one:
        assert "split.count" not in g.fields and list(g.tensors) != list(one.tensors)  # the file's order
        assert sorted(g.tensors) == sorted(one.tensors)
    assert quantize(str(parts[0]), "q8_0").exit_code == 0  # the default name: the part's number dropped
    assert (tmp_path / "m-Q8_0.gguf").exists()
    from imatrix_files import write_imatrix

    last = [t.name for t in GGUFReader(parts[-1]).tensors if len(t.shape) == 2][-1]  # the last part's: no values
    with GGUFFile(parts[0]) as g:
        rows = {n: t.ne[0] for n, t in g.tensors.items() if len(t.ne) == 2 and n.startswith("blk.") and n != last}
    write_imatrix(tmp_path / "m.imatrix.gguf", {n: (np.ones(k), [1.0]) for n, k in rows.items()})
    r = quantize(str(parts[0]), "q2_k_s", "-o", str(tmp_path / "low.gguf"), "--keep-split", "--imatrix",
                 str(tmp_path / "m.imatrix.gguf"))
    assert r.exit_code == 2 and f"no values for '{last}'" in r.stderr and not list(tmp_path.glob("low*"))
