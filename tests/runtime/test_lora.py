"""Run-time LoRA (`qvl-run --lora`, `qvl.load(lora=...)`) and `qvl convert-lora`'s adapter GGUF.

The oracle is peft's own forward of the adapted transformers model (the adapter not merged).
Tolerances: logits within 1e-3 of the largest (float32 on both sides, as test_model.py) and the
greedy tokens the same; a quantized base's product with the adapter minus its product without
is the adapter's term within 1e-5 of its largest value (float32 rounding of the sum). The
adapters are drawn large (A and B N(0, 0.3)): leaving one out moves the logits by far more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from gguf import GGUFReader
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime.cli import app as qvl_app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
from qvl.runtime.lora import LoraError, load_loras, lora_sources
from qvl.runtime.model import ModelError
from qvl.runtime.run_cli import app as run_app
from qvl.runtime.weights import EXACT, PACKED, Weights
from tiny_models import TinySpec, build_model, make_checkpoint, reference_inputs, to_gguf

runner = CliRunner()
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 170, 3), dtype=np.uint8))
PROMPT = "What is in this picture?"
SPEC = TinySpec(dtype=torch.float32, seed=21, vision_depth=2)
TEXT = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ADAPTERS = {  # peft LoraConfig arguments: per-module factors, and rsLoRA
    "patterns": dict(r=4, lora_alpha=8, target_modules=TEXT, alpha_pattern={"v_proj": 2}, rank_pattern={"up_proj": 2}),
    "rslora": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=r".*language_model.*\.(q_proj|down_proj)"),
}


def _peft(lora: dict, folder: Path, seed: int, spec: TinySpec = SPEC):
    tuned = peft.get_peft_model(build_model(spec).float().eval(), peft.LoraConfig(init_lora_weights=False, **lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(folder)
    return tuned.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    src = make_checkpoint(d / "ckpt", SPEC)
    tuned = {name: _peft(lora, d / name, seed=k) for k, (name, lora) in enumerate(ADAPTERS.items())}
    for name in ADAPTERS:
        r = runner.invoke(qvl_app, ["convert-lora", str(d / name), "-o", str(d / f"{name}.gguf")])
        assert r.exit_code == 0, r.output
    return {"dir": d, "f32": to_gguf(src, d / "m.gguf", "f32", "f32"), "q8_0": to_gguf(src, d / "q.gguf", "q8_0"),
            "tuned": tuned, "base": build_model(SPEC).float().eval()}


@pytest.mark.parametrize("name", ADAPTERS)
def test_peft_folder_at_run_time_is_peft(tiny, name):
    model = load(tiny["f32"], device="cpu", dtype=torch.float32, lora=[(tiny["dir"] / name, 1.0)])
    ours = model.prompt_logits(PROMPT, [IMAGE])
    inputs = reference_inputs(model, PROMPT, [IMAGE])
    with torch.no_grad():
        ref, unadapted = tiny["tuned"][name](**inputs).logits[0], tiny["base"](**inputs).logits[0]
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-3 * scale
    assert (unadapted - ref).abs().max().item() > 0.1 * scale
    out = model.generate(PROMPT, [IMAGE], max_new_tokens=16)
    with torch.no_grad():
        gen = tiny["tuned"][name].generate(**inputs, max_new_tokens=16, do_sample=False,
                                           eos_token_id=sorted(model.stop_ids))
    assert out.token_ids == [t for t in gen[0, inputs["input_ids"].shape[1]:].tolist() if t not in model.stop_ids]


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_gguf_is_the_peft_folder(tiny, name):
    """qvl convert-lora's file applied at run time gives the folder's logits exactly (peft's
    per-module factors folded into B where llama.cpp's alpha / r differs: checked below)."""
    d = tiny["dir"]
    folder = load(tiny["f32"], device="cpu", dtype=torch.float32, lora=[(d / name, 1.0)]).prompt_logits(PROMPT, [])
    gguf = load(tiny["f32"], device="cpu", dtype=torch.float32, lora=[(d / f"{name}.gguf", 1.0)])
    torch.testing.assert_close(gguf.prompt_logits(PROMPT, []), folder, rtol=0, atol=1e-5 * folder.abs().max().item())


def test_adapter_gguf_layout_is_llama_cpps(tiny):
    """convert_lora_to_gguf.py's layout, written out here by hand: metadata, names, ggml shapes
    (lora_a ne = [in, r], lora_b ne = [r, out]), F32; B carries peft's factor over alpha / r."""
    reader = GGUFReader(tiny["dir"] / "patterns.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "qwen2vl" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * SPEC.layers
    q, kv = SPEC.hidden, SPEC.kv_heads * SPEC.hidden // SPEC.heads
    assert tensors["blk.0.attn_q.weight.lora_a"].shape.tolist() == [q, 4]
    assert tensors["blk.1.attn_v.weight.lora_b"].shape.tolist() == [4, kv]
    assert tensors["blk.0.ffn_up.weight.lora_a"].shape.tolist() == [q, 2]  # rank_pattern
    assert tensors["blk.0.ffn_down.weight.lora_a"].shape.tolist() == [SPEC.intermediate, 4]
    assert {t.tensor_type.name for t in tensors.values()} == {"F32"}
    layers = tiny["tuned"]["patterns"].base_model.model.model.language_model.layers
    checked = ((layers[1].self_attn.v_proj, "blk.1.attn_v", 4), (layers[0].mlp.up_proj, "blk.0.ffn_up", 2),
               (layers[0].self_attn.q_proj, "blk.0.attn_q", 4))
    for module, name, rank in checked:
        b = module.lora_B["default"].weight.detach().numpy()
        ratio = module.scaling["default"] / (8.0 / rank)  # llama.cpp applies alpha / r
        np.testing.assert_allclose(tensors[name + ".weight.lora_b"].data, b * ratio, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("qtype", ["q8_0", "f32"])
@pytest.mark.parametrize("mode", [EXACT, PACKED])
def test_matrix_products_add_the_term(tiny, qtype, mode):
    """Each matrix's product (and its fused forms: the next norm, the q/k/v and gate/up stacks)
    with an adapter is the product without it plus the adapter's term."""
    from qvl.runtime.decoder import rms_norm
    from qvl.runtime.stack import Stack

    with GGUFFile(tiny[qtype]) as f:
        loras = load_loras([(tiny["dir"] / "patterns", 1.0)], f.tensors)
        plain, adapted = Weights(f, mode=mode), Weights(f, mode=mode, loras=loras)
        x = torch.randn(5, SPEC.hidden, generator=torch.Generator().manual_seed(1))
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.0.attn_output.weight"):
            term = sum(fa.scale * (x @ fa.a.T) @ fa.b.T for fa in loras[name])
            want = plain.matrix(name).matmul(x) + term
            got = adapted.matrix(name).matmul(x)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * term.abs().max().item())
        norm = torch.rand(SPEC.hidden) + 0.5
        y, normed = adapted.matrix("blk.0.attn_output.weight").matmul_norm(x, norm, 1e-6, residual=x)
        torch.testing.assert_close(normed, rms_norm(y, norm, 1e-6))
        names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]
        for got, name in zip(Stack([adapted.matrix(n) for n in names]).matmul(x), names):
            torch.testing.assert_close(got, adapted.matrix(name).matmul(x))
        gate, up = adapted.matrix("blk.1.ffn_gate.weight"), adapted.matrix("blk.1.ffn_up.weight")
        torch.testing.assert_close(Stack([gate, up]).swiglu(x), torch.nn.functional.silu(gate.matmul(x)) * up.matmul(x))


def test_quantized_base_through_qvl_run(tiny, tmp_path):
    """qvl-run on a Q8_0 base with --lora / --lora-scaled: the adapter changes the answer, scale 0
    is the base's, and `A,B` lists and FILE:SCALE read as llama.cpp reads them."""
    d = tiny["dir"]

    def answer(*flags: str) -> str:
        r = runner.invoke(run_app, [str(tiny["q8_0"]), "--prompt", PROMPT, "-n", "12", "--cpu", *flags])
        assert r.exit_code == 0, r.output
        return r.stdout

    base = answer()
    assert answer("--lora", str(d / "patterns.gguf")) != base
    assert answer("--lora-scaled", f"{d / 'patterns.gguf'}:0") == base
    both = answer("--lora", f"{d / 'patterns.gguf'},{d / 'rslora'}")
    assert answer("--lora-scaled", f"{d / 'patterns.gguf'}:1,{d / 'rslora'}:1.0") == both
    assert lora_sources(["a.gguf,b"], ["c:0.5"]) == [("a.gguf", 1.0), ("b", 1.0), ("c", 0.5)]


def _bad_peft(tiny, tmp_path, target: str) -> Path:
    _peft(dict(r=2, lora_alpha=2, target_modules=target), tmp_path / "bad", seed=9)
    return tmp_path / "bad"


@pytest.mark.parametrize("case, expect", [
    ("model as adapter", "not a LoRA adapter GGUF (general.type 'model'"),
    ("missing", "no such LoRA adapter (a GGUF file or a PEFT folder)"),
    ("vision", "not a text model matrix: merge it with qvl-convert --lora"),
    ("embeddings", "adapts the token embeddings 'model.embed_tokens.weight': merge it with qvl-convert --lora"),
    ("other model", "'blk.0.attn_q.weight' is 64 x 64; the adapter's A is [4, 128]"),
    ("scale", "--lora-scaled 'x.gguf:half': FILE:SCALE"),
])
def test_adapters_that_do_not_fit_are_one_line(tiny, tmp_path, case, expect):
    flag, value = "--lora", {"model as adapter": str(tiny["q8_0"]), "missing": str(tmp_path / "none.gguf")}.get(case)
    if case == "vision":
        value = str(_bad_peft(tiny, tmp_path, r".*visual.*\.qkv"))
    elif case == "embeddings":
        value = str(_bad_peft(tiny, tmp_path, r".*embed_tokens"))
    elif case == "other model":
        wide = TinySpec(dtype=torch.float32, hidden=128, intermediate=160, seed=2)
        _peft(dict(r=4, lora_alpha=4, target_modules=r".*language_model.*\.q_proj"), tmp_path / "wide", 1, wide)
        value = str(tmp_path / "wide")
    elif case == "scale":
        flag, value = "--lora-scaled", "x.gguf:half"
    r = runner.invoke(run_app, [str(tiny["q8_0"]), "--prompt", "hi", "-n", "2", "--cpu", flag, value])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qvl-run: error: ") and expect in lines[0], r.stderr
    if case not in ("scale", "missing"):
        with pytest.raises(ModelError, match="LoRA|lora|adapter|A is"):
            load(tiny["q8_0"], device="cpu", lora=[(value, 1.0)])


def test_convert_lora_refusals_and_warning(tiny, tmp_path):
    _peft(dict(r=2, lora_alpha=2, target_modules=r".*(visual.*\.qkv|language_model.*\.q_proj)"), tmp_path / "mixed", 4)
    r = runner.invoke(qvl_app, ["convert-lora", str(tmp_path / "mixed"), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0, r.output
    assert "warning: 2 vision tower weights' pairs left out (first: visual.blocks.0.attn.qkv.weight)" in r.stderr
    assert {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors} == {
        f"blk.{i}.attn_q.weight.lora_{x}" for i in range(SPEC.layers) for x in "ab"}
    r = runner.invoke(qvl_app, ["convert-lora", str(tmp_path / "mixed"), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code == 2 and "already exists (use --force to overwrite)" in r.stderr
    _peft(dict(r=2, lora_alpha=2, target_modules=TEXT, modules_to_save=["lm_head"]), tmp_path / "head", 5)
    r = runner.invoke(qvl_app, ["convert-lora", str(tmp_path / "head"), "-o", str(tmp_path / "h.gguf")])
    assert r.exit_code == 2 and "saves 'lm_head.weight' whole (modules_to_save)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if "h.gguf" in p.name) == []


def test_perplexity_with_an_adapter(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)

    def ppl(*flags: str) -> float:
        r = runner.invoke(qvl_app, ["perplexity", str(tiny["q8_0"]), "-f", str(text), "-c", "32", "--cpu", "--json",
                                    *flags])
        assert r.exit_code == 0, r.output
        import json

        return json.loads(r.stdout)["ppl"]

    plain, adapted = ppl(), ppl("--lora", str(tiny["dir"] / "patterns.gguf"))
    assert adapted != plain
    assert ppl("--lora", str(tiny["dir"] / "patterns")) == pytest.approx(adapted, rel=1e-6)
    with pytest.raises(LoraError):
        lora_sources([], ["no-scale"])


ADAPTER_LAYER = "application/vnd.ollama.image.adapter"


def test_modelfile_adapters_are_stored_and_applied(tiny, tmp_path, monkeypatch):
    """Ollama's ADAPTER lines with a GGUF FROM: each adapter a layer of its own (a PEFT folder
    written as its LoRA GGUF first), applied when the stored model runs (as --lora would), kept by
    a model made FROM it, and shown by `qvl show --modelfile`."""
    from qvl.runtime.store import Store

    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    d = tiny["dir"]
    (d / "Modelfile").write_text(f"FROM {tiny['q8_0'].name}\nADAPTER ./patterns.gguf\nADAPTER ./rslora\n")
    r = runner.invoke(qvl_app, ["create", "tuned:1", "-f", str(d / "Modelfile")])
    assert r.exit_code == 0, r.output
    store = Store()
    layers = [x for x in store.get("tuned:1").manifest["layers"] if x["mediaType"] == ADAPTER_LAYER]
    assert len(layers) == 2
    assert store.adapters(store.get("tuned:1"))[0].read_bytes() == (d / "patterns.gguf").read_bytes()
    assert not [p for p in store.root.iterdir() if p.name.startswith("adapter-")]  # the folder's GGUF, removed

    def answer(model: str, *flags: str) -> str:
        r = runner.invoke(run_app, [model, "--prompt", PROMPT, "-n", "12", "--cpu", *flags])
        assert r.exit_code == 0, r.output
        return r.stdout

    want = answer(str(tiny["q8_0"]), "--lora", f"{d / 'patterns.gguf'},{d / 'rslora'}")
    assert answer("tuned:1") == want != answer(str(tiny["q8_0"]))
    (tmp_path / "Child").write_text("FROM tuned:1\nSYSTEM Be brief.\n")
    assert runner.invoke(qvl_app, ["create", "child:1", "-f", str(tmp_path / "Child")]).exit_code == 0
    assert store.adapters(store.get("child:1")) == store.adapters(store.get("tuned:1"))
    table = runner.invoke(qvl_app, ["show", "tuned:1"]).stdout
    assert "adapter           patterns (LoRA, alpha 8, 14 matrices)" in table
    assert "adapter           rslora (LoRA, alpha 3, 4 matrices)" in table
    shown = runner.invoke(qvl_app, ["show", "tuned:1", "--modelfile"]).stdout
    assert [line for line in shown.splitlines() if line.startswith("ADAPTER ")] == [
        f"ADAPTER {p}" for p in store.adapters(store.get("tuned:1"))]
    (d / "Bad").write_text(f"FROM {tiny['q8_0'].name}\nADAPTER ./{tiny['f32'].name}\n")
    r = runner.invoke(qvl_app, ["create", "bad:1", "-f", str(d / "Bad")])
    assert r.exit_code == 2 and f"ADAPTER ./{tiny['f32'].name}: " in r.stderr and "not a LoRA adapter GGUF" in r.stderr


def test_served_create_takes_adapters(tiny, tmp_path):
    """/api/create's `adapters` ({file: digest} of blobs sent first), as Ollama's API has it."""
    from qvl.runtime.server import RequestError, ServeConfig, Service
    from qvl.runtime.store import Store
    from qvl.runtime.store_api import create

    store = Store(tmp_path / "models")
    service = Service(ServeConfig(), store)
    model, _ = store.add_blob(tiny["q8_0"])
    adapter, _ = store.add_blob(tiny["dir"] / "patterns.gguf")
    create(service, {"model": "x:1", "files": {"q.gguf": model}, "adapters": {"a.gguf": adapter}, "stream": False})
    assert [str(p) for p in store.adapters(store.get("x:1"))] == [str(store.blob_path(adapter))]
    with pytest.raises(RequestError, match="adapters: {file name: sha256 digest"):
        create(service, {"model": "y:1", "files": {"q.gguf": model}, "adapters": ["a.gguf"]})
    with pytest.raises(RequestError, match="ADAPTER ./x.gguf: a blob sent to /api/blobs/"):
        create(service, {"model": "y:1", "modelfile": f"FROM @{model}\nADAPTER ./x.gguf\n"})


def test_gpu_plan_counts_the_adapters(tiny):
    """--max-vram's plan: each layer's adapter factors go up with it (bf16, float32 with --f32)."""
    from qvl.runtime.config import text_config
    from qvl.runtime.placement import footprint

    with GGUFFile(tiny["q8_0"]) as f:
        cfg = text_config(f)
        loras = load_loras([(tiny["dir"] / "patterns", 1.0), (tiny["dir"] / "rslora", 1.0)], f.tensors)
        for half, size in ((True, 2), (False, 4)):
            plain = footprint(cfg, f.tensors, None, half=half)
            adapted = footprint(cfg, f.tensors, None, half=half, loras=loras)
            for i in range(cfg.n_layer):
                values = sum(x.a.numel() + x.b.numel() for name, fs in loras.items() if name.startswith(f"blk.{i}.")
                             for x in fs)
                assert values > 0 and adapted.layer_bytes[i] - plain.layer_bytes[i] == size * values
            assert adapted.output_bytes == plain.output_bytes


def test_quantize_merges_an_adapter(tiny, tmp_path):
    """qvl quantize --lora (llama-export-lora's merge, then the type): the F32 file's adapted
    matrices are W + s (B A) (1e-6 of the largest), its logits the run-time adapter's (1e-4 of the
    largest); a quantized base needs --allow-requantize, as any requantizing does."""
    d = tiny["dir"]
    out = tmp_path / "merged.gguf"
    r = runner.invoke(qvl_app, ["quantize", str(tiny["f32"]), "f32", "--lora", str(d / "patterns.gguf"), "-o", str(out),
                                "-q"])
    assert r.exit_code == 0, r.output
    with GGUFFile(tiny["f32"]) as base, GGUFFile(out) as merged:
        loras = load_loras([(d / "patterns.gguf", 1.0)], base.tensors)
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"):
            f = loras[name][0]
            want = base.raw(name).view(np.float32).reshape(f.b.shape[0], -1) + f.scale * (f.b @ f.a).numpy()
            got = merged.raw(name).view(np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=name)
        assert merged.raw("blk.0.attn_norm.weight").tobytes() == base.raw("blk.0.attn_norm.weight").tobytes()
    runtime = load(tiny["f32"], device="cpu", dtype=torch.float32, lora=[(d / "patterns.gguf", 1.0)])
    ours = runtime.prompt_logits(PROMPT, [IMAGE])
    theirs = load(out, device="cpu", dtype=torch.float32, mmproj=d / "mmproj-m.gguf").prompt_logits(PROMPT, [IMAGE])
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * ours.abs().max().item())
    r = runner.invoke(qvl_app, ["quantize", str(tiny["q8_0"]), "q8_0", "--lora", str(d / "rslora"), "-o",
                                str(tmp_path / "x.gguf"), "-q"])
    assert r.exit_code == 2 and "is Q8_0 already" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_imatrix_of_the_adapted_model(tiny, tmp_path):
    """qvl imatrix --lora: the fine-tune's importance matrix (for qvl quantize --lora --imatrix):
    the first layer's inputs are the base's (an adapter changes what comes after its matrices),
    a later layer's are not; then quantizing with both runs."""
    from qvl.convert.imatrix import read_imatrix

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    d = tiny["dir"]
    values = {}
    for label, flags in (("base", []), ("adapted", ["--lora", str(d / "patterns.gguf")])):
        out = tmp_path / f"{label}.imatrix.gguf"
        r = runner.invoke(qvl_app, ["imatrix", str(tiny["f32"]), "-f", str(text), "-c", "32", "-o", str(out), "--cpu",
                                    *flags])
        assert r.exit_code == 0, r.output
        values[label] = read_imatrix(out).values
    np.testing.assert_allclose(values["adapted"]["blk.0.attn_q.weight"], values["base"]["blk.0.attn_q.weight"],
                               rtol=1e-5)
    assert not np.allclose(values["adapted"]["blk.1.attn_q.weight"], values["base"]["blk.1.attn_q.weight"], rtol=1e-2)
    r = runner.invoke(qvl_app, ["quantize", str(tiny["f32"]), "q4_0", "--lora", str(d / "patterns.gguf"), "--imatrix",
                                str(tmp_path / "adapted.imatrix.gguf"), "-o", str(tmp_path / "q.gguf"), "-q"])
    assert r.exit_code == 0, r.output
