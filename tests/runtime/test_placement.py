"""The --max-vram plan on the official model shapes (tensor sizes from our Q4_K_M plan) and on a
tiny model, where the plan's layer split and image downscaling must be what the model does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from PIL import Image

from qvl.convert.hf_config import parse_config
from qvl.convert.layout import mmproj_tensors, text_tensors
from qvl.convert.official import official_config
from qvl.convert.plan import TEXT_TYPES, plan_text, plan_vision
from qvl.runtime.config import TextConfig, text_config
from qvl.runtime.decoder import OFFLOAD_GROUP
from qvl.runtime.gguf_file import GGUFFile, TensorInfo
from qvl.runtime.image import smart_resize
from qvl.runtime.model import ALL_LAYERS
from qvl.runtime.loader import load
from qvl.runtime.placement import (CUDA_OVERHEAD, GIB, PATCH_PIXELS, REFERENCE_PIXELS, Placement, PlacementError,
                                   footprint, make_plan)
from tiny_models import TinySpec, make_checkpoint, to_gguf


def _official(name: str, kv_type: str = "bf16", dequant_slab: int = 0, file_type: str = "q4_k_m",
              retype: dict | None = None):
    ck = parse_config(official_config(name))
    t = ck.text
    cfg = TextConfig("qwen2vl", t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads,
                     t.num_key_value_heads, t.max_position_embeddings, t.rope_theta, t.rms_norm_eps,
                     t.mrope_section, t.vocab_size)

    def table(planned) -> dict[str, TensorInfo]:
        infos = {}
        for p in planned:
            qtype = (retype or {}).get(p.qtype, p.qtype)
            blk, size = GGML_QUANT_SIZES[qtype]
            nbytes = p.nbytes if qtype == p.qtype else int(np.prod(p.tensor.shape)) // blk * size
            infos[p.tensor.name] = TensorInfo(p.tensor.name, qtype, tuple(reversed(p.tensor.shape)), 0, nbytes)
        return infos

    text = table(plan_text(text_tensors(ck), TEXT_TYPES[file_type], t.num_hidden_layers))
    vision = table(plan_vision(mmproj_tensors(ck), "f16"))
    return cfg, footprint(cfg, text, vision, kernels=True, kv_type=kv_type, dequant_slab=dequant_slab)


def test_7b_q4_k_m_footprint():
    cfg, fp = _official("qwen2.5-vl-7b")
    weights = sum(fp.layer_bytes) + fp.output_bytes
    assert 4.0 * GIB < weights < 4.6 * GIB  # llama.cpp's 7B Q4_K_M text file is 4.36 GiB with embeddings
    assert 1.2 * GIB < fp.vision_bytes < 1.4 * GIB  # the F16 mmproj (675M parameters)
    assert fp.kv_bytes_per_token == 2 * 4 * 128 * 2  # k and v, 4 KV heads of 128, bf16
    assert fp.offload_kv_bytes_per_token == fp.kv_bytes_per_token  # an offloaded copy's, bf16 as the products
    # the encode's bf16 activations (tests/kernels/test_activation_memory.py measures them): about half
    # of the float32 residual, norm, q/k/v, attention output and MLP that were planned before
    assert fp.vision_bytes_per_pixel < 0.5 * 4 * (6 * 1280 + 3 * 3420) / PATCH_PIXELS
    plan = make_plan(fp, 4096, None, ALL_LAYERS, True)
    print(f"\n7B Q4_K_M + 1024x1024 image + 4k context, whole model on the GPU:\n{plan.table()}")
    assert plan.gpu_layers == cfg.n_layer + 1 and plan.vision_on_gpu
    lines = plan.table().splitlines()
    assert lines[0].startswith("plan: 28/28 decoder layers on the GPU (output layer: yes), vision tower on the GPU")
    assert [line.split()[0] for line in lines[1:]] == ["weights", "KV", "activations", "vision", "CUDA", "total"]
    assert plan.total <= 7 * 10**9  # the budget for this job (an estimate until measured on a GPU)


@pytest.mark.parametrize("name", ["qwen2.5-vl-72b", "qwen2-vl-72b"])
@pytest.mark.parametrize("file_type,gib,layer_mib", [("q4_k_m", (42, 45), 600), ("q5_k_m", (49, 51.5), 680)])
def test_72b_keeps_its_ffn_down_in_blocks(name, file_type, gib, layer_mib):
    """ffn_down's 29568-wide rows are not whole 256-weight steps: Q4_K_M stores them as Q5_0 /
    Q8_0 fallbacks, Q5_K_M as Q5_1 / Q8_0, which the kernels read in place with a 128-column
    dense tail. As dense bf16 copies the GPU would hold 63.8 GiB of weights instead of 43.6
    (Q4_K_M; llama.cpp's 72B Q4_K_M text file is 44.2 GiB), 61.3 instead of 50.1 (Q5_K_M, whose
    Q5_1 halves were dense before the kernels read Q5_1)."""
    _, fp = _official(name, file_type=file_type)
    assert gib[0] * GIB < sum(fp.layer_bytes) + fp.output_bytes < gib[1] * GIB
    assert max(fp.layer_bytes) < layer_mib * 2**20  # Q4_K_M 590 MiB a layer (805 dense), Q5_K_M 665 (879)


def test_72b_grid_types_stay_in_blocks():
    """A 72B in an IQ2 mix (the q4_k_m plan's Q4_K matrices as IQ2_XS, its Q5_0 / Q8_0 fallbacks
    as IQ4_NL, llama.cpp's fallback for the grid types; Q6_K kept): the kernels read the grid
    types in their blocks (kernels/qgrids.py), so the GPU holds the file's bytes plus ffn_down's
    dense 128-column tails, not bf16 copies of the IQ2_XS matrices (3.5x as much before)."""
    _, fp = _official("qwen2.5-vl-72b", retype={T.Q4_K: T.IQ2_XS, T.Q5_0: T.IQ4_NL, T.Q8_0: T.IQ4_NL})
    weights = sum(fp.layer_bytes) + fp.output_bytes
    _, dense = _official("qwen2.5-vl-72b", retype={T.Q4_K: T.F16, T.Q5_0: T.IQ4_NL, T.Q8_0: T.IQ4_NL})
    before = sum(dense.layer_bytes) + dense.output_bytes
    print(f"72B IQ2_XS mix: {weights / GIB:.1f} GiB of weights on the GPU ({before / GIB:.1f} as bf16 copies), "
          f"{max(fp.layer_bytes) / 2**20:.0f} MiB a layer")
    assert 24 * GIB < weights < 26 * GIB and before > 3.4 * weights


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-7b"])
def test_budgets(name):
    cfg, fp = _official(name)
    n = cfg.n_layer
    assert make_plan(fp, 4096, 24 * GIB, ALL_LAYERS, True).gpu_layers == n + 1  # a big GPU takes everything
    previous = -1
    for gb in (1.5, 2, 3, 4, 5, 6, 8):
        plan = make_plan(fp, 4096, int(gb * GIB), ALL_LAYERS, True)
        assert plan.total <= plan.budget, plan.table()
        assert plan.weights >= previous  # more memory never means less on the GPU
        previous = plan.weights
        if plan.vision_on_gpu:
            assert plan.vision_max_pixels >= REFERENCE_PIXELS  # a 1024x1024 image always fits
        vision = fp.vision_stream_bytes if plan.vision_streamed else fp.vision_bytes if plan.vision_on_gpu else 0
        assert plan.vision_on_gpu or not plan.vision_streamed
        if plan.gpu_layers <= n:  # the output layer only joins once every layer is there
            assert plan.weights == sum(fp.layer_bytes[n - plan.gpu_layers:]) + vision
    small = make_plan(fp, 4096, int(1.0 * GIB), ALL_LAYERS, True)
    assert not small.vision_on_gpu and small.vision_max_pixels is None and 0 < small.gpu_layers < n
    with pytest.raises(PlacementError, match="below"):
        make_plan(fp, 4096, CUDA_OVERHEAD, ALL_LAYERS, True)


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-7b"])
def test_streamed_vision_tower(name):
    """Streamed (vision_stream.py), the tower keeps two blocks' matrices on the GPU, not all of
    them: for these towers (32 blocks; Qwen2-VL's are wider) ~1.1 GiB less. A budget where the
    whole tower fits but not every layer beside it streams the tower when that places more
    layers; one where everything fits keeps it whole; asked to stream, the plan streams."""
    cfg, fp = _official(name)
    n = cfg.n_layer
    assert fp.vision_bytes - fp.vision_stream_bytes > 0.9 * GIB
    print(f"{name}: vision tower {fp.vision_bytes / GIB:.2f} GiB, streamed {fp.vision_stream_bytes / 2**20:.0f} MiB")
    assert make_plan(fp, 4096, 24 * GIB, ALL_LAYERS, True).vision_streamed is False
    asked = make_plan(fp, 4096, 24 * GIB, ALL_LAYERS, True, vision_stream=True)
    assert asked.vision_streamed and asked.gpu_layers == n + 1
    assert asked.weights == make_plan(fp, 4096, 24 * GIB, ALL_LAYERS, True).weights - fp.vision_bytes \
        + fp.vision_stream_bytes
    unbudgeted = make_plan(fp, 4096, None, ALL_LAYERS, True, vision_stream=True)
    assert unbudgeted.vision_streamed and unbudgeted.weights == asked.weights
    unstreamable = dataclasses.replace(fp, vision_stream_bytes=fp.vision_bytes)  # the policy before streaming
    streamed = []
    for gb in (1.5, 2, 3, 4, 5, 6, 8):
        plan = make_plan(fp, 4096, int(gb * GIB), ALL_LAYERS, True)
        before = make_plan(unstreamable, 4096, int(gb * GIB), ALL_LAYERS, True)
        assert plan.total <= plan.budget, plan.table()
        if plan.vision_streamed:
            streamed.append(gb)  # the tower on the GPU where it was on the CPU, or more layers beside it
            assert not before.vision_on_gpu or plan.gpu_layers > before.gpu_layers
        else:
            assert plan == before
    print(f"{name}: streamed at {streamed} GB")
    assert streamed and 8 not in streamed


def test_q8_0_cache_and_longer_context():
    _, fp16 = _official("qwen2.5-vl-7b", "bf16")
    _, fp8 = _official("qwen2.5-vl-7b", "q8_0")
    assert fp8.kv_bytes_per_token == 2 * 4 * 128 + 2 * 4 * 128 // 32 * 2
    budget = int(5 * GIB)
    long16 = make_plan(fp16, 32768, budget, ALL_LAYERS, True)
    long8 = make_plan(fp8, 32768, budget, ALL_LAYERS, True)
    assert long8.gpu_layers > long16.gpu_layers  # half the cache: room for more layers
    assert make_plan(fp16, 32768, budget, 10, True).gpu_layers == 10  # never more than asked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    src = make_checkpoint(d / "ckpt", TinySpec(dtype=torch.float32, layers=3, seed=2))
    return to_gguf(src, d / "m.gguf", "f32", "f32")


@pytest.fixture(scope="module")
def deep_vision(tmp_path_factory):
    """As `tiny` with 4 vision blocks: streaming keeps 2 of them on the accelerator."""
    d = tmp_path_factory.mktemp("deep")
    src = make_checkpoint(d / "ckpt", TinySpec(dtype=torch.float32, layers=3, vision_depth=4, seed=2))
    return to_gguf(src, d / "m.gguf", "f32", "f32")


def _tiny_footprint(tiny):
    with GGUFFile(tiny) as g, GGUFFile(tiny.with_name("mmproj-m.gguf")) as v:
        # float32 products and cache, as the tests load it (dtype=torch.float32)
        return footprint(text_config(g), dict(g.tensors), dict(v.tensors), kernels=True, kv_type="f32", half=False)


def _copy(fp, ctx: int = 8192) -> int:
    """A CPU layer's copy for a prompt: its weights, and its keys and values to the context's
    length (runtime/offload_kv.py; float32 here, as the products)."""
    return max(fp.layer_bytes) + ctx * fp.offload_kv_bytes_per_token


def test_model_takes_the_planned_layers(tiny):
    fp = _tiny_footprint(tiny)
    kv = 8192 * fp.kv_bytes_per_token
    # one of three layers, and room for a copy of another and a prompt group's hidden states while a
    # prompt runs the CPU's layers there (prefill_offload); no room for a second copy made ahead
    # (copy_ahead.py). A copy, with its keys and values, takes more than a layer kept there with its
    # cache: the room costs a layer (1.4 of the 7B Q4_K_M's at 4096 tokens), so a plan that keeps it
    # has at most one layer fewer than the layers that fit without it.
    room = _copy(fp) + fp.offload_group_bytes
    assert room > max(fp.layer_bytes) + kv
    budget = CUDA_OVERHEAD + fp.activation_bytes + fp.layer_bytes[2] + kv + room + 1000
    model = load(tiny, device="cpu", dtype=torch.float32, placement=Placement("cpu", ALL_LAYERS, kv_type="f32"),
                 max_vram=budget / GIB, plan_ctx=8192)
    assert model.plan == make_plan(fp, 8192, budget, ALL_LAYERS, False, prefill_offload=True)
    assert fp.offload_group_bytes == 2 * 4 * OFFLOAD_GROUP * model.cfg.n_embd  # x and its norm, float32
    assert fp.offload_kv_bytes_per_token == 2 * 4 * model.cfg.n_head_kv * model.cfg.head_dim  # k and v, float32
    assert model.plan.gpu_layers == 1 and not model.plan.vision_on_gpu and model.plan.offload_layer == room
    assert model.plan.total <= budget and model.decoder.prefill_offload
    assert not model.plan.copies_ahead and not model.decoder.copy_ahead  # each copy made in turn
    # with room for a second copy after the layers: made while the one before runs (copy_ahead.py);
    # --gpu-layers 1 as well, since that room would otherwise hold every layer
    roomier = make_plan(fp, 8192, budget + _copy(fp), 1, False, prefill_offload=True)
    assert roomier.gpu_layers == 1 and roomier.copies_ahead and roomier.offload_layer == room + _copy(fp)
    assert roomier.total <= budget + _copy(fp) and "two CPU layers' copies" in roomier.table()
    assert "a CPU layer's copy" in model.plan.table()
    asked = make_plan(fp, 8192, None, 2, False, prefill_offload=True)  # --gpu-layers 2 without a budget
    assert asked.copies_ahead and asked.offload_layer == room + _copy(fp)
    assert not make_plan(fp, 8192, None, ALL_LAYERS, False, prefill_offload=True).copies_ahead  # nothing to copy
    tight = budget - room  # without that room: one layer fewer
    assert make_plan(fp, 8192, tight, ALL_LAYERS, False, prefill_offload=True).gpu_layers == 0
    assert make_plan(fp, 8192, tight, ALL_LAYERS, False).gpu_layers == 1
    assert make_plan(fp, 8192, budget, ALL_LAYERS, False).gpu_layers == 2  # no offload: the room holds a layer
    assert [layer.kernels for layer in model.decoder.layers] == [False, False, True]
    assert not model.vision.kernels


def test_images_over_the_planned_limit_are_downscaled(tiny):
    fp = _tiny_footprint(tiny)
    weights = sum(fp.layer_bytes) + fp.output_bytes + fp.vision_bytes
    budget = CUDA_OVERHEAD + weights + int(fp.vision_bytes_per_pixel * 3 * REFERENCE_PIXELS)  # ~3M pixels of peak
    model = load(tiny, device="cpu", dtype=torch.float32,
                 placement=Placement("cpu", ALL_LAYERS, vision_on_accel=True, kv_type="f32"), max_vram=budget / GIB)
    plan = model.plan
    assert plan == make_plan(fp, 4096, budget, ALL_LAYERS, True)
    assert plan.gpu_layers == 4 and plan.vision_on_gpu and model.vision.kernels
    limit = plan.vision_max_pixels
    assert REFERENCE_PIXELS <= limit < 4 * REFERENCE_PIXELS
    side = int(np.sqrt(limit)) + 300  # an image over the limit
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    warnings: list[str] = []
    model.on_warning = warnings.append
    _, _, pre = model.tokenize("<|image_pad|>", [image])
    h, w = smart_resize(side, side, max_pixels=limit)
    assert pre[0].grid_thw == (1, h // 14, w // 14) and h * w <= limit
    assert len(warnings) == 1 and "downscaled" in warnings[0]
    small = Image.fromarray(np.zeros((56, 84, 3), dtype=np.uint8))
    model.tokenize("<|image_pad|>", [small])
    assert len(warnings) == 1  # images within the limit are left alone


def test_model_streams_the_vision_tower_the_plan_streams(deep_vision):
    """A budget whose half (after the context and activations) holds the streamed tower and an
    image's peak but not the whole tower: the model streams it (vision_stream.py), its blocks'
    matrices in host memory until it runs."""
    fp = _tiny_footprint(deep_vision)
    peak = int(fp.vision_bytes_per_pixel * REFERENCE_PIXELS)
    assert fp.vision_stream_bytes < fp.vision_bytes
    budget = CUDA_OVERHEAD + fp.activation_bytes + 2 * (fp.vision_stream_bytes + peak) + 2
    model = load(deep_vision, device="cpu", dtype=torch.float32,
                 placement=Placement("cpu", ALL_LAYERS, vision_on_accel=True, kv_type="f32"), max_vram=budget / GIB)
    assert model.plan == make_plan(fp, 4096, budget, ALL_LAYERS, True)
    assert model.plan.vision_on_gpu and model.plan.vision_streamed and model.placement.vision_stream
    assert model.vision.stream is not None and model.vision.stream.resident() == []
    assert "its blocks streamed from host memory" in model.plan.table().splitlines()[0]
    whole = load(deep_vision, device="cpu", dtype=torch.float32,
                 placement=Placement("cpu", ALL_LAYERS, vision_on_accel=True, kv_type="f32"), max_vram=100)
    assert whole.vision.stream is None and not whole.plan.vision_streamed  # room for everything: kept whole


def test_videos_over_the_planned_limit_are_downscaled(tiny, tmp_path):
    """The limit counts every frame pair's pixels (the vision tower takes them in one pass); it
    is kept above the frames' floor (1.05 x --video-min-pixels each), which wins over it."""
    from videos import make_video

    from qvl.runtime.video import VideoOptions

    limit = 600_000
    model = load(tiny, device="cpu", dtype=torch.float32, placement=Placement(vision_max_pixels=limit))
    warnings: list[str] = []
    model.on_warning = warnings.append
    big, small = tmp_path / "big.mp4", tmp_path / "small.mp4"
    make_video(big, frames=8, fps=2, size=(480, 640))
    make_video(small, frames=8, fps=2)
    (video,) = model._videos([big], VideoOptions())
    t, h, w = video.grid_thw
    assert t == 4 and t * h * w * 14 * 14 <= limit < 4 * 480 * 640
    assert len(warnings) == 1 and "big.mp4: frames downscaled" in warnings[0]
    (video,) = model._videos([small], VideoOptions())
    unlimited = load(tiny, device="cpu", dtype=torch.float32)._videos([small], VideoOptions())[0]
    assert video.size == unlimited.size and len(warnings) == 1  # within the limit: as without one


def test_dequant_slab_counted_where_the_gemms_use_it(monkeypatch):
    """sm_75's float16 prefill GEMMs decode up to 32 MiB of weight rows first (kernels/dequant.py):
    the plan counts it there, in its total, its budget and its table; not on sm_80+, nor in
    float32 or without the kernels."""
    from qvl.kernels.dequant import SLAB_ELEMENTS
    from qvl.runtime.placement import dequant_slab_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert dequant_slab_bytes("cuda", True, True) == 2 * SLAB_ELEMENTS == 32 * 2**20
    assert dequant_slab_bytes("cuda", False, True) == dequant_slab_bytes("cuda", True, False) == 0
    assert dequant_slab_bytes("cpu", True, True) == 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert dequant_slab_bytes("cuda", True, True) == 0

    _, fp = _official("qwen2.5-vl-3b")
    _, slab = _official("qwen2.5-vl-3b", dequant_slab=32 * 2**20)
    plain, with_slab = make_plan(fp, 4096, None, ALL_LAYERS, True), make_plan(slab, 4096, None, ALL_LAYERS, True)
    assert with_slab.total - plain.total == 32 * 2**20
    assert "dequant slab" in with_slab.table() and "dequant slab" not in plain.table()
    for gb in (2, 3, 4):
        fitted = make_plan(slab, 4096, int(gb * GIB), ALL_LAYERS, True)
        assert fitted.total <= fitted.budget, fitted.table()


def test_cuda_is_resolved_to_the_current_gpu(monkeypatch):
    """load() places layers on `cuda:N`, the device its tensors report: compared with an
    unindexed `cuda`, DecodeGraph.supports was false on the first GPU run (no CUDA graph, no
    fused norms: decode at 51 tok/s instead of 133 on an H200)."""
    import torch

    from qvl.runtime.placement import indexed

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert torch.device("cuda") != torch.device("cuda", 3)  # why it matters
    assert indexed(torch.device("cuda")) == torch.device("cuda", 3)
    assert indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert indexed(torch.device("cpu")) == torch.device("cpu")


def test_fitting_to_the_free_memory(tiny, monkeypatch):
    """Placement.fit_free: when what is asked does not fit in the GPU's free memory
    (fit.free_bytes), the plan is the --max-vram plan for that memory, and fit_note says so;
    when it fits, or without fit_free, what was asked; below the context's own share, the CPU."""
    from qvl.runtime import fit

    fp = _tiny_footprint(tiny)
    kv = 8192 * fp.kv_bytes_per_token
    room = _copy(fp) + fp.offload_group_bytes
    one = CUDA_OVERHEAD + fp.activation_bytes + fp.layer_bytes[2] + kv + room + 1000  # 1 of 3 layers and a copy
    asked = Placement("cpu", ALL_LAYERS, kv_type="f32", fit_free=True)

    def loaded(free: int, placement: Placement = asked):
        monkeypatch.setattr(fit, "free_bytes", lambda accel: free)
        return load(tiny, device="cpu", dtype=torch.float32, placement=placement, plan_ctx=8192)

    whole = loaded(1 << 40)
    assert whole.plan.budget is None and whole.plan.gpu_layers == 4 and whole.fit_note is None  # 3 layers + output
    fitted = loaded(one)
    assert fitted.plan == make_plan(fp, 8192, one, ALL_LAYERS, False, prefill_offload=True)
    assert fitted.plan.gpu_layers == 1 and fitted.placement.gpu_layers == 1
    assert [layer.device.type for layer in fitted.decoder.layers] == ["cpu"] * 3  # the stand-in accelerator
    assert [layer.kernels for layer in fitted.decoder.layers] == [False, False, True]
    assert fitted.fit_note is not None and "1/3 decoder layers on the GPU" in fitted.fit_note
    assert f"{one / GIB:.1f} GiB is free" in fitted.fit_note
    kept = loaded(one, dataclasses.replace(asked, fit_free=False))
    assert kept.plan.gpu_layers == 4 and kept.fit_note is None
    none = loaded(CUDA_OVERHEAD // 2)
    assert none.plan is None and none.placement.accel is None and "running on the CPU" in none.fit_note
    assert not any(layer.kernels for layer in none.decoder.layers)
    # with the vision tower there: when everything fits, images are limited to what the memory
    # left beside the weights and a kept KV cache holds (downscaled with a warning, not out of memory)
    seeing = dataclasses.replace(asked, vision_on_accel=True)
    rest = CUDA_OVERHEAD + sum(fp.layer_bytes) + fp.output_bytes + fp.vision_bytes + 3 * kv
    room = make_plan(fp, 8192, None, ALL_LAYERS, True, prefill_offload=True).total + 3 * kv  # fits, with room to spare
    limited = loaded(room, seeing)
    assert limited.fit_note is None and limited.plan.gpu_layers == 4 and limited.plan.vision_on_gpu
    assert limited.placement.vision_max_pixels == int((room - rest) / fp.vision_bytes_per_pixel)
    assert limited.plan.vision_max_pixels == limited.placement.vision_max_pixels
    assert loaded(room, dataclasses.replace(seeing, fit_free=False)).placement.vision_max_pixels is None


def test_a_fitted_load_that_runs_out_of_memory_plans_again_smaller(tiny, monkeypatch):
    """fit.retrying_load: where a load on the plan for the free memory runs out of GPU memory
    (the plan's estimates fell short), the model is planned again for LOAD_RETRY_SHARE of what
    is free then, and fit_note says so; with a budget (--max-vram), the error is raised."""
    from qvl.runtime import fit
    from qvl.runtime.weights import Matrix

    fp = _tiny_footprint(tiny)
    kv = 8192 * fp.kv_bytes_per_token
    room = _copy(fp) + fp.offload_group_bytes
    one = CUDA_OVERHEAD + fp.activation_bytes + fp.layer_bytes[2] + kv + room + 1000  # 1 of 3 layers and a copy
    free = int(one / fit.LOAD_RETRY_SHARE) + 1
    monkeypatch.setattr(fit, "free_bytes", lambda accel: free)
    to_device, uploads = Matrix.to_device, []

    def short_of_memory(self, *args, **kwargs):  # the first load runs out at its 10th weight
        uploads.append(1)
        if len(uploads) == 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return to_device(self, *args, **kwargs)

    monkeypatch.setattr(Matrix, "to_device", short_of_memory)
    asked = Placement("cpu", ALL_LAYERS, kv_type="f32", fit_free=True)
    model = load(tiny, device="cpu", dtype=torch.float32, placement=asked, plan_ctx=8192)
    budget = int(fit.LOAD_RETRY_SHARE * free)
    assert model.plan == make_plan(fp, 8192, budget, ALL_LAYERS, False, prefill_offload=True)
    assert model.plan.gpu_layers == 1 and [layer.kernels for layer in model.decoder.layers] == [False, False, True]
    assert model.fit_note == ("out of GPU memory loading the model on its plan; planned again for 85% of the "
                              f"{free / GIB:.1f} GiB free: 1/3 decoder layers on the GPU, the rest on the CPU, the "
                              "vision tower on the CPU (--max-vram or --gpu-layers to choose)")
    uploads.clear()
    with pytest.raises(torch.OutOfMemoryError):  # a budget the user chose is not second-guessed
        load(tiny, device="cpu", dtype=torch.float32, placement=asked, plan_ctx=8192, max_vram=1.0)
