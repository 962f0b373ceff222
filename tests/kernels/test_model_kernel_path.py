"""The whole decoder through the Triton matmul (interpreted on the CPU) gives the torch path's tokens."""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import torch
from typer.testing import CliRunner

from qvl.convert.cli import app as convert_app
from qvl.runtime.config import text_config
from qvl.runtime.decoder import Decoder, KVCache
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.weights import Weights
from tiny_models import TinySpec, make_checkpoint


def _greedy(path, triton: bool, n: int = 6) -> tuple[list[int], torch.Tensor]:
    g = GGUFFile(path)
    dec = Decoder(text_config(g), Weights(g, triton=triton))
    cache = KVCache(dec.cfg, 64)
    ids = torch.tensor([1001, 1002, 10, 200, 33, 999, 5])
    pos = torch.arange(len(ids)).expand(3, -1)
    first = dec.logits(dec.forward(dec.embed_tokens(ids), pos, cache))
    out, logits = [], first[-1]
    for step in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        h = dec.forward(dec.embed_tokens(torch.tensor([tok])), torch.full((3, 1), len(ids) + step), cache)
        logits = dec.logits(h)[-1]
    return out, first


def test_kernel_path_matches_torch_path(tmp_path):
    spec = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2, vocab_size=1280,
                    dtype=torch.float32, std=0.15)
    src = make_checkpoint(tmp_path / "ckpt", spec)
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(convert_app, [str(src), "-o", str(out), "--type", "q4_k_m", "-q"])
    assert r.exit_code == 0, r.output
    with GGUFFile(out) as g:
        kinds = {t.type.name for t in g.tensors.values()}
    assert {"Q4_K", "Q6_K"} <= kinds  # both kernels are exercised
    torch_tokens, torch_logits = _greedy(out, triton=False)
    kernel_tokens, kernel_logits = _greedy(out, triton=True)
    assert kernel_tokens == torch_tokens
    assert (kernel_logits - torch_logits).abs().max().item() <= 1e-4 * torch_logits.abs().max().item()
