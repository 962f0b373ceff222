"""`qvl-run MODEL [options]`: ask a picture a question.

Flags follow candle's `qwen2_5_vl` example (names and defaults), plus llama.cpp-style extras.
The answer alone goes to stdout; everything else (progress, --verbose figures) to stderr. Bad
input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional

import torch
import typer

from .config import ConfigError
from .gguf_file import GGUFError
from .image import MAX_PIXELS, MIN_PIXELS, ImageError, pixel_limits_ok
from .kernel_failure import KernelFailure, is_tritons
from .decoder import KV_TYPES
from .go_template import TemplateError
from . import kv_file
from .boxes_cli import boxes_problem, draw_answer_boxes
from .grounding import GroundingError, counted
from .loader import load, open_ended
from .lora import LoraError, lora_sources
from .generation import Generation, answer_json, answer_timings
from .model import ALL_LAYERS, PLAN_CTX, ModelError
from .placement import Placement
from .run_flags import answer_format_flag as _answer_format, chain_flags, fail as _fail, grammar_flag as _grammar
from .run_flags import DryFlags, logit_biases
from .sampling import SamplingError, SamplingParams
from . import spec_flags
from .draft_model import draft_for, open_draft
from .speculative import Drafter, SpeculationError, speculation
from .media_args import local_paths
from .media_fetch import is_remote
from . import answer_stream
from .prompt_paths import pictures_in
from .run_store import pull_if_missing, stored_run_defaults
from .store import StoreError
from .tokenizer import TokenizerError
from .video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VideoError, VideoOptions

app = typer.Typer(add_completion=False, rich_markup_mode=None)

DEFAULT_PROMPT = "Describe this image in detail."
HELP = """Run a Qwen2-VL / Qwen2.5-VL GGUF on images and a prompt.

MODEL is a GGUF file: llama.cpp's text model (its mmproj-*.gguf is found beside it), Ollama's
single qwen25vl file, or what qvl-convert wrote. Images come before the text unless the prompt
places them with {image1}, {image2}, ... The question may follow MODEL, as in `ollama run`,
image files it names attached (qvl-run m.gguf "What is in ./cat.png?"). Without a question and
with a terminal on stdin, an interactive chat starts.

With a CUDA GPU the whole model runs there through qvl's Triton kernels, or as much of it
as the GPU's free memory holds (one warning says what stays on the CPU); --gpu-layers,
--vision-device and --max-vram choose how it is shared with the CPU.

