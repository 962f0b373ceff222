"""Which tensors a checkpoint must hold, and what each output file is made of.

`expected_hf_tensors` derives every Hugging Face tensor name and shape from the config (so a
missing, extra or misshapen tensor is caught before anything is written); `text_tensors`,
`mmproj_tensors` and `ollama_tensors` rename them through explicit tables into llama.cpp's
two-file layout or Ollama's one file. An unknown tensor is an error, never guessed at.
Shapes here are numpy (HF) order, `(out, in)`; GGUF stores them reversed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConvertError
from .hf_config import CheckpointConfig


@dataclass(frozen=True)
class OutTensor:
    """One output tensor and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    source: str  # canonical HF tensor name
    row_start: int = 0  # rows [row_start, row_start + shape[0]) of the source (q/k/v split)
    temporal: int | None = None  # index along the source's temporal axis (patch embedding)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2

    @property
    def row_length(self) -> int:
        """ne[0] in GGUF terms: the innermost dimension."""
        return self.shape[-1]


def _text_hf(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    t = cfg.text
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (t.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not t.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (t.intermediate_size, h),
            p + "mlp.up_proj.weight": (t.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, t.intermediate_size),
        })
    return shapes


def _vision_hf(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    e, w, m = v.embed_dim, v.mlp_width, v.merged_dim
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (e, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "visual.merger.ln_q.weight": (e,),
        "visual.merger.mlp.0.weight": (m, m),
        "visual.merger.mlp.0.bias": (m,),
        "visual.merger.mlp.2.weight": (v.out_hidden_size, m),
        "visual.merger.mlp.2.bias": (v.out_hidden_size,),
    }
    if not cfg.is_qwen2_5:
        shapes["visual.merger.ln_q.bias"] = (e,)
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        shapes.update({
            p + "norm1.weight": (e,),
            p + "norm2.weight": (e,),
            p + "attn.qkv.weight": (3 * e, e),
            p + "attn.qkv.bias": (3 * e,),
            p + "attn.proj.weight": (e, e),
            p + "attn.proj.bias": (e,),
        })
        if cfg.is_qwen2_5:
            for proj in ("gate_proj", "up_proj"):
                shapes[p + f"mlp.{proj}.weight"] = (w, e)
                shapes[p + f"mlp.{proj}.bias"] = (w,)
            shapes[p + "mlp.down_proj.weight"] = (e, w)
            shapes[p + "mlp.down_proj.bias"] = (e,)
        else:
            shapes.update({
                p + "norm1.bias": (e,),
                p + "norm2.bias": (e,),
                p + "mlp.fc1.weight": (w, e),
                p + "mlp.fc1.bias": (w,),
                p + "mlp.fc2.weight": (e, w),
                p + "mlp.fc2.bias": (e,),
            })
    return shapes


def expected_hf_tensors(cfg: CheckpointConfig) -> dict[str, tuple[int, ...]]:
    return {**_text_hf(cfg), **_vision_hf(cfg)}


def check_tensors(cfg: CheckpointConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its shape; nothing unknown (a tied lm_head may be)."""
    expected = expected_hf_tensors(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise ConvertError(f"{where}: missing tensor '{name}'")
        if tuple(found[name]) != shape:
            raise ConvertError(f"{where}: tensor '{name}' has shape {list(found[name])}, config says {list(shape)}")
    tolerated = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    for name in found:
        if name not in expected and name not in tolerated:
            raise ConvertError(f"{where}: unexpected tensor '{name}' (not part of a {cfg.family} model)")


# --- llama.cpp / Ollama naming -------------------------------------------------------------

_TEXT_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_TEXT_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# HF vision block part -> (llama.cpp name, Ollama name)
_VISION_BLOCK = {
    "norm1": ("ln1", "ln1"),
    "norm2": ("ln2", "ln2"),
    "attn.proj": ("attn_out", "attn_out"),
    "mlp.gate_proj": ("ffn_gate", "ffn_gate"),
    "mlp.up_proj": ("ffn_up", "ffn_up"),
    "mlp.down_proj": ("ffn_down", "ffn_down"),
    "mlp.fc1": ("ffn_up", "ffn_up"),
    "mlp.fc2": ("ffn_down", "ffn_down"),
}
_VISION_GLOBAL = {
    "visual.merger.ln_q": ("v.post_ln", "v.merger.ln_q"),
    "visual.merger.mlp.0": ("mm.0", "v.merger.mlp.0"),
    "visual.merger.mlp.2": ("mm.2", "v.merger.mlp.2"),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_RE = re.compile(r"^visual\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(.+)\.(weight|bias)$")


def _unknown(name: str) -> ConvertError:
    return ConvertError(f"no GGUF name for tensor '{name}'")


def text_name(hf: str) -> str:
    if hf in _TEXT_GLOBAL:
        return _TEXT_GLOBAL[hf]
    m = _LAYER_RE.match(hf)
    if not m or m.group(2) not in _TEXT_LAYER:
        raise _unknown(hf)
    return f"blk.{m.group(1)}.{_TEXT_LAYER[m.group(2)]}.{m.group(3)}"


def _vision_tensors(hf: str, shape: tuple[int, ...], ollama: bool) -> list[OutTensor]:
    pick = 1 if ollama else 0
    if hf == "visual.patch_embed.proj.weight":
        e, c, t, ph, pw = shape
        names = ["v.patch_embd_0.weight", "v.patch_embd_1.weight"] if ollama else [
            "v.patch_embd.weight", "v.patch_embd.weight.1"]
        if t != 2:
            raise ConvertError(f"tensor '{hf}': temporal patch size {t} (GGUF layouts need 2)")
        return [OutTensor(n, (e, c, ph, pw), hf, temporal=i) for i, n in enumerate(names)]
    m = _BLOCK_RE.match(hf)
    if m:
        blk, part, kind = m.groups()
        if part == "attn.qkv":
            third = shape[0] // 3
            return [
                OutTensor(f"v.blk.{blk}.attn_{x}.{kind}", (third, *shape[1:]), hf, row_start=i * third)
                for i, x in enumerate("qkv")
            ]
        if part not in _VISION_BLOCK:
            raise _unknown(hf)
        return [OutTensor(f"v.blk.{blk}.{_VISION_BLOCK[part][pick]}.{kind}", shape, hf)]
    m = _GLOBAL_RE.match(hf)
    if not m or m.group(1) not in _VISION_GLOBAL:
        raise _unknown(hf)
    return [OutTensor(f"{_VISION_GLOBAL[m.group(1)][pick]}.{m.group(2)}", shape, hf)]


def _ordered(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    def key(name: str) -> list[object]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

    return sorted(shapes, key=key)


def text_tensors(cfg: CheckpointConfig) -> list[OutTensor]:
    """llama.cpp's `qwen2vl` text model (also the text half of Ollama's file)."""
    shapes = _text_hf(cfg)
    return [OutTensor(text_name(hf), shapes[hf], hf) for hf in _ordered(shapes)]


def mmproj_tensors(cfg: CheckpointConfig) -> list[OutTensor]:
    """llama.cpp's `clip` projector file."""
    shapes = _vision_hf(cfg)
    return [t for hf in _ordered(shapes) for t in _vision_tensors(hf, shapes[hf], ollama=False)]


def ollama_tensors(cfg: CheckpointConfig) -> list[OutTensor]:
    """Ollama's single `qwen25vl` file: text tensors, then vision tensors."""
    shapes = _vision_hf(cfg)
    vision = [t for hf in _ordered(shapes) for t in _vision_tensors(hf, shapes[hf], ollama=True)]
    return text_tensors(cfg) + vision
