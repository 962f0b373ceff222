"""scripts/make_random_gguf.py: what qvl-convert would write for the checkpoint, with random
blocks in place of the checkpoint's: the same tensor table and metadata, values as the script
promises (norms 1, weights ~N(0, 0.02), nothing non-finite), and a file qvl loads and runs."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gguf_compare import differences
from paths import REPO
from qvl.convert.cli import app
from qvl.convert.errors import ConvertError
from qvl.convert.quant import dequantize
from qvl.runtime.gguf_file import GGUFFile
from tiny_models import TinySpec, make_checkpoint

SPEC = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, vision_hidden=64, vision_width=96,
                vocab_size=1280)


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "scripts"))  # it imports make_random_checkpoint beside it
        spec = importlib.util.spec_from_file_location("make_random_gguf", REPO / "scripts" / "make_random_gguf.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", SPEC)


@pytest.mark.parametrize("type_name,layout", [("q4_k_m", "llamacpp"), ("q8_0", "ollama"), ("f16", "llamacpp")])
def test_same_files_as_qvl_convert(script, checkpoint, tmp_path, type_name, layout):
    converted, random = tmp_path / "c" / "tiny.gguf", tmp_path / "r" / "tiny.gguf"
    converted.parent.mkdir()
    random.parent.mkdir()
    r = CliRunner().invoke(app, [str(checkpoint), "-o", str(converted), "--type", type_name, "--layout", layout, "-q"])
    assert r.exit_code == 0, r.output
    config = json.loads((checkpoint / "config.json").read_text())
    job = script.make_random_gguf(config, random, type_name, layout=layout, tokenizer=checkpoint, name="tiny")
    names = [f.path.name for f in job.files]
    assert names == (["tiny.gguf"] if layout == "ollama" else ["tiny.gguf", "mmproj-tiny.gguf"])
    for name in names:
        assert (random.parent / name).exists()
        problems = differences(random.parent / name, converted.parent / name)
        assert problems and all(p.endswith(": tensor bytes differ") for p in problems), problems
    assert not list(random.parent.glob("*.partial"))


def test_values(script, checkpoint, tmp_path):
    out = tmp_path / "tiny.gguf"
    config = json.loads((checkpoint / "config.json").read_text())
    script.make_random_gguf(config, out, "q4_k_m", tokenizer=checkpoint)
    weights = []
    for path in (out, tmp_path / "mmproj-tiny.gguf"):
        with GGUFFile(path) as f:
            for name, t in f.tensors.items():
                values = dequantize(f.raw(name).reshape(-1, f.raw(name).shape[-1]), t.type).reshape(-1)
                assert np.isfinite(values).all(), name
                if name.endswith("norm.weight") or ".ln" in name or "norm" in name.split(".")[-2]:
                    assert (values == 1).all(), name
                elif len(t.ne) >= 2 and values.size >= 4096:
                    weights.append((name, values))
    assert len(weights) > 20
    for name, values in weights:  # the pool's N(0, 0.02) through the tensor's type
        assert abs(values.std() - 0.02) < 0.004 and abs(values.mean()) < 0.002, (name, values.std(), values.mean())


def test_qvl_runs_it(script, checkpoint, tmp_path):
    import qvl

    out = tmp_path / "tiny.gguf"
    config = json.loads((checkpoint / "config.json").read_text())
    script.make_random_gguf(config, out, "q4_k_m", tokenizer=checkpoint)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    model = qvl.load(out)
    result = model.generate("What is in {image1}?", images=[image], max_new_tokens=4)
    assert result.prompt_tokens > 6  # the image's merged patches are in the prompt
    assert len(result.token_ids) == 4 or result.token_ids[-1] in model.stop_ids


def test_existing_output_is_refused(script, checkpoint, tmp_path):
    out = tmp_path / "tiny.gguf"
    out.write_text("old")
    config = json.loads((checkpoint / "config.json").read_text())
    with pytest.raises(ConvertError, match="already exists"):
        script.make_random_gguf(config, out, "q8_0", tokenizer=checkpoint)
    assert out.read_text() == "old"


@pytest.mark.parametrize("mix", ["low-bit", "grid"])
def test_mixes_of_the_types_qvl_convert_does_not_write(script, checkpoint, tmp_path, mix):
    """--mix: llama.cpp's low-bit or grid types where Q4_K_M plans Q4_K, their values finite and
    about the pool's N(0, 0.02), and a file qvl runs."""
    import qvl
    from gguf import GGMLQuantizationType as T

    from quant_weights import GRID_MIX, LOW_BIT

    out = tmp_path / "tiny.gguf"
    config = json.loads((checkpoint / "config.json").read_text())
    script.make_random_gguf(config, out, "q4_k_m", tokenizer=checkpoint, mix=mix)
    want = dict(LOW_BIT if mix == "low-bit" else GRID_MIX)
    seen = set()
    with GGUFFile(out) as f:
        for name, t in f.tensors.items():
            part = next((p for p in want if f".{p}" in name), None)
            if name.startswith("blk.") and part is not None and len(t.ne) >= 2:
                if T(t.type) != T.Q6_K:  # Q4_K_M keeps some ffn_down and attn_v in Q6_K
                    assert T(t.type) == want[part], name
                    seen.add(want[part])
                    values = dequantize(f.raw(name).reshape(-1, f.raw(name).shape[-1]), t.type).reshape(-1)
                    assert np.isfinite(values).all() and 0.01 < values.std() < 0.04, (name, values.std())
    assert seen == set(want.values())
    model = qvl.load(out)
    assert len(model.generate("Hello", max_new_tokens=3).token_ids) >= 1
    with pytest.raises(ConvertError, match="--mix grid: one of low-bit, grid, with --type q4_k_m"):
        script.make_random_gguf(config, tmp_path / "x.gguf", "q8_0", tokenizer=checkpoint, mix="grid")
