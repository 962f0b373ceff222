"""Our per-tensor type choices against llama-quantize's own (fixtures/q4_k_m-plans.json)."""

from __future__ import annotations

import json

import pytest
from gguf import GGMLQuantizationType as T

from qvl.convert.hf_config import parse_config
from qvl.convert.layout import OutTensor, mmproj_tensors, text_tensors
from qvl.convert.official import MODELS, official_config
from qvl.convert.plan import TEXT_TYPES, Overrides, fallback, plan_text, plan_vision


@pytest.fixture(scope="module")
def llama_plans(fixtures_dir):
    return json.loads((fixtures_dir / "q4_k_m-plans.json").read_text())


def _plan(model: str, type_name: str):
    cfg = parse_config(official_config(model))
    return plan_text(text_tensors(cfg), TEXT_TYPES[type_name], cfg.text.num_hidden_layers,
                     n_gqa=cfg.text.num_attention_heads // cfg.text.num_key_value_heads)


@pytest.mark.parametrize("model", MODELS)
def test_q4_k_m_plan_equals_llama_quantize(llama_plans, model):
    ours = {p.tensor.name: p.qtype.name for p in _plan(model, "q4_k_m")}
    theirs = llama_plans[model]
    assert set(ours) == set(theirs)
    wrong = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {list(wrong.items())[:5]}"


def test_72b_ffn_down_falls_back():
    plan = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-72b", "q4_k_m")}
    # 29568 is a multiple of 32 but not of 256
    assert plan["blk.0.ffn_down.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert plan["blk.11.ffn_down.weight"] == T.Q5_0  # Q4_K -> Q5_0 (layer 11 of 80: no extra bits)
    assert plan["blk.1.ffn_gate.weight"] == T.Q4_K


def test_fallback_chain():
    assert fallback(T.Q4_K, 3420) == T.F16  # Q5_0 needs a multiple of 32 too
    assert fallback(T.Q6_K, 29568) == T.Q8_0
    assert fallback(T.Q5_K, 29568) == T.Q5_1
    assert fallback(T.Q8_0, 120) == T.F16
    assert fallback(T.Q4_K, 2048) == T.Q4_K


def test_q6_k_and_q4_k_s_plans():
    q6 = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-7b", "q6_k")}
    assert q6["output.weight"] == T.Q6_K and q6["blk.3.ffn_up.weight"] == T.Q6_K
    assert q6["token_embd.weight"] == T.Q6_K and q6["blk.0.attn_norm.weight"] == T.F32
    q4s = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-7b", "q4_k")}
    # Q4_K_S: first four attn_v and the first n/8 ffn_down get Q5_K, output Q6_K
    assert [q4s[f"blk.{i}.attn_v.weight"] for i in range(5)] == [T.Q5_K] * 4 + [T.Q4_K]
    assert [q4s[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [T.Q5_K] * 3 + [T.Q4_K]
    assert q4s["output.weight"] == T.Q6_K and q4s["token_embd.weight"] == T.Q4_K


@pytest.mark.parametrize("model", MODELS)
def test_q5_k_m_plan_is_q4_k_m_one_step_up(llama_plans, model):
    """llama-quant.cpp treats Q5_K_M as Q4_K_M with Q5_K as the base type (the same attn_v /
    ffn_down layers take Q6_K): llama-quantize's Q4_K_M plan with Q4_K -> Q5_K and its fallback
    Q5_0 -> Q5_1 (72B's 29568-wide ffn_down). (Bytes identical to llama-quantize's Q5_K_M on a
    256-wide checkpoint: scripts/check_llamacpp.py, docs/benchmarks.md.)"""
    ours = {p.tensor.name: p.qtype.name for p in _plan(model, "q5_k_m")}
    step_up = {"Q4_K": "Q5_K", "Q5_0": "Q5_1"}
    assert ours == {n: step_up.get(t, t) for n, t in llama_plans[model].items()}


def test_q4_0_plan():
    """Q4_0 everywhere but the output (Q6_K, as llama-quantize picks for it) and the norms."""
    plan = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-7b", "q4_0")}
    assert plan["output.weight"] == T.Q6_K and plan["token_embd.weight"] == T.Q4_0
    assert plan["blk.0.attn_v.weight"] == T.Q4_0 and plan["blk.0.ffn_down.weight"] == T.Q4_0
    assert plan["blk.0.attn_norm.weight"] == T.F32
    tied = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-3b", "q4_0")}
    assert tied["token_embd.weight"] == T.Q6_K


@pytest.mark.parametrize("type_name", list(TEXT_TYPES))
def test_an_importance_matrix_changes_only_q4_0s_first_ffn_downs(type_name):
    """llama-quantize with --imatrix: Q4_0's (Q5_0's) ffn_down on the first n_layer/8 layers takes
    Q4_1 (Q5_1: llama_tensor_get_type's guard), IQ4's keep their type there (Q5_K without one),
    IQ3_XXS's ffn_down keep theirs everywhere (without one: Q4_K on the first eighth, Q3_K after);
    every other type's plan is the same as without one."""
    cfg = parse_config(official_config("qwen2.5-vl-7b"))  # 28 layers: blk.0-2 (28 // 8 = 3)
    n = cfg.text.num_hidden_layers
    plain = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-7b", type_name)}
    weighted = {p.tensor.name: p.qtype for p in plan_text(text_tensors(cfg), TEXT_TYPES[type_name], n, imatrix=True,
                                                          n_gqa=7)}
    changed = {k: (plain[k], weighted[k]) for k in plain if plain[k] != weighted[k]}
    guard = {"q4_0": (T.Q4_0, T.Q4_1), "q5_0": (T.Q5_0, T.Q5_1), "iq4_nl": (T.Q5_K, T.IQ4_NL),
             "iq4_xs": (T.Q5_K, T.IQ4_XS)}.get(type_name)  # IQ4: the guard is there without a matrix
    if type_name == "iq3_xxs":
        assert changed == {f"blk.{i}.ffn_down.weight": (T.Q4_K if i < n // 8 else T.Q3_K, T.IQ3_XXS) for i in range(n)}
        return
    assert changed == ({f"blk.{i}.ffn_down.weight": guard for i in range(n // 8)} if guard else {})


def _with(model: str, type_name: str, overrides: Overrides) -> dict[str, T]:
    cfg = parse_config(official_config(model))
    return {p.tensor.name: p.qtype for p in plan_text(text_tensors(cfg), TEXT_TYPES[type_name],
                                                      cfg.text.num_hidden_layers, overrides=overrides)}


def test_llama_quantizes_overrides():
    """--pure: every matrix the default (norms F32); --output-tensor-type / --token-embedding-type:
    that type; --tensor-type: the first pattern found wins, and the mix's counters skip the
    tensors it names (llama-quantize's; byte-checked against it in docs/benchmarks.md)."""
    pure = _with("qwen2.5-vl-7b", "q4_k_m", Overrides(pure=True))
    assert {q for n, q in pure.items() if not n.endswith("norm.weight") and n.endswith(".weight")} == {T.Q4_K}
    typed = _with("qwen2.5-vl-7b", "q4_k_m", Overrides(output=T.Q8_0, token_embd=T.Q5_K))
    assert typed["output.weight"] == T.Q8_0 and typed["token_embd.weight"] == T.Q5_K
    plain = _with("qwen2.5-vl-7b", "q4_k_m", Overrides())
    assert plain["blk.5.ffn_down.weight"] == T.Q6_K and plain["blk.6.ffn_down.weight"] == T.Q4_K
    named = _with("qwen2.5-vl-7b", "q4_k_m", Overrides(patterns=((r"blk\.0\.ffn_down", T.Q8_0), ("ffn", T.Q5_K))))
    assert named["blk.0.ffn_down.weight"] == T.Q8_0 and named["blk.3.ffn_up.weight"] == T.Q5_K
    assert named["blk.5.ffn_down.weight"] == T.Q5_K  # every ffn_down named: the mix never runs for them
    one = _with("qwen2.5-vl-7b", "q4_k_m", Overrides(patterns=((r"blk\.0\.ffn_down", T.Q8_0),)))
    assert one["blk.5.ffn_down.weight"] == T.Q4_K and one["blk.6.ffn_down.weight"] == T.Q6_K  # counted from blk.1
    tied = _with("qwen2.5-vl-3b", "q8_0", Overrides(output=T.Q6_K))  # Q8_0's mix: a tied embedding takes it
    assert tied["token_embd.weight"] == T.Q6_K and tied["blk.0.attn_q.weight"] == T.Q8_0
    assert _with("qwen2.5-vl-3b", "f16", Overrides(patterns=(("attn", T.Q8_0),)))["blk.0.attn_q.weight"] == T.F16


def test_the_low_bit_mixes():
    """llama_tensor_get_type_impl's Q3_K_S / Q3_K_M / Q3_K_L / Q2_K / Q2_K_S / Q5_K_S rules on the 7B's
    shapes (28 layers, 7 heads per KV head; byte-checked against llama-quantize in
    docs/benchmarks.md on other shapes)."""
    plans = {k: _plan("qwen2.5-vl-7b", k) for k in ("q3_k_s", "q3_k_m", "q3_k_l", "q2_k", "q5_k_s")}
    got = {k: {p.tensor.name: p.qtype for p in v} for k, v in plans.items()}
    for k in got:
        assert got[k]["output.weight"] == T.Q6_K and got[k]["blk.0.attn_norm.weight"] == T.F32
    assert {got["q3_k_s"][f"blk.{i}.{n}.weight"] for i in range(28) for n in ("attn_v", "ffn_down", "attn_output")} \
        == {T.Q3_K}
    m = got["q3_k_m"]
    assert [m[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [m[f"blk.{i}.ffn_down.weight"] for i in range(2)] == [T.Q5_K, T.Q4_K]  # 28 // 16 = 1
    assert m["blk.5.attn_output.weight"] == T.Q4_K and m["blk.5.ffn_up.weight"] == T.Q3_K
    assert {got["q3_k_l"][f"blk.3.{n}.weight"] for n in ("attn_v", "ffn_down", "attn_output")} == {T.Q5_K}
    q2 = got["q2_k"]
    assert q2["blk.0.attn_v.weight"] == T.Q4_K  # 7 heads per KV head: Q4_K (Q3_K under 4)
    assert q2["blk.0.ffn_down.weight"] == q2["blk.0.attn_output.weight"] == T.Q3_K and q2["blk.0.attn_q.weight"] == T.Q2_K
    cfg = parse_config(official_config("qwen2.5-vl-7b"))
    few = {p.tensor.name: p.qtype for p in plan_text(text_tensors(cfg), TEXT_TYPES["q2_k"], 28, n_gqa=2)}
    assert few["blk.0.attn_v.weight"] == T.Q3_K
    assert {got["q5_k_s"][f"blk.{i}.{n}.weight"] for i in range(28) for n in ("attn_v", "ffn_down")} == {T.Q5_K}
    q2s = {g: {p.tensor.name: p.qtype for p in plan_text(text_tensors(cfg), TEXT_TYPES["q2_k_s"], 28, n_gqa=g)}
           for g in (7, 2)}  # Q2_K_S: attn_v Q4_K from 4 heads per KV head, the first eighth of ffn_down Q4_K
    assert [q2s[7][f"blk.{i}.ffn_down.weight"] for i in (2, 3)] == [T.Q4_K, T.Q2_K]  # 28 // 8 = 3
    assert q2s[7]["blk.0.attn_v.weight"] == T.Q4_K and q2s[2]["blk.0.attn_v.weight"] == T.Q2_K
    assert q2s[7]["blk.0.attn_output.weight"] == q2s[7]["token_embd.weight"] == T.Q2_K
    assert q2s[7]["output.weight"] == T.Q6_K
    assert fallback(T.Q3_K, 64) == T.Q4_0 and fallback(T.Q2_K, 96) == T.Q4_0


@pytest.mark.parametrize("type_name,kind", [("iq4_xs", T.IQ4_XS), ("iq4_nl", T.IQ4_NL)])
def test_the_iq4_mixes(type_name, kind):
    """IQ4_NL / IQ4_XS: attn_v Q5_K where 4 or more heads share a KV head, the first eighth of
    ffn_down Q5_K without an importance matrix (not with one), the output Q6_K."""
    cfg = parse_config(official_config("qwen2.5-vl-7b"))
    n = cfg.text.num_hidden_layers

    def plan(n_gqa: int, imatrix: bool) -> dict[str, T]:
        return {p.tensor.name: p.qtype for p in plan_text(text_tensors(cfg), TEXT_TYPES[type_name], n,
                                                          imatrix, n_gqa=n_gqa)}

    p = plan(7, False)
    assert p["output.weight"] == T.Q6_K and p["blk.9.attn_v.weight"] == T.Q5_K and p["blk.9.attn_q.weight"] == kind
    assert [p[f"blk.{i}.ffn_down.weight"] for i in (2, 3)] == [T.Q5_K, kind]  # 28 // 8 = 3
    assert plan(2, False)["blk.9.attn_v.weight"] == kind and plan(7, True)["blk.0.ffn_down.weight"] == kind
    assert fallback(T.IQ4_XS, 64) == T.IQ4_NL and fallback(T.IQ4_NL, 48) == T.F16


def test_tied_embedding_takes_output_type():
    plan = {p.tensor.name: p.qtype for p in _plan("qwen2.5-vl-3b", "q4_k_m")}
    assert "output.weight" not in plan
    assert plan["token_embd.weight"] == T.Q6_K


@pytest.mark.parametrize("vision_type,ffn_down,patch,attn_q", [
    ("f16", T.F16, T.F16, T.F16),
    ("f32", T.F32, T.F32, T.F32),
    ("q8_0", T.F16, T.F32, T.Q8_0),  # 3420 cannot take Q8_0; the patch embedding is never quantized
])
def test_vision_plan(vision_type, ffn_down, patch, attn_q):
    cfg = parse_config(official_config("qwen2.5-vl-3b"))
    plan = {p.tensor.name: p.qtype for p in plan_vision(mmproj_tensors(cfg), vision_type)}
    assert plan["v.blk.0.ffn_down.weight"] == ffn_down
    assert plan["v.patch_embd.weight"] == patch and plan["v.patch_embd.weight.1"] == patch
    assert plan["v.blk.0.attn_q.weight"] == attn_q
    assert plan["v.blk.0.ln1.weight"] == T.F32 and plan["mm.0.bias"] == T.F32


def test_float_types_keep_vectors_f32():
    t = [OutTensor("blk.0.attn_q.bias", (64,), "x"), OutTensor("blk.0.attn_q.weight", (48, 64), "y")]
    plan = plan_text(t, TEXT_TYPES["q8_0"], 1)
    assert [p.qtype for p in plan] == [T.F32, T.Q8_0]
    plan = plan_text([OutTensor("blk.0.attn_q.weight", (64, 40), "y")], TEXT_TYPES["q8_0"], 1)
    assert plan[0].qtype == T.F16  # 40 is not a multiple of 32: converter falls back to F16