Example: qvl-run qwen2.5-vl-3b-q4_k_m.gguf --image cat.png --prompt "What is the cat doing?"
"""


def _out_of_memory(while_: str) -> str:
    """The one line for a GPU allocation that failed (torch.OutOfMemoryError), after giving back
    what the allocator caches, so that a chat can go on with a smaller request."""
    torch.cuda.empty_cache()
    return (f"out of GPU memory {while_}: --max-vram GB plans for a budget (fewer layers on the GPU, "
            "smaller images); --ctx-size, --cache-type q8_0, --max-pixels or --vision-device cpu take less")


def _triton_failure(error: BaseException) -> str | None:
    """The one line for an error Triton raised compiling or launching a kernel (a KernelFailure
    from the model, or Triton's own), or None for any other error."""
    if not isinstance(error, KernelFailure):
        if not is_tritons(error):
            return None
        error = KernelFailure(error)
    return f"a Triton kernel failed on this GPU ({error.line}); --no-triton runs torch's matmuls on the GPU instead"


def _system_line(device: str, kernels: bool, f32: bool) -> str:
    """What --verbose says first, as llama.cpp's system_info: versions, and where and how the
    matmuls run."""
    parts = [f"torch {torch.__version__}"]
    if device == "cuda":
        import triton

        from ..kernels.target import target

        gpu = target(torch.device("cuda"))
        parts += [f"Triton {triton.__version__}", f"{torch.cuda.get_device_name()} (sm_{gpu.arch}, {gpu.cores} SMs)",
                  ("Triton kernels" + (" with inline PTX" if gpu.ptx else ", plain Triton code")) if kernels
                  else "torch matmuls (--no-triton)"]
    else:
        from .cpu_gemm import bf16_gemms

        threads = torch.get_num_threads()
        parts += [f"CPU, {threads} thread{'s' if threads != 1 else ''}",
                  "float32 matmuls (--f32)" if f32 else
                  "bf16 GEMMs (native bf16)" if bf16_gemms() else "float32 GEMMs (no native bf16)"]
    return "qvl-run: " + ", ".join(parts)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _placement(cpu: bool, gpu_layers: int | None, vision_device: str, max_vram: float | None, no_triton: bool,
               cache_type: str | None, no_cuda_graph: bool, int8: bool = False,
               vision_stream: bool = False, no_prefill_offload: bool = False) -> tuple[str, Placement]:
    """The device and placement the flags ask for; GPU flags without a GPU warn and run on the CPU.
    `int8` (--int8-activations) turns on the int8-activation GEMVs (kernels/q8_activations.ENABLED)
    where the Triton kernels run."""
    if vision_device not in ("auto", "cpu", "cuda"):
        _fail(f"--vision-device {vision_device}: choose auto, cpu or cuda")
    if cache_type is not None and cache_type not in KV_TYPES:
        _fail(f"--cache-type {cache_type}: choose {', '.join(KV_TYPES)}")
    if max_vram is not None and max_vram <= 0:
        _fail(f"--max-vram {max_vram}: a budget in GB above 0")
    if gpu_layers is not None and gpu_layers < 0:
        _fail(f"--gpu-layers {gpu_layers}: 0 or more")
    if int8 and no_triton:
        _fail("--int8-activations needs the Triton kernels: not with --no-triton")
    if vision_stream and vision_device == "cpu":
        _fail("--vision-stream streams the vision tower's weights to the GPU: not with --vision-device cpu")
    gpu_flags = [f for f, on in (("--gpu-layers", gpu_layers is not None), ("--max-vram", max_vram is not None),
                                 ("--vision-device cuda", vision_device == "cuda"), ("--int8-activations", int8),
                                 ("--vision-stream", vision_stream), ("--no-prefill-offload", no_prefill_offload))
                 if on]
    if cpu and gpu_flags:
        _fail(f"--cpu with {', '.join(gpu_flags)}: choose one")
    if cpu or not torch.cuda.is_available():
        if gpu_flags:
            typer.echo(f"qvl-run: warning: no CUDA GPU found; {', '.join(gpu_flags)} ignored, running on the CPU",
                       err=True)
        return "cpu", Placement(kv_type=cache_type)
    layers = ALL_LAYERS if gpu_layers is None else gpu_layers
    kernels = not no_triton
    if kernels:
        from ..kernels import probe

        why = probe.why_not(torch.device("cuda"))
        if why is not None:
            typer.echo(f"qvl-run: warning: {why}; using torch matmuls on the GPU (as --no-triton)", err=True)
            kernels = False
    if int8 and kernels:
        from ..kernels import q8_activations

        q8_activations.ENABLED = True
    elif int8:
        typer.echo("qvl-run: warning: --int8-activations ignored: the Triton kernels do not run here", err=True)
    return "cuda", Placement("cuda", layers, vision_on_accel=vision_device != "cpu", kernels=kernels,
                             kv_type=cache_type, cuda_graph=not no_cuda_graph, vision_stream=vision_stream,
                             prefill_offload=not no_prefill_offload, fit_free=gpu_layers is None and max_vram is None)


@app.command(help=HELP)
def run(
    ctx: typer.Context,
    model_arg: Optional[str] = typer.Argument(
        None, metavar="MODEL", help="GGUF model file or store name (qwen2.5-vl:3b, hf.co/org/repo:q4_k_m...)."),
    words: Optional[List[str]] = typer.Argument(
        None, metavar="PROMPT", help="The question, as `ollama run MODEL PROMPT` takes it (or --prompt); image "
        "files it names (./cat.png, /home/me/a b.jpg) are attached and leave the text, as Ollama's."),
    image_args: List[str] = typer.Option([], "--image", help="Image file or http(s) URL; repeat for several."),
    video_args: List[str] = typer.Option([], "--video", help="Video file (any container/codec PyAV reads) or http(s) "
                                         "URL; repeatable."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Question (default: what stdin holds when it "
                                         f"is not a terminal, as `echo ... | ollama run`; else {DEFAULT_PROMPT!r})."),
    prompt_file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the question from this file "
                                               "(llama.cpp's -f)."),
    model_id: Optional[str] = typer.Option(
        None, "--model-id", help="Instead of MODEL: a Hugging Face id (Qwen/Qwen2.5-VL-3B-Instruct, pulled and "
        "converted to q4_k_m into the store) or a store name."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision, with --model-id (main only)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a CUDA GPU is there."),
    bf16: bool = typer.Option(False, "--bf16", help="Fast matmuls, the default: quantized weights with bf16 activations, "
                              "GEMMs in bf16 (float32 on CPUs without native bf16)."),
    f32: bool = typer.Option(False, "--f32", help="float32 matmuls throughout (exact, slower; F32 weights always are)."),
    max_length: int = typer.Option(512, "--max-length", "-n", "--n-predict", help="Most tokens to generate (0: only "
                                   "read the prompt; -1: until the answer ends or the context is full)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help="Sampling temperature; greedy when absent or 0 or below."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this probability (0..1; 1 = off)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability (0..1; 0 = off)."),
    samplers: Optional[str] = typer.Option(None, "--samplers", help="The samplers' order, names split by ';' "
                                           "(llama.cpp's; default: penalties;dry;temperature;top_n_sigma;top_k;"
                                           "typ_p;top_p;min_p;xtc, temperature first as Ollama samples)."),
    sampling_seq: Optional[str] = typer.Option(None, "--sampling-seq", "--sampler-seq", help="The order as "
                                               "llama.cpp's characters (e d s k y p m x t), e.g. edskypmxt."),
    typical: Optional[float] = typer.Option(None, "--typical", "--typical-p", help="Locally typical sampling "
                                            "(llama.cpp's): keep tokens closest to the entropy up to this mass "
                                            "(1 = off)."),
    top_n_sigma: Optional[float] = typer.Option(None, "--top-nsigma", "--top-n-sigma", help="Keep tokens within N "
                                                "standard deviations of the top logit (0 or below = off)."),
    xtc_probability: float = typer.Option(0.0, "--xtc-probability", help="XTC: the chance a step drops its top "
                                          "choices, all at or above --xtc-threshold but the least likely (0 = off)."),
    xtc_threshold: float = typer.Option(0.1, "--xtc-threshold", help="XTC's probability threshold (above 0.5 = off)."),
    dynatemp_range: float = typer.Option(0.0, "--dynatemp-range", help="Dynamic temperature: between temperature - "
                                         "and + this range by the candidates' entropy (0 = off)."),
    dynatemp_exp: float = typer.Option(1.0, "--dynatemp-exp", help="Dynamic temperature's exponent on the entropy."),
    dry_multiplier: float = typer.Option(0.0, "--dry-multiplier", help="DRY (llama.cpp's): a token extending a "
                                         "repeated run loses multiplier x base^(run - allowed length) (0 = off)."),
    dry_base: float = typer.Option(1.75, "--dry-base", help="DRY's base (below 1: kept at 1.75)."),
    dry_allowed_length: int = typer.Option(2, "--dry-allowed-length", help="DRY: runs this long are not penalized."),
    dry_penalty_last_n: int = typer.Option(64, "--dry-penalty-last-n", help="DRY: the last generated tokens it "
                                           "scans (0 = off, -1 = all)."),
    dry_sequence_breaker: List[str] = typer.Option([], "--dry-sequence-breaker", help="A text that ends a run "
                                                   "(repeatable; replaces the default \\n : \" *; none: no breakers)."),
    mirostat: int = typer.Option(0, "--mirostat", help="Mirostat (llama.cpp's) 1 or 2, in place of the other samplers "
                                 "after the temperature (0 = off)."),
    mirostat_lr: float = typer.Option(0.1, "--mirostat-lr", help="Mirostat's learning rate (eta)."),
    mirostat_ent: float = typer.Option(5.0, "--mirostat-ent", help="Mirostat's target entropy (tau)."),
    adaptive_target: float = typer.Option(-1.0, "--adaptive-target", help="adaptive-p (llama.cpp's; with "
                                          "adaptive_p in --samplers): draw tokens near this probability "
                                          "(below 0 = off)."),
    adaptive_decay: float = typer.Option(0.9, "--adaptive-decay", help="adaptive-p's decay of its average "
                                         "(0 to 0.99)."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for repeated tokens (above 0; 1.0 = none)."),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Last generated tokens the penalties see (0 = off, -1 = all)."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="Subtracted from the logit of each token "
                                           "among those (OpenAI's presence penalty; 0 = off)."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="Subtracted from a token's logit once "
                                            "for each time it is among those (OpenAI's frequency penalty; 0 = off)."),
    logit_bias: List[str] = typer.Option([], "--logit-bias", "-l", help="TOKEN_ID(+/-)BIAS added to that token's "
                                         "logit (llama.cpp's; repeatable): 15043+1, 15043-inf bans it."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Never end at an end-of-turn token: the answer runs "
                                    "to --max-length (llama.cpp's; -inf logit bias on those tokens)."),
    seed: int = typer.Option(299792458, "--seed", "-s", help="Random seed for sampling (-1: a random one)."),
    stop: List[str] = typer.Option([], "--stop", "-r", "--reverse-prompt", help="End the answer before this text "
                                   "(repeatable; Ollama's stop, llama.cpp's reverse prompt)."),
    answer_format: Optional[str] = typer.Option(None, "--format", help="json: the answer is one JSON object, kept so "
                                                "token by token (Ollama's --format json, llama.cpp's json grammar); "
                                                "a JSON schema file, or a schema inline ('{...}'): what it allows."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", "-j", help="A JSON schema inline, as "
                                              "llama.cpp's -j: the answer is what it allows (as --format '{...}')."),
    json_schema_file: Optional[Path] = typer.Option(None, "--json-schema-file", help="A JSON schema from a file "
                                                    "(llama.cpp's; as --format FILE)."),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="A GBNF grammar (llama.cpp's) the answer keeps "
                                          "to, token by token: its root rule is the whole answer."),
    grammar_file: Optional[Path] = typer.Option(None, "--grammar-file", help="A GBNF grammar from a file (llama.cpp's "
                                                "grammars/*.gbnf read as they are)."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they come (on a terminal they always do, "
                                "the prompt's reading shown on stderr meanwhile, as ollama run)."),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Accepted for candle compatibility: attention is always flash-style on a GPU (Triton) and SDPA on the CPU."),
    sliding_window: bool = typer.Option(False, "--sliding-window", help="Accepted for candle compatibility (Qwen2-VL/2.5-VL checkpoints do not use it)."),
    sliding_window_size: int = typer.Option(4096, "--sliding-window-size", help="With --sliding-window."),
    max_window_layers: Optional[int] = typer.Option(None, "--max-window-layers", help="With --sliding-window."),
    video_fps: float = typer.Option(2.0, "--video-fps", help="Frames per second sampled from a video."),
    max_frames: int = typer.Option(32, "--max-frames", help="Most frames sampled from a video (2 or more)."),
    video_start: Optional[float] = typer.Option(None, "--video-start", help="Start of the video clip, seconds."),
    video_end: Optional[float] = typer.Option(None, "--video-end", help="End of the video clip, seconds."),
    video_min_pixels: int = typer.Option(VIDEO_MIN_PIXELS, "--video-min-pixels", help="Smallest frame area."),
    video_max_pixels: int = typer.Option(VIDEO_MAX_PIXELS, "--video-max-pixels", help="Largest frame area."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector GGUF (default: found beside MODEL)."),
    system: Optional[str] = typer.Option(None, "--system", "-sys", "--system-prompt", help="System prompt."),
    min_pixels: int = typer.Option(MIN_PIXELS, "--min-pixels", help="Smallest image area after resizing."),
    max_pixels: int = typer.Option(MAX_PIXELS, "--max-pixels", help="Largest image area after resizing."),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", "-c", help="KV cache size in tokens (default or 0: prompt + --max-length; "
                                            f"with --max-length -1: {PLAN_CTX})."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: text, token ids, prompt tokens, "
                                  "reused_tokens (those --prompt-cache held), done_reason (stop: an end-of-turn token "
                                  "or a --stop string; length: -n or the context), timings."),
    logprobs: Optional[int] = typer.Option(None, "--logprobs", help="With --json: each answer token's "
                                           "log-probability under the model's raw logits and its N likeliest "
                                           "rivals (0 to 20), to compare with another runtime's."),
    each: bool = typer.Option(False, "--each", help="Ask the question of each --image on its own, the model "
                              "loaded once (captioning a folder): a \"PATH: answer\" line each, or with --json one "
                              "JSON object a line with its \"image\"; a picture that fails is reported and skipped "
                              "(exit code 1 at the end)."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="Draw the boxes and points the answer gives "
        "(ask e.g. \"Outline every car as JSON.\": Qwen2.5-VL's bbox_2d / point_2d JSON, Qwen2-VL's <|box_start|>"
        "(x1,y1),(x2,y2)<|box_end|>) on the picture and write it to this file (PNG, JPEG, ... by its extension); "
        "with --json the answer's \"boxes\" in the picture's pixels. One --image, or with --each a file each "
        "named with {stem} or {name}: boxes/{stem}.png."),
    prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache", help="Keep the KV cache in this file "
        "(llama.cpp's): a later run whose prompt starts the same (the same picture, another question) reads only the "
        "rest, its pictures not encoded again (the terminal chat writes it after each answer); a file made with "
        "another model or settings is not used."),
    prompt_cache_ro: bool = typer.Option(False, "--prompt-cache-ro", help="With --prompt-cache: use it, leave it."),
    verbose: bool = typer.Option(False, "--verbose", help="torch / Triton versions and where the matmuls run, "
                                 "load time, vision ms, prefill and decode tok/s, peak memory on stderr."),
    gpu_layers: Optional[int] = typer.Option(
        None, "--gpu-layers", "-ngl", "--n-gpu-layers", help="Decoder layers on the GPU, counted from the last as llama.cpp's -ngl "
        "(n_layer + 1 puts the output layer there too; default: all, or what the GPU's free memory holds)."),
    vision_device: str = typer.Option("auto", "--vision-device", help="Where the vision tower runs: auto (the GPU "
                                      "when there is one), cpu or cuda."),
    vision_stream: bool = typer.Option(False, "--vision-stream", help="On a GPU, keep the vision tower's block "
                                       "weights in host memory and copy each to the GPU while the block before it "
                                       "runs: ~1.1 GiB less GPU memory for the 3B / 7B towers, their 1.2 GiB copied "
                                       "over the bus an image (--max-vram chooses this by itself when it pays)."),
    no_prefill_offload: bool = typer.Option(False, "--no-prefill-offload", "--no-op-offload",
                                            help="With decoder layers on the CPU (--gpu-layers, --max-vram), read "
                                            "prompts there too; by default a prompt of 32 tokens or more runs "
                                            "each CPU layer on the GPU from a copy made for it, as llama.cpp's op "
                                            "offload does (its KV cache stays on the CPU)."),
    max_vram: Optional[float] = typer.Option(
        None, "--max-vram", help="GPU memory budget in GB: fit layers, vision tower and KV cache into it "
        "(the plan is printed with --verbose; larger images are downscaled)."),
    no_triton: bool = typer.Option(False, "--no-triton", help="On a GPU, torch matmuls on 16-bit weights (bf16; f16 "
                                   "before Ampere) instead of the Triton kernels (more memory; for comparison)."),
    no_cuda_graph: bool = typer.Option(False, "--no-cuda-graph", help="On a GPU, launch each decode step's kernels "
                                       "one by one instead of replaying a captured CUDA graph (for comparison)."),
    cache_type: Optional[str] = typer.Option(None, "--cache-type", help="KV cache type: f32, bf16, f16 or q8_0 "
                                             "(default: f32 on the CPU, bf16 on the GPU; f16 on GPUs "
                                             "without bf16, before Ampere)."),
    no_pull: bool = typer.Option(False, "--no-pull", help="Do not pull a store name that is not in the store."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP when pulling from a local registry."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads for the matmuls (default: "
                                          "torch's, one a physical core)."),
    int8_activations: bool = typer.Option(
        False, "--int8-activations", help="On a GPU, decode's Q4_K / Q6_K matrix-vector products on activations "
        "rounded to int8 per 32 values (dp4a, as llama.cpp's CUDA kernels do): fewer instructions a weight; the "
        "logits move slightly, so greedy tokens can differ from the default's exact float32 products."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA adapter applied at run time: a GGUF (qvl "
                                             "convert-lora's or llama.cpp's) or a PEFT folder (repeatable; or A,B)."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: a --lora adapter with "
                                                    "its term scaled (repeatable; or A:0.5,B:2), as llama.cpp's."),
    spec_type: Optional[str] = typer.Option(None, "--spec-type", help="ngram-simple: llama.cpp's self-speculative "
                                            "decoding: tokens the text already holds after the last few are drafted "
                                            "and checked in one pass, the answer's tokens kept; ngram-map-k, "
                                            "ngram-map-k4v: keys met before, each drafting what its last draft had "
                                            "taken; ngram-mod: a table of what followed each n-gram; draft-simple: "
                                            "a draft model's guesses (the default with --spec-draft-model); "
                                            "several: a,b (none: off)."),
    spec_size_n: int = spec_flags.SIZE_N,
    spec_size_m: int = spec_flags.SIZE_M,
    spec_mod_match: int = spec_flags.MOD_MATCH,
    spec_mod_max: int = spec_flags.MOD_MAX,
    spec_mod_min: int = spec_flags.MOD_MIN,
    spec_k_n: int = spec_flags.K_N, spec_k_m: int = spec_flags.K_M, spec_k_hits: int = spec_flags.K_HITS,
    spec_k4v_n: int = spec_flags.K4V_N, spec_k4v_m: int = spec_flags.K4V_M, spec_k4v_hits: int = spec_flags.K4V_HITS,
    spec_n_max: Optional[int] = spec_flags.N_MAX,
    spec_draft_model: Optional[Path] = spec_flags.DRAFT_MODEL,
    spec_p_min: float = spec_flags.P_MIN, spec_n_min: int = spec_flags.N_MIN,
) -> None:
    del flash_attn, sliding_window_size, max_window_layers
    if sliding_window:
        _fail("--sliding-window: Qwen2-VL / Qwen2.5-VL checkpoints set use_sliding_window false; not supported")
    if bf16 and f32:
        _fail("--bf16 and --f32: choose one")
    if model_id is not None and model_arg is not None:  # `qvl-run --model-id ID "question"`
        if prompt is not None or prompt_file is not None:
            _fail("give a MODEL (GGUF file or store name) or --model-id, not both")
        words, model_arg = [model_arg, *(words or [])], None
    if model_arg is None and model_id is None:
        _fail("no model: give a GGUF file or store name, or --model-id (see --help)")
    model_path = Path(model_arg) if model_arg is not None else None
    remote = any(map(is_remote, [*image_args, *video_args]))  # fetched first, into a folder gone at exit
    folder = Path(ctx.with_resource(tempfile.TemporaryDirectory(prefix="qvl-run-"))) if remote else Path()
    urls: dict[Path, str] = {}  # each fetched file's URL
    try:
        image, video = local_paths(image_args, "image", folder, urls), local_paths(video_args, "video", folder, urls)
    except (ImageError, VideoError) as e:
        _fail(str(e))
    if words:
        if prompt is not None or prompt_file is not None:
            _fail(f"a PROMPT after MODEL and {'--prompt' if prompt is not None else '--file'}: choose one")
        piped = sys.stdin.read().strip() if sys.stdin is not None and not sys.stdin.isatty() else ""
        text, named = pictures_in(" ".join([piped, *words] if piped else words))  # `cat a.txt | ollama run m Sum it up`
        prompt = text or DEFAULT_PROMPT  # `qvl-run MODEL ./cat.png`: the picture alone
        for p in named:
            typer.echo(f"Added image '{p}'", err=True)  # as ollama run says it
        image = [*image, *map(Path, named)]
    if revision not in (None, "main"):
        _fail(f"--revision {revision}: only the hub's default branch can be pulled")
    if model_id is not None:
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None and not model_id.startswith("hf.co/")
        model_path = Path(f"hf.co/{model_id}" if hub_id else model_id)
    assert model_path is not None
    for kind, paths in (("image", image), ("video", video), ("mmproj file", [mmproj] if mmproj else [])):
        for p in paths:
            if p.is_dir():
                _fail(f"{p}: is a folder, not {'an' if kind == 'image' else 'a'} {kind}")
            if not p.is_file():
                _fail(f"{p}: {kind} not found")
    if prompt_file is not None:
        if prompt is not None:
            _fail("--prompt and --file: choose one")
        try:
            prompt = prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = "file not found" if isinstance(e, FileNotFoundError) else getattr(e, "strerror", None) or "not text"
            _fail(f"{prompt_file}: {why}")
    elif prompt is None and sys.stdin is not None and not sys.stdin.isatty():  # `echo question | qvl-run m`
        prompt = sys.stdin.read().strip() or None
    fmt = _answer_format(answer_format)
    schema_flags = [f for f, v in (("--format", answer_format), ("--json-schema", json_schema),
                                   ("--json-schema-file", json_schema_file)) if v is not None]
    if len(schema_flags) > 1:
        _fail(f"{' and '.join(schema_flags)}: choose one")
    if json_schema is not None or json_schema_file is not None:
        fmt = _answer_format(json_schema if json_schema is not None else str(json_schema_file), schema_flags[0])
    if grammar is not None or grammar_file is not None:
        if fmt is not None:
            _fail(f"{schema_flags[0]} and --grammar: choose one")
        fmt = _grammar(grammar, grammar_file)
    if logprobs is not None and (not json_out or not 0 <= logprobs <= 20):
        _fail(f"--logprobs {logprobs}: 0 to 20, with --json" if json_out else "--logprobs: with --json")
    if max_length < -1:
        _fail(f"--max-length {max_length}: 0 or more, or -1 (until the answer ends or the context is full)")
    if ctx_size is not None and ctx_size < 0:
        _fail(f"--ctx-size {ctx_size}: 0 (prompt + --max-length) or more")
    if threads is not None:
        if threads < 1:
            _fail(f"--threads {threads}: 1 or more")
        torch.set_num_threads(threads)
    if not pixel_limits_ok(min_pixels, max_pixels):
        _fail(f"--min-pixels {min_pixels}, --max-pixels {max_pixels}: want 0 < max and min <= max")
    if each and (not image or video):
        _fail("--each: one question of each --image, with no --video" if image else
              "--each: give the pictures with --image")
    if boxes is not None and (why := boxes_problem(boxes, image, prompt, each)) is not None:
        _fail(why)
    chat = prompt is None and sys.stdin is not None and sys.stdin.isatty() and not json_out and not each
    if prompt_cache is not None and (why := kv_file.problem(prompt_cache, each)) is not None:
        _fail(why)
    biases = logit_biases(logit_bias)

    def sampler_chain() -> Any:  # the flags' sampler chain (checked now; again with a stored model's PARAMETERs)
        return chain_flags(samplers, sampling_seq, typical, top_n_sigma, xtc_probability, xtc_threshold, dynatemp_range,
                           dynatemp_exp, DryFlags(dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n,
                                                  tuple(dry_sequence_breaker)), (mirostat, mirostat_ent, mirostat_lr),
                           (adaptive_target, adaptive_decay))

    chain = sampler_chain()
    if ignore_eos and fmt is not None:
        _fail("--ignore-eos with --format or --grammar: a constrained answer ends at its end-of-turn token")
    try:  # the options' own checks, before a model is loaded
        SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, presence_penalty,
                       frequency_penalty)
        video_options = VideoOptions(fps=video_fps, max_frames=max_frames, start=video_start, end=video_end,
                                     min_pixels=video_min_pixels, max_pixels=video_max_pixels)
        spec = speculation(spec_type, spec_size_n, spec_size_m, spec_n_max, spec_mod_match, spec_mod_max,
                           spec_mod_min, (spec_k_n, spec_k_m, spec_k_hits), (spec_k4v_n, spec_k4v_m, spec_k4v_hits),
                           spec_p_min, spec_n_min, spec_draft_model is not None)
    except (SamplingError, VideoError, SpeculationError) as e:
        _fail(str(e))
    if not model_path.exists() and mmproj is None:
        pull_if_missing(str(model_path), no_pull, insecure)
    if not model_path.exists():  # a store name: its stored PARAMETERs and SYSTEM stand in for flags not given
        stored, stored_system = stored_run_defaults(ctx, str(model_path))
        if verbose and (stored or stored_system is not None):
            typer.echo(f"qvl-run: defaults stored with {model_path}: "
                       + ", ".join([f"{k} {v}" for k, v in stored.items()]
                                   + (["system prompt"] if stored_system is not None else [])), err=True)
        temperature, top_k = stored.get("temperature", temperature), stored.get("top_k", top_k)
        top_p, min_p = stored.get("top_p", top_p), stored.get("min_p", min_p)
        repeat_penalty = stored.get("repeat_penalty", repeat_penalty)
        repeat_last_n = stored.get("repeat_last_n", repeat_last_n)
        presence_penalty = stored.get("presence_penalty", presence_penalty)
        frequency_penalty = stored.get("frequency_penalty", frequency_penalty)
        seed, ctx_size = stored.get("seed", seed), stored.get("ctx_size", ctx_size)
        max_length, stop = stored.get("max_length", max_length), stored.get("stop", stop)
        typical, mirostat = stored.get("typical", typical), stored.get("mirostat", mirostat)
        mirostat_ent, mirostat_lr = stored.get("mirostat_ent", mirostat_ent), stored.get("mirostat_lr", mirostat_lr)
        chain = sampler_chain()
        system = system if system is not None else stored_system
    max_length, ctx_size = open_ended(max_length, ctx_size)
    device, placement = _placement(cpu, gpu_layers, vision_device, max_vram, no_triton, cache_type, no_cuda_graph,
                                   int8_activations, vision_stream, no_prefill_offload)
    t0 = time.perf_counter()
    try:  # a draft model first: on a GPU the model's plan (its KV cache too) fits in what the draft leaves
        draft = open_draft(spec_draft_model, device, f32) if spec_draft_model else None
        model = load(model_path, device=device, mmproj=mmproj, dtype=torch.float32 if f32 else None,
                     placement=placement, max_vram=max_vram if device == "cuda" else None,
                     plan_ctx=ctx_size or PLAN_CTX, lora=lora_sources(lora or [], lora_scaled or []))
        model.drafter = Drafter(draft_for(model, draft) if draft else None)
    except (GGUFError, ConfigError, TokenizerError, ModelError, KeyError, StoreError, LoraError) as e:
        _fail(str(e).strip("'\""))
    except torch.OutOfMemoryError:
        _fail(_out_of_memory("loading the model"))
    load_s = time.perf_counter() - t0
    model.on_warning = lambda message: typer.echo(f"qvl-run: warning: {message}", err=True)
    model.speculation = spec
    if model.fit_note is not None:
        model.on_warning(model.fit_note)
    if verbose:
        typer.echo(_system_line(device, placement.kernels, f32), err=True)
    if verbose and model.plan is not None:
        typer.echo(model.plan.table(), err=True)
    if verbose and model.drafter.model is not None:
        typer.echo(f"qvl-run: {model.drafter.model.describe(model.cfg.n_embd)}", err=True)
    if ignore_eos:
        biases.update({token: float("-inf") for token in model.stop_ids})
    if prompt_cache is not None and (why := kv_file.restore(model, prompt_cache)[1]) is not None:
        model.on_warning(why)
    gen_kwargs = dict(max_new_tokens=max_length, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                      repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty, logit_bias=biases, seed=seed, ctx_size=ctx_size,
                      stop=list(stop), min_pixels=min_pixels, max_pixels=max_pixels, videos=[str(p) for p in video],
                      video_options=video_options, format=fmt, chain=chain)
    if each:
        from .run_each import ask_each

        if ask_each(model, prompt if prompt is not None else DEFAULT_PROMPT, image, system, gen_kwargs, json_out,
                    stream, logprobs, load_s, boxes, urls):
            raise typer.Exit(1)
        return
    if chat:
        from .chat_cli import interactive
        from .chat_input import history_path

        interactive(model, gen_kwargs, [str(p) for p in image], system,
                    lambda: _keep_prompt(model, prompt_cache, prompt_cache_ro), history_path(), verbose)
        return
    text = prompt if prompt is not None else DEFAULT_PROMPT
    # a terminal sees the answer as it comes (ollama run), and the prompt's reading on stderr meanwhile
    shown = (stream or answer_stream.on_terminal(sys.stdout)) and not json_out
    try:
        if shown:
            status = sys.stderr if answer_stream.on_terminal(sys.stderr) else None
            answer_stream.write_answer(model.generate(text, [str(p) for p in image], stream=True, system=system,
                                                      progress=status is not None, **gen_kwargs), sys.stdout, status)
            out = model.last_generation
        else:
            out = model.generate(text, [str(p) for p in image], system=system, logprobs=logprobs, **gen_kwargs)
        _keep_prompt(model, prompt_cache, prompt_cache_ro)
    except (ModelError, ImageError, VideoError, TemplateError) as e:
        _fail(str(e))
    except torch.OutOfMemoryError:
        if shown:
            sys.stdout.write("\n")  # after the answer's part already written
        sys.stdout.flush()
        _fail(_out_of_memory("answering"))
    except Exception as e:
        why = _triton_failure(e)
        if why is None:
            raise
        if shown:
            sys.stdout.write("\n")
        sys.stdout.flush()
        _fail(why)
    assert isinstance(out, Generation)
    found = None if boxes is None else _draw_answer_boxes(model, out, image[0], boxes)
    timings = answer_timings(out, load_s)
    if json_out:
        reply = answer_json(out, timings)
        if found is not None:
            reply["boxes"] = [b.as_json() for b in found]
        typer.echo(json.dumps(reply, ensure_ascii=False))
    elif not shown:
        typer.echo(out.text)
    if verbose:
        for k, v in enumerate(out.videos):
            typer.echo(f"qvl-run: video {k + 1}: {len(v.frame_indices)} frames at "
                       f"{', '.join(f'{t:.2f}' for t in v.timestamps)} s, grid {list(v.grid_thw)}, "
                       f"{v.grid_thw[0] * (v.grid_thw[1] // 2) * (v.grid_thw[2] // 2)} tokens, "
                       f"{v.second_per_grid_t:.3f} s per temporal step", err=True)
        figures = ", ".join(f"{k} {v}" for k, v in timings.items())
        vram = f", peak VRAM {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda" else ""
        typer.echo(f"qvl-run: {figures}, peak RSS {_peak_rss_mib():.0f} MiB{vram}", err=True)


def _keep_prompt(model: Any, path: Path | None, read_only: bool) -> None:
    """--prompt-cache after an answer: the cache written to its file (one line if it cannot be)."""
    if path is not None and not read_only:
        try:
            kv_file.save(model, path)
        except OSError as e:
            _fail(f"--prompt-cache {path}: cannot write it ({e.strerror or e})")


def _draw_answer_boxes(model: Any, out: Generation, picture_path: Path, path: Path) -> list:
    """--boxes after an answer (boxes_cli.py): a line on stderr says what was drawn; its failure one line."""
    try:
        found = draw_answer_boxes(model, out, picture_path, path)
    except (ImageError, GroundingError) as e:
        _fail(str(e))
    typer.echo(f"qvl-run: {counted(found)} drawn on {path}" if found else
               f"qvl-run: the answer gives no boxes or points; {path} not written", err=True)
    return found


def main() -> None:
    app(prog_name="qvl-run")
