"""The ggml type of every output tensor: llama.cpp's rules, ported.

Text model: `--type` picks a llama.cpp file type. f32/f16/bf16/q8_0 convert every matrix to that
type, as convert_hf_to_gguf.py does. The other types (q4_0, q4_1, q5_0, q5_1, q4_k = llama.cpp's
Q4_K_S, q4_k_m, q5_k_s, q5_k_m, q6_k, q3_k_s/m/l, q2_k, q2_k_s, iq4_nl, iq4_xs, iq3_m/s/xs/xxs,
iq2_m/s/xs/xxs, iq1_m/s) follow `llama_tensor_get_type` in llama-quant.cpp for a dense model: the
output (or the tied token embedding) takes Q6_K (the IQ1/IQ2 mixes and IQ3_XXS: Q5_K), `attn_v`,
`ffn_down` and `attn_output` take more bits on the layers llama.cpp picks (Q4_K_S: Q5_K on the
first ones; Q4_K_M, Q5_K_M: Q6_K on use_more_bits' layers; Q3_K_M, Q3_K_L, Q2_K, Q2_K_S, IQ4 and
the IQ1-IQ3 mixes: their own; the IQ3_XXS / IQ3_XS mixes also move attn_q, attn_k, ffn_gate and
ffn_up), and a row length that is not a multiple of the block falls back (Q4_K -> Q5_0, Q5_K ->
Q5_1, Q6_K -> Q8_0, Q3_K / Q2_K -> Q4_0, IQ4_XS and the grid types -> IQ4_NL, else F16).
llama-quantize's per-tensor options are `Overrides`. Vectors and norms stay F32 in every mode.

Vision projector: `--vision-type` f16 (default), f32 or q8_0; the patch embedding is never
quantized and a row that Q8_0 cannot hold (Qwen2.5-VL's 3420-wide ffn_down) stays F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from .errors import ConvertError
from .layout import OutTensor
from .quant import NEEDS_IMATRIX, block_size, can_hold, row_bytes


@dataclass(frozen=True)
class TextType:
    """A `--type` choice: the llama.cpp file type and the default ggml type of a matrix."""

    name: str
    file_type: FT
    default: T
    mixed: bool  # follows llama-quantize's per-tensor rules
    needs_imatrix: bool = False  # its default-type matrices need an importance matrix (qvl quantize --imatrix)


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
    "q5_k_s": TextType("q5_k_s", FT.MOSTLY_Q5_K_S, T.Q5_K, True),
    "q3_k_l": TextType("q3_k_l", FT.MOSTLY_Q3_K_L, T.Q3_K, True),
    "q3_k_m": TextType("q3_k_m", FT.MOSTLY_Q3_K_M, T.Q3_K, True),
    "q3_k_s": TextType("q3_k_s", FT.MOSTLY_Q3_K_S, T.Q3_K, True),
    "q2_k": TextType("q2_k", FT.MOSTLY_Q2_K, T.Q2_K, True),
    "q2_k_s": TextType("q2_k_s", FT.MOSTLY_Q2_K_S, T.Q2_K, True, needs_imatrix=True),
    "q4_1": TextType("q4_1", FT.MOSTLY_Q4_1, T.Q4_1, True),
    "q5_0": TextType("q5_0", FT.MOSTLY_Q5_0, T.Q5_0, True),
    "q5_1": TextType("q5_1", FT.MOSTLY_Q5_1, T.Q5_1, True),
    "iq4_nl": TextType("iq4_nl", FT.MOSTLY_IQ4_NL, T.IQ4_NL, True),
    "iq4_xs": TextType("iq4_xs", FT.MOSTLY_IQ4_XS, T.IQ4_XS, True),
    "iq3_m": TextType("iq3_m", FT.MOSTLY_IQ3_M, T.IQ3_S, True),
    "iq3_s": TextType("iq3_s", FT.MOSTLY_IQ3_S, T.IQ3_S, True),
    "iq3_xs": TextType("iq3_xs", FT.MOSTLY_IQ3_XS, T.IQ3_S, True, needs_imatrix=True),
    "iq3_xxs": TextType("iq3_xxs", FT.MOSTLY_IQ3_XXS, T.IQ3_XXS, True, needs_imatrix=True),
    "iq2_m": TextType("iq2_m", FT.MOSTLY_IQ2_M, T.IQ2_S, True, needs_imatrix=True),
    "iq2_s": TextType("iq2_s", FT.MOSTLY_IQ2_S, T.IQ2_XS, True, needs_imatrix=True),
    "iq2_xs": TextType("iq2_xs", FT.MOSTLY_IQ2_XS, T.IQ2_XS, True, needs_imatrix=True),
    "iq2_xxs": TextType("iq2_xxs", FT.MOSTLY_IQ2_XXS, T.IQ2_XXS, True, needs_imatrix=True),
    "iq1_m": TextType("iq1_m", FT.MOSTLY_IQ1_M, T.IQ1_M, True, needs_imatrix=True),
    "iq1_s": TextType("iq1_s", FT.MOSTLY_IQ1_S, T.IQ1_S, True, needs_imatrix=True),
}

# the types qvl-convert writes from a checkpoint: not those that need an importance matrix
CONVERT_TYPES = tuple(k for k, v in TEXT_TYPES.items() if not v.needs_imatrix)


# the types llama-quantize does not write without importance values (but for the token embedding and the output)
IMATRIX_TYPES = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)


def requires_imatrix(kind: TextType, name: str, qtype: T) -> bool:
    """llama-quant.cpp `tensor_requires_imatrix` for qvl's types: an IQ3_XXS, IQ2 or IQ1 matrix, and
    in a Q2_K_S file a Q2_K one, other than the token embedding and the output, is not quantized
    without importance values; nor is any IQ2_XXS, IQ2_XS or IQ1_S one (ggml's quantizer asserts
    them: llama-quantize aborts where --output-tensor-type names one of those without them)."""
    if qtype in NEEDS_IMATRIX:
        return True
    if name in ("token_embd.weight", "output.weight"):
        return False
    return qtype in IMATRIX_TYPES or qtype == T.Q2_K and kind.file_type == FT.MOSTLY_Q2_K_S


VISION_TYPES: dict[str, tuple[FT, T]] = {
    "f16": (FT.MOSTLY_F16, T.F16),
    "f32": (FT.ALL_F32, T.F32),
    "q8_0": (FT.MOSTLY_Q8_0, T.Q8_0),
}

_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0, T.Q2_K: T.Q4_0, T.IQ4_XS: T.IQ4_NL,
             T.IQ3_S: T.IQ4_NL, T.IQ3_XXS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL,
             T.IQ1_M: T.IQ4_NL, T.IQ1_S: T.IQ4_NL}
_IQ4 = (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS)
_MORE_BITS = (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M)  # Q6_K for attn_v / ffn_down on use_more_bits' layers
_IQ2 = (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS, FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M, FT.MOSTLY_IQ1_S,
        FT.MOSTLY_IQ1_M)  # their own rules, before the others
_IQ1 = (FT.MOSTLY_IQ1_S, FT.MOSTLY_IQ1_M)
_IQ2_SM = (FT.MOSTLY_IQ2_S, FT.MOSTLY_IQ2_M)
# a matrix's role: the first of these its name holds (llama-quant.cpp tensor_get_category's order)
_ROLES = {"attn_v.weight": "attn_v", "attn_k.weight": "attn_k", "attn_q.weight": "attn_q",
          "attn_output.weight": "attn_output", "ffn_up": "ffn_up", "ffn_gate": "ffn_gate", "ffn_down": "ffn_down"}


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


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor choices: `pure` (no mix: every matrix the type's default),
    `output` / `token_embd` (--output-tensor-type / --token-embedding-type: that type as it is,
    no fallback), `patterns` (--tensor-type NAME=TYPE: the first pattern found in a tensor's name,
    as a regex search, gives its type instead of the mix; a fallback still applies)."""

    pure: bool = False
    output: T | None = None
    token_embd: T | None = None
    patterns: tuple[tuple[str, T], ...] = ()


