"""GGUF key/value metadata of each output file, as typed entries.

Keys and types follow the files llama.cpp's converter writes (`qwen2vl` text model, `clip`
projector) and Ollama's `qwen25vl` single file; see docs in ../shared/docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType as V
from gguf import LlamaFileType

from .errors import ConvertError
from .hf_config import CheckpointConfig
from .vocab import Vocab


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    vtype: V
    sub: V | None = None


def _u32(key: str, v: int) -> KV:
    return KV(key, int(v), V.UINT32)


def _f32(key: str, v: float) -> KV:
    return KV(key, float(v), V.FLOAT32)


def _str(key: str, v: str) -> KV:
    return KV(key, v, V.STRING)


def _arr(key: str, v: list[Any], sub: V) -> KV:
    return KV(key, list(v), V.ARRAY, sub)


def _general(kind: str, name: str) -> list[KV]:
    # general.architecture is written by the GGUF writer itself, first.
    return [_str("general.type", kind), _str("general.name", name)]


def _text_params(prefix: str, cfg: CheckpointConfig) -> list[KV]:
    t = cfg.text
    return [
        _u32(f"{prefix}.block_count", t.num_hidden_layers),
        _u32(f"{prefix}.context_length", t.max_position_embeddings),
        _u32(f"{prefix}.embedding_length", t.hidden_size),
        _u32(f"{prefix}.feed_forward_length", t.intermediate_size),
        _u32(f"{prefix}.attention.head_count", t.num_attention_heads),
        _u32(f"{prefix}.attention.head_count_kv", t.num_key_value_heads),
    ]


def _special_ids(vocab: Vocab) -> list[KV]:
    out = []
    for key, value in (("eos", vocab.eos_id), ("padding", vocab.pad_id), ("bos", vocab.bos_id)):
        if value is not None:
            out.append(_u32(f"tokenizer.ggml.{key}_token_id", value))
    return out


def text_kv(cfg: CheckpointConfig, vocab: Vocab, file_type: LlamaFileType, name: str) -> list[KV]:
    """llama.cpp's `qwen2vl` text model."""
    t = cfg.text
    kv = _general("model", name) + _text_params("qwen2vl", cfg)
    sections = list(t.mrope_section) + [0] * (4 - len(t.mrope_section))
    kv += [
        _arr("qwen2vl.rope.dimension_sections", sections, V.INT32),
        _f32("qwen2vl.rope.freq_base", t.rope_theta),
        _f32("qwen2vl.attention.layer_norm_rms_epsilon", t.rms_norm_eps),
        _u32("general.file_type", int(file_type)),
        _u32("general.quantization_version", 2),
        _str("tokenizer.ggml.model", "gpt2"),
        _str("tokenizer.ggml.pre", "qwen2"),
        _arr("tokenizer.ggml.tokens", list(vocab.tokens), V.STRING),
        _arr("tokenizer.ggml.token_type", list(vocab.types), V.INT32),
        _arr("tokenizer.ggml.merges", list(vocab.merges), V.STRING),
        *_special_ids(vocab),
        KV("tokenizer.ggml.add_bos_token", False, V.BOOL),
        KV("tokenizer.ggml.add_eos_token", False, V.BOOL),
    ]
    if vocab.chat_template is not None:
        kv.append(_str("tokenizer.chat_template", vocab.chat_template))
    return kv


