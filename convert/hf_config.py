"""A Hugging Face checkpoint's config.json as typed, frozen dataclasses.

Both layouts are read: the hub's flat one (text fields at the top level, `rope_scaling`,
nested `vision_config`) and the one transformers 5 writes (`text_config`, `rope_parameters`).
Unknown keys are ignored; a missing required key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConvertError

log = logging.getLogger(__name__)

QWEN2_VL = "qwen2_vl"
QWEN2_5_VL = "qwen2_5_vl"

_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": QWEN2_5_VL,
}

# CLIP normalisation, the Qwen image processor's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    bos_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_width: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    # Qwen2.5-VL only (window attention); empty / 0 for Qwen2-VL
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    tokens_per_second: float
    # what llama.cpp writes as clip.vision.feed_forward_length (for Qwen2-VL: the LLM width)
    gguf_feed_forward_length: int

    @property
    def merged_dim(self) -> int:
        return self.embed_dim * self.spatial_merge_size**2


@dataclass(frozen=True)
class CheckpointConfig:
    family: str  # QWEN2_VL or QWEN2_5_VL
    text: TextConfig
    vision: VisionConfig
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def is_qwen2_5(self) -> bool:
        return self.family == QWEN2_5_VL


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object at the top level")
    return data


class _Keys:
    """Typed lookups in one config section, with errors that name the file and key."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data = data
        self.where = where

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConvertError(f"{self.where}: missing required key '{key}'")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise ConvertError(f"{self.where}: key '{key}' should be {kind.__name__}, got {value!r}")
        return value


def _family(cfg: dict[str, Any], where: str) -> str:
    for arch in cfg.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type in (QWEN2_VL, QWEN2_5_VL):
        return model_type
    named = cfg.get("architectures") or model_type
    raise ConvertError(
        f"{where}: unsupported architecture {named!r} "
        "(qvl converts Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration)"
    )


def _mrope_section(text: dict[str, Any], where: str) -> tuple[int, ...]:
    for key in ("rope_parameters", "rope_scaling"):
        section = (text.get(key) or {}).get("mrope_section")
        if section is not None:
            if not (isinstance(section, list) and all(isinstance(s, int) for s in section)):
                raise ConvertError(f"{where}: {key}.mrope_section should be a list of ints")
            return tuple(section)
    raise ConvertError(f"{where}: missing required key 'rope_scaling.mrope_section'")


def _text_config(cfg: dict[str, Any], where: str) -> TextConfig:
    nested = isinstance(cfg.get("text_config"), dict)
    section = {**cfg.get("text_config", {})} if nested else cfg
    k = _Keys(section, f"{where} ({'text_config' if nested else 'top level'})")
    top = _Keys(cfg, where)
    heads = k.get("num_attention_heads", int, required=True)
    rope = section.get("rope_parameters") or {}
    theta = rope.get("rope_theta", k.get("rope_theta", float, 1000000.0))
    tie = top.get("tie_word_embeddings", bool, None)
    if tie is None:
        tie = k.get("tie_word_embeddings", bool, False)
    text = TextConfig(
        vocab_size=k.get("vocab_size", int, required=True),
        hidden_size=k.get("hidden_size", int, required=True),
        intermediate_size=k.get("intermediate_size", int, required=True),
        num_hidden_layers=k.get("num_hidden_layers", int, required=True),
        num_attention_heads=heads,
        num_key_value_heads=k.get("num_key_value_heads", int, heads),
        max_position_embeddings=k.get("max_position_embeddings", int, 32768),
        rope_theta=float(theta),
        rms_norm_eps=k.get("rms_norm_eps", float, 1e-6),
        mrope_section=_mrope_section(section, where),
        tie_word_embeddings=tie,
        bos_token_id=top.get("bos_token_id", int, k.get("bos_token_id", int, None)),
    )
    if text.hidden_size % heads or heads % text.num_key_value_heads:
        raise ConvertError(f"{where}: hidden_size {text.hidden_size} / heads {heads} / kv heads "
                           f"{text.num_key_value_heads} do not divide")
    if 2 * sum(text.mrope_section) != text.head_dim:
        raise ConvertError(f"{where}: mrope_section {list(text.mrope_section)} does not cover head dim {text.head_dim}")
    return text


def _vision_config(cfg: dict[str, Any], family: str, text: TextConfig, where: str) -> VisionConfig:
    if not isinstance(cfg.get("vision_config"), dict):
        raise ConvertError(f"{where}: missing required key 'vision_config'")
    v = _Keys(cfg["vision_config"], f"{where} (vision_config)")
    in_channels = v.get("in_channels", int, None) or v.get("in_chans", int, 3)
    common = dict(
        depth=v.get("depth", int, 32),
        num_heads=v.get("num_heads", int, 16),
        patch_size=v.get("patch_size", int, 14),
        temporal_patch_size=v.get("temporal_patch_size", int, 2),
        spatial_merge_size=v.get("spatial_merge_size", int, 2),
        in_channels=in_channels,
    )
    if family == QWEN2_5_VL:
        embed = v.get("hidden_size", int, 1280)
        width = v.get("intermediate_size", int, 3420)
        return VisionConfig(
            embed_dim=embed,
            mlp_width=width,
            out_hidden_size=v.get("out_hidden_size", int, text.hidden_size),
            window_size=v.get("window_size", int, 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", list, [7, 15, 23, 31])),
            tokens_per_second=float(v.get("tokens_per_second", float, 2.0)),
            gguf_feed_forward_length=width,
            **common,
        )
    embed = v.get("embed_dim", int, 1280)
    llm_width = v.get("hidden_size", int, text.hidden_size)
    return VisionConfig(
        embed_dim=embed,
        mlp_width=int(embed * v.get("mlp_ratio", float, 4.0)),
        out_hidden_size=llm_width,
        window_size=0,
        fullatt_block_indexes=(),
        tokens_per_second=0.0,
        gguf_feed_forward_length=llm_width,  # llama.cpp's quirk, kept for byte-compatible files
        **common,
    )


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> CheckpointConfig:
    """A config.json dict (either layout) with the CLIP image statistics."""
    family = _family(cfg, where)
    text = _text_config(cfg, where)
    vision = _vision_config(cfg, family, text, where)
    if vision.out_hidden_size != text.hidden_size:
        raise ConvertError(f"{where}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
    return CheckpointConfig(family=family, text=text, vision=vision, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def load_config(folder: Path) -> CheckpointConfig:
    """Read config.json (and preprocessor_config.json when present) of a checkpoint folder."""
    where = str(folder / "config.json")
    parsed = parse_config(_read_json(folder / "config.json"), where)
    mean, std = CLIP_MEAN, CLIP_STD
    pre_path = folder / "preprocessor_config.json"
    if pre_path.exists():
        pre = _read_json(pre_path)
        mean = tuple(float(x) for x in pre.get("image_mean", mean))
        std = tuple(float(x) for x in pre.get("image_std", std))
    else:
        log.debug("%s absent: using CLIP mean/std", pre_path)
    return dataclasses.replace(parsed, image_mean=mean, image_std=std)
