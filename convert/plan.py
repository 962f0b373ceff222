"""The ggml type of every output tensor: llama.cpp's rules, ported.

Text model: `--type` picks a llama.cpp file type. f32/f16/bf16/q8_0 convert every matrix to that
type, as convert_hf_to_gguf.py does. q4_0, q4_k (llama.cpp's Q4_K_S), q4_k_m, q5_k_m and q6_k
follow `llama_tensor_get_type` in llama-quant.cpp: the output (or the tied token embedding) takes
Q6_K, `attn_v` and `ffn_down` take more bits on the layers llama.cpp picks (Q4_K_S: Q5_K on the
first ones; Q4_K_M, Q5_K_M: Q6_K on use_more_bits' layers), and a row length that is not
a multiple of the block falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16).
Vectors and norms stay F32 in every mode.

Vision projector: `--vision-type` f16 (default), f32 or q8_0; the patch embedding is never
quantized and a row that Q8_0 cannot hold (Qwen2.5-VL's 3420-wide ffn_down) stays F16.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from .errors import ConvertError
from .layout import OutTensor
from .quant import block_size, can_hold, row_bytes


@dataclass(frozen=True)
class TextType:
    """A `--type` choice: the llama.cpp file type and the default ggml type of a matrix."""

    name: str
    file_type: FT
    default: T
    mixed: bool  # follows llama-quantize's per-tensor rules


TEXT_TYPES: dict[str, TextType] = {
    "f32": TextType("f32", FT.ALL_F32, T.F32, False),
    "f16": TextType("f16", FT.MOSTLY_F16, T.F16, False),
    "bf16": TextType("bf16", FT.MOSTLY_BF16, T.BF16, False),
    "q8_0": TextType("q8_0", FT.MOSTLY_Q8_0, T.Q8_0, False),
    "q4_0": TextType("q4_0", FT.MOSTLY_Q4_0, T.Q4_0, True),
    "q4_k": TextType("q4_k", FT.MOSTLY_Q4_K_S, T.Q4_K, True),
    "q4_k_m": TextType("q4_k_m", FT.MOSTLY_Q4_K_M, T.Q4_K, True),
    "q5_k_m": TextType("q5_k_m", FT.MOSTLY_Q5_K_M, T.Q5_K, True),
    "q6_k": TextType("q6_k", FT.MOSTLY_Q6_K, T.Q6_K, True),
}

VISION_TYPES: dict[str, tuple[FT, T]] = {
    "f16": (FT.MOSTLY_F16, T.F16),
    "f32": (FT.ALL_F32, T.F32),
    "q8_0": (FT.MOSTLY_Q8_0, T.Q8_0),
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_MORE_BITS = (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M)  # Q6_K for attn_v / ffn_down on use_more_bits' layers


@dataclass(frozen=True)
class PlannedTensor:
    tensor: OutTensor
    qtype: T

    @property
    def nbytes(self) -> int:
        rows = 1
        for d in self.tensor.shape[:-1]:
            rows *= d
        return rows * row_bytes(self.qtype, self.tensor.row_length)


def fallback(qtype: T, row_length: int) -> T:
    """llama-quant.cpp `tensor_type_fallback`."""
    if qtype in (T.F32, T.F16, T.BF16) or can_hold(qtype, row_length):
        return qtype
    alt = _FALLBACK.get(qtype, qtype)
    return alt if can_hold(alt, row_length) else T.F16


def _use_more_bits(i: int, n: int) -> bool:
    # C integer arithmetic; i, n >= 0 so Python's // agrees with C's /
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def keeps_float(t: OutTensor) -> bool:
    return not t.is_matrix or t.name.endswith("_norm.weight") or not t.name.endswith(".weight")


def plan_text(tensors: list[OutTensor], kind: TextType, n_layer: int, imatrix: bool = False) -> list[PlannedTensor]:
    """Port of llama_tensor_get_type for the file types qvl writes (tensors in file order); with
    an importance matrix Q4_0's first eighth of ffn_down takes Q4_1, as llama.cpp's does."""
    tied = not any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum(1 for t in tensors if "attn_v.weight" in t.name)
    i_attn_v = 0
    i_ffn_down = 0
    plan = []
    for t in tensors:
        if keeps_float(t):
            plan.append(PlannedTensor(t, T.F32))
            continue
        qtype = kind.default
        if not kind.mixed:
            if not can_hold(qtype, t.row_length):
                qtype = T.F16  # convert_hf_to_gguf.py's QuantError fallback
            plan.append(PlannedTensor(t, qtype))
            continue
        ft = kind.file_type
        if t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
            if t.row_length % block_size(qtype):
                qtype = T.Q8_0
            elif qtype != T.Q8_0:
                qtype = T.Q6_K
        elif "attn_v.weight" in t.name:
            if ft in _MORE_BITS and _use_more_bits(i_attn_v, n_attn_v):
                qtype = T.Q6_K
            elif ft == FT.MOSTLY_Q4_K_S and i_attn_v < 4:
                qtype = T.Q5_K
            i_attn_v += 1
        elif "ffn_down" in t.name:
            if ft in _MORE_BITS and _use_more_bits(i_ffn_down, n_layer):
                qtype = T.Q6_K
            elif ft == FT.MOSTLY_Q4_K_S and i_ffn_down < n_layer // 8:
                qtype = T.Q5_K
            elif ft == FT.MOSTLY_Q4_0 and imatrix and i_ffn_down < n_layer // 8:
                qtype = T.Q4_1
            i_ffn_down += 1
        plan.append(PlannedTensor(t, fallback(qtype, t.row_length)))
    return plan


def plan_vision(tensors: list[OutTensor], vision_type: str) -> list[PlannedTensor]:
    if vision_type not in VISION_TYPES:
        raise ConvertError(f"--vision-type {vision_type!r}: choose one of {', '.join(VISION_TYPES)}")
    _, target = VISION_TYPES[vision_type]
    plan = []
    for t in tensors:
        if "patch_embd" in t.name:  # forced before the name checks, as llama.cpp does
            qtype = T.F16 if target == T.F16 else T.F32
        elif keeps_float(t):
            qtype = T.F32
        elif not can_hold(target, t.row_length):
            qtype = T.F16
        else:
            qtype = target
        plan.append(PlannedTensor(t, qtype))
    return plan
