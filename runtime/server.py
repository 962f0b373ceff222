"""`qvl serve`: Ollama's HTTP API, and OpenAI's chat completions, over the model store.

    GET  /                      "qvl is running"
    GET  /api/version           {"version"}
    GET  /api/tags              the stored models, as Ollama lists them
    POST /api/show              {"model"}: details, parameters, template, system, modelfile
    POST /api/generate          {"model", "prompt", "images": [base64], "system", "raw", "format", "stream",
                                 "options", "logprobs", "top_logprobs", "context", "template"}: the reply's
                                 "context" sent back goes on from it; "template" (Ollama's) renders the prompt
                                 in place of the model's (generate_context.py)
    POST /api/chat              {"model", "messages": [{"role", "content", "images"}], "format", "stream", "options",
                                 "logprobs", "top_logprobs"}
    GET  /api/ps                the loaded model
    POST /api/copy              {"source", "destination"}
    POST /api/pull, /api/push   {"model", "insecure", "stream"}: as `qvl pull` / `qvl push` (store_api.py)
    POST /api/create            {"model", "from" or "files", "system", "template", "license", "parameters",
                                 "messages"} or {"model", "modelfile"} (store_api.py)
    HEAD, POST /api/blobs/DIGEST  a GGUF for create's "files", sent first (blob_upload.py)
    DELETE /api/delete          {"model"}
    POST /api/embed, /api/embeddings, /v1/embeddings: a text's embedding (embed_api.py)
    GET  /v1/models, /v1/models/NAME, POST /v1/chat/completions, POST /v1/completions: OpenAI's (openai_api.py)
    POST /v1/responses: OpenAI's Responses API, stateless (responses_api.py)
    POST /completion, GET /props: llama.cpp server's own completions and settings (llamacpp_completion.py)
    POST /v1/messages: Anthropic's (anthropic_api.py); GET /health, POST /tokenize, /detokenize (llamacpp_api.py)

One model is loaded at a time: a request naming another stored model replaces it. Requests for the model are
answered one at a time, in the thread that calls `serve` (http_serve.py; the endpoints that only read answer from
their connection's thread): the model has one KV cache (whose prompt cache keeps a conversation's earlier turns from
being read again), and torch's CPU ops ran slower from a second thread on a 2-core machine (a 3B Q4_K_M decoded
1.21x slower, the int4 op at 2048 x 2048 1.4x, small bf16 products 4.7x; likely libgomp, which spin-waits less once
two OpenMP teams' threads outnumber the cores).

A stored model's PARAMETERs and SYSTEM are defaults that a request's options and system prompt
override, as in Ollama; without num_predict an answer runs to its end or the context's (num_ctx,
default `qvl serve --ctx-size`, else 4096). Streams are Ollama's JSON lines or OpenAI's
server-sent events. Errors are {"error": message} with 400 (a bad request), 404 (no such model
or endpoint) or 500; an error in the middle of a stream is its last event. Only stored models and
the one file named to `qvl serve` (and its draft model) are opened: a request cannot make the server read another
file, and images come inline (base64), never fetched.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate_context import PromptError, context_ids, rendered, reply_context, request_prompt
from .go_template import TemplateError
from .ollama_template import stored_template
from .gguf_file import GGUFError, GGUFFile
from .inline_media import decode_image
from .media_fetch import MediaAccess
from .json_format import format_grammar
from .cache_pool import CachePool
from .draft_model import draft_for, open_draft
from .speculative import Drafter, Speculation  # draft_model.py: --spec-draft-model
from .loader import load, open_ended
from .logprobs import MAX_TOP, entries, new_scores, speller
from .lora import LoraError, LoraSource
from .model import PLAN_CTX, Model, ModelError
from .modelfile import (CHAIN_PARAMS, ModelfileError, check_params, generate_kwargs, modelfile_of, parameter_lines,
                        stored_chat_template, stored_defaults)
from .placement import Placement
from .request_error import RequestError
from .request_messages import request_messages
from .sampling import SamplingParams
from .store import Store, StoreError
from .usage import ServerUsage

VERSION = "0.1.0"
DEFAULT_PORT = 11434  # Ollama's


@dataclass(frozen=True)
class ServeConfig:
    device: str = "cpu"
    placement: Placement = Placement()
    max_vram: float | None = None
    ctx_size: int | None = None  # num_ctx when neither the request nor the model says
    default_model: str | None = None  # MODEL given to `qvl serve`: a GGUF file or a stored name
    keep_alive_s: float = 300.0  # how long a model stays loaded after its last request (inf: until replaced)
    origins: tuple[str, ...] = ()  # web origins allowed besides the local ones (origins.py; --origins)
    cache_pool_bytes: int = 0  # host memory for other conversations' KV caches (cache_pool.py; --cache-pool)
    slot_save_path: str | None = None  # where POST /slots/0?action=save|restore keeps its files (slots_api.py)
    lora: tuple[LoraSource, ...] = ()  # run-time adapters of default_model (--lora, --lora-scaled; lora_api.py)
    metrics: bool = False  # GET /metrics answers (--metrics; metrics_api.py)
    speculation: Speculation | None = None  # every model's drafts (--spec-type; speculative.py)
    draft_model: str | None = None  # every model's draft model (--spec-draft-model; draft_model.py)
    media: MediaAccess = MediaAccess()  # URLs a request's pictures may come by (--no-remote-media, --media-path)
    api_keys: tuple[str, ...] = ()  # a request must carry one (--api-key; api_keys.py); none: no check
    tls: tuple[str, str] | None = None  # HTTPS from these PEM files: certificate, key (--ssl-cert-file, --ssl-key-file)
    alias: str | None = None  # the name default_model (a GGUF file) answers to and is listed by (--alias)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
FOREVER_S = 292 * 365.25 * 86400  # Ollama's "forever": its largest duration, about 292 years


def keep_alive_seconds(value: Any, where: str = "keep_alive") -> float:
    """Ollama's keep_alive: seconds (a number, or a string of one), or a Go duration ("5m",
    "1h30m", "0"); negative: forever (math.inf)."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            body = text.removeprefix("-")
            parts = _DURATION.findall(body)
            if parts and "".join(n + u for n, u in parts) == body:
                seconds = sum(float(n) * _UNIT_S[u] for n, u in parts) * (-1 if text.startswith("-") else 1)
    if seconds is None or seconds != seconds:
        raise RequestError(400, f"{where} {value!r}: seconds, or a duration like 5m, 30s or 1h; -1 for forever")
    return math.inf if seconds < 0 else seconds


