"""`qvl quantize --prune-layers` (llama-quantize's): decoder layers left out, the rest renumbered
and the block count set.

The oracle for the model is transformers' with the same layers removed: float32 on both sides,
logits within 1e-4 of the largest (as the other F32 model checks). The mix's choices follow
llama-quantize's counting (llama-quant.cpp): attn_v's by the attn_v tensors the file keeps,
ffn_down's by the source's layer count (n_layer_all), whatever is pruned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from qvl.convert.cli import app as convert_app
from qvl.convert.requantize import QuantizeOptions, plan_quantize
from qvl.runtime.cli import app
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
from tiny_models import TinySpec, build_model, make_checkpoint, reference_inputs

runner = CliRunner()
SPEC = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=8, vision_hidden=64, vision_width=96,
                vocab_size=1280, dtype=torch.float32, seed=5)
PROMPT = "Which layers are left?"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    r = runner.invoke(convert_app, [str(make_checkpoint(folder / "ckpt", SPEC)), "-o", str(folder / "m-f32.gguf"),
                                    "--type", "f32", "-q"])
    assert r.exit_code == 0, r.output
    return folder / "m-f32.gguf"


def quantize(*args: str):
    return runner.invoke(app, ["quantize", *args, "-q"])


def test_pruned_model_is_transformers_without_those_layers(source, tmp_path):
    out = tmp_path / "pruned.gguf"
    r = quantize(str(source), "f32", "--prune-layers", "5,2", "-o", str(out))
    assert r.exit_code == 0, r.output
    with GGUFFile(out) as g:
        assert g.get("qwen2vl.block_count") == 6 and list(g.fields)[-1] == "qwen2vl.block_count"
        assert {int(n.split(".")[1]) for n in g.tensors if n.startswith("blk.")} == set(range(6))
        with GGUFFile(source) as s:  # new layer 2 is the old layer 3, byte for byte
            assert np.array_equal(g.raw("blk.2.ffn_up.weight"), s.raw("blk.3.ffn_up.weight"))
    model = load(out, device="cpu", dtype=torch.float32)
    ours = model.prompt_logits(PROMPT, [])
    hf = build_model(SPEC).float().eval()
    text = hf.model.language_model
    text.layers = torch.nn.ModuleList([layer for i, layer in enumerate(text.layers) if i not in (2, 5)])
    for i, layer in enumerate(text.layers):
        layer.self_attn.layer_idx = i
    text.config.num_hidden_layers = 6
    if getattr(text.config, "layer_types", None):
        text.config.layer_types = [t for i, t in enumerate(text.config.layer_types) if i not in (2, 5)]
    with torch.no_grad():
        ref = hf(**reference_inputs(model, PROMPT, []), use_cache=False).logits[0]
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * scale
    whole = load(source, device="cpu", dtype=torch.float32).prompt_logits(PROMPT, [])
    assert (whole - ref).abs().max().item() > 0.01 * scale  # the layers mattered


def test_the_mix_counts_as_llama_quantize_does(source, tmp_path):
    """Q4_K_M with layers 0 and 1 of 8 pruned: attn_v's extra bits by the 6 attn_v kept (use_more_bits
    over 6: layers 2 and 5), ffn_down's by the source's 8 layers (over 8: layers 0 and 3)."""
    job, src = plan_quantize(source, tmp_path / "x.gguf", "q4_k_m", QuantizeOptions(prune_layers=(0, 1)), True)
    src.source.close()
    types = {p.tensor.name: p.qtype for p in job.files[0].plan}
    assert [i for i in range(6) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K] == [2, 5]
    assert [i for i in range(6) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K] == [0, 3]
    assert "blk.6.attn_q.weight" not in types and job.files[0].plan[-1].tensor.source.startswith("blk.7.")


def test_importance_values_follow_the_source_layers(source, tmp_path):
    """With --imatrix each kept layer is weighed by its source layer's values (llama-quantize's
    remap_imatrix): --pure q4_k's bytes of new layer i are those the whole model gets for its old one."""
    from imatrix_files import write_imatrix

    with GGUFFile(source) as g:
        rows = {n: t.ne[0] for n, t in g.tensors.items() if n.startswith("blk.") and len(t.ne) == 2}
    rng = np.random.default_rng(3)
    matrix = tmp_path / "m.imatrix.gguf"
    write_imatrix(matrix, {n: (np.exp(rng.normal(0, 2, k)), [1.0]) for n, k in rows.items()})
    for name, args in (("whole.gguf", []), ("pruned.gguf", ["--prune-layers", "1"])):
        r = quantize(str(source), "q4_k", "--pure", "--imatrix", str(matrix), "-o", str(tmp_path / name), *args)
        assert r.exit_code == 0, r.output
    with GGUFFile(tmp_path / "whole.gguf") as whole, GGUFFile(tmp_path / "pruned.gguf") as pruned:
        for new, old in ((0, 0), (1, 2), (6, 7)):
            for part in ("attn_q", "ffn_down"):
                assert np.array_equal(pruned.raw(f"blk.{new}.{part}.weight"), whole.raw(f"blk.{old}.{part}.weight"))


@pytest.mark.parametrize("value,expect", [
    ("8", "--prune-layers 8: the model's layers are 0 to 7"),
    ("2,x", "--prune-layers '2,x': layer numbers separated by commas"),
    ("0,1,2,3,4,5,6,7", "--prune-layers: all 8 layers; at least one has to stay"),
])
def test_refused_in_one_line(source, tmp_path, value, expect):
    r = quantize(str(source), "q8_0", "--prune-layers", value, "-o", str(tmp_path / "x.gguf"))
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output, r.output
    assert not list(tmp_path.iterdir())
