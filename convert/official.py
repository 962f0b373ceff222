"""The official Qwen2-VL / Qwen2.5-VL shapes (../shared/docs/models.md), as config.json dicts.

Used to plan real-shaped models without their weights (tests compare our Q4_K_M plan with
llama-quantize's) and by scripts/make_random_checkpoint.py to write random checkpoints with the
exact tensor shapes of an official model.
"""

from __future__ import annotations

from typing import Any

_COMMON_TEXT = {
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}

# name: (hidden, intermediate, layers, heads, kv heads, vocab, tied, max positions, vision width)
_QWEN2_5 = {
    "qwen2.5-vl-3b": (2048, 11008, 36, 16, 2, 151936, True, 128000, 3420),
    "qwen2.5-vl-7b": (3584, 18944, 28, 28, 4, 152064, False, 128000, 3420),
    "qwen2.5-vl-32b": (5120, 27648, 64, 40, 8, 152064, False, 128000, 3456),
    "qwen2.5-vl-72b": (8192, 29568, 80, 64, 8, 152064, False, 128000, 3456),
}
_QWEN2 = {
    "qwen2-vl-2b": (1536, 8960, 28, 12, 2, 151936, True, 32768),
    "qwen2-vl-7b": (3584, 18944, 28, 28, 4, 152064, False, 32768),
    "qwen2-vl-72b": (8192, 29568, 80, 64, 8, 152064, False, 32768),
}

HUB_REPOS = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-72b": "Qwen/Qwen2-VL-72B-Instruct",
}

MODELS = tuple(list(_QWEN2_5) + list(_QWEN2))


def official_config(name: str) -> dict[str, Any]:
    """config.json of an official model, in the hub's flat layout."""
    if name in _QWEN2_5:
        h, inter, layers, heads, kv, vocab, tied, pos, vwidth = _QWEN2_5[name]
        arch, model_type = "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"
        vision = {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": vwidth,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": h, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
        }
    elif name in _QWEN2:
        h, inter, layers, heads, kv, vocab, tied, pos = _QWEN2[name]
        arch, model_type = "Qwen2VLForConditionalGeneration", "qwen2_vl"
        vision = {
            "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
            "hidden_size": h, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2, "hidden_act": "quick_gelu",
        }
    else:
        raise KeyError(f"unknown official model {name!r}; known: {', '.join(MODELS)}")
    return {
        "architectures": [arch], "model_type": model_type, **_COMMON_TEXT,
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "tie_word_embeddings": tied, "max_position_embeddings": pos, "vision_config": vision,
    }
