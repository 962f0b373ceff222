"""Where the model runs: which decoder layers and whether the vision tower live on the GPU, and a
plan that fits them into a memory budget (`--max-vram`).

The footprint is read from the GGUF tensor table (bytes each tensor takes once uploaded: GGUF
blocks for the types the Triton matmul reads, bf16 otherwise, float32 for F32 and vectors). The
transient parts are estimates from the model's dimensions:

- decoder activations: one prefill chunk of `PREFILL_CHUNK` tokens, float32, through the widest
  layer (residual, norm, q/k/v, attention output, gate/up/SwiGLU) plus one row of logits;
- vision peak: per patch, the largest set of activations alive at once (flash-style attention
  keeps no patches x patches matrix; `vision_bytes_per_pixel`);
- `CUDA_OVERHEAD`: the CUDA context and allocator slack; an estimate, to be measured on a GPU;
- on GPUs without tensor cores for Triton (sm_75: T4, RTX 20xx), the float16 weight slab that
  kernels/dequant.py decodes for each prefill / vision GEMM (32 MiB at most), beside either.

The vision tower runs before prefill and frees its activations, so the budget must hold
overhead + all weights + dequant slab + max(vision peak, KV cache + decoder activations +
offloaded layers' copies). The last: with decoder layers left on the CPU, a prompt runs each of them on
the GPU from a copy made for it (decoder.prefill_offload), the next one's copy made meanwhile
where the budget has room for it after the layers (two at once, copy_ahead.py), each copy with
its layer's keys and values up to the context's length (offload_kv.py; bf16 / f16 on the kernel
path, float32 otherwise), and keeps the hidden states of up to OFFLOAD_GROUP prompt tokens there
between layers.

Policy under a budget: (1) the vision tower, when its weights and the peak of a 1024x1024
image fit in half of what is left after the overhead and the decoder's activations; streamed
(vision_stream.py: its blocks' matrices in host memory, two blocks on the GPU at a time) when
only that fits, or when streaming puts more decoder layers on the GPU than the whole tower
leaves room for; (2) decoder layers, last first, each with its KV cache, as llama.cpp's -ngl
counts them; (3) the output layer once every layer is on the GPU. Images larger than what the
budget leaves for the vision peak are downscaled (`vision_max_pixels`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .config import TextConfig
from .copy_ahead import OFFLOAD_COPIES
from .decoder import KV_TYPES, OFFLOAD_GROUP, PREFILL_CHUNK, kv_bytes_per_token
from .dense_mlp import ALIGN
from .gguf_file import TensorInfo
from .lora import LoraFactor
from .weights import device_bytes

CUDA_OVERHEAD = 512 * 2**20
REFERENCE_PIXELS = 1024 * 1024  # the image the vision reservation is sized for
PATCH_PIXELS = 14 * 14
VISION_SLACK = 1.25  # the vision peak's estimate over the tensors it counts: the allocator's rounding and gaps
ROTARY_BYTES = 2 * 4 * 64  # a patch's rotary angles (head_dim / 2 float32, head dims to 128) and their copy
GIB = 2**30


class PlacementError(ValueError):
    """A budget or device request that cannot be met; one line."""


@dataclass(frozen=True)
class Placement:
    """What runs where. `accel` is "cuda" (or "cpu": the kernel path on the CPU, for tests)."""

    accel: str | None = None  # None: everything on the CPU
    gpu_layers: int = 0  # the last N decoder layers on accel; N > n_layer puts the output layer there too
    vision_on_accel: bool = False
    kernels: bool = True  # Triton kernels on accel (False: torch with bf16 weights, --no-triton)
    kv_type: str | None = None  # None: float32 on the CPU, bf16 (f16 before Ampere) on accel; or one of KV_TYPES
    vision_max_pixels: int | None = None  # larger images are downscaled (from a --max-vram plan)
    cuda_graph: bool = True  # decode captured in a CUDA graph when the whole decoder is on the GPU
    vision_stream: bool = False  # the vision tower on accel with its blocks' matrices in host memory
    prefill_offload: bool = True  # prompts run the CPU's decoder layers on accel, each copied there for the pass
    copy_ahead: bool = True  # prefill_offload makes each layer's copy while the one before runs (two there at once)
    # without a budget: when what is asked does not fit in the GPU's free memory, plan for that
    # memory instead (fewer layers there, or none), as Ollama and llama.cpp's --fit do
    fit_free: bool = False

    def __post_init__(self) -> None:
        if self.kv_type is not None and self.kv_type not in KV_TYPES:
            raise PlacementError(f"cache type {self.kv_type!r}: one of {', '.join(KV_TYPES)}")
        if self.gpu_layers < 0:
            raise PlacementError(f"--gpu-layers {self.gpu_layers}: must be >= 0")


@dataclass(frozen=True)
class Footprint:
    """What the model takes on an accelerator, from its GGUF files."""

    layer_bytes: tuple[int, ...]  # weights of each decoder layer
    output_bytes: int  # the output layer and final norm
    vision_bytes: int  # vision tower and merger (0 without a projector)
    kv_bytes_per_token: int  # one layer, keys and values
    activation_bytes: int  # decoder, one prefill chunk
    vision_bytes_per_pixel: float  # transient, per image pixel
    dequant_slab: int = 0  # transient, the GEMMs' dequantized weight rows (kernels/dequant.py's prefill route)
    vision_stream_bytes: int = 0  # the tower streamed: all but its blocks' matrices, two blocks' and a placeholder
    offload_group_bytes: int = 0  # prefill offload: OFFLOAD_GROUP prompt tokens' hidden states, between layers
    offload_kv_bytes_per_token: int = 0  # prefill offload: a token of a copy's keys and values (offload_kv.py)


def decoder_activation_bytes(cfg: TextConfig, tokens: int) -> int:
    """A forward pass of `tokens` through a decoder layer, float32, at most: the residual, norm,
    q/k/v, attention output and the next residual (8 n_embd), the gate / up product and the
    SwiGLU's operand for down (3 n_ff), and the last token's logits (2 n_vocab).
    tests/kernels/test_activation_memory.py counts what a pass holds against it."""
    return 4 * (tokens * (8 * cfg.n_embd + 3 * cfg.n_ff) + 2 * cfg.n_vocab)


def vision_bytes_per_pixel(vision: Mapping[str, TensorInfo], kernels: bool, half: bool) -> float:
    """The vision encode's activations a pixel, at their peak (runtime/vision.py's forward).

    On the kernel path with half products (dense bf16 / f16 copies of the tower's matrices, the
    F16 mmproj's), each phase holds, a patch, with E the width and F the MLP's (zero-padded to
    dense_mlp.ALIGN when gated): the image's float32 patches copied up beside x and its
    window-ordered copy (float32, 8E); attention: x, its norm, q/k/v, the attention's and the o
    projection's outputs (4E + 2E + 6E + 2E + 2E); the MLP: x, the norm, gate|up (the hidden
    layer written over its gate half) and the output (8E + 4F); the merger: the norm and three
    float32 products (14E). Qwen2-VL's LayerNorm keeps the norm float32 (2E more), its MLP holds
    up and quick GELU's product (4F), and the adds are float32. The largest, plus the rotary's angles and their copy (ROTARY_BYTES), times
    VISION_SLACK for the allocator's rounding and gaps. tests/kernels/test_activation_memory.py
    counts every tensor an encode makes while it lives and finds the peak within that.
    Otherwise (quantized tower weights, the torch path, float32): the float32 residual, norm,
    q/k/v, attention output and the MLP's up / gate / hidden, 4 * (6E + 3F).
    """
    q, up, down = (vision[f"v.blk.0.{role}.weight"] for role in ("attn_q", "ffn_up", "ffn_down"))
    embed, ffn = q.shape[0], up.shape[0]

    def dense_half(info: TensorInfo) -> bool:  # Matrix.to_device's bf16 / f16 copy (2 bytes a weight)
        return device_bytes(info, kernels) == 2 * info.shape[0] * info.shape[1]

    if not (kernels and half and all(dense_half(i) for i in (q, up, down))):
        return 4 * (6 * embed + 3 * ffn) / PATCH_PIXELS
    patches_up = 4 * 2 * 3 * PATCH_PIXELS + 8 * embed  # float32, two frames of three channels
    if "v.blk.0.ffn_gate.weight" in vision:  # Qwen2.5-VL
        ffn = -(-ffn // ALIGN) * ALIGN
        phases = (patches_up, 16 * embed, 8 * embed + 4 * ffn, 14 * embed)
    else:  # Qwen2-VL: LayerNorm's float32 norm (+2E, +2E converted for the GEMMs), float32 adds
        phases = (patches_up, 18 * embed, 10 * embed + 4 * ffn, 18 * embed)
    return (max(phases) + ROTARY_BYTES) * VISION_SLACK / PATCH_PIXELS


def footprint(cfg: TextConfig, text: Mapping[str, TensorInfo], vision: Mapping[str, TensorInfo] | None,
              kernels: bool = True, kv_type: str = "bf16", dequant_slab: int = 0, half: bool = True,
              loras: Mapping[str, Sequence[LoraFactor]] | None = None) -> Footprint:
    """From the tensor tables of the text and vision files (`GGUFFile.tensors`); `dequant_slab`
    bytes where the GPU's GEMMs dequantize weights first (dequant_slab_bytes); `half`:
    bf16 / f16 products (False: float32 throughout, load's dtype=torch.float32); `loras`: run-time
    adapters' factors by tensor name (lora.load_loras), which go up with their matrices."""
    layers = [0] * cfg.n_layer
    output = 0
    loras = loras or {}
    for name, info in text.items():
        if name.startswith("v.") or name.startswith("mm."):
            continue
        size = device_bytes(info, kernels) + sum(f.a.numel() + f.b.numel() for f in loras.get(name, ())) * (
            2 if half else 4)
        m = re.match(r"blk\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] += size
        elif name in ("output.weight", "output_norm.weight") or (
                name == "token_embd.weight" and "output.weight" not in text):
            output += size  # tied: a second copy of the embeddings goes up
    vis_bytes, per_pixel, stream_bytes = 0, 0.0, 0
    if vision is not None:
        names = [n for n in vision if n.startswith("v.") or n.startswith("mm.")]
        vis_bytes = sum(device_bytes(vision[n], kernels) for n in names)
        block_matrices: dict[int, int] = {}
        stacks: dict[tuple[int, str], int] = {}  # a block's matrices as the device stacks them (one storage each)
        for n in names:
            m = re.match(r"v\.blk\.(\d+)\.(\w+?)(?:\.weight)?$", n)
            if m and len(vision[n].shape) == 2:
                i, role = int(m.group(1)), m.group(2)
                size = device_bytes(vision[n], kernels)
                block_matrices[i] = block_matrices.get(i, 0) + size
                stack = "qkv" if role in ("attn_q", "attn_k", "attn_v") else "gate_up" if role in (
                    "ffn_gate", "ffn_up") else role
                stacks[i, stack] = stacks.get((i, stack), 0) + size
        stream_bytes = vis_bytes
        if block_matrices:  # two blocks' matrices, and the placeholder blocks at rest view (the largest stack)
            stream_bytes += (min(2, len(block_matrices)) * max(block_matrices.values()) + max(stacks.values())
                             - sum(block_matrices.values()))
        per_pixel = vision_bytes_per_pixel(vision, kernels, half)
    act = decoder_activation_bytes(cfg, PREFILL_CHUNK)
    group = 2 * 4 * OFFLOAD_GROUP * cfg.n_embd  # float32 x and its norm (decoder.prompt_forward)
    return Footprint(tuple(layers), output, vis_bytes, kv_bytes_per_token(cfg, kv_type), act, per_pixel, dequant_slab,
                     stream_bytes, group, kv_bytes_per_token(cfg, "bf16" if kernels and half else "f32"))


@dataclass(frozen=True)
class Plan:
    budget: int | None
    ctx: int
    n_layer: int
    gpu_layers: int  # as --gpu-layers counts: n_layer + 1 = every layer and the output
    vision_on_gpu: bool
    vision_max_pixels: int | None
    weights: int  # bytes on the GPU
    kv: int
    activations: int
    vision_peak: int  # at vision_max_pixels, or at REFERENCE_PIXELS without a limit
    dequant_slab: int = 0
    vision_streamed: bool = False  # on the GPU with its blocks' matrices in host memory (vision_stream.py)
    offload_layer: int = 0  # CPU layers' copies and a prompt group's hidden states (decoder.prefill_offload)
    copies_ahead: bool = False  # offload_layer holds two copies: the next made while one runs (copy_ahead.py)

    @property
    def total(self) -> int:
        return CUDA_OVERHEAD + self.weights + self.dequant_slab + max(self.vision_peak,
                                                                       self.kv + self.activations + self.offload_layer)

    def table(self) -> str:
        """The plan, a line per part, for --verbose."""
        def gib(n: int) -> str:
            return f"{n / GIB:6.2f} GiB"

        layers = min(self.gpu_layers, self.n_layer)
        out = "yes" if self.gpu_layers > self.n_layer else "no"
        copies = "two CPU layers' copies" if self.copies_ahead else "a CPU layer's copy"
        pixels = "no limit" if self.vision_max_pixels is None else f"{self.vision_max_pixels} pixels"
        lines = [
            f"plan: {layers}/{self.n_layer} decoder layers on the GPU (output layer: {out}), "
            f"vision tower on the {'GPU' if self.vision_on_gpu else 'CPU'}"
            f"{' (its blocks streamed from host memory)' if self.vision_streamed else ''}, images up to {pixels}",
            f"  weights      {gib(self.weights)}",
            f"  KV cache     {gib(self.kv)}  ({self.ctx} tokens)",
            f"  activations  {gib(self.activations)}",
            *([f"  offload      {gib(self.offload_layer)}  ({copies}, keys and values included, and "
               "the prompt's hidden states while a prompt runs them here)"] if self.offload_layer else []),
            f"  vision peak  {gib(self.vision_peak)}",
            *([f"  dequant slab {gib(self.dequant_slab)}  (weight rows decoded for cuBLAS's prefill GEMMs)"]
              if self.dequant_slab else []),
            f"  CUDA context {gib(CUDA_OVERHEAD)}  (estimate)",
            f"  total        {gib(self.total)}"
            + (f" of {gib(self.budget).strip()} budget" if self.budget is not None else ""),
        ]
        return "\n".join(lines)


def make_plan(fp: Footprint, ctx: int, budget: int | None, want_layers: int, want_vision: bool,
              vision_max_pixels: int | None = None, vision_stream: bool = False,
              prefill_offload: bool = False) -> Plan:
    """Fit at most `want_layers` layers (as --gpu-layers counts) and the vision tower when
    `want_vision` (streamed when `vision_stream`, or when the plan finds that better) into
    `budget` bytes; without a budget, exactly what was asked. With `prefill_offload` and layers
    left on the CPU, room for a copy of the largest layer beside the activations, and for a
    second (copies made ahead) where the budget has it after the layers. See the
    module doc."""
    n = len(fp.layer_bytes)
    want_layers = min(want_layers, n + 1)
    want_vision = want_vision and fp.vision_bytes > 0

    def peak(pixels: int) -> int:
        return int(fp.vision_bytes_per_pixel * pixels)

    kv_layer = ctx * fp.kv_bytes_per_token
    one_copy = max(fp.layer_bytes, default=0) + ctx * fp.offload_kv_bytes_per_token  # and its keys and values
    largest = one_copy + fp.offload_group_bytes if prefill_offload else 0

    def offload(layers: int) -> int:  # with layers (as --gpu-layers counts) on the GPU, one copy at a time
        return largest if layers < n else 0

    def ahead(plan: Plan) -> Plan:
        """The plan with room for a second copy (made while the first runs), where the budget
        has it after the layers: a layer on the GPU needs no copy at all."""
        more = replace(plan, offload_layer=plan.offload_layer + (OFFLOAD_COPIES - 1) * one_copy, copies_ahead=True)
        if plan.offload_layer and (budget is None or more.total <= budget):
            return more
        return plan

    if budget is None:
        weights = sum(fp.layer_bytes[n - 1 - i] for i in range(min(want_layers, n)))
        weights += fp.output_bytes if want_layers > n else 0
        weights += (fp.vision_stream_bytes if vision_stream else fp.vision_bytes) if want_vision else 0
        kv = min(want_layers, n) * kv_layer
        return ahead(Plan(None, ctx, n, want_layers, want_vision, vision_max_pixels, weights, kv, fp.activation_bytes,
                          peak(vision_max_pixels or REFERENCE_PIXELS) if want_vision else 0, fp.dequant_slab,
                          want_vision and vision_stream, offload(want_layers)))
    fixed = CUDA_OVERHEAD + fp.dequant_slab  # present whatever runs where
    free = budget - fixed - fp.activation_bytes
    if free <= 0:
        raise PlacementError(f"--max-vram {budget / GIB:.2f} GB is below the "
                             f"{(fixed + fp.activation_bytes) / GIB:.2f} GB the CUDA context and "
                             "activations take")

    def layers_with(vision_weights: int | None) -> tuple[int, int, int]:
        """(layers as --gpu-layers counts, their weights, their KV cache) beside the vision tower's
        `vision_weights` and a 1024x1024 image's peak (None: the tower on the CPU)."""
        room = free - (vision_weights + peak(REFERENCE_PIXELS) if vision_weights is not None else 0)
        for reserve in (0, largest):  # all layers, else with room kept for an offloaded layer's copy
            left = room - reserve
            layers = weights = kv = 0
            while layers < min(want_layers, n) and fp.layer_bytes[n - 1 - layers] + kv_layer <= left:
                left -= fp.layer_bytes[n - 1 - layers] + kv_layer
                weights += fp.layer_bytes[n - 1 - layers]
                kv += kv_layer
                layers += 1
            if layers == n and want_layers > n and fp.output_bytes <= left:
                layers += 1
                weights += fp.output_bytes
            if layers >= n or offload(layers) <= reserve:
                break
        return layers, weights, kv

    def fits(vision_weights: int) -> bool:
        return want_vision and vision_weights + peak(REFERENCE_PIXELS) <= free / 2

    vision_weights: int | None = None  # on the CPU
    streamed = False
    if fits(fp.vision_bytes) and not vision_stream:
        vision_weights = fp.vision_bytes
        if fits(fp.vision_stream_bytes) and (layers_with(fp.vision_stream_bytes)[0]
                                             > layers_with(fp.vision_bytes)[0]):
            vision_weights, streamed = fp.vision_stream_bytes, True
    elif fits(fp.vision_stream_bytes):
        vision_weights, streamed = fp.vision_stream_bytes, True
    layers, weights, kv = layers_with(vision_weights)
    max_pixels = None
    vision_peak = 0
    if vision_weights is not None:  # the peak is transient: everything but the weights and overhead is its room
        weights += vision_weights
        max_pixels = int((budget - fixed - weights) / fp.vision_bytes_per_pixel)
        if vision_max_pixels is not None:
            max_pixels = min(max_pixels, vision_max_pixels)
        vision_peak = peak(max_pixels)
    return ahead(Plan(budget, ctx, n, layers, vision_weights is not None, max_pixels, weights, kv,
                      fp.activation_bytes, vision_peak, fp.dequant_slab, streamed, offload(layers)))


def dequant_slab_bytes(accel: str | None, kernels: bool, fast: bool) -> int:
    """GPU memory for the float16 / bf16 weight slab kernels/dequant.py decodes per prefill /
    vision GEMM where Triton's dots get no tensor cores (sm_75), or anywhere with
    QVL_DEQUANT_GEMM=1; 0 elsewhere (and in float32, fast=False)."""
    if accel != "cuda" or not kernels or not fast or not torch.cuda.is_available():
        return 0
    from ..kernels import dequant

    if torch.cuda.get_device_capability()[0] >= 8 and not dequant.ON_TENSOR_CORES:
        return 0
    return 2 * dequant.SLAB_ELEMENTS


def indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current GPU): tensors report their device with its index, and
    placement checks compare them with the layers' device (`cuda` != `cuda:0`: compared
    unindexed, the first H200 run never captured decode in a CUDA graph nor fused the norms)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