FLOAT_DEFAULTS = (T.F32, T.F16, T.BF16)
WRITABLE = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
            T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ3_XXS, T.IQ2_S, T.IQ2_XS, T.IQ2_XXS, T.IQ1_M, T.IQ1_S)


def ggml_type(name: str) -> T:
    """A ggml type by its name, any case (llama-quantize's parse_ggml_type), among those qvl writes."""
    for t in WRITABLE:
        if t.name.lower() == name.lower():
            return t
    raise ConvertError(f"type {name!r}: qvl writes {', '.join(t.name.lower() for t in WRITABLE)}")


def tensor_type(option: str) -> tuple[str, T]:
    """--tensor-type NAME=TYPE as llama-quantize reads it: the name lower-cased, a regex."""
    name, sep, type_name = option.partition("=")
    if not sep or not name or not type_name:
        raise ConvertError(f"--tensor-type {option!r}: NAME=TYPE (e.g. attn_v=q8_0)")
    try:
        re.compile(name.lower())
    except re.error as e:
        raise ConvertError(f"--tensor-type {option!r}: {name!r} is not a regular expression ({e})") from None
    return name.lower(), ggml_type(type_name)


def plan_text(tensors: list[OutTensor], kind: TextType, n_layer: int, imatrix: bool = False,
              overrides: Overrides = Overrides(), n_gqa: int = 1) -> list[PlannedTensor]:
    """Port of llama_tensor_get_type for the file types qvl writes (tensors in file order); with
    an importance matrix Q4_0's first eighth of ffn_down takes Q4_1, as llama.cpp's does. The
    mix's counters move only where the mix is consulted (not for a tensor a pattern names)."""
    tied = not any(t.name == "output.weight" for t in tensors)
    n_attn_v = sum(1 for t in tensors if "attn_v.weight" in t.name)
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    plan = []
    for t in tensors:
        if keeps_float(t):
            plan.append(PlannedTensor(t, T.F32))
            continue
        if overrides.token_embd is not None and t.name == "token_embd.weight":
            plan.append(PlannedTensor(t, overrides.token_embd))
            continue
        if overrides.output is not None and t.name == "output.weight":
            plan.append(PlannedTensor(t, overrides.output))
            continue
        qtype = kind.default
        if qtype in FLOAT_DEFAULTS:
            plan.append(PlannedTensor(t, qtype))
            continue
        manual = next((q for pattern, q in overrides.patterns if re.search(pattern, t.name)), None)
        if manual is not None:
            qtype = manual
        elif kind.mixed and not overrides.pure:
            qtype = _mixed(t, qtype, kind.file_type, tied, (n_attn_v, n_layer, n_gqa), imatrix, overrides, counters)
        elif not kind.mixed and not overrides.pure and overrides.output is not None and tied \
                and t.name == "token_embd.weight":
            qtype = overrides.output  # the tied embedding takes the output's type (Q8_0's mix is its default)
        plan.append(PlannedTensor(t, fallback(qtype, t.row_length)))
    return plan


