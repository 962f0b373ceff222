"""qvl-convert --lora: PEFT LoRA adapters merged into the weights, against peft's own merge.

The oracle is peft's merge_and_unload of the adapter on the transformers model. Tolerances: the
converted F32 tensors are peft's merged ones within 1e-6 of each tensor's largest value (the
rank-r products B A are float32 on both sides, summed by numpy's BLAS here and torch's there);
the converted model's logits are the merged model's within 1e-3 of the largest logit (float32 on
both sides, as tests/runtime/test_model.py) and its 24 greedy tokens are the same. Each adapter's
deltas are large (its A and B drawn N(0, 0.3)), so a tensor merged wrong or left out moves the
logits by far more than that: checked against the base model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_tensors import expected_gguf_tensors, read_tensors
from qvl.convert.cli import app
from qvl.runtime.loader import load
from tiny_models import TinySpec, build_model, legacy_state_dict, make_checkpoint, reference_inputs

runner = CliRunner()
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 170, 3), dtype=np.uint8))  # 4x6 merged

# spec, peft's LoraConfig arguments: every kind of tensor an adapter can change, both families
CASES = {
    "qwen2.5": (TinySpec(dtype=torch.float32, seed=7), dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj", "qkv", "proj",
                                           "mlp.0", "embed_tokens"],
        modules_to_save=["lm_head"], alpha_pattern={"v_proj": 2}, rank_pattern={"gate_proj": 2})),
    "qwen2-tied-hf5": (TinySpec(family="qwen2_vl", tied=True, layout="hf5", dtype=torch.float32, seed=8), dict(
        r=6, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "up_proj", "fc1", "mlp.2", "embed_tokens"])),
}


def _convert(*args: str):
    return runner.invoke(app, [*args, "-q"])


def _adapter(spec: TinySpec, lora: dict, folder: Path, seed: int):
    """A peft LoRA of `spec`'s model, drawn large, saved to `folder`; returns peft's merged model."""
    model = build_model(spec).float().eval()
    tuned = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(folder)
    return tuned.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    out = {}
    for name, (spec, lora) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        src = make_checkpoint(d / "ckpt", spec)
        merged = _adapter(spec, lora, d / "adapter", seed=11)
        r = _convert(str(src), "-o", str(d / "m.gguf"), "--type", "f32", "--vision-type", "f32",
                     "--lora", str(d / "adapter"))
        assert r.exit_code == 0, r.output
        out[name] = (d, src, merged, build_model(spec).float().eval())
    return out


@pytest.mark.parametrize("name", CASES)
def test_tensors_are_peft_merged_ones(adapted, name):
    d, _, merged, base = adapted[name]
    spec = CASES[name][0]
    want = expected_gguf_tensors(legacy_state_dict(merged), spec.family)
    before = expected_gguf_tensors(legacy_state_dict(base), spec.family)
    if spec.tied:
        want.pop("output.weight", None)
    got = {**read_tensors(d / "m.gguf"), **read_tensors(d / "mmproj-m.gguf")}
    assert set(got) == set(want)
    changed = 0
    for key, w in want.items():
        data = got[key][1].reshape(w.shape)
        np.testing.assert_allclose(data, w, rtol=0, atol=1e-6 * np.abs(w).max(), err_msg=key)
        changed += not np.array_equal(w, before[key])
    assert changed == CHANGED[name]


# GGUF tensors each case's adapter changes, counted from its targets on 2 text layers and 2
# vision blocks: qwen2.5: q, v, o 2 each, ffn_down and ffn_gate 4 each (text and vision), qkv's
# q, k and v 6, attn_out 2, the patch embedding's two halves, mm.0, token_embd, output (saved
# whole); qwen2: k and ffn_up 2 each (its vision MLP is fc1 / fc2), vision ffn_up (fc1) 2, mm.2,
# token_embd (the output tied to it)
CHANGED = {"qwen2.5": 27, "qwen2-tied-hf5": 8}


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_tokens_are_the_merged_model(adapted, name):
    d, _, merged, base = adapted[name]
    model = load(d / "m.gguf")
    for prompt, images in (("What is in this picture?", [IMAGE]), ("Describe the weather in two words.", [])):
        ours = model.prompt_logits(prompt, images)
        inputs = reference_inputs(model, prompt, images)
        with torch.no_grad():
            ref, unadapted = merged(**inputs).logits[0], base(**inputs).logits[0]
        scale = ref.abs().max().item()
        assert (ours - ref).abs().max().item() <= 1e-3 * scale
        assert (unadapted - ref).abs().max().item() > 0.1 * scale  # the adapter matters
    out = model.generate("What is in this picture?", [IMAGE], max_new_tokens=24)
    inputs = reference_inputs(model, "What is in this picture?", [IMAGE])
    with torch.no_grad():
        ref = merged.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=sorted(model.stop_ids))
    ref_new = [t for t in ref[0, inputs["input_ids"].shape[1]:].tolist() if t not in model.stop_ids]
    assert out.token_ids == ref_new


def test_scale_and_two_adapters_add_their_deltas(adapted, tmp_path):
    d, src, merged, base = adapted["qwen2.5"]
    spec, lora = CASES["qwen2.5"]
    merged2 = _adapter(spec, {**lora, "modules_to_save": None}, tmp_path / "second", seed=12)
    r = _convert(str(src), "-o", str(tmp_path / "m.gguf"), "--type", "f32", "--lora", str(d / "adapter"),
                 "--lora", str(tmp_path / "second"), "--lora-scale", "0.5")
    assert r.exit_code == 0, r.output
    got = read_tensors(tmp_path / "m.gguf")
    first, second, plain = (expected_gguf_tensors(legacy_state_dict(m), "qwen2_5_vl") for m in (merged, merged2, base))
    for key in ("blk.0.attn_q.weight", "blk.1.ffn_gate.weight", "token_embd.weight"):
        w = plain[key] + 0.5 * (first[key] - plain[key]) + 0.5 * (second[key] - plain[key])
        np.testing.assert_allclose(got[key][1].reshape(w.shape), w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=key)
    # a whole tensor an adapter saves replaces the base's, unscaled
    np.testing.assert_array_equal(got["output.weight"][1].reshape(first["output.weight"].shape), first["output.weight"])


def _same_tensors(a: Path, b: Path) -> None:
    mine, theirs = read_tensors(a), read_tensors(b)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key][0] == theirs[key][0], key
        np.testing.assert_array_equal(mine[key][1], theirs[key][1], err_msg=key)


def test_legacy_module_names_merge_the_same(adapted, tmp_path):
    """Adapters trained on transformers < 4.52 name modules model.layers.* and visual.*."""
    d, src, _, _ = adapted["qwen2.5"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((d / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(d / "adapter" / "adapter_model.safetensors")
    renamed = {k.replace("model.language_model.", "model.").replace("base_model.model.model.visual.",
                                                                     "base_model.model.visual."): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, old / "adapter_model.safetensors")
    r = _convert(str(src), "-o", str(tmp_path / "m.gguf"), "--type", "q8_0", "--lora", str(old))
    assert r.exit_code == 0, r.output
    r = _convert(str(src), "-o", str(tmp_path / "n.gguf"), "--type", "q8_0", "--lora", str(d / "adapter"))
    assert r.exit_code == 0, r.output
    _same_tensors(tmp_path / "m.gguf", tmp_path / "n.gguf")
    _same_tensors(tmp_path / "mmproj-m.gguf", tmp_path / "mmproj-n.gguf")


def test_modelfile_adapter_is_merged_by_qvl_create(adapted, tmp_path, monkeypatch):
    """Ollama's ADAPTER line: with FROM a checkpoint folder, `qvl create` merges it as --lora does."""
    from qvl.runtime.cli import app as qvl_app
    from qvl.runtime.store import Store

    d, src, _, _ = adapted["qwen2.5"]
    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    (d / "Modelfile").write_text("FROM ./ckpt\nADAPTER ./adapter\nPARAMETER temperature 0\n")
    r = runner.invoke(qvl_app, ["create", "tuned:1", "-f", str(d / "Modelfile"), "-q", "q8_0"])
    assert r.exit_code == 0, r.output
    r = _convert(str(src), "-o", str(tmp_path / "m.gguf"), "--type", "q8_0", "--lora", str(d / "adapter"))
    assert r.exit_code == 0, r.output
    stored, projector = Store().resolve("tuned:1")
    _same_tensors(stored, tmp_path / "m.gguf")
    _same_tensors(projector, tmp_path / "mmproj-m.gguf")


