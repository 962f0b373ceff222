"""`qvl-convert`: Hugging Face checkpoint -> GGUF in one streaming step."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..runtime.inspect import human_bytes
from .errors import ConvertError
from .pipeline import ConvertOptions, Job, check_destination, plan_job, run_job
from .plan import PlannedTensor
from .writer import ChunkSource

err = Console(stderr=True)
out = Console()

HELP = """Convert a Qwen2-VL / Qwen2.5-VL checkpoint to GGUF.

SRC is a local checkpoint folder (config.json, tokenizer.json, *.safetensors) or a Hugging Face
repo id such as Qwen/Qwen2.5-VL-3B-Instruct (downloaded into the normal HF cache).

With --layout llamacpp (default) two files are written: OUT (the `qwen2vl` text model) and
mmproj-OUT (the `clip` vision projector), as llama.cpp's own converter lays them out. With
--layout ollama one `qwen25vl` file is written, as Ollama does (Qwen2.5-VL only).

Types (--type): f32, f16, bf16, q8_0 convert every matrix; q4_0, q4_k (llama.cpp's Q4_K_S
mix), q4_k_m, q5_k_m and q6_k pick per-tensor types exactly as llama-quantize does. Quantized bytes are
identical to ggml's reference quantizers. Norms and biases stay F32.

With --lora ADAPTER (a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors, as
peft, LLaMA-Factory or unsloth save a fine-tune) the adapter is merged into the weights before
they are quantized, as peft's merge_and_unload would (repeat --lora for several; --lora-scale
scales their deltas).

Example: qvl-convert Qwen/Qwen2.5-VL-3B-Instruct --type q4_k_m -o qwen2.5-vl-3b-q4_k_m.gguf
"""


def print_plan(job: Job) -> None:
    """The adapters merged, every tensor with its type, ggml shape and size, then per-file and
    overall totals."""
    for adapter in job.lora:
        out.print(f"merging LoRA {adapter.describe()}", markup=False, highlight=False, soft_wrap=True)
    for f in job.files:
        out.print(f"{f.path}" + (f"  ({f.arch})" if f.arch else ""), markup=False, highlight=False)
        width = max(len(p.tensor.name) for p in f.plan)
        counts: dict[str, int] = {}
        for p in f.plan:
            ne = str(list(reversed(p.tensor.shape)))
            out.print(f"  {p.tensor.name:<{width}}  {p.qtype.name:<5}  {ne:<22} {human_bytes(p.nbytes):>10}",
                      markup=False, highlight=False, soft_wrap=True)
            counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
        mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        out.print(f"  {len(f.plan)} tensors, {human_bytes(f.nbytes)} ({mix})\n", markup=False, highlight=False)
    out.print(f"total: {human_bytes(job.nbytes)} in {len(job.files)} file(s)", markup=False, highlight=False)


def write_job(job: Job, workers: int, quiet: bool, verb: str, chunks: ChunkSource | None = None) -> None:
    """Write the job's files with two progress bars (tensors, bytes), then their sizes and the time."""
    n_tensors = sum(len(f.plan) for f in job.files)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        console=err,
        disable=quiet,
        transient=False,
    )
    bytes_progress = Progress(BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err, disable=quiet)
    t0 = time.perf_counter()
    done: dict[str, int] = {}
    with progress, bytes_progress:
        tensors_task = progress.add_task(verb, total=n_tensors)
        bytes_task = bytes_progress.add_task("bytes", total=job.nbytes)

        def on_bytes(p: PlannedTensor, n: int) -> None:
            bytes_progress.advance(bytes_task, n)
            done[p.tensor.name] = done.get(p.tensor.name, 0) + n
            if done[p.tensor.name] == p.nbytes:
                progress.update(tensors_task, advance=1, description=p.tensor.name)

        run_job(job, on_bytes, workers, chunks)
    dt = time.perf_counter() - t0
    for f in job.files:
        err.print(f"wrote {f.path} ({human_bytes(f.path.stat().st_size)})", markup=False, highlight=False)
    err.print(f"done in {dt:.1f} s")


