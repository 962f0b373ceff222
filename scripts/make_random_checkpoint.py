#!/usr/bin/env python3
"""Write a random-weight checkpoint with the exact tensor shapes of an official model.

Conversion speed does not depend on the values, so this stands in for the real checkpoint in
benchmarks (no hub access needed). Weights are bf16 drawn N(0, 0.02) (norms around 1), written
in shards of about 4 GB with `model.safetensors.index.json`, plus the real Qwen tokenizer and
chat template from ../shared/fixtures. The 3B model is 7.5 GB.

    python scripts/make_random_checkpoint.py qwen2.5-vl-3b /tmp/qwen2.5-vl-3b-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from qvl.convert.hf_config import parse_config
from qvl.convert.layout import expected_hf_tensors
from qvl.convert.official import MODELS, official_config

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SRC = REPO.parent / "shared" / "fixtures" / "tiny-qwen2.5-vl" / "hf"
SHARD_BYTES = 4 << 30
POOL = 1 << 24  # random bf16 values reused (shifted) across tensors: generating 4B normals is slow


def _bf16_pool(rng: np.random.Generator) -> np.ndarray:
    x = (rng.standard_normal(POOL) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def is_norm_weight(name: str) -> bool:
    """A vector of the checkpoint (by HF name) that is a norm's weight: these are written as 1."""
    return ("norm" in name or "ln_q" in name) and name.endswith("weight")


def _tensor_bytes(name: str, shape: tuple[int, ...], pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = int(np.prod(shape))
    if len(shape) == 1 and is_norm_weight(name):
        return np.full(n, 0x3F80, dtype=np.uint16)  # 1.0
    return np.resize(np.roll(pool, -int(rng.integers(0, POOL))), n)


def write_config(config: dict, dst: Path, tokenizer: Path = TOKENIZER_SRC) -> None:
    """A checkpoint folder without weights: config.json and the tokenizer files."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                 "generation_config.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, dst / name)


def load_model_config(model: str) -> dict:
    """An official model's config.json (by name, e.g. qwen2.5-vl-7b) or one read from a path."""
    if model in MODELS:
        return official_config(model)
    if Path(model).is_file():
        return json.loads(Path(model).read_text())
    sys.exit(f"{model}: not an official model name ({', '.join(MODELS)}) nor a config.json file")


def write_checkpoint(config: dict, dst: Path, seed: int = 0, tokenizer: Path = TOKENIZER_SRC) -> None:
    """Random bf16 weights for every tensor `config` implies, plus tokenizer files."""
    shapes = expected_hf_tensors(parse_config(config))
    write_config(config, dst, tokenizer)
    names = sorted(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    pool = _bf16_pool(rng)
    weight_map = {}
    for k, part in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in part:
            nbytes = 2 * int(np.prod(shapes[name]))
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in part:
                _tensor_bytes(name, shapes[name], pool, rng).tofile(f)
                weight_map[name] = fname
        print(f"wrote {dst / fname} ({offset / 2**30:.2f} GiB)", file=sys.stderr)
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=f"one of {', '.join(MODELS)}, or a config.json path")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER_SRC, help="folder with tokenizer files")
    args = ap.parse_args()
    write_checkpoint(load_model_config(args.model), args.dst, args.seed, args.tokenizer)


if __name__ == "__main__":
    main()
