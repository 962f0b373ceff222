#!/usr/bin/env python3
"""Write a random-weight GGUF pair (text model + mmproj) with the exact tensor table and metadata
that qvl-convert writes for an official model, in seconds instead of a checkpoint and a
conversion.

Decode and vision speed do not depend on the values, but making a 7B Q4_K_M the long way
(scripts/make_random_checkpoint.py, 16 GB of bf16, then quantizing 8 G weights) costs minutes
of a lent GPU's quarter hour. Here the plan is qvl-convert's own (convert/pipeline.plan_files:
the same names, shapes, types and keys), and each (type, row length) gets a pool of 64 rows of
N(0, 0.02) weights quantized once by qvl's quantizers; a matrix's rows are that pool's rows
from an offset of its own, so every block is one ggml's quantizer could have written. Norm
weights are 1, other vectors N(0, 0.02). The 7B Q4_K_M pair (4.36 + 1.26 GiB of tensors) took
15 s on a 2-core machine (2026-12-04), 0.23 GiB peak RSS.

    python scripts/make_random_gguf.py qwen2.5-vl-7b /tmp/q7b-q4_k_m.gguf --type q4_k_m
    #  -> /tmp/q7b-q4_k_m.gguf + /tmp/mmproj-q7b-q4_k_m.gguf

`--mix low-bit` / `--mix grid` write the types of llama.cpp's files that qvl-convert does not
write, where a Q4_K_M conversion plans Q4_K (the token embedding stays Q4_K): low-bit is Q3_K
q/k/v, IQ4_NL attn_output, Q2_K gate/up and IQ4_XS ffn_down; grid is one of each of IQ3_S,
IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M and IQ1_S (tests/quant_weights.py's mixes and its
round-to-nearest encoders, seconds where ggml's searches take minutes). The metadata still says Q4_K_M. For timing those types end to end
(`bench_run.py`), as `bench_kernels.py --low-bit` times their GEMVs alone.

    python scripts/make_random_gguf.py qwen2.5-vl-7b /tmp/q7b-grid.gguf --mix grid
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from make_random_checkpoint import TOKENIZER_SRC, is_norm_weight, load_model_config, write_config
from qvl.convert.errors import ConvertError
from qvl.convert.hf_config import load_config
from qvl.convert.official import MODELS
from qvl.convert.pipeline import ConvertOptions, Job, check_destination, check_options, plan_files, run_job
from qvl.convert.plan import PlannedTensor
from qvl.convert.quant import quantize

POOL_ROWS = 64
MIXES = ("low-bit", "grid")  # tests/quant_weights.py's LOW_BIT and GRID_MIX


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


class RandomChunks:
    """A `ChunkSource` (convert/writer.py) of random weights in each tensor's planned type."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.pools: dict[tuple[T, int], np.ndarray] = {}
        self.lock = threading.Lock()

    def _pool(self, qtype: T, row_length: int) -> np.ndarray:
        """POOL_ROWS quantized rows (POOL_ROWS, row bytes), made once per type and length."""
        key = (qtype, row_length)
        with self.lock:
            if key not in self.pools:
                rng = np.random.default_rng(_seed(f"{qtype.name}:{row_length}", self.seed))
                rows = (rng.standard_normal((POOL_ROWS, row_length)) * 0.02).astype(np.float32)
                self.pools[key] = quantize(rows, qtype).reshape(POOL_ROWS, -1)
            return self.pools[key]

    def __call__(self, p: PlannedTensor, start: int, stop: int) -> np.ndarray:
        t = p.tensor
        if not t.is_matrix:
            values = np.full(t.shape, 1.0, dtype=np.float32)
            if not is_norm_weight(t.source):
                values = np.random.default_rng(_seed(t.name, self.seed)).standard_normal(t.shape).astype(np.float32)
                values *= 0.02
            return quantize(values[start:stop].reshape(-1, t.row_length), p.qtype).reshape(-1)
        inner = int(np.prod(t.shape[1:-1]))  # rows of the GGUF matrix per index of the first dimension
        offset = _seed(t.name, self.seed) % POOL_ROWS
        rows = (np.arange(start * inner, stop * inner) + offset) % POOL_ROWS
        return np.take(self._pool(p.qtype, t.row_length), rows, axis=0).reshape(-1)


def make_random_gguf(config: dict, out: Path, type_name: str = "q4_k_m", vision_type: str = "f16",
                     layout: str = "llamacpp", seed: int = 0, tokenizer: Path = TOKENIZER_SRC,
                     force: bool = False, name: str | None = None, mix: str | None = None) -> Job:
    """Plan as qvl-convert would for a checkpoint of `config` and write random weights; with
    `mix` (one of MIXES, type_name q4_k_m), its types where Q4_K was planned."""
    if mix is None:
        return _make(config, out, type_name, vision_type, layout, seed, tokenizer, force, name)
    if mix not in MIXES or type_name != "q4_k_m":
        raise ConvertError(f"--mix {mix}: one of {', '.join(MIXES)}, with --type q4_k_m")
    import pytest  # its MonkeyPatch puts the plan and the quantizers back afterwards

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from quant_weights import GRID_MIX, LOW_BIT, use_low_bit_types

    with pytest.MonkeyPatch.context() as mp:
        use_low_bit_types(mp, LOW_BIT if mix == "low-bit" else GRID_MIX)
        return _make(config, out, type_name, vision_type, layout, seed, tokenizer, force, name)


def _make(config: dict, out: Path, type_name: str, vision_type: str, layout: str, seed: int, tokenizer: Path,
          force: bool, name: str | None) -> Job:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / (name or out.stem)
        write_config(config, folder, tokenizer)
        opts = ConvertOptions(source=str(folder), out=out, type=type_name, layout=layout, vision_type=vision_type,
                              force=force)
        check_options(opts)
        cfg = load_config(folder)
        job = Job(folder, cfg, plan_files(folder, cfg, folder.name, opts))
        check_destination(job, force)
        run_job(job, lambda p, n: None, workers=4, chunks=RandomChunks(seed))
    return job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=f"one of {', '.join(MODELS)}, or a config.json path")
    ap.add_argument("out", type=Path, help="the text model's GGUF; the projector goes to mmproj-OUT beside it")
    ap.add_argument("--type", default="q4_k_m", help="as qvl-convert --type (default q4_k_m)")
    ap.add_argument("--vision-type", default="f16", help="as qvl-convert --vision-type (default f16)")
    ap.add_argument("--layout", default="llamacpp", help="llamacpp (default) or ollama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER_SRC, help="folder with tokenizer files")
    ap.add_argument("--force", action="store_true", help="overwrite existing outputs")
    ap.add_argument("--mix", choices=MIXES, help="llama.cpp's types qvl-convert does not write, where Q4_K_M "
                    "plans Q4_K (see above)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        job = make_random_gguf(load_model_config(args.model), args.out, args.type, args.vision_type, args.layout,
                               args.seed, args.tokenizer, args.force,
                               name=args.model if args.model in MODELS else None, mix=args.mix)
    except ConvertError as e:
        sys.exit(f"make_random_gguf: {e}")
    for f in job.files:
        print(f"wrote {f.path} ({f.nbytes / 2**30:.2f} GiB of tensors)", file=sys.stderr)
    print(f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
