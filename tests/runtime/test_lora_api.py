"""Run-time adapters whose scales change while the model stays loaded: Adapters.set_scales (the
model's logits at new scales are those of a model loaded at them), the prompt cache not reused
across scales, and llama.cpp server's GET / POST /lora-adapters and a request's `lora` on `qvl
serve` (lora_api.py).

Tolerances: a model whose scales were changed and one loaded at those scales run the same
float32 operations (a term at scale 0 is skipped), so their logits are equal within 1e-6 of the
largest (allowing for nothing but summation order); against the model loaded without adapters,
whose q/k/v and gate/up are stacked and whose norms are fused where an adapted matrix's are not,
1e-5 of the largest (float32 rounding of differently grouped sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from serving import MODEL, Running
from typer.testing import CliRunner

from qvl.runtime.cli import app as qvl_app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
from qvl.runtime.lora import load_adapters
from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.weights import EXACT, Weights

runner = CliRunner()
PROMPT = "Tell me a story about a red fox."
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_adapter(model: Path, out: Path, seed: int, rank: int = 4, alpha: float = 8.0,
                  task: str | None = None) -> Path:
    """A llama.cpp LoRA GGUF for every matrix of `model`'s layers, factors N(0, 0.5)."""
    rng = np.random.default_rng(seed)
    with GGUFFile(model) as f:
        shapes = {n: i.shape for n, i in f.tensors.items() if n.startswith("blk.") and n.split(".")[2] in MATRICES
                  and n.endswith(".weight")}
    w = GGUFWriter(out, "qwen2vl")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    if task is not None:
        w.add_string("adapter.lora.task_name", task)
    for name, (rows, cols) in shapes.items():
        w.add_tensor(name + ".lora_a", (0.5 * rng.standard_normal((rank, cols))).astype(np.float32))
        w.add_tensor(name + ".lora_b", (0.5 * rng.standard_normal((rows, rank))).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def adapters(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-api")
    return (write_adapter(files / MODEL, d / "a.gguf", 1, task="story"),
            write_adapter(files / MODEL, d / "b.gguf", 2, rank=2, alpha=0.0))


def _logits(model) -> torch.Tensor:
    return model.prompt_logits(PROMPT, [])


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=rel * want.abs().max().item())


def test_new_scales_are_a_model_loaded_at_them(files, adapters):
    a, b = adapters
    model = load(files / MODEL, device="cpu", dtype=torch.float32, lora=[(a, 1.0), (b, 1.0)])
    both = _logits(model)
    model.adapters.set_scales([0.5, 0.0])
    assert model.adapters.scales() == [0.5, 0.0]
    _close(_logits(model), _logits(load(files / MODEL, device="cpu", dtype=torch.float32, lora=[(a, 0.5)])), 1e-6)
    model.adapters.set_scales([0.0, 0.0])
    plain = _logits(load(files / MODEL, device="cpu", dtype=torch.float32))
    _close(_logits(model), plain, 1e-5)
    assert (both - plain).abs().max().item() > 0.1 * plain.abs().max().item()  # the adapters matter
    model.adapters.set_scales([1.0, 1.0])
    _close(_logits(model), both, 1e-6)


def test_a_cache_made_at_other_scales_is_not_reused(files, adapters):
    a, b = adapters
    model = load(files / MODEL, device="cpu", dtype=torch.float32, lora=[(a, 1.0), (b, 1.0)])
    first = model.generate(PROMPT, max_new_tokens=6)
    assert model.generate(PROMPT, max_new_tokens=6).reused_tokens > 0  # same scales: reused
    model.adapters.set_scales([0.0, 0.0])
    off = model.generate(PROMPT, max_new_tokens=6)
    assert off.reused_tokens == 0
    assert off.token_ids == load(files / MODEL, device="cpu", dtype=torch.float32).generate(
        PROMPT, max_new_tokens=6).token_ids
    assert off.token_ids != first.token_ids
    model.adapters.set_scales([1.0, 1.0])
    again = model.generate(PROMPT, max_new_tokens=6)
    assert again.reused_tokens == 0 and again.token_ids == first.token_ids


@pytest.mark.parametrize("side", ["cpu", "device"])
def test_a_matrix_reads_the_scale_at_each_product(files, adapters, side):
    """A matrix's product follows its adapter's scale as it changes, on the CPU (the number; 0
    skips the term) and on the accelerator's side (A kept there times the scale, written again in
    place by set_scales, where a captured CUDA graph reads it: the same storage throughout; here a
    dense copy on the CPU takes that path).
    The F16 weight's device copy and its factors are bf16 there: the term within 1e-2 of its
    largest value (x, A, the rank-r product and B each rounded to 8 bits, 2**-8 = 0.4 % each);
    float32 on the CPU: 1e-5. Scale 0 adds nothing on either side."""
    a, _ = adapters
    name = "blk.1.ffn_down.weight"
    with GGUFFile(files / MODEL) as f:
        model = load_adapters([(a, 1.0)], f.tensors)
        plain, adapted = Weights(f, mode=EXACT).matrix(name), Weights(f, mode=EXACT, loras=model.factors).matrix(name)
        if side == "device":
            plain, adapted = plain.to_device("cpu", kernels=False), adapted.to_device("cpu", kernels=False)
            assert all(fa.on_device for fa in adapted.loras)
        x = torch.randn(3, f.tensors[name].shape[1], generator=torch.Generator().manual_seed(4))
        fa = model.factors[name][0]
        term = fa.gain * (x @ fa.a.T) @ fa.b.T
        base = plain.matmul(x)
        tol = (1e-2 if side == "device" else 1e-5) * term.abs().max().item()
        storage = adapted.loras[0].a.data_ptr()
        for scale in (1.0, -0.5, 0.0, 2.0):
            model.set_scales([scale])
            got = adapted.matmul(x)
            torch.testing.assert_close(got - base, scale * term, rtol=0, atol=abs(scale) * tol)
        assert adapted.loras[0].a.data_ptr() == storage


@pytest.fixture(scope="module")
def served(store, files, adapters):
    a, b = adapters
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), lora=((str(a), 1.0), (str(b), 0.5))), store))
    yield r
    r.server.shutdown()


