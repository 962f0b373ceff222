"""A tiny checkpoint's tensors as the converter must write them: GGUF name -> float32 data, by
hand from formats.md (independent of qvl's tables), and a GGUF's tensors as read back."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from qvl.runtime.gguf_file import GGUFFile


def expected_gguf_tensors(sd: dict, family: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 data, written out by hand from formats.md (independent of qvl's tables)."""
    f = {k: v.float().numpy() for k, v in sd.items()}
    out = {"token_embd.weight": f["model.embed_tokens.weight"], "output_norm.weight": f["model.norm.weight"]}
    if "lm_head.weight" in f:
        out["output.weight"] = f["lm_head.weight"]
    text = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for x in "qkv":
        for kind in ("weight", "bias"):
            text[f"self_attn.{x}_proj.{kind}"] = f"attn_{x}.{kind}"
    vis = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for name, data in f.items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            out[f"blk.{parts[2]}.{text['.'.join(parts[3:])]}"] = data
        elif name.startswith("visual.blocks."):
            rest, kind = ".".join(parts[3:-1]), parts[-1]
            if rest == "attn.qkv":
                for k, x in enumerate(np.split(data, 3, axis=0)):
                    out[f"v.blk.{parts[2]}.attn_{'qkv'[k]}.{kind}"] = x
            else:
                out[f"v.blk.{parts[2]}.{vis[rest]}.{kind}"] = data
    out["v.patch_embd.weight"] = f["visual.patch_embed.proj.weight"][:, :, 0]
    out["v.patch_embd.weight.1"] = f["visual.patch_embed.proj.weight"][:, :, 1]
    for kind in ("weight", "bias"):
        if f"visual.merger.ln_q.{kind}" in f:
            out[f"v.post_ln.{kind}"] = f[f"visual.merger.ln_q.{kind}"]
        out[f"mm.0.{kind}"] = f[f"visual.merger.mlp.0.{kind}"]
        out[f"mm.2.{kind}"] = f[f"visual.merger.mlp.2.{kind}"]
    return out


def read_tensors(path) -> dict[str, tuple[T, np.ndarray]]:
    f = GGUFFile(path)
    out = {}
    for name, t in f.tensors.items():
        raw = f.raw(name)
        out[name] = (t.type, raw.copy().view(np.float32) if t.type == T.F32 else raw.copy())
    f.close()
    return out