def mmproj_kv(cfg: CheckpointConfig, file_type: LlamaFileType, name: str) -> list[KV]:
    """llama.cpp's `clip` projector file."""
    v = cfg.vision
    kv = _general("mmproj", name) + [
        _u32("general.file_type", int(file_type)),
        KV("clip.has_vision_encoder", True, V.BOOL),
        _u32("clip.vision.projection_dim", cfg.text.hidden_size),
        _u32("clip.vision.image_size", 560),
        _u32("clip.vision.patch_size", v.patch_size),
        _u32("clip.vision.embedding_length", v.embed_dim),
        _u32("clip.vision.feed_forward_length", v.gguf_feed_forward_length),
        _u32("clip.vision.block_count", v.depth),
        _u32("clip.vision.attention.head_count", v.num_heads),
        _arr("clip.vision.image_mean", list(cfg.image_mean), V.FLOAT32),
        _arr("clip.vision.image_std", list(cfg.image_std), V.FLOAT32),
    ]
    if cfg.is_qwen2_5:
        kv += [
            _str("clip.projector_type", "qwen2.5vl_merger"),
            KV("clip.use_silu", True, V.BOOL),
            _u32("clip.vision.n_wa_pattern", window_pattern(cfg)),
        ]
    else:
        kv.append(_str("clip.projector_type", "qwen2vl_merger"))
    kv += [
        _f32("clip.vision.attention.layer_norm_epsilon", cfg.text.rms_norm_eps),
        _u32("general.quantization_version", 2),
    ]
    return kv


def window_pattern(cfg: CheckpointConfig) -> int:
    """llama.cpp's n_wa_pattern: full attention every n-th block, from fullatt_block_indexes."""
    idx = cfg.vision.fullatt_block_indexes
    if not idx:
        raise ConvertError("config.json: vision_config.fullatt_block_indexes is empty")
    n = idx[0] + 1
    if any(b - a != n for a, b in zip(idx, idx[1:])):
        raise ConvertError(f"config.json: fullatt_block_indexes {list(idx)} are not evenly spaced "
                           "(llama.cpp's n_wa_pattern cannot express them)")
    return n


def ollama_kv(cfg: CheckpointConfig, vocab: Vocab, file_type: LlamaFileType, name: str) -> list[KV]:
    """Ollama's single `qwen25vl` file (convert_qwen25vl.go)."""
    t, v = cfg.text, cfg.vision
    tokens, scores, types = vocab.ollama_tokens()
    kv = _general("model", name) + [
        _u32("general.file_type", int(file_type)),
        _u32("general.quantization_version", 2),
        *_text_params("qwen25vl", cfg),
        _f32("qwen25vl.rope.freq_base", t.rope_theta),
        _f32("qwen25vl.attention.layer_norm_rms_epsilon", t.rms_norm_eps),
        _arr("qwen25vl.rope.mrope_section", list(t.mrope_section), V.INT32),
        _u32("qwen25vl.vision.block_count", v.depth),
        _u32("qwen25vl.vision.embedding_length", v.embed_dim),
        _u32("qwen25vl.vision.attention.head_count", v.num_heads),
        _u32("qwen25vl.vision.num_channels", v.in_channels),
        _u32("qwen25vl.vision.patch_size", v.patch_size),
        _u32("qwen25vl.vision.spatial_merge_size", v.spatial_merge_size),
        _u32("qwen25vl.vision.spatial_patch_size", v.patch_size),
        _u32("qwen25vl.vision.window_size", v.window_size),
        _f32("qwen25vl.vision.attention.layer_norm_epsilon", 1e-6),
        _f32("qwen25vl.vision.rope.freq_base", 1e4),
        _arr("qwen25vl.vision.fullatt_block_indexes", list(v.fullatt_block_indexes), V.INT32),
        _u32("qwen25vl.vision.temporal_patch_size", v.temporal_patch_size),
        _str("tokenizer.ggml.model", "gpt2"),
        _str("tokenizer.ggml.pre", "qwen2"),
        _arr("tokenizer.ggml.tokens", tokens, V.STRING),
        _arr("tokenizer.ggml.scores", scores, V.FLOAT32),
        _arr("tokenizer.ggml.token_type", types, V.INT32),
        _arr("tokenizer.ggml.merges", list(vocab.merges), V.STRING),
        *_special_ids(vocab),
        KV("tokenizer.ggml.add_bos_token", False, V.BOOL),
        KV("tokenizer.ggml.add_eos_token", False, V.BOOL),
    ]
    if vocab.eos_ids:
        kv.append(_arr("tokenizer.ggml.eos_token_ids", list(vocab.eos_ids), V.INT32))
    if vocab.chat_template is not None:
        kv.append(_str("tokenizer.chat_template", vocab.chat_template))
    return kv
