"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints generated with transformers, in several hub layouts.

Variants cover what the converter must read: both families, tied and untied embeddings, the
hub's legacy names with a flat config.json and transformers 5's `model.language_model.*` names
with a nested config, single-file and sharded safetensors, bf16/f16/f32 weights. A small
tokenizer (the real Qwen BPE cut down to its first ids, plus the 22 added tokens) keeps the
embedding small enough for quantization tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from paths import FIXTURES

N_BASE = 1000  # ordinary tokens kept from the real vocabulary


@dataclass(frozen=True)
class TinySpec:
    family: str = "qwen2_5_vl"  # or "qwen2_vl"
    tied: bool = False
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_width: int = 72  # Qwen2.5-VL SwiGLU width (Qwen2-VL uses mlp_ratio 2)
    vision_depth: int = 2
    vision_heads: int = 2
    layout: str = "legacy"  # "legacy": flat config + model.layers.* ; "hf5": save_pretrained
    dtype: torch.dtype = torch.bfloat16
    shards: int = 1
    vocab_size: int = 1056  # N_BASE + 22 added tokens + padding ids
    std: float = 0.15
    seed: int = 0

    @property
    def mrope_section(self) -> list[int]:
        half = self.hidden // self.heads // 2
        t = half // 4
        return [t, (half - t) // 2, half - t - (half - t) // 2]


def write_small_tokenizer(dst: Path, n_base: int = N_BASE) -> None:
    """The real Qwen tokenizer restricted to ids < n_base, added tokens renumbered after them."""
    src = FIXTURES / "tiny-qwen2.5-vl" / "hf"
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < n_base}
    merges = []
    for m in tj["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = merges
    for k, tok in enumerate(tj["added_tokens"]):
        tok["id"] = n_base + k
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        shutil.copy(src / name, dst / name)
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (dst / "generation_config.json").write_text(json.dumps(gen))


def special_ids(n_base: int = N_BASE) -> dict[str, int]:
    names = ["endoftext", "im_start", "im_end", "object_ref_start", "object_ref_end", "box_start",
             "box_end", "quad_start", "quad_end", "vision_start", "vision_end", "vision_pad",
             "image_pad", "video_pad"]
    return {n: n_base + k for k, n in enumerate(names)}


def flat_config(spec: TinySpec) -> dict:
    ids = special_ids()
    text = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": spec.tied,
        "rope_scaling": {"type": "mrope", "mrope_section": spec.mrope_section},
        "bos_token_id": ids["endoftext"], "eos_token_id": ids["im_end"],
        "vision_start_token_id": ids["vision_start"], "vision_end_token_id": ids["vision_end"],
        "vision_token_id": ids["vision_pad"], "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"], "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": spec.layers,
    }
    if spec.family == "qwen2_5_vl":
        vision = {"depth": spec.vision_depth, "hidden_size": spec.vision_hidden,
                  "intermediate_size": spec.vision_width, "num_heads": spec.vision_heads,
                  "out_hidden_size": spec.hidden, "in_chans": 3, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": list(range(1, spec.vision_depth, 2)),
                  "tokens_per_second": 2, "hidden_act": "silu"}
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        vision = {"depth": spec.vision_depth, "embed_dim": spec.vision_hidden, "mlp_ratio": 2,
                  "num_heads": spec.vision_heads, "hidden_size": spec.hidden, "in_chans": 3,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "hidden_act": "quick_gelu"}
        arch = "Qwen2VLForConditionalGeneration"
    return {"architectures": [arch], "model_type": spec.family, **text, "vision_config": vision}


def build_model(spec: TinySpec):
    """A transformers model with weights drawn N(0, std) (norm weights around 1)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cls = Qwen2_5_VLForConditionalGeneration if spec.family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    cfg_dict = flat_config(spec)
    config = AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(spec.seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.05)
            else:
                p.normal_(0, spec.std)
    return model


def legacy_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers 5 names -> the hub's legacy names."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif name.startswith("model.visual."):
            name = "visual." + name[len("model.visual."):]
        out[name] = t
    return out


def make_checkpoint(dst: Path, spec: TinySpec) -> Path:
    """Write a checkpoint folder for `spec`; returns the folder."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    write_small_tokenizer(dst)
    if spec.layout == "hf5":
        model.to(spec.dtype).save_pretrained(dst, max_shard_size="200KB" if spec.shards > 1 else "10GB")
        return dst
    state = {k: v.to(spec.dtype).contiguous() for k, v in legacy_state_dict(model).items()}
    if spec.tied:
        state.pop("lm_head.weight", None)
    (dst / "config.json").write_text(json.dumps(flat_config(spec), indent=1))
    names = sorted(state)
    if spec.shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    weight_map = {}
    per = -(-len(names) // spec.shards)
    for k in range(spec.shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{spec.shards:05d}.safetensors"
        save_file({n: state[n] for n in part}, dst / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def to_gguf(src: Path, out: Path, qtype: str = "f32", vision_type: str | None = None) -> Path:
    """qvl-convert on a checkpoint folder, quietly (`vision_type`: --vision-type, or the
    converter's default); the test fails with the converter's output if it fails. Returns `out`."""
    from typer.testing import CliRunner

    from qvl.convert.cli import app

    args = [str(src), "-o", str(out), "--type", qtype, "-q"]
    r = CliRunner().invoke(app, args + (["--vision-type", vision_type] if vision_type else []))
    assert r.exit_code == 0, r.output
    return out


def reference_inputs(model, prompt, images) -> dict:
    """transformers' inputs for qvl's `model` asked `prompt` about `images`: the same input_ids,
    pixel_values and image_grid_thw, and mm_token_type_ids (1 on image pads; without them
    transformers 5 silently uses 1-D positions, docs/testing.md)."""
    import numpy as np
    from qvl.runtime.chat import render

    text = render(model.chat_template, model.messages_for(prompt, len(images)))
    ids, _, pre = model.tokenize(text, images)
    input_ids = torch.tensor([ids])
    kwargs = {"input_ids": input_ids, "mm_token_type_ids": (input_ids == model.image_pad_id).int()}
    if pre:
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate([p.pixels for p in pre]))
        kwargs["image_grid_thw"] = torch.tensor([p.grid_thw for p in pre])
    return kwargs
