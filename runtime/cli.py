"""`qvl`: the umbrella command (convert, inspect, run)."""

from __future__ import annotations

import calendar
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer

from ..convert import cli as convert_cli
from . import bench_cli, embed_cli, imatrix_cli, perplexity_cli, run_cli, spec_flags
from .gguf_file import GGUFError, GGUFFile
from .inspect import human_bytes, inspect_file, model_rows

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  help="qvl: a local runtime for Qwen2-VL and Qwen2.5-VL.")

app.command("convert", help=convert_cli.HELP)(convert_cli.command)
app.command("quantize", help=convert_cli.QUANTIZE_HELP)(convert_cli.quantize_command)
app.command("gguf-split", help=convert_cli.GGUF_SPLIT_HELP)(convert_cli.gguf_split_command)
app.command("convert-lora", help=convert_cli.CONVERT_LORA_HELP)(convert_cli.convert_lora_command)
app.command("embed", help=embed_cli.HELP)(embed_cli.embed_command)
app.command("perplexity", help=perplexity_cli.HELP)(perplexity_cli.perplexity_command)
app.command("imatrix", help=imatrix_cli.HELP)(imatrix_cli.imatrix_command)
app.command("bench", help=bench_cli.HELP)(bench_cli.bench_command)


@app.command("inspect", help="Show a GGUF file's metadata (long arrays summarised) and tensor table.\n\n"
                             "Example: qvl inspect qwen2.5-vl-3b-q4_k_m.gguf")
def inspect_cmd(
    path: str = typer.Argument(..., help="Any GGUF file (ours, llama.cpp's or Ollama's)."),
    full: bool = typer.Option(False, "--full", help="Print arrays and strings in full."),
) -> None:
    try:
        inspect_file(path, sys.stdout, full)
    except GGUFError as e:
        typer.echo(f"qvl inspect: error: {e}", err=True)
        raise typer.Exit(2) from None
    except BrokenPipeError:  # `qvl inspect x.gguf | head`
        sys.stderr.close()


app.command("run", help=run_cli.HELP)(run_cli.run)


def _store_fail(e: Exception) -> None:
    typer.echo(f"qvl: error: {e}", err=True)
    raise typer.Exit(2)


@app.command("create", help="Store local GGUF files under a name (like `ollama create`): MODEL (its mmproj "
                            "found beside it), or an Ollama Modelfile with -f (FROM, PARAMETER, SYSTEM, TEMPLATE, "
                            "LICENSE; its PARAMETERs and SYSTEM become qvl-run's defaults for that name).\n\n"
                            "Example: qvl create qwen2.5-vl:3b-q4_k_m model.gguf --mmproj mmproj-model.gguf\n\n"
                            "Example: qvl create terse -f Modelfile")
