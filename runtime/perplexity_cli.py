"""`qvl perplexity MODEL -f TEXT`: a text's perplexity under a model (or with `--hellaswag`,
`--winogrande` or `--multiple-choice` those scores: tasks_cli.py), and with `--base` the KL
divergence from the base model's next-token distributions (llama.cpp's llama-perplexity and its
--kl-divergence, in one run; perplexity.py measures), or in llama.cpp's two runs with a file of
the base's log-probabilities between them (`--kl-divergence-base FILE [--kl-divergence]`,
logits_file.py). Each chunk's running figures go to standard error as it is read; the result, in
llama-perplexity's words (or one JSON object), to standard output."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, List, NoReturn, Optional

import typer

HELP = ("A text's perplexity under a model, as llama-perplexity measures it: the text cut into chunks of "
        "--ctx-size tokens, each read alone, the second half of each scored. With --base (the same model at a "
        "higher precision, e.g. its F16 or Q8_0) also the KL divergence of the model's next-token "
        "probabilities from the base's, the change in the right token's probability and how often both put "
        "the same token first: how much a quantization lost. With --base both models are held in memory "
        "together; llama-perplexity's two runs need one at a time: the base's run writes its log-probabilities "
        "(--kl-divergence-base FILE), the model's run reads them (--kl-divergence-base FILE --kl-divergence). "
        "llama.cpp's files of them read here, and ours there.\n\n"
        "Example: qvl perplexity qwen2.5-vl-7b-q4_k_m.gguf -f wiki.test.raw --base qwen2.5-vl-7b-f16.gguf\n\n"
        "Or: qvl perplexity qwen2.5-vl-7b-f16.gguf -f wiki.test.raw --kl-divergence-base f16.kld; "
        "qvl perplexity qwen2.5-vl-7b-q4_k_m.gguf --kl-divergence-base f16.kld --kl-divergence\n\n"
        "HellaSwag, WinoGrande, multiple choice (llama-perplexity's): qvl perplexity MODEL -f hellaswag_val_full.txt --hellaswag; "
        "qvl perplexity MODEL -f winogrande-debiased-eval.csv --winogrande; qvl perplexity MODEL -f "
        "arc-easy-validation.bin --multiple-choice")


def _fail(message: str) -> NoReturn:
    typer.echo(f"qvl perplexity: error: {message}", err=True)
    raise typer.Exit(2)


def _lines(s: dict) -> list[str]:
    """The result as llama-perplexity prints its statistics."""
    out = [f"Final estimate: PPL = {s['ppl']:.4f} +/- {s['ppl_uncertainty']:.5f} ({s['tokens']} tokens scored)"]
    if "kld" not in s:
        return out
    pct = s["kld_percentiles"]
    out += ["", "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_uncertainty']:10.6f}",
            f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_uncertainty']:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['ln_ppl_correlation']:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_uncertainty']:10.6f}",
            "", "====== KL divergence statistics ======",
            f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_uncertainty']:10.6f}",
            f"Maximum KLD: {s['kld_max']:10.6f}"]
    out += [f"{'Median ' if k == '50.0' else f'{float(k):4.1f}%  '} KLD: {v:10.6f}" for k, v in pct.items()]
    out += [f"Minimum KLD: {s['kld_min']:10.6f}", "", "====== Token probability statistics ======",
            f"Mean    Δp: {100 * s['p_diff']:6.3f} ± {100 * s['p_diff_uncertainty']:5.3f} %",
            f"RMS Δp    : {100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_uncertainty']:5.3f} %",
            f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_uncertainty']:5.3f} %"]
    return out


def read_text(file: Path, fail: Callable[[str], NoReturn]) -> str:
    """A UTF-8 text file's text; `fail(one line)` where it cannot be read (qvl perplexity's, imatrix's)."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text")
    except OSError as e:
        fail(f"{file}: {e.strerror or e}")