@dataclass
class Reply:
    """A JSON body, a text body, or a stream of JSON events (JSON lines, or server-sent events)."""

    body: Any = None
    events: Iterator[dict[str, Any]] | None = None
    sse: bool = False
    status: int = 200
    named_events: bool = False  # server-sent events named by their `type` (OpenAI's Responses API)
    sse_done: bool = True  # server-sent events end with `data: [DONE]` (OpenAI's chat and completions)


@dataclass
class Loaded:
    key: str  # the stored model's full name, or the file's path
    model: Model
    params: dict[str, Any] = field(default_factory=dict)  # stored PARAMETERs (checked)
    system: str | None = None  # stored SYSTEM
    load_s: float = 0.0  # for the request that loaded it

    def with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` with the stored SYSTEM first where they have no system message."""
        if self.system is None or messages[0]["role"] == "system":
            return messages
        return [{"role": "system", "content": self.system}, *messages]


def _vram() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _named(body: dict[str, Any]) -> str:
    """The model a request names (Ollama's `model`, or its older `name`)."""
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(400, "model: required")
    return name


def _store_error(e: StoreError) -> RequestError:
    return RequestError(404 if "not found" in str(e) else 400, str(e))


def generation_options(stored: dict[str, Any], options: Any, default_ctx: int | None) -> dict[str, Any]:
    """Model.generate's keyword arguments from the model's stored parameters and a request's
    `options` (Ollama's names; the request's win, names qvl does not use are ignored)."""
    if not isinstance(options, dict):
        raise RequestError(400, "options: a JSON object")
    try:
        merged = {**stored, **check_params(options, strict=False)}
    except ModelfileError as e:
        raise RequestError(400, f"options: {e}") from None
    # Ollama's default num_predict -1: until the answer ends or the context is full
    n, ctx = open_ended(merged.get("num_predict", -1), merged.get("num_ctx") or default_ctx)
    keep = (*SamplingParams.__dataclass_fields__, "stop", *CHAIN_PARAMS)  # the sampler chain's as `chain`
    return {"max_new_tokens": n, "ctx_size": ctx, **generate_kwargs({k: v for k, v in merged.items() if k in keep})}


def top_logprobs(value: Any, where: str) -> int:
    """A request's count of alternatives to each token's logprob (OpenAI's and Ollama's 0 to 20)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP:
        raise RequestError(400, f"{where} {value!r}: 0 to {MAX_TOP}")
    return value


def unsupported(body: dict[str, Any], name: str) -> None:
    """A 400 for what a Qwen2-VL / Qwen2.5-VL model cannot do that a request asks, as Ollama answers
    a model without the capability, rather than an answer that silently lacks it: tools (the
    chat template writes none), thinking, fill-in-the-middle (no FIM tokens)."""
    if body.get("tools"):
        raise RequestError(400, f"{name} does not support tools")
    if body.get("think") not in (None, False):  # true, or a level ("low", "medium", "high")
        raise RequestError(400, f"{name} does not support thinking")
    if body.get("suffix"):
        raise RequestError(400, f"{name} does not support insert (suffix: no fill-in-the-middle tokens)")


def answer_format(body: dict[str, Any]) -> Any:
    """Model.generate's `format` from Ollama's `format` ("json", a JSON schema; "" or none: free
    text), OpenAI's `response_format` (json_object, json_schema; text: free text) or llama.cpp's
    server's `grammar` (GBNF text: a gbnf Grammar) or `json_schema`."""
    if body.get("grammar") not in (None, ""):
        from .gbnf import GrammarError, parse_gbnf

        if not isinstance(body["grammar"], str) or body.get("format") or body.get("response_format"):
            raise RequestError(400, "grammar: GBNF text, without format or response_format")
        try:
            return parse_gbnf(body["grammar"])
        except GrammarError as e:
            raise RequestError(400, str(e)) from None
    if body.get("json_schema") is not None:  # llama.cpp server's field
        if body.get("format") or body.get("response_format"):
            raise RequestError(400, "json_schema: a JSON schema, without format or response_format")
        value, where = body["json_schema"], "json_schema"
        if not isinstance(value, dict):
            raise RequestError(400, "json_schema: a JSON schema (an object)")
    elif "response_format" in body:
        rf = body["response_format"]
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return "json"
        spec = rf.get("json_schema") if kind == "json_schema" else None
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError(400, "response_format: {\"type\": \"json_object\"}, {\"type\": \"json_schema\", "
                                    "\"json_schema\": {\"schema\": {...}}} or {\"type\": \"text\"}")
        value, where = spec["schema"], "response_format.json_schema.schema"
    else:
        value, where = body.get("format"), "format"
        if value in (None, ""):
            return None
    if value != "json" and not isinstance(value, dict):
        raise RequestError(400, f'{where} {value!r}: "json" or a JSON schema')
    try:
        format_grammar(value)
    except ValueError as e:
        raise RequestError(400, f"{where}: {e}") from None
    return value


class Service:
    """The endpoints, over one loaded model at a time."""

    def __init__(self, config: ServeConfig, store: Store | None = None,
                 loader: Callable[..., Model] = load):
        self.config, self.store, self.loader = config, store or Store(), loader
        self.loaded: Loaded | None = None
        self._ids = itertools.count(1)
        self._keep_s = config.keep_alive_s  # the last request's keep_alive
        self.expires: float | None = None  # time.time() at which the idle model is unloaded; None while in use
        self.lora_scales: dict[str, list[float]] = {}  # each model's adapter scales, as POST /lora-adapters set them
        self.usage = ServerUsage()  # every loaded model's generations counted (usage.py; GET /metrics)

    # -- models -------------------------------------------------------------------------------

    def use(self, name: Any, keep_alive: Any = None, lora: Any = None) -> Loaded:
        """The model a request names (loading it, in place of the one loaded before), kept
        `keep_alive` (the server's default when None) after the request is done (`settle`), its
        run-time adapters at the request's `lora` scales (llama.cpp's [{"id", "scale"}]: those
        left out at 0) or, without, at the model's own (lora_api.py)."""
        loaded = self._use(name, keep_alive)
        adapters = loaded.model.adapters
        scales = self.lora_scales.get(loaded.key)
        if scales is None or len(scales) != len(adapters.adapters):
            scales = self.lora_scales[loaded.key] = adapters.scales()
        try:
            adapters.set_scales(scales if lora is None or lora == [] else adapters.asked(lora))
        except LoraError as e:
            raise RequestError(400, str(e)) from None
        return loaded

    def _use(self, name: Any, keep_alive: Any) -> Loaded:
        self._keep_s = self.config.keep_alive_s if keep_alive is None else keep_alive_seconds(keep_alive)
        self.expires = None
        name = name if name else self.config.default_model
        if not isinstance(name, str) or not name:
            raise RequestError(400, "model: required (a stored model's name)")
        if name == self.default_file_name():  # the GGUF file qvl serve was given, by the name it shows
            name = self.config.default_model
        if name == self.config.default_model and Path(name).is_file():
            key, params, system, messages, stored = name, {}, None, [], False
            path, projector, adapters = Path(name), None, []  # load() finds the mmproj beside it
        else:
            try:
                entry = self.store.get(name)
            except StoreError:
                raise RequestError(404, f"model '{name}' not found (qvl pull it first)") from None
            key, stored = str(entry.name), True
            try:
                params, system = stored_defaults(self.store, name)
                messages = self.store.messages(entry)
                path, projector = self.store.resolve(name)
                adapters = self.store.adapters(entry)
            except StoreError as e:
                raise RequestError(500, str(e)) from None
        if self.loaded is not None and self.loaded.key == key:
            self.loaded.load_s = 0.0
            return self.loaded
        try:  # a stored TEMPLATE: parsed (and tried) when its model is loaded, not at every request
            template = stored_chat_template(self.store, name) if stored else None
        except StoreError as e:
            raise RequestError(500, str(e)) from None
        self._free()  # the old model's memory goes before the new one is read
        t0 = time.perf_counter()
        try:  # the draft model first: on a GPU the model's plan fits in what it leaves
            draft = open_draft(self.config.draft_model, self.config.device, False) if self.config.draft_model else None
            model = self.loader(path, mmproj=projector, device=self.config.device, placement=self.config.placement,
                                max_vram=self.config.max_vram, plan_ctx=self.config.ctx_size or PLAN_CTX,
                                lora=[(a, 1.0) for a in adapters] + list(self._default_lora(key)))
            model.drafter = Drafter(draft_for(model, draft) if draft else None)
        except (GGUFError, ModelError, StoreError, KeyError, ValueError) as e:
            raise RequestError(500, f"model '{name}': {str(e).strip(chr(39) + chr(34))}") from None
        model.usage, model.speculation = self.usage.total, self.config.speculation
        if self.config.cache_pool_bytes > 0:  # conversations taking turns keep their caches (cache_pool.py)
            model.cache_pool = CachePool(self.config.cache_pool_bytes)
        if messages:  # the stored MESSAGE lines: every prompt follows that conversation (Model.defaults)
            model.defaults = {"messages": messages}
        if template is not None:  # a stored TEMPLATE renders its prompts (ollama_template.py)
            model.chat_template = template
        self.loaded = Loaded(key, model, params, system, time.perf_counter() - t0)
        return self.loaded

    def settle(self, now: float) -> None:
        """A request is done: the idle model's time to go starts."""
        if self.loaded is not None and self.expires is None:
            self.expires = now + self._keep_s

    def expire(self, now: float) -> str | None:
        """Unloads the model if it has been idle its keep_alive; the name of the one it unloaded."""
        if self.loaded is None or self.expires is None or now < self.expires:
            return None
        name = self._name(self.loaded)
        self._free()
        return name

    def _free(self) -> None:
        self.loaded, self.expires = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _name(self, loaded: Loaded) -> str:
        return loaded.key if loaded.key != self.config.default_model else self.default_file_name() or loaded.key

    def default_file_name(self) -> str | None:
        """The name the GGUF file given to qvl serve shows and answers to: its --alias, else the
        file's name (None: no file given, or a stored model's name)."""
        default = self.config.default_model
        if default is None or not Path(default).is_file():
            return None
        return self.config.alias or Path(default).name

    # -- Ollama ---------------------------------------------------------------------------------

    def tags(self, body: dict[str, Any]) -> Reply:
        models = []
        for e in self.store.list():
            config = {}
            try:
                config = json.loads(self.store.blob_path(e.manifest["config"]["digest"]).read_text())
            except (OSError, ValueError):
                pass
            models.append({"name": str(e.name), "model": str(e.name),
                           "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.modified)),
                           "size": e.size, "digest": e.digest.removeprefix("sha256:"),
                           "details": {"format": "gguf", "family": config.get("model_family", ""),
                                       "families": config.get("model_families", []),
                                       "parameter_size": config.get("model_type", ""),
                                       "quantization_level": config.get("file_type", "")}})
        return Reply({"models": models})

    def show(self, body: dict[str, Any]) -> Reply:
        name = _named(body)
        try:
            entry = self.store.get(name)
            params, system = stored_defaults(self.store, name)
            out = {"modelfile": modelfile_of(self.store, name),
                   "parameters": "\n".join(parameter_lines(params)),
                   "template": self.store.text(entry, "template") or ""}
        except StoreError as e:
            raise RequestError(404 if "not found" in str(e) else 500, str(e)) from None
        if system is not None:
            out["system"] = system
        if messages := self.store.messages(entry):
            out["messages"] = messages
        out["details"] = next((m["details"] for m in self.tags({}).body["models"] if m["name"] == str(entry.name)), {})
        out["model_info"], vision = self._model_info(name)
        out["capabilities"] = ["completion"] + (["vision"] if vision else [])
        out["modified_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.modified))
        return Reply(out)

    def _model_info(self, name: str) -> tuple[dict[str, Any], bool]:
        """The model GGUF's metadata as Ollama's show gives it (long arrays as null), and whether
        the model sees pictures (a projector, or Ollama's one-file layout)."""
        model, projector = self.store.resolve(name)
        try:
            with GGUFFile(model) as g:
                info = {k: (None if isinstance(v.value, list) and len(v.value) > 64 else v.value)
                        for k, v in g.fields.items()}
                vision = projector is not None or g.architecture == "qwen25vl"
        except GGUFError as e:
            raise RequestError(500, str(e)) from None
        return info, vision

    def generate(self, body: dict[str, Any]) -> Reply:
        if not body.get("prompt") and not body.get("images") and body.get("keep_alive") in (0, "0", "0s"):
            return self._unload(body.get("model"))  # Ollama's way to unload a model
        loaded = self.use(body.get("model"), body.get("keep_alive"))
        unsupported(body, self._name(loaded))
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt: a string")
        images = body.get("images") or []
        if not isinstance(images, list):
            raise RequestError(400, "images: a list of base64 strings")
        pictures = [decode_image(b, f"images[{i}]", self.config.media) for i, b in enumerate(images)]
        kwargs = generation_options(loaded.params, body.get("options") or {}, self.config.ctx_size)
        name = self._name(loaded)
        if not prompt and not pictures:  # Ollama's way to load a model
            return Reply({"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})
        system = body.get("system") if isinstance(body.get("system"), str) else loaded.system
        top = top_logprobs(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
        model, raw = loaded.model, bool(body.get("raw", False))
        try:
            template = body.get("template")
            if template is not None and not isinstance(template, str):
                raise PromptError("template: a string, Ollama's template syntax")
            asked = request_prompt(model, context_ids(body.get("context")), prompt, pictures, raw, system,
                                   None if raw else stored_template(template, "template"))
        except (PromptError, TemplateError) as e:
            raise RequestError(400, str(e)) from None
        pieces = model.generate(asked.text, asked.images, stream=True, system=system, template=asked.template,
                                format=answer_format(body), logprobs=top, **kwargs)
        return self._ollama(loaded, name, pieces, body.get("stream", True), "response", top is not None,
                            lambda answer: {"context": reply_context(model, rendered(model, asked, system), answer)})

    def _unload(self, name: Any) -> Reply:
        loaded = self.loaded
        if loaded is not None and (not name or name in (loaded.key, self._name(loaded))
                                   or (isinstance(name, str) and self._stored_key(name) == loaded.key)):
            self._free()
        return Reply({"model": name or "", "created_at": _now(), "response": "", "done": True,
                      "done_reason": "unload"})

    def _default_lora(self, key: str) -> tuple[LoraSource, ...]:
        """qvl serve's --lora adapters where `key` is its MODEL's."""
        default = self.config.default_model
        if not self.config.lora or default is None:
            return ()
        return self.config.lora if key in (default, self._stored_key(default)) else ()

    def _stored_key(self, name: str) -> str | None:
        try:
            return str(self.store.get(name).name)
        except StoreError:
            return None

    def chat(self, body: dict[str, Any]) -> Reply:
        loaded = self.use(body.get("model"), body.get("keep_alive"))
        unsupported(body, self._name(loaded))
        messages = loaded.with_system(request_messages(body.get("messages"), "images", self.config.media))
        kwargs = generation_options(loaded.params, body.get("options") or {}, self.config.ctx_size)
        top = top_logprobs(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
        pieces = loaded.model.chat(messages, stream=True, format=answer_format(body), logprobs=top, **kwargs)
        return self._ollama(loaded, self._name(loaded), pieces, body.get("stream", True), "message", top is not None)

    def _ollama(self, loaded: Loaded, name: str, pieces: Iterator[str], stream: Any, key: str,
                scoring: bool, extra: Callable[[str], dict[str, Any]] | None = None) -> Reply:
        """Ollama's reply: one object, or a stream of them; with `scoring` (logprobs), each
        carries the logprobs of the tokens scored since the one before (the whole answer's, unstreamed);
        the last one `extra`'s fields for the whole answer (/api/generate's context)."""
        started = time.perf_counter() - loaded.load_s
        spell, sent = speller(loaded.model.tokenizer) if scoring else None, [0]

        def scores() -> dict[str, Any]:
            if spell is None:
                return {}
            new = new_scores(loaded.model, sent)
            return {"logprobs": entries(spell, new)} if new else {}

        def wrap(text: str) -> Any:
            return text if key == "response" else {"role": "assistant", "content": text}

        def final(text: str) -> dict[str, Any]:
            g = loaded.model.last_generation
            assert g is not None
            return {"model": name, "created_at": _now(), key: wrap(text), "done": True,
                    "done_reason": "stop" if g.ended else "length",
                    "total_duration": _ns(time.perf_counter() - started), "load_duration": _ns(loaded.load_s),
                    "prompt_eval_count": g.prompt_tokens,
                    "prompt_eval_duration": _ns(g.timings.get("prefill_s", 0.0) + g.timings.get("vision_ms", 0.0) / 1e3),
                    "eval_count": len(g.token_ids), "eval_duration": _ns(g.timings.get("decode_s", 0.0)), **scores(),
                    **(extra(g.text) if extra is not None else {})}

        if stream is False:
            return Reply(final("".join(pieces)))

        def events() -> Iterator[dict[str, Any]]:
            for piece in pieces:
                yield {"model": name, "created_at": _now(), key: wrap(piece), "done": False, **scores()}
            yield final("")

        return Reply(events=events())

    def ps(self, body: dict[str, Any]) -> Reply:
        """The loaded model, as Ollama's `ps` lists running ones (read in a connection's thread
        while the serving thread may unload it: from one look at it)."""
        loaded, expires = self.loaded, self.expires
        if loaded is None:
            return Reply({"models": []})
        name = self._name(loaded)
        details = next((m for m in self.tags({}).body["models"] if m["name"] == loaded.key), {})
        until = expires if expires is not None else time.time() + self._keep_s
        expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + min(until - time.time(), FOREVER_S)))
        return Reply({"models": [{"name": name, "model": name, "size": details.get("size", 0),
                                  "digest": details.get("digest", ""), "details": details.get("details", {}),
                                  "expires_at": expires_at, "size_vram": _vram()}]})

    def copy(self, body: dict[str, Any]) -> Reply:
        source, target = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not isinstance(target, str):
            raise RequestError(400, "source and destination: model names")
        try:
            self.store.copy(source, target)
        except StoreError as e:
            raise _store_error(e) from None
        return Reply("")

    def delete(self, body: dict[str, Any]) -> Reply:
        name = _named(body)
        try:
            key = str(self.store.get(name).name)
            self.store.remove(name)
        except StoreError as e:
            raise _store_error(e) from None
        if self.loaded is not None and self.loaded.key == key:
            self._free()  # its blobs are gone
        return Reply("")


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/"): lambda s, b: Reply("qvl is running"),
    ("GET", "/api/version"): lambda s, b: Reply({"version": VERSION}),
    ("GET", "/api/tags"): Service.tags,
    ("POST", "/api/show"): Service.show,
    ("POST", "/api/generate"): Service.generate,
    ("POST", "/api/chat"): Service.chat,
    ("GET", "/api/ps"): Service.ps,
    ("POST", "/api/copy"): Service.copy,
    ("DELETE", "/api/delete"): Service.delete,
}