def _convert(opts: ConvertOptions, dry_run: bool, quiet: bool, store_name: Optional[str] = None) -> None:
    if store_name is not None:
        from ..runtime.store import ModelName, StoreError

        try:
            ModelName.parse(store_name)
        except StoreError as e:
            raise ConvertError(str(e)) from None
    job = plan_job(opts)
    if not quiet and not dry_run:
        for adapter in job.lora:
            err.print(f"merging LoRA {adapter.describe()}", markup=False, highlight=False, soft_wrap=True)
    if dry_run:
        print_plan(job)
        return
    check_destination(job, opts.force)
    write_job(job, opts.workers, quiet, "converting")
    if store_name is not None:
        from ..runtime.store import Store

        text, rest = job.files[0].path, job.files[1:]
        entry = Store().create(store_name, text, rest[0].path if rest else None,
                               config={"model_family": job.files[0].arch, "file_type": opts.type.upper()})
        err.print(f"stored as {entry.name}")


def command(
    src: str = typer.Argument(..., help="Checkpoint folder or Hugging Face repo id.", show_default=False),
    out_path: Optional[Path] = typer.Option(None, "-o", "--out", "--outfile",
                                             help="Output GGUF, or a folder to write the default name in (default: ./<name>-<TYPE>.gguf)."),
    type_: str = typer.Option("f16", "--type", "--outtype",
                              help="f32|f16|bf16|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q4_k_m|q5_k_s|q5_k_m|q6_k|"
                                   "q3_k_s|q3_k_m|q3_k_l|q2_k|iq4_nl|iq4_xs|iq3_m|iq3_s (q2_k_s, iq3_xs, iq3_xxs "
                                   "and the iq2 and iq1 types: qvl quantize --imatrix)"),
    layout: str = typer.Option("llamacpp", "--layout", help="llamacpp (model + mmproj) | ollama (one file)"),
    vision_type: str = typer.Option("f16", "--vision-type", help="f16|f32|q8_0 for the vision projector"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every tensor's type and size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    name: Optional[str] = typer.Option(None, "--name", help="Also store the result in the model store under NAME."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="Quantizing threads (default: the CPU "
                                          "count, at most 4).", show_default=False),
    lora: Optional[List[Path]] = typer.Option(None, "--lora", help="A PEFT LoRA adapter folder to merge into the "
                                              "weights (repeatable).", show_default=False),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="Multiplies every --lora adapter's delta."),
) -> None:
    if threads is not None and threads < 1:
        err.print(f"qvl-convert: error: --threads {threads}: 1 or more", markup=False)
        raise typer.Exit(2)
    if not math.isfinite(lora_scale):
        err.print(f"qvl-convert: error: --lora-scale {lora_scale}: a finite number", markup=False)
        raise typer.Exit(2)
    opts = ConvertOptions(source=src, out=out_path, type=type_.lower(), layout=layout.lower(),
                          vision_type=vision_type.lower(), revision=revision, force=force,
                          workers=threads or ConvertOptions.workers, lora=tuple(lora or ()), lora_scale=lora_scale)
    try:
        _convert(opts, dry_run, quiet, name)
    except ConvertError as e:
        err.print(f"qvl-convert: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("qvl-convert: interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None


QUANTIZE_HELP = """Write a GGUF text model in another type, as llama-quantize does.

MODEL is a text model GGUF (qvl-convert's, llama.cpp's or Ollama's one-file layout; its vision
tensors are copied as they are). TYPE is one of q8_0, q4_0, q4_1, q5_0, q5_1, q4_k (Q4_K_S),
q4_k_m, q5_k_s, q5_k_m, q6_k, q3_k_s, q3_k_m, q3_k_l, q2_k, q2_k_s, iq4_nl, iq4_xs, iq3_m, iq3_s,
iq3_xs, iq3_xxs, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s, f16, bf16, f32: the per-tensor plan and
the quantized bytes are llama-quantize's (its rules, ggml's bytes; q2_k_s, iq3_xs, iq3_xxs and the
iq2 and iq1 types need --imatrix, as llama-quantize's do). Metadata is copied, with general.file_type set. A matrix quantized already
is refused unless --allow-requantize. The projector (mmproj) is not touched: it pairs with the
new file as with the old (copy or link it beside the new name). With --lora ADAPTER (a LoRA GGUF or
a PEFT folder) its deltas are added to the weights before they are quantized (llama-export-lora's
merge, in any type). --prune-layers 20,21 leaves decoder layers out, the rest renumbered and the
block count set (the mix's choices as llama-quantize makes them then). With --imatrix FILE (llama-imatrix's
or qvl imatrix's importance matrix, GGUF or the legacy .dat) the quantizers weigh each column by it,
as llama-quantize --imatrix does (the same bytes), and Q4_0 gives the first eighth of ffn_down Q4_1.

Example: qvl quantize qwen2.5-vl-3b-bf16.gguf q4_k_m    (writes qwen2.5-vl-3b-Q4_K_M.gguf)
"""


def quantize_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="Text model GGUF (f32, f16 or bf16 matrices)."),
    type_: str = typer.Argument(..., metavar="TYPE", help="q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q4_k_m|q5_k_s|q5_k_m|"
                                                          "q6_k|q3_k_s|q3_k_m|q3_k_l|q2_k|q2_k_s|iq4_nl|iq4_xs|iq3_m|"
                                                          "iq3_s|iq3_xs|iq3_xxs|iq2_m|iq2_s|iq2_xs|iq2_xxs|iq1_m|iq1_s|"
                                                          "f16|bf16|f32"),
    out_path: Optional[Path] = typer.Option(None, "-o", "--out", help="Output GGUF (default: <name>-<TYPE>.gguf "
                                            "beside MODEL)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize", help="Quantize matrices that are "
                                          "quantized already (dequantized first: the errors add up)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama-imatrix's file, "
                                           "GGUF or .dat) weighing the quantizers, as llama-quantize's."),
    pure: bool = typer.Option(False, "--pure", help="No mix: every matrix in TYPE's own type (llama-quantize's)."),
    leave_output: bool = typer.Option(False, "--leave-output-tensor", help="Copy output.weight as it is."),
    keep_split: bool = typer.Option(False, "--keep-split", help="A split MODEL written in the same parts: "
                                    "OUT-00001-of-0000N.gguf... (OUT's .gguf dropped)."),
    prune_layers: Optional[str] = typer.Option(None, "--prune-layers", metavar="L0,L1,...", help="Decoder layers to "
                                               "leave out (numbered from 0), the rest renumbered, as llama-quantize's."),
    output_type: Optional[str] = typer.Option(None, "--output-tensor-type", help="output.weight's type (e.g. q8_0)."),
    embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type", help="token_embd.weight's type."),
    tensor_types: Optional[List[str]] = typer.Option(None, "--tensor-type", help="NAME=TYPE: tensors whose name "
                                                     "NAME (a regex) is found in take TYPE (repeatable; the first "
                                                     "that matches wins), e.g. attn_v=q8_0."),
    tensor_type_file: Optional[Path] = typer.Option(None, "--tensor-type-file", help="A file of NAME=TYPE entries "
                                                    "(separated by spaces or lines), after any --tensor-type."),
    include_weights: Optional[List[str]] = typer.Option(None, "--include-weights", help="Use the importance matrix "
                                                        "only for tensors whose name holds this (repeatable)."),
    exclude_weights: Optional[List[str]] = typer.Option(None, "--exclude-weights", help="Do not use it for tensors "
                                                        "whose name holds this (repeatable)."),
    override_kv: Optional[List[str]] = typer.Option(None, "--override-kv", help="KEY=TYPE:VALUE written into the "
                                                    "file (TYPE int, float, bool or str; repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every tensor's type and size; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    threads: Optional[int] = typer.Option(None, "-t", "--threads", help="Quantizing threads (default: the CPU "
                                          "count, at most 4).", show_default=False),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="A LoRA adapter (GGUF or PEFT folder) merged into "
                                             "the weights before they are quantized, as llama-export-lora merges "
                                             "(repeatable; or A,B)."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: --lora with its delta "
                                                    "scaled (repeatable)."),
) -> None:
    from ..runtime.lora import LoraError, lora_sources
    from .plan import Overrides, ggml_type, tensor_type
    from .requantize import QuantizeOptions, default_quantized_out, kv_override, plan_quantize

    def fail(message: str) -> None:
        err.print(f"qvl quantize: error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    if threads is not None and threads < 1:
        fail(f"--threads {threads}: 1 or more")
    kind = type_.lower()
    out = out_path or default_quantized_out(model, kind)
    if out.is_dir():
        out = out / default_quantized_out(model, kind).name
    if out.resolve() == model.resolve():
        fail(f"{out}: the output would overwrite MODEL")
    try:
        patterns = list(tensor_types or ())
        if tensor_type_file is not None:
            try:
                patterns += tensor_type_file.read_text(encoding="utf-8").split()
            except (OSError, UnicodeDecodeError) as e:
                fail(f"--tensor-type-file {tensor_type_file}: {getattr(e, 'strerror', None) or e}")
        overrides = Overrides(pure, ggml_type(output_type) if output_type else None,
                              ggml_type(embedding_type) if embedding_type else None,
                              tuple(tensor_type(o) for o in patterns))
        try:
            adapters = tuple(lora_sources(lora or [], lora_scaled or []))
        except LoraError as e:
            fail(str(e))
        pruned = ()
        if prune_layers is not None:
            try:
                pruned = tuple(sorted({int(i) for i in prune_layers.split(",")}))
            except ValueError:
                fail(f"--prune-layers {prune_layers!r}: layer numbers separated by commas, e.g. 20,21,22")
        options = QuantizeOptions(allow_requantize, imatrix, tuple(include_weights or ()),
                                  tuple(exclude_weights or ()), overrides, leave_output,
                                  tuple(kv_override(o) for o in override_kv or ()), keep_split, pruned, adapters)
        job, source = plan_quantize(model, out, kind, options, dry_run)
        try:
            if dry_run:
                print_plan(job)
                if source.unweighted:  # llama-quantize's warning after its dry run
                    where = "their values in the importance matrix" if source.importance else "--imatrix FILE"
                    err.print(f"qvl quantize: warning: {kind} quantizes {len(source.unweighted)} tensors "
                              f"('{source.unweighted[0]}' first) to a type that takes importance values: writing "
                              f"the file needs {where}", markup=False, highlight=False, soft_wrap=True)
                return
            check_destination(job, force)
            write_job(job, threads or ConvertOptions.workers, quiet, "quantizing", source.chunks)
        finally:
            source.source.close()
    except ConvertError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("qvl quantize: interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None


GGUF_SPLIT_HELP = """Cut a GGUF into parts, or join a split model's parts into one file, as llama.cpp's
llama-gguf-split does (the same files, byte for byte).

Split (the default): IN is a GGUF, OUT a name: the parts are OUT-00001-of-0000N.gguf..., a new
one every --split-max-tensors tensors (128) or before a tensor that would take a part past
--split-max-size (e.g. 4G, 500M: 10^9 and 10^6 bytes). qvl and llama.cpp read a split model by
its first part (Ollama reads none; qvl create stores one merged). Merge: IN is the first part,
OUT the one file.

Example: qvl gguf-split --split-max-size 4G qwen2.5-vl-72b-q4_k_m.gguf qwen2.5-vl-72b-q4_k_m
         qvl gguf-split --merge qwen2.5-vl-72b-q4_k_m-00001-of-00012.gguf qwen2.5-vl-72b-q4_k_m.gguf
"""


def gguf_split_command(
    source: Path = typer.Argument(..., metavar="IN", help="The GGUF to split, or with --merge a split model's "
                                                            "first part."),
    target: Path = typer.Argument(..., metavar="OUT", help="The parts' name (OUT-0000i-of-0000N.gguf), or with "
                                                             "--merge the file."),
    merge: bool = typer.Option(False, "--merge", help="Join a split model's parts into one file."),
    split: bool = typer.Option(False, "--split", help="Split IN into parts (the default)."),
    max_tensors: Optional[int] = typer.Option(None, "--split-max-tensors", help="Tensors a part (default 128)."),
    max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Bytes a part's tensors may take: N "
                                                                          "followed by M or G (e.g. 4G)."),
    no_tensor_first: bool = typer.Option(False, "--no-tensor-first-split", help="The first part holds the "
                                         "metadata alone."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the parts' tensors and sizes; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    from .gguf_split import open_source, plan_merge, plan_split, split_size
    from .requantize import Requantize

    def fail(message: str) -> None:
        err.print(f"qvl gguf-split: error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    if merge and (split or max_tensors is not None or max_size is not None or no_tensor_first):
        fail("--merge: not with --split, --split-max-tensors, --split-max-size or --no-tensor-first-split")
    if max_tensors is not None and max_size is not None:
        fail("--split-max-tensors or --split-max-size: one of them")
    if max_tensors is not None and max_tensors < 1:
        fail(f"--split-max-tensors {max_tensors}: 1 or more")
    try:
        size = split_size(max_size) if max_size is not None else None
        g = open_source(source)
        try:
            job = plan_merge(g, target) if merge else plan_split(g, target, max_tensors, size, no_tensor_first)
            if dry_run:
                print_plan(job)
                return
            check_destination(job, force)
            copied = Requantize(g, frozenset(g.tensors))  # every tensor's bytes as they are
            write_job(job, ConvertOptions.workers, quiet, "merging" if merge else "splitting", copied.chunks)
        finally:
            g.close()
    except ConvertError as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("qvl gguf-split: interrupted; nothing was written", markup=False)
        raise typer.Exit(130) from None


CONVERT_LORA_HELP = """Write a PEFT LoRA adapter folder as llama.cpp's LoRA adapter GGUF.

ADAPTER is a PEFT folder (adapter_config.json + adapter_model.safetensors, as peft, LLaMA-Factory
or unsloth save a fine-tune of Qwen2-VL / Qwen2.5-VL). The file is convert_lora_to_gguf.py's
layout: llama.cpp's --lora, Ollama's ADAPTER and qvl-run --lora apply it to the base model at run
time, whatever the base's type. peft's per-module factors (alpha_pattern, rank_pattern,
use_rslora) are folded into B, so the deltas are peft's. The vision tower's pairs are left out
with a warning (no run-time adapter reaches the projector: merge them with qvl-convert --lora).

Example: qvl convert-lora ./my-finetune -o my-finetune-lora.gguf
         qvl-run qwen2.5-vl-7b-q4_k_m.gguf --lora my-finetune-lora.gguf --image a.png --prompt "..."
"""


def convert_lora_command(
    adapter: Path = typer.Argument(..., metavar="ADAPTER", help="PEFT LoRA folder."),
    out_path: Optional[Path] = typer.Option(None, "-o", "--out", "--outfile", help="Output GGUF (default: "
                                            "./<ADAPTER's name>-<TYPE>-LoRA.gguf)."),
    outtype: str = typer.Option("f32", "--outtype", help="f32 (as llama.cpp's converter), f16 or bf16."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    from .lora_gguf import default_lora_out, write_lora_gguf

    outtype = outtype.lower()
    try:
        written = write_lora_gguf(adapter, out_path or default_lora_out(adapter, outtype), outtype, force)
    except ConvertError as e:
        err.print(f"qvl convert-lora: error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if written.left_out:
        err.print(f"qvl convert-lora: warning: {len(written.left_out)} vision tower weights' pairs left out (first: "
                  f"{written.left_out[0]}); merge them with qvl-convert --lora", markup=False, highlight=False,
                  soft_wrap=True)
    err.print(f"wrote {written.path} ({written.pairs} adapted weights, "
              f"{human_bytes(written.path.stat().st_size)})", markup=False, highlight=False)


app = typer.Typer(add_completion=False, help=HELP, rich_markup_mode=None)
app.command(help=HELP)(command)


def main() -> None:
    app(prog_name="qvl-convert")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
