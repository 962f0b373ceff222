"""qvl-convert end to end: the shared llama.cpp fixtures, and checkpoints generated with transformers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from gguf_compare import differences
from hf_tensors import expected_gguf_tensors, read_tensors
from qvl.runtime.gguf_file import GGUFFile
from qvl.convert.cli import app
from qvl.convert.quant import dequantize, quantize
from tiny_models import TinySpec, build_model, legacy_state_dict, make_checkpoint

runner = CliRunner()


def convert(*args: str):
    result = runner.invoke(app, [*args, "-q"])
    return result


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def test_f16_equals_llama_cpp_converter(fixtures_dir, tmp_path, model):
    out = tmp_path / f"{model}.gguf"
    r = convert(str(fixtures_dir / model / "hf"), "-o", str(out), "--type", "f16")
    assert r.exit_code == 0, r.output
    theirs = fixtures_dir / model / "llamacpp"
    assert differences(out, theirs / f"{model}-f16.gguf") == []
    assert differences(tmp_path / f"mmproj-{model}.gguf", theirs / f"mmproj-{model}-f16.gguf") == []


def _meta(path) -> dict:
    with GGUFFile(path) as f:
        return {k: kv.value for k, kv in f.fields.items()}


SPECS = {
    "qwen2.5-untied-legacy-bf16": TinySpec(),
    "qwen2.5-untied-hf5-sharded": TinySpec(layout="hf5", shards=3, heads=8, kv_heads=2, hidden=128, intermediate=96),
    "qwen2-untied-legacy-f32-sharded": TinySpec(family="qwen2_vl", dtype=torch.float32, shards=2, layers=3),
    "qwen2-tied-hf5-f16": TinySpec(family="qwen2_vl", tied=True, layout="hf5", dtype=torch.float16, kv_heads=4),
    "qwen2.5-tied-legacy-f16": TinySpec(tied=True, dtype=torch.float16, heads=2, kv_heads=1, vision_depth=4),
}


@pytest.mark.parametrize("name", SPECS)
def test_f32_conversion_is_lossless(tmp_path, name):
    spec = SPECS[name]
    src = make_checkpoint(tmp_path / "ckpt", spec)
    out = tmp_path / "m.gguf"
    r = convert(str(src), "-o", str(out), "--type", "f32", "--vision-type", "f32")
    assert r.exit_code == 0, r.output
    expected = expected_gguf_tensors(legacy_state_dict(build_model(spec).to(spec.dtype)), spec.family)
    if spec.tied:
        expected.pop("output.weight", None)
    got = {**read_tensors(out), **read_tensors(tmp_path / "m.gguf".replace("m.", "mmproj-m."))}
    assert set(got) == set(expected)
    for key, want in expected.items():
        qtype, data = got[key]
        assert qtype == T.F32, key
        np.testing.assert_array_equal(data.reshape(want.shape), want, err_msg=key)
    meta = _meta(out)
    assert meta["qwen2vl.block_count"] == spec.layers
    assert meta["qwen2vl.attention.head_count"] == spec.heads
    assert meta["qwen2vl.attention.head_count_kv"] == spec.kv_heads
    assert meta["qwen2vl.rope.dimension_sections"] == spec.mrope_section + [0]
    assert meta["general.file_type"] == 0
    assert len(meta["tokenizer.ggml.tokens"]) == spec.vocab_size
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{spec.vocab_size - 1}]"
    assert meta["tokenizer.ggml.eos_token_id"] == 1002  # <|im_end|> in the small tokenizer


QUANT_SPEC = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, vision_hidden=64,
                      vision_width=96, vocab_size=1280)


@pytest.fixture(scope="module")
def quant_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "ckpt", QUANT_SPEC)


@pytest.mark.parametrize("type_name,file_type,expect", [
    ("q8_0", 7, {"token_embd.weight": T.Q8_0, "blk.0.ffn_down.weight": T.Q8_0, "output.weight": T.Q8_0}),
    ("q4_k_m", 15, {"token_embd.weight": T.Q4_K, "output.weight": T.Q6_K, "blk.2.attn_v.weight": T.Q6_K,
                    "blk.0.attn_v.weight": T.Q4_K, "blk.2.ffn_down.weight": T.Q6_K, "blk.1.ffn_up.weight": T.Q4_K}),
    ("q4_k", 14, {"blk.0.attn_v.weight": T.Q5_K, "blk.1.ffn_down.weight": T.Q4_K, "output.weight": T.Q6_K}),
    ("q6_k", 18, {"blk.1.ffn_gate.weight": T.Q6_K, "token_embd.weight": T.Q6_K}),
    ("q5_k_m", 17, {"token_embd.weight": T.Q5_K, "output.weight": T.Q6_K, "blk.2.attn_v.weight": T.Q6_K,
                    "blk.0.attn_v.weight": T.Q5_K, "blk.2.ffn_down.weight": T.Q6_K, "blk.1.ffn_up.weight": T.Q5_K}),
    ("q4_0", 2, {"token_embd.weight": T.Q4_0, "output.weight": T.Q6_K, "blk.2.attn_v.weight": T.Q4_0}),
    ("bf16", 32, {"blk.1.ffn_gate.weight": T.BF16}),
])
def test_quantized_conversion(tmp_path, quant_checkpoint, type_name, file_type, expect):
    out = tmp_path / "m.gguf"
    r = convert(str(quant_checkpoint), "-o", str(out), "--type", type_name, "--vision-type", "q8_0")
    assert r.exit_code == 0, r.output
    got = read_tensors(out)
    meta = _meta(out)
    assert meta["general.file_type"] == file_type
    state = {k: v.float().numpy() for k, v in legacy_state_dict(build_model(QUANT_SPEC).to(torch.bfloat16)).items()}
    source = {"token_embd.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
              "blk.1.ffn_gate.weight": state["model.layers.1.mlp.gate_proj.weight"]}
    for name, qtype in expect.items():
        assert got[name][0] == qtype, name
    for name, want in source.items():
        qtype, data = got[name]
        # the bytes are exactly our quantizer's (checked against ggml in test_quant) of the source
        assert np.array_equal(data.reshape(-1), quantize(want, qtype).reshape(-1)), name
        approx = dequantize(data.reshape(want.shape[0], -1), qtype)
        rel = np.abs(approx - want).max() / np.abs(want).max()
        assert rel < {T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q4_K: 0.15, T.Q5_K: 0.08, T.Q4_0: 0.1, T.BF16: 0.01}[qtype], \
            (name, rel)
    vision = read_tensors(tmp_path / "mmproj-m.gguf")
    assert vision["v.blk.0.attn_q.weight"][0] == T.Q8_0
    assert vision["v.blk.0.ffn_down.weight"][0] == T.Q8_0  # 96 is a multiple of 32
    assert vision["v.patch_embd.weight"][0] == T.F32


def test_convert_hf_to_gguf_flag_names(fixtures_dir, tmp_path):
    """--outfile / --outtype (llama.cpp's convert_hf_to_gguf.py) are -o / --type."""
    src = str(fixtures_dir / "tiny-qwen2.5-vl" / "hf")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert convert(src, "-o", str(a), "--type", "q8_0").exit_code == 0
    r = convert(src, "--outfile", str(b), "--outtype", "q8_0")
    assert r.exit_code == 0, r.output
    assert a.read_bytes() == b.read_bytes()


def test_out_names(fixtures_dir, tmp_path, monkeypatch):
    """-o FOLDER writes the default names in it (as convert_hf_to_gguf.py does); -o NAME without
    .gguf gets it; no -o writes the default names in the working folder."""
    src = str(fixtures_dir / "tiny-qwen2.5-vl" / "hf")
    folder, cwd = tmp_path / "models", tmp_path / "cwd"
    folder.mkdir()
    cwd.mkdir()
    assert convert(src, "-o", str(folder), "--type", "q8_0").exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["hf-Q8_0.gguf", "mmproj-hf-Q8_0.gguf"]
    assert convert(src, "-o", str(tmp_path / "plain"), "--type", "q8_0").exit_code == 0
    assert (tmp_path / "plain.gguf").read_bytes() == (folder / "hf-Q8_0.gguf").read_bytes()
    assert (tmp_path / "mmproj-plain.gguf").is_file()
    monkeypatch.chdir(cwd)
    assert convert(src, "--type", "q8_0").exit_code == 0
    assert sorted(p.name for p in cwd.iterdir()) == ["hf-Q8_0.gguf", "mmproj-hf-Q8_0.gguf"]
    r = convert(src, "-o", str(folder), "--type", "q8_0")  # the same names again
    assert r.exit_code == 2 and "hf-Q8_0.gguf: already exists" in r.output


def test_threads_do_not_change_the_bytes(tmp_path, quant_checkpoint):
    """--threads quantizes chunks in parallel; the files are the same byte for byte."""
    outs = []
    for n in (1, 3):
        out = tmp_path / f"t{n}" / "m.gguf"
        out.parent.mkdir()
        r = convert(str(quant_checkpoint), "-o", str(out), "--type", "q4_k_m", "--threads", str(n))
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert (outs[0].parent / "mmproj-m.gguf").read_bytes() == (outs[1].parent / "mmproj-m.gguf").read_bytes()


def test_ollama_layout(tmp_path, quant_checkpoint):
    out = tmp_path / "o.gguf"
    r = convert(str(quant_checkpoint), "-o", str(out), "--layout", "ollama", "--type", "q4_k_m")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "mmproj-o.gguf").exists()
    meta = _meta(out)
    assert meta["general.architecture"] == "qwen25vl"
    assert meta["qwen25vl.rope.mrope_section"] == QUANT_SPEC.mrope_section
    assert meta["qwen25vl.vision.fullatt_block_indexes"] == [1]
    assert meta["qwen25vl.vision.window_size"] == 112
    assert meta["tokenizer.ggml.scores"][:3] == [0.0, 1.0, 2.0]
    assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{1280 - 1022 - 1}]"
    with GGUFFile(out) as f:
        names = {n: t.type for n, t in f.tensors.items()}
    for n in ("v.patch_embd_0.weight", "v.patch_embd_1.weight", "v.blk.0.ln1.weight", "v.blk.1.attn_k.bias",
              "v.blk.0.attn_out.weight", "v.blk.0.ffn_gate.weight", "v.merger.ln_q.weight",
              "v.merger.mlp.0.weight", "v.merger.mlp.2.bias", "blk.2.ffn_down.weight", "output.weight"):
        assert n in names, n
    assert names["v.blk.0.attn_q.weight"] == T.F16  # vision stays F16 by default
    assert names["blk.1.ffn_gate.weight"] == T.Q4_K


def test_ollama_layout_rejects_qwen2_vl(fixtures_dir, tmp_path):
    r = convert(str(fixtures_dir / "tiny-qwen2-vl" / "hf"), "-o", str(tmp_path / "x.gguf"), "--layout", "ollama")
    assert r.exit_code == 2
    assert "Qwen2.5-VL only" in r.output
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_plan_and_writes_nothing(fixtures_dir, tmp_path):
    r = convert(str(fixtures_dir / "tiny-qwen2.5-vl" / "hf"), "-o", str(tmp_path / "x.gguf"), "--type", "q4_k_m",
                "--dry-run")
    assert r.exit_code == 0, r.output
    # rows of 64 cannot take 256-blocks: llama.cpp's fallbacks (Q6_K -> Q8_0, Q4_K -> Q5_0)
    assert re.search(r"token_embd\.weight\s+Q8_0\s+\[64, 151936\]", r.output)
    assert re.search(r"blk\.2\.ffn_gate\.weight\s+Q5_0", r.output)
    assert re.search(r"v\.blk\.3\.ffn_down\.weight\s+F16\s+\[120, 64\]", r.output)
    assert "109 tensors" not in r.output and "total:" in r.output
    assert list(tmp_path.iterdir()) == []