def perplexity_command(
    model: str = typer.Argument(..., help="A GGUF file or a stored model's name."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="The text to score (UTF-8), e.g. wikitext-2's "
                                                                   "wiki.test.raw (not with --kl-divergence)."),
    ctx_size: Optional[int] = typer.Option(None, "-c", "--ctx-size", help="Tokens a chunk (llama-perplexity's -c; "
                                                                          "default 512, or the file's)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Read only the first N chunks (default: all)."),
    base: Optional[str] = typer.Option(None, "--base", help="The base model (GGUF file or stored name) for the KL "
                                                            "divergence: the same model, less quantized."),
    kl_base: Optional[Path] = typer.Option(
        None, "--kl-divergence-base", help="llama-perplexity's file of the base's log-probabilities: a run of the "
                                           "base writes it (with -f), a run of the model with --kl-divergence reads "
                                           "it (its tokens are the text; llama.cpp's files too)."),
    kl_divergence: bool = typer.Option(False, "--kl-divergence", help="Measure against --kl-divergence-base's "
                                                                      "file instead of a base in memory."),
    hellaswag: bool = typer.Option(False, "--hellaswag", help="Score HellaSwag's tasks in -f FILE instead (llama.cpp's "
                                                              "six lines a task, e.g. hellaswag_val_full.txt): "
                                                              "llama-perplexity --hellaswag's acc_norm."),
    hellaswag_tasks: int = typer.Option(400, "--hellaswag-tasks", help="How many tasks --hellaswag scores, drawn "
                                                                       "as llama-perplexity draws them."),
    winogrande: bool = typer.Option(False, "--winogrande", help="Score WinoGrande's tasks in -f FILE instead "
                                                                "(llama.cpp's CSV): llama-perplexity --winogrande's."),
    winogrande_tasks: int = typer.Option(0, "--winogrande-tasks", help="How many tasks --winogrande scores, drawn "
                                                                       "as llama-perplexity draws them (0: all)."),
    multiple_choice: bool = typer.Option(False, "--multiple-choice", help="Score the multiple-choice tasks in -f "
                                                                          "FILE instead (llama.cpp's binary files: "
                                                                          "ARC, MMLU, TruthfulQA)."),
    multiple_choice_tasks: int = typer.Option(0, "--multiple-choice-tasks", help="How many --multiple-choice "
                                                                                 "scores, drawn as llama-perplexity "
                                                                                 "draws them (0: all)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object: the figures, and each chunk's PPL."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even where a GPU is."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA adapter applied to MODEL at run time (GGUF "
                                             "or PEFT folder; repeatable), as llama-perplexity's --lora."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: --lora with its term "
                                                    "scaled (repeatable)."),
) -> None:
    from ..convert.errors import ConvertError
    from .config import ConfigError
    from .gguf_file import GGUFError
    from .loader import load
    from .logits_file import LogitsFileError, read, writing
    from .lora import LoraError, lora_sources
    from .model import ModelError
    from .perplexity import PerplexityError, chunk_count, measure, summary
    from .store import StoreError
    from .tokenizer import TokenizerError

    scores = [name for name, on in (("hellaswag", hellaswag), ("winogrande", winogrande),
                                    ("multiple-choice", multiple_choice)) if on]
    if len(scores) > 1:
        _fail(f"--{' and --'.join(scores)}: one at a time")
    if scores and (base is not None or kl_base is not None):
        _fail(f"--{scores[0]} scores one model: not with --base or --kl-divergence-base")
    if hellaswag_tasks < 1:
        _fail(f"--hellaswag-tasks {hellaswag_tasks}: 1 or more")
    for name, n in (("winogrande", winogrande_tasks), ("multiple-choice", multiple_choice_tasks)):
        if n < 0:
            _fail(f"--{name}-tasks {n}: 0 (all) or more")
    if kl_divergence and kl_base is None:
        _fail("--kl-divergence reads the base's log-probabilities from --kl-divergence-base FILE")
    if kl_base is not None and base is not None:
        _fail("--base and --kl-divergence-base: one base or the other")
    if kl_divergence and file is not None:
        _fail(f"-f and --kl-divergence: the text is the one {kl_base} was made of")
    if not kl_divergence and file is None:
        _fail("the text to score: -f FILE")
    device = "cpu" if cpu else "auto"
    try:
        adapters = lora_sources(lora or [], lora_scaled or [])
    except LoraError as e:
        _fail(str(e))
    if multiple_choice:
        from .tasks_cli import run_multiple_choice

        return run_multiple_choice(model, file, multiple_choice_tasks, device, json_out, _fail, adapters)
    text = read_text(file, _fail) if file is not None else None  # before a model loads, and once
    if hellaswag or winogrande:
        from .tasks_cli import run_hellaswag, run_winogrande

        run = run_hellaswag if hellaswag else run_winogrande
        return run(model, text, hellaswag_tasks if hellaswag else winogrande_tasks, device, json_out, _fail, adapters)
    try:
        stored = read(kl_base) if kl_divergence else None
        ctx = ctx_size or (stored.n_ctx if stored is not None else 512)
        loaded = load(model, device=device, plan_ctx=ctx, lora=adapters)
        ids = stored.tokens if stored is not None else loaded.tokenizer.encode(text, add_special_tokens=False).ids
        n = chunk_count(len(ids), ctx, chunks, loaded.cfg.context_length,
                        at_least=1 if stored is not None else 2)  # errors before the base loads
        reference = None
        if base is not None:
            reference = load(base, device=device, plan_ctx=ctx)
            if reference.tokenizer.encode(text, add_special_tokens=False).ids != ids:
                _fail(f"{base} reads the text as other tokens than {model}: not the same model")
        started, per_chunk = time.perf_counter(), []

        def each(i: int, total: int, so_far) -> None:
            figures = summary(so_far)
            per_chunk.append(figures["ppl"])
            if i == 0:
                seconds = time.perf_counter() - started
                typer.echo(f"qvl perplexity: {total} chunks of {ctx} tokens, {seconds:.2f} s a chunk, "
                           f"ETA {seconds * (total - 1) / 60:.2f} min", err=True)
            line = f"[{i + 1}/{total}] PPL {figures['ppl']:.4f}"
            if "kld" in figures:
                line += (f"  ln(PPL(Q)/PPL(base)) {figures['ln_ppl_ratio']:.5f}  KLD {figures['kld']:.6f}"
                         f"  same top {100 * figures['same_top']:.2f}%")
            typer.echo(line, err=True)

        if kl_base is not None and stored is None:
            with writing(kl_base, ctx, loaded.cfg.n_vocab, ids[:n * ctx]) as keep:
                scores = measure(loaded, ids, ctx, n, None, each, keep=keep)
            typer.echo(f"qvl perplexity: the log-probabilities written to {kl_base}", err=True)
        else:
            scores = measure(loaded, ids, ctx, chunks, reference, each, stored)
    except (GGUFError, ConfigError, TokenizerError, ModelError, StoreError, ConvertError, PerplexityError,
            LogitsFileError, KeyError) as e:
        _fail(str(e).strip("'\""))
    result = summary(scores)
    if json_out:
        typer.echo(json.dumps({"model": model, "base": base or (str(kl_base) if stored is not None else None),
                               "ctx_size": ctx, "chunks": len(per_chunk), **result, "chunk_ppl": per_chunk}))
    else:
        sys.stdout.write("\n".join(_lines(result)) + "\n")