def create_cmd(
    name: str = typer.Argument(..., help="[host/][namespace/]model[:tag]"),
    model: Optional[Path] = typer.Argument(None, help="Text model GGUF (or give -f)."),
    modelfile: Optional[Path] = typer.Option(None, "-f", "--file", help="Ollama Modelfile to build from."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Vision projector GGUF (default: found beside MODEL)."),
    template: Optional[Path] = typer.Option(None, "--template", help="A prompt template file in Ollama's TEMPLATE syntax (Go's text/template: .Messages, "
                                          ".System, .Prompt, .Response); it renders the model's prompts in place of the "
                                          "GGUF's chat template."),
    params: Optional[str] = typer.Option(None, "--params", help="Default parameters as JSON, Ollama's names "
                                         '(e.g. \'{"temperature": 0.2, "num_ctx": 8192}\').'),
    quantize: Optional[str] = typer.Option(None, "-q", "--quantize", help="Store the text model quantized to this "
                                           "type (q4_K_M, q4_K_S, q8_0, ... as `qvl quantize`; from f16/bf16/f32)."),
) -> None:
    from ..convert.errors import ConvertError
    from ..convert.for_store import Conversion, checked_name
    from ..convert.requantize import Quantization
    from .loader import find_mmproj
    from .modelfile import Creation, ModelfileError, adapter_files, check_params, parse, resolve
    from .store import ModelName, Store, StoreError

    if (model is None) == (modelfile is None):
        _store_fail("give MODEL or -f Modelfile" if model is None else "MODEL and -f: choose one")
    if modelfile is not None and (mmproj or template or params):
        _store_fail("-f with --mmproj / --template / --params: the Modelfile says those")
    try:
        ModelName.parse(name)
        store = Store()
        if modelfile is not None:
            try:
                text = modelfile.read_text()
            except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
                why = "file not found" if isinstance(e, FileNotFoundError) else "not a Modelfile"
                raise ModelfileError(f"{modelfile}: {why}") from None
            mf = parse(text)
            folders = [Path(s) for s in mf.sources if (modelfile.parent / Path(s).expanduser()).is_dir()]
            if folders and len(mf.sources) > 1:
                raise ModelfileError(f"FROM {folders[0]}: a checkpoint folder is the only FROM")
            adapters = tuple(modelfile.parent / Path(a).expanduser() for a in mf.adapters)
            if folders and not all(a.is_dir() for a in adapters):  # merged as it converts: PEFT folders
                raise ModelfileError(f"ADAPTER {next(a for a in adapters if not a.is_dir())}: with a checkpoint "
                                     "folder FROM, an ADAPTER is a PEFT folder (merged as it converts)")
            job = (Creation(modelfile.parent / folders[0].expanduser(), None, mf.params, mf.template, mf.system,
                            mf.license, mf.messages, adapters) if folders else resolve(mf, modelfile.parent, store))
        else:
            assert model is not None
            extra = json.loads(params) if params else {}
            if not isinstance(extra, dict):
                raise ModelfileError(f"--params {params}: a JSON object")
            extra = check_params(extra, strict=True)
            job = Creation(model, mmproj, extra, template.read_text() if template else None, None, None)
        if job.model.is_dir():  # a checkpoint folder: converted as qvl-convert does (f16, or --quantize's type)
            made = Conversion(store, job.model, checked_name(name), quantize, job.adapters)  # merged in
            entry = _create_made(store, name, replace(job, adapters=()), made,
                                 f"converting to {(quantize or 'f16').upper()}")
        else:
            with adapter_files(store, job.adapters) as files:  # stored as layers, applied at run time
                job = replace(job, projector=job.projector or find_mmproj(job.model), adapters=files)
                if quantize is not None:
                    made = Quantization(store, job, quantize)
                    entry = _create_made(store, name, job, made,
                                         f"quantizing {made.source_type} to {quantize.upper()}")
                else:
                    entry = store.create(name, job.model, job.projector, job.template, job.params or None,
                                         job.license, system=job.system, messages=job.messages, adapters=job.adapters)
    except (StoreError, GGUFError, OSError, json.JSONDecodeError, ModelfileError, ConvertError) as e:
        _store_fail(e)
    typer.echo(f"created {entry.name} ({len(entry.manifest['layers'])} layers, {human_bytes(entry.size)})", err=True)


def _create_made(store, name: str, job, made, label: str):
    """`qvl create` of a model made first (a Conversion or a Quantization: a bytes bar on stderr),
    stored with `job`'s defaults; the made files removed after."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    try:
        bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True))
        with bar:
            task = bar.add_task("", total=made.total)
            model, projector = made.run(lambda done, total: bar.update(task, completed=done))
        return store.create(name, model, projector, job.template, job.params or None, job.license,
                            system=job.system, messages=job.messages, adapters=job.adapters)
    finally:
        made.close()


@app.command("list", help="List stored models: name, id, size, modified.")
def list_cmd() -> None:
    from .store import Store, StoreError, human_time

    try:
        entries = Store().list()
    except StoreError as e:
        _store_fail(e)
    width = max([len(str(e.name)) for e in entries] + [4])
    typer.echo(f"{'NAME':<{width}}  {'ID':<12}  {'SIZE':>10}  MODIFIED")
    for e in entries:
        typer.echo(f"{str(e.name):<{width}}  {e.digest[7:19]:<12}  {human_bytes(e.size):>10}  {human_time(e.modified)}")


@app.command("show", help="Architecture, parameters, quantization, context, projector, template, system, "
                          "params, license, adapters of a stored model.\n\nExample: qvl show qwen2.5-vl:3b --modelfile")
def show_cmd(
    name: str = typer.Argument(...),
    modelfile: bool = typer.Option(False, "--modelfile", help="Print a Modelfile that rebuilds the model "
                                   "(qvl create NEW -f it)."),
    template: bool = typer.Option(False, "--template", help="Print the prompt template: the stored TEMPLATE, "
                                  "else the GGUF's chat template (Jinja), whichever renders its prompts."),
    system: bool = typer.Option(False, "--system", help="Print the stored system prompt."),
    parameters: bool = typer.Option(False, "--parameters", help="Print the stored parameters, one a line."),
    license_: bool = typer.Option(False, "--license", help="Print the stored license."),
) -> None:
    from .modelfile import modelfile_of, parameter_lines
    from .store import Store, StoreError

    try:
        store = Store()
        if modelfile:
            typer.echo(modelfile_of(store, name), nl=False)
            return
        entry = store.get(name)
        if template or system or parameters or license_:  # as ollama show's: each asked part as it is
            if parameters:
                typer.echo("\n".join(parameter_lines(store.params(entry))))
            for asked, kind in ((template, "template"), (system, "system"), (license_, "license")):
                text = store.text(entry, kind) if asked else None
                if asked and text is None and kind == "template":
                    with GGUFFile(store.resolve(name)[0]) as g:
                        text = g.get("tokenizer.chat_template")
                if asked:
                    typer.echo(text if text is not None else f"(no {kind})")
            return
        model, proj = store.resolve(name)
        with GGUFFile(model) as g:
            if proj is None:
                rows = model_rows(g, None)
            else:
                with GGUFFile(proj) as p:
                    rows = model_rows(g, p)
        for kind in ("template", "system", "params", "license"):
            text = store.text(entry, kind)
            if text is not None:
                text = " ".join(text.split())  # one line of the table
                rows.append((kind, text if len(text) < 70 else text[:67] + "..."))
        if messages := store.messages(entry):
            rows.append(("messages", f"{len(messages)} ({', '.join(m['role'] for m in messages)})"))
        for adapter in store.adapters(entry):
            with GGUFFile(adapter) as a:
                rows.append(("adapter", f"{a.get('general.name', adapter.name)} (LoRA, alpha "
                                        f"{a.get('adapter.lora.alpha', 0):g}, {len(a.tensors) // 2} matrices)"))
    except (StoreError, GGUFError) as e:
        _store_fail(e)
    for k, v in rows:
        typer.echo(f"  {k:<18}{v}")


@app.command("rm", help="Remove stored models; blobs go when no other model uses them. Every name is checked "
                        "before any is removed.\n\nExample: qvl rm qwen2.5-vl:3b qwen2.5-vl:7b")
def rm_cmd(names: List[str] = typer.Argument(..., metavar="NAME", help="One or more stored model names.")) -> None:
    from .store import Store, StoreError

    store = Store()
    try:
        named = {store.get(name).name: name for name in names}  # `a` and `a:latest` are one model
        for name in named.values():
            removed = store.remove(name)
            typer.echo(f"deleted {name} ({len(removed)} blobs freed)", err=True)
    except StoreError as e:
        _store_fail(e)


@app.command("cp", help="Copy a stored model to another name (no data is copied).")
def cp_cmd(src: str = typer.Argument(...), dst: str = typer.Argument(...)) -> None:
    from .store import Store, StoreError

    try:
        Store().copy(src, dst)
    except StoreError as e:
        _store_fail(e)
    typer.echo(f"copied {src} to {dst}", err=True)


@app.command("pull", help="Get a model into the store: from an OCI / Ollama registry (resumable, verified), "
                          "hf.co/<org>/<repo>:<quant> (GGUF repos as is, checkpoints converted), a short alias "
                          "(qwen2.5-vl:3b, qwen2-vl:7b-q8_0) or ollama://model:tag (a local Ollama install, "
                          "hard-linked).\n\nExample: qvl pull localhost:5000/me/qwen2.5-vl:3b --insecure")
def pull_cmd(
    name: str = typer.Argument(..., help="[host/]namespace/model[:tag]"),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP (local registries)."),
) -> None:
    from .sources import pull_with_progress
    from .store import Store, StoreError

    try:
        done = pull_with_progress(name, Store(), insecure)
    except StoreError as e:
        _store_fail(e)
    except KeyboardInterrupt:
        typer.echo("qvl: pull interrupted; run it again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"pulled {done}", err=True)


@app.command("push", help="Upload a stored model to an OCI registry (blobs it has are skipped).\n\n"
                          "Example: qvl push qwen2.5-vl:3b localhost:5000/me/qwen2.5-vl:3b --insecure")
def push_cmd(
    name: str = typer.Argument(...),
    target: str = typer.Argument(..., help="host/namespace/model[:tag]"),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP (local registries)."),
) -> None:
    from .registry import push
    from .store import Store, StoreError

    try:
        sent = push(name, target, Store(), insecure)
    except StoreError as e:
        _store_fail(e)
    typer.echo(f"pushed {name} to {target} ({human_bytes(sent)} uploaded)", err=True)


HOST_HELP = "The server: [http://]HOST[:PORT] (default $QVL_HOST, else 127.0.0.1:11434)."


@app.command("ps", help="List the models a running qvl serve (or Ollama) has loaded: name, id, size, processor.\n\n"
                        "Example: qvl ps --host 127.0.0.1:11434")
def ps_cmd(host: Optional[str] = typer.Option(None, "--host", help=HOST_HELP)) -> None:
    from .client import ClientError, ask, processor, server_url

    try:
        models = ask(server_url(host), "/api/ps").get("models", [])
    except ClientError as e:
        _store_fail(e)
    width = max([len(m.get("name", "")) for m in models] + [4])
    typer.echo(f"{'NAME':<{width}}  {'ID':<12}  {'SIZE':>10}  {'PROCESSOR':<16}  UNTIL")
    for m in models:
        size, until = int(m.get("size") or 0), m.get("expires_at", "")
        typer.echo(f"{m.get('name', ''):<{width}}  {m.get('digest', '')[-64:][:12]:<12}  {human_bytes(size):>10}  "
                   f"{processor(size, int(m.get('size_vram') or 0)):<16}  "
                   f"{_until(until)}")


def _until(expires_at: str) -> str:
    """Ollama's UNTIL column from an ISO time: Forever, N minutes from now, Stopping..."""
    try:
        left = calendar.timegm(time.strptime(expires_at[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()
    except ValueError:
        return expires_at
    if expires_at.startswith("0001-") or left > 100 * 365 * 86400:
        return "Forever"
    if left < 1:
        return "Stopping..."
    if left < 90:
        return f"{int(left)} seconds from now"
    return f"{round(left / 60)} minutes from now" if left < 5400 else f"{round(left / 3600)} hours from now"


@app.command("stop", help="Unload a model from a running qvl serve (or Ollama), as `ollama stop`.\n\n"
                          "Example: qvl stop qwen2.5-vl:3b")
def stop_cmd(name: str = typer.Argument(..., help="A loaded model's name (see qvl ps)."),
             host: Optional[str] = typer.Option(None, "--host", help=HOST_HELP)) -> None:
    from .client import ClientError, ask, server_url

    try:
        base = server_url(host)
        loaded = [m.get("name") for m in ask(base, "/api/ps").get("models", [])]
        if name not in loaded and f"{name}:latest" not in loaded:
            raise ClientError(f"model {name!r} is not loaded" + (f" (loaded: {', '.join(loaded)})" if loaded else ""))
        ask(base, "/api/generate", {"model": name, "keep_alive": 0})
    except ClientError as e:
        _store_fail(e)
    typer.echo(f"stopped {name}", err=True)


@app.command("serve", help="Answer Ollama's HTTP API (/api/generate, /api/chat, /api/embed, /api/tags, /api/show, "
                           "/api/ps, /api/pull, /api/push, /api/create, /api/blobs, /api/copy, /api/delete) and "
                           "OpenAI's (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models), and "
                           "llama.cpp server's /completion, /embedding, /health, /tokenize, /detokenize, /slots, "
                           "/lora-adapters, /metrics, for the stored models, one loaded at a time; a stored model's "
                           "PARAMETERs and SYSTEM are its defaults.\n\n"
                           "Example: qvl serve qwen2.5-vl:3b --port 11434, then\n\n"
                           "curl localhost:11434/api/generate -d '{\"model\": \"qwen2.5-vl:3b\", \"prompt\": \"Hi\"}'")
def serve_cmd(
    model: Optional[str] = typer.Argument(None, help="Stored name or GGUF file to load now and answer requests "
                                          "that name no model (any stored model may be named)."),
    alias: Optional[str] = typer.Option(None, "--alias", "-a", help="The name MODEL (a GGUF file) answers to and is "
                                        "listed by in /v1/models (default: its file name), as llama-server's."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (0.0.0.0: every interface; "
                                       "default: $QVL_HOST's, as ollama serve reads $OLLAMA_HOST, else 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: $QVL_HOST's, else Ollama's 11434)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even when a CUDA GPU is there."),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers", "-ngl", help="Decoder layers on the GPU "
                                             "(default: all, or what the GPU's free memory holds)."),
    max_vram: Optional[float] = typer.Option(None, "--max-vram", help="GPU memory budget in GB."),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", "-c", help="Context when a request and the model "
                                           "give no num_ctx (default $QVL_CONTEXT_LENGTH, as Ollama's "
                                           "OLLAMA_CONTEXT_LENGTH, else 4096)."),
    cache_type: Optional[str] = typer.Option(None, "--cache-type", help="KV cache type: f32, bf16, f16 or q8_0 "
                                             "(default $QVL_KV_CACHE_TYPE, as Ollama's OLLAMA_KV_CACHE_TYPE, else "
                                             "f32 on the CPU, bf16 on the GPU)."),
    keep_alive: Optional[str] = typer.Option(None, "--keep-alive", help="How long a model stays loaded after its "
                                             "last request (default $QVL_KEEP_ALIVE, else 5m), as Ollama's keep_alive "
                                             "(a request's own wins): 30s, 5m, 1h, 0 (unload at once), -1 "
                                             "(until another replaces it)."),
    origins: Optional[str] = typer.Option(None, "--origins", help="Web origins whose pages may call the server, "
                                          "comma-separated, besides localhost's, apps' and browser extensions' "
                                          "(as OLLAMA_ORIGINS): e.g. https://chat.example.com,http://192.168.1.*:*; "
                                          "* for any (default $QVL_ORIGINS)."),
    cache_pool: float = typer.Option(1.0, "--cache-pool", help="GB of host memory for other conversations' KV "
                                     "caches: a client coming back to its conversation (its pictures) after another's "
                                     "goes on from its own cache instead of reading it all again (0: off)."),
    slot_save_path: Optional[Path] = typer.Option(None, "--slot-save-path", help="Folder for llama.cpp's POST "
                                                  "/slots/0?action=save|restore files (the KV cache kept on disk)."),
    media_path: Optional[Path] = typer.Option(None, "--media-path", help="Folder whose files requests may name as "
                                              "file:// URLs relative to it (llama-server's; default: none may)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Answer only requests carrying this key "
                                          "(Authorization: Bearer KEY, or X-Api-Key), as llama-server's; several: "
                                          "A,B (default $QVL_API_KEY; /health stays open)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="A file of keys, one a line (# "
                                                "comments), as llama-server's."),
    ssl_cert: Optional[Path] = typer.Option(None, "--ssl-cert-file", help="HTTPS: the server's PEM certificate "
                                            "(with --ssl-key-file), as llama-server's."),
    ssl_key: Optional[Path] = typer.Option(None, "--ssl-key-file", help="HTTPS: the certificate's PEM private key."),
    no_remote_media: bool = typer.Option(False, "--no-remote-media", help="Refuse http(s) URLs of pictures and "
                                         "videos in requests (by default fetched, as llama-server does: 10 MiB, "
                                         "10 s)."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA adapter applied to MODEL at run time: a GGUF "
                                             "or a PEFT folder (repeatable; or A,B); GET / POST /lora-adapters list "
                                             "them and set their scales, a request's `lora` its own."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: a --lora adapter at "
                                                    "that scale (repeatable; or A:S,B:T)."),
    lora_off: bool = typer.Option(False, "--lora-init-without-apply", help="Load --lora's adapters at scale 0 (off "
                                  "until POST /lora-adapters or a request's `lora` sets one), as llama-server's."),
    metrics: bool = typer.Option(False, "--metrics", help="Answer GET /metrics: llama-server's Prometheus counters "
                                 "(tokens read and generated, their seconds, throughput, requests waiting)."),
    spec_type: Optional[str] = typer.Option(None, "--spec-type", help="ngram-simple, ngram-map-k, ngram-map-k4v, "
                                            "ngram-mod, draft-simple or several (a,b): llama.cpp's speculative "
                                            "decoding for every answer, what the last four keep shared by a model's "
                                            "requests (qvl-run --help; none: off)."),
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
    import torch

    import ssl

    from .http_serve import serve, tls_context
    from .api_keys import ENV, KeyFileError, server_keys
    from .client import listen_address
    from .decoder import KV_TYPES
    from .lora import LoraError, lora_sources
    from .media_fetch import MediaAccess
    from .origins import is_loopback, parse_origins
    from .server import RequestError, ServeConfig, Service, keep_alive_seconds
    from .speculative import SpeculationError, speculation

    def fail(message: str) -> None:
        typer.echo(f"qvl serve: error: {message}", err=True)
        raise typer.Exit(2)

    try:
        env_host, env_port = listen_address(os.environ.get("QVL_HOST") or "127.0.0.1")
    except ValueError:
        fail(f"$QVL_HOST {os.environ.get('QVL_HOST')!r}: [http://]HOST[:PORT]")
    host, port = host or env_host, env_port if port is None else port
    if not 0 <= port <= 65535:
        fail(f"--port {port}: 0 to 65535")
    if ctx_size is None and (env_ctx := os.environ.get("QVL_CONTEXT_LENGTH")):  # as OLLAMA_CONTEXT_LENGTH
        if not env_ctx.strip().isdigit():
            fail(f"$QVL_CONTEXT_LENGTH {env_ctx!r}: a number of tokens")
        ctx_size = int(env_ctx)
    if ctx_size is not None and ctx_size < 1:
        fail(f"--ctx-size {ctx_size}: 1 or more")
    if gpu_layers is not None and gpu_layers < 0:
        fail(f"--gpu-layers {gpu_layers}: 0 or more")
    if max_vram is not None and max_vram <= 0:
        fail(f"--max-vram {max_vram}: a budget above 0 GB")
    if not cache_pool >= 0:
        fail(f"--cache-pool {cache_pool}: 0 (off) or more GB")
    if slot_save_path is not None and not slot_save_path.is_dir():
        fail(f"--slot-save-path {slot_save_path}: not a folder")
    if media_path is not None and not media_path.is_dir():
        fail(f"--media-path {media_path}: not a folder")
    try:
        keys = server_keys(api_key if api_key is not None else os.environ.get(ENV), api_key_file)
    except KeyFileError as e:
        fail(str(e))
    if (api_key is not None or api_key_file is not None) and not keys:
        fail("--api-key / --api-key-file: no key given")
    tls = None
    if (ssl_cert is None) != (ssl_key is None):
        fail("--ssl-cert-file and --ssl-key-file: give both")
    if ssl_cert is not None and ssl_key is not None:
        tls = (str(ssl_cert), str(ssl_key))
        try:
            tls_context(*tls)
        except (OSError, ssl.SSLError) as e:
            fail(f"--ssl-cert-file {ssl_cert}, --ssl-key-file {ssl_key}: {getattr(e, 'strerror', None) or e}")
    try:
        adapters = tuple((path, 0.0 if lora_off else s) for path, s in lora_sources(lora or [], lora_scaled or []))
    except LoraError as e:
        fail(str(e))
    try:
        spec = speculation(spec_type, spec_size_n, spec_size_m, spec_n_max, spec_mod_match, spec_mod_max,
                           spec_mod_min, (spec_k_n, spec_k_m, spec_k_hits), (spec_k4v_n, spec_k4v_m, spec_k4v_hits),
                           spec_p_min, spec_n_min, spec_draft_model is not None)
    except SpeculationError as e:
        fail(str(e))
    if adapters and model is None:
        fail("--lora / --lora-scaled: adapters of the MODEL given to qvl serve; name one")
    gpu_flags = [f for f, on in (("--gpu-layers", gpu_layers is not None), ("--max-vram", max_vram is not None)) if on]
    if cpu and gpu_flags:
        fail(f"--cpu with {', '.join(gpu_flags)}: choose one")
    if gpu_flags and not torch.cuda.is_available():
        typer.echo(f"qvl serve: warning: no CUDA GPU found; {', '.join(gpu_flags)} ignored, running on the CPU",
                   err=True)
        gpu_layers = max_vram = None
    try:
        keep_s = (keep_alive_seconds(keep_alive, "--keep-alive") if keep_alive is not None else
                  keep_alive_seconds(os.environ.get("QVL_KEEP_ALIVE") or "5m", "$QVL_KEEP_ALIVE"))
    except RequestError as e:
        fail(e.message)
    kv_type = cache_type or os.environ.get("QVL_KV_CACHE_TYPE") or None
    if kv_type is not None and kv_type not in KV_TYPES:
        fail(f"{'--cache-type' if cache_type else '$QVL_KV_CACHE_TYPE'} {kv_type}: choose {', '.join(KV_TYPES)}")
    device, placement = run_cli._placement(cpu, gpu_layers, "auto", max_vram, False, kv_type, False)
    allowed = parse_origins(origins if origins is not None else os.environ.get("QVL_ORIGINS"))
    config = ServeConfig(device, placement, max_vram if device == "cuda" else None, ctx_size, model, keep_s, allowed,
                         int(cache_pool * 1e9), str(slot_save_path) if slot_save_path else None, adapters, metrics,
                         spec, str(spec_draft_model) if spec_draft_model else None,
                         MediaAccess(not no_remote_media, media_path), keys, tls, alias or None)
    service = Service(config)
    if model is not None:
        try:
            service.use(model)
        except RequestError as e:
            fail(e.message)
        service.settle(time.time())

    def log(line: str) -> None:
        typer.echo(f"qvl serve: {time.strftime('%H:%M:%S')} {line}", err=True)

    def ready(server) -> None:
        bound_host, bound_port = server.server_address[:2]
        scheme = "https" if tls else "http"
        typer.echo(f"qvl serve: listening on {scheme}://{bound_host}:{bound_port} (Ollama's API; OpenAI's under /v1); "
                   "Ctrl-C stops", err=True)
        if not keys and not is_loopback(str(bound_host)):
            typer.echo(f"qvl serve: warning: {bound_host} is reachable from other machines and no --api-key is "
                       "set: whoever reaches it may use, pull and delete models", err=True)

    try:
        serve(service, host, port, log, ready)
    except OSError as e:
        fail(f"{host}:{port}: {e.strerror or e}")
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting is no traceback
        typer.echo("qvl serve: stopped", err=True)