def test_dry_run_names_the_adapter(adapted, tmp_path):
    d, src, _, _ = adapted["qwen2.5"]
    r = _convert(str(src), "-o", str(tmp_path / "m.gguf"), "--lora", str(d / "adapter"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"merging LoRA {d / 'adapter'}: 21 matrices, rank 4, alpha 8, 2 replaced" in r.stdout
    assert list(tmp_path.iterdir()) == []


def _edited(adapted, tmp_path, config: dict | None = None, tensors=None) -> Path:
    d = adapted["qwen2.5"][0] / "adapter"
    dst = tmp_path / "bad"
    dst.mkdir()
    cfg = json.loads((d / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    state = load_file(d / "adapter_model.safetensors")
    save_file(tensors(state) if tensors else state, dst / "adapter_model.safetensors")
    return dst


def _renamed(old: str, new: str):
    return lambda state: {k.replace(old, new): v for k, v in state.items()}


def _q_proj(key: str) -> str:
    return f"base_model.model.model.language_model.layers.0.self_attn.q_proj.{key}"


BAD = {
    "dora": (dict(use_dora=True), None, "use_dora is set: DoRA adapters are not supported"),
    "lora bias": (None, lambda s: {**s, _q_proj("lora_B.bias"): torch.zeros(64)}, "LoRA biases"),
    "other method": (dict(peft_type="IA3"), None, "peft_type 'IA3': qvl merges LORA adapters only"),
    "no alpha": (dict(lora_alpha=None), None, "'lora_alpha' must be a positive number"),
    "rank": (dict(r=5), None, "has rank 4 (B: 4), adapter_config.json says 5"),
    "half a pair": (None, lambda s: {k: v for k, v in s.items() if k != _q_proj("lora_B.weight")},
                    "has lora_A but no lora_B"),
    "unknown module": (None, _renamed("self_attn.q_proj", "self_attn.x_proj"),
                       "adapts 'model.layers.0.self_attn.x_proj.weight': no such tensor in the model"),
    "resized vocabulary": (None, lambda s: {k: (torch.cat([v, v[:, :4]], 1) if "embedding_A" in k else v)
                                            for k, v in s.items()}, "[1060, 64], the model's is [1056, 64]"),
    "not peft's": (None, _renamed("base_model.model.", "model."), "is not a peft adapter tensor"),
}


@pytest.mark.parametrize("case", BAD)
def test_adapters_qvl_cannot_merge_are_refused(adapted, tmp_path, case):
    config, tensors, expect = BAD[case]
    bad = _edited(adapted, tmp_path, config, tensors)
    out = tmp_path / "out"
    out.mkdir()
    r = _convert(str(adapted["qwen2.5"][1]), "-o", str(out / "m.gguf"), "--lora", str(bad))
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qvl-convert: error: "), r.stderr
    assert expect in lines[0], lines[0]
    assert list(out.iterdir()) == []


def test_lm_head_of_a_tied_model_is_refused(adapted, tmp_path):
    _, src, _, _ = adapted["qwen2-tied-hf5"]
    spec, lora = CASES["qwen2-tied-hf5"]
    _adapter(spec, {**lora, "target_modules": ["lm_head"]}, tmp_path / "head", seed=3)
    r = _convert(str(src), "-o", str(tmp_path / "m.gguf"), "--lora", str(tmp_path / "head"))
    assert r.exit_code == 2, r.output
    assert "adapts 'lm_head.weight': " in r.stderr


@pytest.mark.parametrize("what, expect", [
    ("missing", "adapter_config.json: not found"),
    ("bin", "adapter_model.safetensors: not found (it has adapter_model.bin: save it with safe_serialization=True)"),
])
def test_missing_adapter_files(adapted, tmp_path, what, expect):
    folder = tmp_path / "adapter"
    if what == "bin":
        folder.mkdir()
        (folder / "adapter_config.json").write_text((adapted["qwen2.5"][0] / "adapter" / "adapter_config.json")
                                                    .read_text())
        (folder / "adapter_model.bin").write_bytes(b"\0")
    r = _convert(str(adapted["qwen2.5"][1]), "-o", str(tmp_path / "m.gguf"), "--lora", str(folder))
    assert r.exit_code == 2, r.output
    assert expect in r.stderr