def _mixed(t: OutTensor, qtype: T, ft: FT, tied: bool, shape: tuple[int, int, int], imatrix: bool,
           overrides: Overrides, counters: dict[str, int]) -> T:
    """llama_tensor_get_type_impl for qvl's file types (a dense model, not Falcon; `shape`: the
    attn_v count, the layer count and heads per KV head): the output (or tied embedding), the
    token embedding, attn_v, attn_k, attn_q, ffn_down, attn_output, ffn_gate and ffn_up take
    other types where llama.cpp gives them others."""
    n_attn_v, n_layer, n_gqa = shape
    if t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
        if overrides.output is not None:
            return overrides.output
        if t.row_length % block_size(qtype):
            return T.Q8_0
        if ft in _IQ2 or ft == FT.MOSTLY_IQ3_XXS:
            return T.Q5_K
        return T.Q6_K if qtype != T.Q8_0 else qtype
    if t.name == "token_embd.weight":
        if ft in (FT.MOSTLY_IQ2_XXS, FT.MOSTLY_IQ2_XS) or ft in _IQ1:
            return T.Q2_K
        return T.IQ3_S if ft in _IQ2_SM or ft == FT.MOSTLY_IQ3_XXS else qtype
    role = next((r for key, r in _ROLES.items() if key in t.name), None)
    i = counters.get(role, 0)
    if role in counters:
        counters[role] += 1
    if ft in _IQ2:
        if role == "attn_v":
            return T.Q4_K if n_gqa >= 4 else T.IQ3_S if ft in _IQ2_SM else T.Q2_K
        if role == "ffn_down" and i < n_layer // 8 or role == "attn_output" and ft in _IQ2_SM:
            return T.IQ3_S if ft in _IQ2_SM else T.Q2_K
        return T.IQ2_XXS if role == "attn_output" and ft in _IQ1 else qtype
    if role == "attn_v":
        if ft == FT.MOSTLY_Q2_K:
            return T.Q4_K if n_gqa >= 4 else T.Q3_K
        if ft == FT.MOSTLY_Q2_K_S and n_gqa >= 4:
            return T.Q4_K
        if ft == FT.MOSTLY_IQ3_XXS:
            return T.Q4_K if n_gqa >= 4 else T.IQ3_XXS if imatrix else T.IQ3_S
        if ft in (FT.MOSTLY_IQ3_XS, FT.MOSTLY_IQ3_S) and n_gqa >= 4 or ft == FT.MOSTLY_IQ3_M:
            return T.Q4_K
        if ft == FT.MOSTLY_Q3_K_M:
            return T.Q5_K if i < 2 else T.Q4_K
        if ft == FT.MOSTLY_Q3_K_L or ft in _IQ4 and n_gqa >= 4:
            return T.Q5_K
        if ft in _MORE_BITS and _use_more_bits(i, n_attn_v):
            return T.Q6_K
        if ft == FT.MOSTLY_Q4_K_S and i < 4:
            return T.Q5_K
    elif role in ("attn_k", "attn_q"):
        return {FT.MOSTLY_IQ3_XS: T.IQ3_XXS, FT.MOSTLY_IQ3_XXS: T.IQ2_S}.get(ft, qtype)
    elif role == "ffn_down":
        if ft == FT.MOSTLY_Q2_K:
            return T.Q3_K
        if ft == FT.MOSTLY_Q2_K_S:
            return T.Q4_K if i < n_layer // 8 else qtype
        if ft == FT.MOSTLY_IQ3_XXS and not imatrix:
            return T.Q4_K if i < n_layer // 8 else T.Q3_K
        if ft == FT.MOSTLY_Q3_K_M:
            return T.Q5_K if i < n_layer // 16 else T.Q4_K
        if ft == FT.MOSTLY_IQ3_M and i < n_layer // 8:
            return T.Q4_K
        if ft == FT.MOSTLY_Q3_K_L:
            return T.Q5_K
        if ft in _MORE_BITS and _use_more_bits(i, n_layer):
            return T.Q6_K
        if ft in _IQ4 and not imatrix and i < n_layer // 8:
            return T.Q5_K
        if ft == FT.MOSTLY_Q4_K_S and i < n_layer // 8:
            return T.Q5_K
        if ft in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and imatrix and i < n_layer // 8:
            return T.Q4_1 if ft == FT.MOSTLY_Q4_0 else T.Q5_1
    elif role == "attn_output":
        return {FT.MOSTLY_Q2_K: T.Q3_K, FT.MOSTLY_IQ3_XXS: T.IQ3_S, FT.MOSTLY_Q3_K_M: T.Q4_K,
                FT.MOSTLY_Q3_K_L: T.Q5_K, FT.MOSTLY_IQ3_M: T.Q4_K}.get(ft, qtype)
    elif role in ("ffn_gate", "ffn_up") and ft == FT.MOSTLY_IQ3_XS and n_layer // 8 <= i < 7 * n_layer // 8:
        return T.IQ3_XXS
    return qtype


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
