"""The whole pipeline against transformers on tiny generated models, with images.

transformers gets the same input_ids, pixel_values, image_grid_thw and mm_token_type_ids (1 on
image pads; without them transformers 5 silently uses 1-D positions, docs/testing.md).
Tolerance: max |delta logit| <= 1e-3 * max |logit|, float32 on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime.model import Generation, ModelError
from qvl.runtime.loader import load
from tiny_models import TinySpec, build_model, make_checkpoint, reference_inputs, to_gguf

rng = np.random.default_rng(0)
IMG_A = Image.fromarray(rng.integers(0, 256, (120, 170, 3), dtype=np.uint8))  # 4x6 merged grid
IMG_B = Image.fromarray(rng.integers(0, 256, (60, 250, 3), dtype=np.uint8))  # wide, other size

SPECS = {
    "qwen2.5-untied": TinySpec(dtype=torch.float32, vision_depth=4),
    "qwen2.5-tied-8heads": TinySpec(tied=True, heads=8, kv_heads=2, hidden=128, dtype=torch.float32, seed=3),
    "qwen2-untied": TinySpec(family="qwen2_vl", dtype=torch.float32, seed=4),
    "qwen2-tied-mqa": TinySpec(family="qwen2_vl", tied=True, kv_heads=1, dtype=torch.float32, seed=5),
}

PROMPTS = {
    "text only": ("Describe the weather in two words.", []),
    "one image": ("What is in this picture?", [IMG_A]),
    "two images": ("{image1} and {image2}: which is wider?", [IMG_A, IMG_B]),
    "image between text": ("Look at this: {image1} then tell me about it.", [IMG_B]),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for name, spec in SPECS.items():
        d = tmp_path_factory.mktemp(name)
        src = make_checkpoint(d / "ckpt", spec)
        out[name] = (to_gguf(src, d / "m.gguf", "f32", "f32"), build_model(spec).float().eval())
    return out


@pytest.mark.parametrize("prompt_name", PROMPTS)
@pytest.mark.parametrize("spec_name", SPECS)
def test_prompt_logits_match_transformers(converted, spec_name, prompt_name):
    path, hf = converted[spec_name]
    model = load(path)
    prompt, images = PROMPTS[prompt_name]
    ours = model.prompt_logits(prompt, images)
    with torch.no_grad():
        ref = hf(**reference_inputs(model, prompt, images)).logits[0]
    assert ours.shape == ref.shape
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-3 * scale, (err, scale)


@pytest.mark.parametrize("spec_name", ["qwen2.5-untied", "qwen2-tied-mqa"])
def test_greedy_generation_matches_transformers(converted, spec_name):
    path, hf = converted[spec_name]
    model = load(path)
    prompt, images = PROMPTS["two images"]
    out = model.generate(prompt, images, max_new_tokens=32)
    assert isinstance(out, Generation)
    kwargs = reference_inputs(model, prompt, images)
    with torch.no_grad():
        ref = hf.generate(**kwargs, max_new_tokens=32, do_sample=False, eos_token_id=sorted(model.stop_ids))
    ref_new = ref[0, kwargs["input_ids"].shape[1]:].tolist()
    ref_new = [t for t in ref_new if t not in model.stop_ids]
    assert out.token_ids == ref_new[: len(out.token_ids)] and len(out.token_ids) == len(ref_new)
    assert len(set(out.token_ids)) > 3  # std-0.15 weights: not one repeated token


def test_placeholders_pick_the_named_image(converted):
    path, _ = converted["qwen2.5-untied"]
    model = load(path)
    swapped = model.prompt_logits("{image2} and {image1}: which is wider?", [IMG_A, IMG_B])
    in_order = model.prompt_logits("{image1} and {image2}: which is wider?", [IMG_B, IMG_A])
    assert torch.equal(swapped, in_order)


def test_pictures_over_a_memory_limit_are_encoded_in_turn(converted, monkeypatch):
    """Under a memory limit on the vision tower's pixels (placement.vision_max_pixels: a
    --max-vram plan, or the free memory's), a prompt's pictures that each fit but together do
    not go through the tower one batch at a time: same logits (within float32 rounding of the
    GEMMs' other row counts, 1e-5 of the largest), one forward a batch."""
    import dataclasses

    from qvl.runtime.image import MAX_PIXELS, MIN_PIXELS
    from qvl.runtime.placement import PATCH_PIXELS
    from qvl.runtime.vision import VisionTower

    from qvl.runtime.vision_cache import VisionCache

    path, _ = converted["qwen2.5-untied"]
    model = load(path)
    model.vision_cache = VisionCache(budget=0)  # each prompt's pictures encoded: this counts the forwards
    prompt, images = PROMPTS["two images"]
    whole = model.prompt_logits(prompt, images)
    sizes = [p.pixels.shape[0] * PATCH_PIXELS for p in model._images(images, MIN_PIXELS, MAX_PIXELS)]
    calls = []
    forward = VisionTower.forward
    monkeypatch.setattr(VisionTower, "forward", lambda self, px, grids: calls.append(len(grids)) or forward(
        self, px, grids))
    model.placement = dataclasses.replace(model.placement, vision_max_pixels=max(sizes))  # each fits, both do not
    in_turn = model.prompt_logits(prompt, images)
    assert calls == [1, 1]
    assert (in_turn - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()
    calls.clear()
    model.placement = dataclasses.replace(model.placement, vision_max_pixels=sum(sizes))  # both fit together
    assert torch.equal(model.prompt_logits(prompt, images), whole) and calls == [2]


def test_streaming_yields_the_same_text(converted):
    path, _ = converted["qwen2.5-untied"]
    model = load(path)
    whole = model.generate("Hello there", max_new_tokens=12)
    pieces = list(model.generate("Hello there", max_new_tokens=12, stream=True))
    assert "".join(pieces) == whole.text


def test_sampling_is_seeded(converted):
    path, _ = converted["qwen2.5-untied"]
    model = load(path)
    a = model.generate("Tell me", max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    b = model.generate("Tell me", max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    c = model.generate("Tell me", max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=40, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_generation_parameters_are_checked(converted):
    model = load(converted["qwen2.5-untied"][0])
    with pytest.raises(ModelError, match="^max_new_tokens -1: 0 or more"):
        model.generate("hi", max_new_tokens=-1)
    with pytest.raises(ModelError, match="^ctx_size -1"):
        model.generate("hi", ctx_size=-1)
    with pytest.raises(ModelError, match="^top_p 3"):
        model.generate("hi", temperature=1.0, top_p=3.0)
    out = model.generate("hi", max_new_tokens=0)
    assert out.token_ids == [] and out.text == "" and out.prompt_tokens > 0


def test_a_prompt_of_token_ids_is_read_as_it_is(converted):
    """generate(token ids, template=False): the tokens of the same text read as they are, the same
    answer; in a chat template, or with a picture's pad or an id past the vocabulary, a ModelError
    at once (before any stream is read)."""
    model = load(converted["qwen2.5-untied"][0])
    text = "Hello there, <|im_start|>friend"
    ids = model.tokenize(text, [])[0]
    want = model.generate(text, template=False, max_new_tokens=6, cache_prompt=False)
    got = model.generate(ids, template=False, max_new_tokens=6, cache_prompt=False)
    assert got.token_ids == want.token_ids and got.prompt_tokens == len(ids) == want.prompt_tokens
    for bad, says in ((ids, "read as it is"), (ids + [model.image_pad_id], "no picture's pad"),
                      ([model.cfg.n_vocab], "1 or more of 0 to"), ([], "1 or more of 0 to")):
        with pytest.raises(ModelError, match=says):
            model.generate(bad, template=bad is ids, stream=True)


def test_text_only_model_refuses_images(converted, tmp_path):
    path, _ = converted["qwen2.5-untied"]
    lone = tmp_path / "lone.gguf"
    lone.write_bytes(path.read_bytes())
    model = load(lone)
    assert model.vision is None
    assert isinstance(model.generate("hi", max_new_tokens=2), Generation)
    with pytest.raises(ModelError, match="no vision projector"):
        model.prompt_logits("what?", [IMG_A])


def test_llama_cpp_fixture_pair_loads(fixtures_dir):
    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    assert model.vision is not None and model.vision_cfg.fullatt_blocks == (1, 3)
    logits = model.prompt_logits("What is this?", [IMG_A])
    assert torch.isfinite(logits).all()


def test_profile_decode_splits_the_token_and_restores_the_runtime(converted):
    """scripts/profile_decode.py on the CPU (no graph: the step is Model._decode): each part
    timed, the parts and `other` sum to the measured time a token, nothing left patched."""
    import importlib.util

    import qvl.runtime.model as model_module
    from paths import REPO
    from qvl.runtime.sampling import sample
    from qvl.runtime.tokenizer import TextStream

    spec = importlib.util.spec_from_file_location("profile_decode", REPO / "scripts" / "profile_decode.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    push = TextStream.push
    report = script.profile(str(converted["qwen2.5-untied"][0]), "cpu", 6)
    assert 0 < report["tokens"] <= 6 and "kernels_one_token" not in report
    ops = report["ops_one_token"]  # the CPU's ops over one profiled token, the largest first
    assert ops[0]["kernel"] == "(all)" and len(ops) > 2
    odd = [r["kernel"] for r in ops[1:] if not r["kernel"].startswith("aten::")]
    assert not odd, odd  # named: a flaky CI run once found an op that was not aten's
    assert [r["us"] for r in ops[1:]] == sorted((r["us"] for r in ops[1:]), reverse=True)
    assert ops[0]["us"] >= sum(r["us"] for r in ops[1:]) - 0.1 * len(ops)  # rounding to 0.1 us a row
    parts = report["ms_per_token"]
    assert set(parts) == {"sample", "text", "embed", "step", "other"}
    assert all(parts[k] > 0 for k in ("sample", "text", "step"))
    total = sum(parts.values())
    assert abs(total - 1e3 / report["decode_tok_s"]) <= 0.01 * total + 0.01
    assert model_module.sample is sample and TextStream.push is push


def test_profile_prefill_splits_the_prompt_and_restores_the_decoder(converted):
    """scripts/profile_prefill.py on the CPU: a prompt of about the tokens asked, its parts
    timed (no offload copies: every layer is where it runs), none negative, nothing left patched."""
    import importlib.util

    from paths import REPO
    from qvl.runtime.decoder import Decoder

    spec = importlib.util.spec_from_file_location("profile_prefill", REPO / "scripts" / "profile_prefill.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    saved = Decoder._attend, Decoder.layer_forward, Decoder._layer, Decoder.logits, Decoder.embed_tokens
    report = script.profile(str(converted["qwen2.5-untied"][0]), "cpu", 80, runs=2)
    assert 80 <= report["prompt_tokens"] <= 100 and len(report["prefill_s_runs"]) == 2 and "kernels" not in report
    parts = report["parts_ms"]
    assert set(parts) == {"embed", "attention", "projections", "logits", "other"}  # no offload_copy
    assert all(parts[k] > 0 for k in ("embed", "attention", "projections", "logits")) and parts["other"] >= 0
    assert abs(sum(parts.values()) - report["parts_total_ms"]) <= 0.05
    assert (Decoder._attend, Decoder.layer_forward, Decoder._layer, Decoder.logits, Decoder.embed_tokens) == saved


def test_profile_vision_splits_the_encode_and_restores_the_tower(converted):
    """scripts/profile_vision.py on the CPU: window and full attention, MLP and norms timed, none
    counted twice (`other`, the encode less the parts, is not negative: the residual add's norm
    calls `_norm`), nothing left patched."""
    import importlib.util

    from paths import REPO
    from qvl.runtime.vision import VisionTower

    spec = importlib.util.spec_from_file_location("profile_vision", REPO / "scripts" / "profile_vision.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    saved = VisionTower._attention, VisionTower._mlp, VisionTower._norm, VisionTower._add_norm
    report = script.profile(str(converted["qwen2.5-untied"][0]), "cpu", (252, 140), runs=2)
    assert report["grid_thw"] == [1, 10, 18] and report["patches"] == 180 and "ops" not in report
    parts = report["parts_ms"]
    assert set(parts) == {"attention_window", "attention_full", "mlp", "norm", "other"}
    assert all(parts[k] > 0 for k in ("attention_window", "attention_full", "mlp", "norm"))
    assert 0 <= parts["other"] < report["parts_total_ms"]
    assert abs(sum(parts.values()) - report["parts_total_ms"]) <= 0.05
    assert len(report["encode_s_runs"]) == 2 and report["streamed"] is False
    assert (VisionTower._attention, VisionTower._mlp, VisionTower._norm, VisionTower._add_norm) == saved
