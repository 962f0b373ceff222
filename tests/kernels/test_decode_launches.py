"""What a captured decode step launches, counted without a GPU (scripts/count_launches.py: the
kernels compiled for sm_90 and sm_75, never run): per layer four dequantizing GEMVs (q/k/v
stacked, o, gate/up stacked, down), one KV store that rotates q and k too, one decode attention;
split GEMVs and decode attention combine their splits in their last program, and the o and
down GEMVs apply the RMSNorm that follows them (the MLP's, the next layer's, the final one), so
per step the output GEMV, the token's embedding row and first RMSNorm (kernels/decode_inputs.py,
kernels/rmsnorm.py), the argmax (torch) and one launch that makes the next step's inputs from it
(decode_inputs.advance), and nothing else: the token id, slot, length, position and angles come
in the step's input buffer, sent in one copy when the host stages a step. A torch op that
creeps into the step (a dtype conversion, a norm in torch) fails here.
The accelerator is torch's meta device, and the vision tower (an image) and a 20-token prefill
run first, so a CPU tensor mixed into the accelerator's work (a torch op, or a Triton launch's
arguments) fails here too, as it would on a GPU: the CPU-only kernel tests cannot see that."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from paths import REPO
from tiny_models import TinySpec, make_checkpoint, to_gguf


LAYERS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("launches")
    spec = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=LAYERS, vocab_size=1280,
                    dtype=torch.float32, std=0.15, seed=3)
    return to_gguf(make_checkpoint(d / "ckpt", spec), d / "m.gguf", "q8_0")


@pytest.mark.parametrize("arch,cache", [(90, "bf16"), (75, "q8_0")])
def test_decode_step_launches(model, arch, cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "count_launches.py"), str(model), "--json",
                          "--arch", str(arch), "--cache-type", cache], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    triton, torch_ops, n = found["triton"], found["torch"], found["layers"]
    assert n == LAYERS and found["vision"]
    assert triton.pop("qgemv_kernel") == 4 * n + 1
    assert triton.pop("decode_attention_kernel") == n
    assert triton.pop("kv_store_q8_kernel" if cache == "q8_0" else "kv_store_kernel") == n
    # the step's own inputs: the token's embedding row, its first RMSNorm, and at the end the
    # next step's (the argmax's token, slot, length, position, angles)
    assert triton.pop("embed_row_kernel") == triton.pop("rmsnorm_kernel") == triton.pop("advance_kernel") == 1
    assert triton == {}
    assert torch_ops == {"argmax": 1}, torch_ops
    assert found["inputs"] == {"copy_": 1}  # token, slot, length, position, angles: one transfer


def test_int8_decode_step_launches(model, tmp_path):
    """QVL_INT8_GEMV=1 on a Q4_K_M file: every quantized product is an int8 GEMV (4 a layer, 5
    where attn_v's Q6_K splits q/k/v, and the output), and no launch of its own quantizes an x:
    whatever feeds an int8 GEMV writes its int8 form too (q8_activations.py: the first
    RMSNorm, decode attention, the SwiGLU GEMV, the norms after o and down), and a layer's q/k
    stack and v share one."""
    src = model.parent / "ckpt"
    path = to_gguf(src, tmp_path / "m-q4_k_m.gguf", "q4_k_m")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"QVL_INT8_GEMV": "1"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "count_launches.py"), str(path), "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    triton = json.loads(out.stdout)["triton"]
    assert "qgemv_kernel" not in triton
    assert 4 * LAYERS + 1 <= triton["qgemv_q8_kernel"] <= 5 * LAYERS + 1
    assert "quantize_q8_kernel" not in triton
