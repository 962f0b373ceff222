"""`qvl bench MODEL`: llama-bench's command line (bench.py does the timing): -p, -n and -d take
comma-separated lists, -pg P,G (repeatable) a prompt then a generation, -o md / csv / json /
jsonl its outputs; --json qvl's own summary object."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from . import run_cli

HELP = ("Time a model as llama-bench does: a prompt read (ppN), tokens generated (tgN), both (ppN+tgM), each at a "
        "depth of tokens already in the cache (-d: ' @ dD'), and, with a vision tower, an image encoded (imgWxH); "
        "tokens a second, mean ± sd over repetitions, after a warm-up.\n\n"
        "Example: qvl bench qwen2.5-vl-3b-q4_k_m.gguf -p 512 -n 128\n\n"
        "qvl bench qwen2.5-vl-3b-q4_k_m.gguf -p 512 -n 128 -d 0,4096 -pg 512,64 -o json")
OUTPUTS = ("md", "csv", "json", "jsonl")


def _counts(value: str, flag: str) -> list[int]:
    """llama-bench's comma-separated list of token counts (duplicates dropped, order kept)."""
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        _fail(f"{flag} {value}: whole numbers, comma-separated")
    if any(c < 0 for c in counts):
        _fail(f"{flag} {value}: 0 or more")
    return list(dict.fromkeys(counts))


def _fail(message: str) -> None:
    typer.echo(f"qvl bench: error: {message}", err=True)
    raise typer.Exit(2)


def bench_command(
    model: Path = typer.Argument(..., help="GGUF file (its mmproj found beside it) or stored name."),
    prompt_tokens: str = typer.Option("512", "-p", "--n-prompt", help="Prompt tokens for ppN, comma-separated for "
                                      "several (0: none)."),
    gen_tokens: str = typer.Option("128", "-n", "--n-gen", help="Tokens for tgN, comma-separated (0: none)."),
    pg: Optional[List[str]] = typer.Option(None, "-pg", help="P,G: a prompt of P tokens then G generated, timed "
                                           "together (ppP+tgG; repeatable)."),
    depth: str = typer.Option("0", "-d", "--n-depth", help="Tokens already in the cache when each test runs, "
                              "comma-separated (llama-bench's depth: ' @ dD')."),
    image: str = typer.Option("1024x1024", "--image-size", help="WxH of the random picture for imgWxH (none: skip)."),
    reps: int = typer.Option(3, "-r", "--repetitions", help="Runs of each test."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a CUDA GPU is there."),
    gpu_layers: Optional[int] = typer.Option(None, "-ngl", "--gpu-layers", help="Decoder layers on the GPU."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="CPU threads (default: one a physical core)."),
    output: str = typer.Option("md", "-o", "--output", help="md (the table), csv, json or jsonl: llama-bench's "
                               "outputs, its field names."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: each test's tokens and seconds a run."),
) -> None:
    import torch

    from . import bench
    from .gguf_file import GGUFError
    from .loader import load
    from .model import ModelError
    from .store import StoreError, gguf_config
    from .tokenizer import TokenizerError

    size = None
    if image != "none":
        try:
            width, height = (int(v) for v in image.lower().split("x"))
            assert width >= 28 and height >= 28
            size = (width, height)
        except (ValueError, AssertionError):
            _fail(f"--image-size {image}: WIDTHxHEIGHT, each 28 or more, or none")
    prompts, gens, depths = _counts(prompt_tokens, "-p"), _counts(gen_tokens, "-n"), _counts(depth, "-d")
    pairs = []
    for value in pg or []:
        pair = _counts(value, "-pg")
        if len(pair) != 2 or value.count(",") != 1:
            _fail(f"-pg {value}: P,G (prompt tokens, generated tokens)")
        pairs.append((pair[0], pair[1]))
    if output not in OUTPUTS:
        _fail(f"-o {output}: one of {', '.join(OUTPUTS)}")
    for flag, value, least in (("-r", reps, 1), ("-t", threads or 1, 1),
                               ("-ngl", 0 if gpu_layers is None else gpu_layers, 0)):
        if value < least:
            _fail(f"{flag} {value}: {least} or more")
    if threads is not None:
        torch.set_num_threads(threads)
    device, placement = run_cli._placement(cpu, gpu_layers, "auto", None, False, None, False)
    try:
        loaded = load(model, device=device, placement=placement)
    except (GGUFError, TokenizerError, ModelError, KeyError, StoreError, OSError) as e:
        _fail(str(e).strip("'\""))
    info = gguf_config(Path(loaded.text_file.path))
    name = " ".join(v for v in (info["model_family"], info["model_type"], info["file_type"]) if v)

    def status(text: str) -> None:  # on a terminal: what runs now (a 7B's tests take minutes on a CPU)
        if sys.stderr.isatty():
            typer.echo(f"\r\033[Kqvl bench: {text}", err=True, nl=False)

    status("warm-up")
    loaded.generate("Hi", template=False, max_new_tokens=2, cache_prompt=False)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    planned = [(p, 0, d) for d in depths for p in prompts if p] + [(0, g, d) for d in depths for g in gens if g] + [
        (p, g, d) for d in depths for p, g in pairs if p or g]
    planned.sort(key=lambda t: t[2])  # by depth, as llama-bench's order of instances
    tests = []
    for i, (p, g, d) in enumerate(planned):
        status(f"{bench.test_name(p, g, d)}, {reps} runs")
        tests.append(bench.measured(loaded, p, g, d, reps, i + 1))
    if size is not None and loaded.vision is not None:
        status(f"img{size[0]}x{size[1]}, {reps} runs")
        tests.append(bench.image_encoding(loaded, size[0], size[1], reps, 2))
    if sys.stderr.isatty():
        typer.echo("\r\033[K", err=True, nl=False)
    total = sum(p.stat().st_size for f in loaded.files for p in f.paths)
    rows = bench.records(loaded, name, total, tests, when)
    if json_out:
        typer.echo(json.dumps({"model": name, "size": total, "params": bench.params_of(loaded),
                               "backend": bench.backend(loaded),
                               "tests": [{"test": t.name, "tokens": t.tokens, "seconds": t.seconds,
                                          "tok_s": t.rates} for t in tests]}))
    elif output == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif output == "jsonl":
        for row in rows:
            typer.echo(json.dumps(row))
    elif output == "csv":
        typer.echo(bench.csv_text(rows))
    else:
        typer.echo(bench.table(name, total, loaded, tests))