def _complete(r, lora=None) -> dict:
    body = {"prompt": PROMPT, "n_predict": 6, "cache_prompt": True}
    return r.json("/completion", body if lora is None else {**body, "lora": lora})


def _chat(r, lora) -> str:
    reply = r.json("/v1/chat/completions", {"max_tokens": 6, "lora": lora,
                                            "messages": [{"role": "user", "content": PROMPT}]})
    return reply["choices"][0]["message"]["content"]


def test_lora_adapters_lists_and_sets_scales(served, adapters):
    a, b = adapters
    listed = served.json("/lora-adapters")
    assert listed == [{"id": 0, "path": str(a), "scale": 1.0, "task_name": "story", "prompt_prefix": ""},
                      {"id": 1, "path": str(b), "scale": 0.5, "task_name": "", "prompt_prefix": ""}]
    on = _complete(served)["content"]
    assert served.json("/lora-adapters", [{"id": 1, "scale": 0.25}]) == {"success": True}
    assert [x["scale"] for x in served.json("/lora-adapters")] == [0.0, 0.25]  # left out: 0, as llama.cpp's
    served.json("/lora-adapters", [])
    off = _complete(served)
    assert off["tokens_cached"] == 0  # made at the old scales: read again
    assert _complete(served)["tokens_cached"] > 0
    assert off["content"] != on
    served.json("/lora-adapters", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])
    assert _complete(served)["content"] == on


def test_a_requests_lora_is_its_own(served):
    served.json("/lora-adapters", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])
    on = _complete(served)["content"]
    assert _complete(served, [])["content"] == on  # an empty list: the set scales
    off = _complete(served, [{"id": 1, "scale": 0}])["content"]
    assert off != on
    assert _complete(served, [{"id": 0, "scale": 0.0}])["content"] == off
    assert [x["scale"] for x in served.json("/lora-adapters")] == [1.0, 0.5]  # the request's alone
    assert _complete(served)["content"] == on
    assert _chat(served, [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}]) != _chat(served, [{"id": 1, "scale": 0}])


def test_qvl_embed_lora_is_the_servers(served, files, adapters):
    """`qvl embed --lora` (llama-embedding's flags) gives the vectors /api/embed gives with the
    same adapters at the same scales; without them, other vectors."""
    a, b = adapters
    served.json("/lora-adapters", [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.5}])
    texts = ["a red fox", "a story"]
    want = served.json("/api/embed", {"input": texts})["embeddings"]

    def embed(*flags: str) -> list:
        r = runner.invoke(qvl_app, ["embed", str(files / MODEL), *texts, "--cpu", *flags])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["embeddings"]

    assert np.allclose(embed("--lora", str(a), "--lora-scaled", f"{b}:0.5"), want, atol=1e-6)
    assert not np.allclose(embed(), want, atol=1e-2)
    r = runner.invoke(qvl_app, ["embed", str(files / MODEL), "x", "--cpu", "--lora-scaled", "x.gguf"])
    assert r.exit_code == 2 and "--lora-scaled 'x.gguf': FILE:SCALE" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("path,body,expect", [
    ("/lora-adapters", {"id": 0, "scale": 1}, "request body: a list of"),
    ("/lora-adapters", [{"id": 2, "scale": 1}], "request body[0]: an object with an adapter's id (the model's "
                                                 "adapters: ids 0 to 1"),
    ("/lora-adapters", [{"id": 0, "scale": "high"}], "request body[0].scale: a number"),
    ("/completion", {"prompt": "Hi", "lora": [{"scale": 1}]}, "lora[0]: an object with an adapter's id"),
    ("/completion", {"prompt": "Hi", "lora": {"id": 0}}, "lora: a list of"),
    ("/v1/completions", {"prompt": "Hi", "lora": [{"id": -1, "scale": 1}]}, "lora[0]: an object"),
])
def test_refused(served, path, body, expect):
    status, data = served.request(path, body)
    assert status == 400 and expect in json.loads(data)["error"], data


def test_a_model_without_adapters_has_none(running):
    assert running.json("/lora-adapters") == []
    status, data = running.request("/completion", {"prompt": "Hi", "lora": [{"id": 0, "scale": 1}]})
    assert status == 400 and "the model's adapters: none" in json.loads(data)["error"]


@pytest.mark.parametrize("args,expect", [
    (["--lora", "x.gguf"], "--lora / --lora-scaled: adapters of the MODEL given to qvl serve"),
    (["--lora-scaled", "x.gguf"], "--lora-scaled 'x.gguf': FILE:SCALE"),
])
def test_serve_flags_refused(args, expect):
    r = runner.invoke(qvl_app, ["serve", *args])
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, r.output


def test_serve_refuses_an_adapter_of_another_shape(files, tmp_path):
    bad = tmp_path / "bad.gguf"
    w = GGUFWriter(bad, "qwen2vl")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 48), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = runner.invoke(qvl_app, ["serve", str(files / MODEL), "--port", "0", "--lora", str(bad)])
    assert r.exit_code == 2 and "'blk.0.attn_q.weight' is 64 x 64" in r.output and "Traceback" not in r.output, r.output
