"""`qvl serve`'s POST /completion: llama.cpp server's own completion endpoint (SillyTavern's,
Continue's and the llama.cpp web UI's older way in), the prompt continued as it is.

`prompt` is a string, token ids ([12, 34, ...], or mixed with texts: [12, "text", 34]), or llama.cpp's
multimodal object {"prompt_string", "multimodal_data": [base64 picture, ...]} whose `<__media__>`
markers place the pictures. Read: n_predict, temperature, top_k,
top_p, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, typical_p,
top_n_sigma, xtc_probability, xtc_threshold, dynatemp_range, dynatemp_exponent, dry_multiplier,
dry_base, dry_allowed_length, dry_penalty_last_n, dry_sequence_breakers, mirostat, mirostat_tau,
mirostat_eta, adaptive_target, adaptive_decay, samplers (the order: names or characters; by default
llama.cpp's, temperature last: sampler_chain.ORDER_LLAMACPP; the penalties and DRY see the prompt's
text tokens before the answer's, as llama-server's do), seed (-1: a random one), stop, ignore_eos,
logit_bias (llama.cpp's [[id or text, bias or false], ...] or {"id or text": bias}), n_probs (any
number, or its alias logprobs; post_sampling_probs: the sampler chain's probabilities), grammar,
json_schema, cache_prompt, return_tokens, stream, timings_per_token, return_progress, lora (the
request's adapter scales, lora_api.py), response_fields (the reply's fields kept, llama-server's:
"generation_settings/n_predict" brings a nested one up under that name).
Unset, a sampler takes the model's stored PARAMETER, else qvl's default (greedy), as qvl's other
endpoints do (llama.cpp's server samples at 0.8 by default). n_indent and t_max_predict_ms are
refused when asked for, not ignored; left at 0 they are fine. Several prompts (a list of
prompts, as llama-server's batch: strings, token-id lists or multimodal objects; up to MAX_PROMPTS)
and n_cmpl (or its alias n: completions a prompt, up to MAX_COMPLETIONS; each after the first with
the seed one more, as llama-server's child tasks) are answered one after another, prompt k's
completions at index k * n_cmpl ...: an array of replies where there are several (one: the reply
alone), a stream of all of their events, each with its index.

The reply is llama.cpp's: content, tokens, stop, stop_type (eos, limit, word), stopping_word, has_new_line,
tokens_predicted, tokens_evaluated, tokens_cached, truncated, timings (cache_n; prompt_* and
predicted_*: n, ms, per token ms, per second; draft_n and draft_n_accepted under --spec-type),
generation_settings, completion_probabilities with n_probs;
a stream is server-sent `data:` events of {content, tokens (the chunk's ids), stop: false,
tokens_predicted, tokens_evaluated} (completion_probabilities of the chunk's tokens with
n_probs; with timings_per_token the timings so far, live.py; with return_progress, events of no
content with prompt_progress {total, cache, processed, time_ms} before the prompt is read, after
each 2048 of its tokens and at its end), then the whole reply's fields with
stop true, and no [DONE] (llama.cpp's own endpoint sends none). GET /props tells a
client the default model's settings, whether it sees pictures and the picture marker.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import partial
from collections.abc import Callable, Iterator
from typing import Any

from .generation import llama_timings
from .inline_media import decode_image
from .live import Live, PromptProgress, asks_progress
from .media_fetch import MediaAccess
from .logprobs import entries, new_scores, speller
from .modelfile import CHAIN_PARAMS
from .model import PLAN_CTX
from .sampler_chain import ORDER_LLAMACPP, ChainOptions
from .sampling import RANDOM_SEED, SamplingError, SamplingParams
from .server import VERSION, Loaded, Reply, RequestError, Service, answer_format, generation_options
from .tokenizer import stop_word

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: one picture's place in the prompt
PICTURE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"  # what a picture is in a Qwen2-VL prompt
NAMES = {"n_predict": "num_predict", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
         "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
         "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
         "stop": "stop"}
CHAIN = ("typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent",
         "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "mirostat", "mirostat_tau",
         "mirostat_eta", "adaptive_target", "adaptive_decay")
# what qvl does not do, and the values at which it is off
OFF = {"n_indent": 0, "t_max_predict_ms": 0}
MAX_COMPLETIONS = 16  # OpenAI's n and llama-server's n_cmpl: completions a prompt, made one after another
MAX_PROMPTS = 256  # prompts a request (lm-evaluation-harness batches them), read in turn


def token_ids(prompt: Any, tokenizer: Any) -> list[int] | None:
    """llama-server's prompt of token ids, or of texts and ids ([12, "text", 34]: each text's tokens
    in its place, special tokens' names read as those tokens), as one list of ids; None for a prompt
    of no ids (a string, or a list of strings: several prompts)."""
    if not isinstance(prompt, list) or not any(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return None
    ids: list[int] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            ids += tokenizer.encode(p, add_special_tokens=False).ids
        elif isinstance(p, int) and not isinstance(p, bool):
            ids.append(p)
        else:
            raise RequestError(400, f"prompt[{i}]: a token id or a string, in a prompt of token ids")
    return ids


def prompt_text(prompt: str | list[int], tokenizer: Any) -> str:
    """A prompt as text: token ids decoded, special tokens' names kept."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)


def each_completion(n: Any, key: str, kwargs: dict[str, Any], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Model.generate's keyword arguments for each of a prompt's `n` completions (OpenAI's n,
    llama-server's n_cmpl), made one after another: as llama-server's child tasks, each after the
    first with the seed one more than the one before (the request's, else the model's stored one,
    else qvl's; modulo 2^32), a random seed (-1) left random."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_COMPLETIONS:
        raise RequestError(400, f"{key} {n!r}: 1 to {MAX_COMPLETIONS} choices")
    seed = kwargs.get("seed", defaults.get("seed", SamplingParams.seed))
    if seed in (-1, RANDOM_SEED):
        return [kwargs] * n
    return [{**kwargs, "seed": (seed + i) % 2**32} if i else kwargs for i in range(n)]


def _prompts(body: dict[str, Any], model: Any, access: MediaAccess) -> list[tuple[str | list[int], list[Any]]]:
    """The request's prompts: one, or several (a list with no token id in it: llama-server's batch),
    each checked before any is answered; pictures by URL as `access` allows."""
    prompt = body.get("prompt", "")
    several = isinstance(prompt, list) and not any(_is_id(p) for p in prompt)
    if several and not 0 < len(prompt) <= MAX_PROMPTS:
        raise RequestError(400, f"prompt: a list of 1 to {MAX_PROMPTS} prompts")
    out = [_prompt(p, model.tokenizer, f"prompt[{i}]" if several else "prompt", access)
           for i, p in enumerate(prompt if several else [prompt])]
    check_ids([p for p, _ in out], model)
    return out


def check_ids(prompts: list[str | list[int]], model: Any) -> None:
    """Each token-id prompt checked (Model.tokenize's ModelError for a bad id) before any prompt is
    answered, not after the prompts before it."""
    for prompt in prompts:
        if not isinstance(prompt, str):
            model.tokenize(prompt, [])


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(prompt: Any, tokenizer: Any, where: str, access: MediaAccess) -> tuple[str | list[int], list[Any]]:
    """One prompt's text, each picture's marker made a picture's slot, and its pictures; or its
    token ids. `where`: its name in errors."""
    if (ids := token_ids(prompt, tokenizer)) is not None:
        return ids, []
    if isinstance(prompt, str):
        text, data = prompt, []
    elif isinstance(prompt, dict) and isinstance(prompt.get("prompt_string"), str):
        text, data = prompt["prompt_string"], prompt.get("multimodal_data", [])
        if not isinstance(data, list):
            raise RequestError(400, f"{where}.multimodal_data: a list of base64 pictures")
    else:
        raise RequestError(400, f"{where}: a string, token ids or {{\"prompt_string\", \"multimodal_data\"}}")
    if text.count(MEDIA_MARKER) != len(data):
        raise RequestError(400, f"{where}: {text.count(MEDIA_MARKER)} {MEDIA_MARKER} markers for {len(data)} "
                                "pictures in multimodal_data")
    pictures = [decode_image(d, f"{where}.multimodal_data[{i}]", access) for i, d in enumerate(data)]
    return text.replace(MEDIA_MARKER, PICTURE_SLOT), pictures


def _biases(value: Any, model: Any) -> dict[int, float]:
    """llama.cpp's logit_bias: [[id or text, bias or false], ...] or {"id or text": bias}; a text's
    tokens each get the bias; false bans."""
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list):
        raise RequestError(400, "logit_bias: [[token id or text, bias or false], ...] or {\"id or text\": bias}")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RequestError(400, f"logit_bias: {pair!r} is not a [token, bias] pair")
        key, bias = pair
        if bias is False:
            bias = float("-inf")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise RequestError(400, f"logit_bias: {pair!r}: the bias is a number or false")
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        ids = [key] if isinstance(key, int) and not isinstance(key, bool) else (
            model.tokenizer.encode(key, add_special_tokens=False).ids if isinstance(key, str) else None)
        if ids is None:
            raise RequestError(400, f"logit_bias: {pair!r}: the token is an id or a text")
        out.update({t: float(bias) for t in ids})
    return out


def _kwargs(loaded: Loaded, service: Service, body: dict[str, Any]) -> dict[str, Any]:
    for key, off in OFF.items():
        if body.get(key, off) not in (off, None):
            raise RequestError(400, f"{key} {body[key]!r}: not done by qvl serve (leave it at {off})")
    options = {NAMES[k]: v for k, v in body.items() if k in NAMES and v is not None}
    kwargs = generation_options(loaded.params, options, service.config.ctx_size)
    bias = _biases(body.get("logit_bias") or [], loaded.model)
    if body.get("ignore_eos"):
        bias.update({t: float("-inf") for t in loaded.model.stop_ids})
    if bias:
        kwargs["logit_bias"] = bias
    kwargs["cache_prompt"] = bool(body.get("cache_prompt", True))
    kwargs["chain"] = replace(request_chain(body, ORDER_LLAMACPP, kwargs.get("chain")), prompt_seen=True,
                              post_sampling_probs=bool(body.get("post_sampling_probs")))
    return kwargs


def _chain_settings(chain: ChainOptions) -> dict[str, Any]:
    """The chain's settings as llama.cpp's generation_settings give them (typical_p 1 and
    top_n_sigma -1: off)."""
    off = {"typical_p": 1.0, "top_n_sigma": -1.0}
    values = {k: off[k] if getattr(chain, k) is None else getattr(chain, k) for k in CHAIN}
    return {**values, "dry_sequence_breakers": list(chain.dry_sequence_breakers), "samplers": list(chain.order)}


def request_chain(body: dict[str, Any], order: tuple[str, ...] | None, stored: ChainOptions | None) -> ChainOptions:
    """A request's sampler chain by llama.cpp's field names: its `samplers` order (else `order`;
    None: qvl's) and its samplers' options, over a stored model's (its typical_p and mirostat
    PARAMETERs: `stored`)."""
    given = {k: body[k] for k in CHAIN if body.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, f"{key} {value!r}: a number")
        if key in ("dry_allowed_length", "dry_penalty_last_n", "mirostat") and (value != int(value) or value < 0):
            raise RequestError(400, f"{key} {value!r}: a whole number, 0 or more")
    if given.get("dry_base", 1.75) < 1:  # llama.cpp's server keeps its default then
        given["dry_base"] = 1.75
    breakers = body.get("dry_sequence_breakers")
    if breakers is not None:
        if not isinstance(breakers, list) or not breakers or not all(isinstance(b, str) for b in breakers):
            raise RequestError(400, "dry_sequence_breakers: a non-empty list of texts")
        given["dry_sequence_breakers"] = tuple(breakers)
    given.update({k: int(given[k]) for k in ("dry_allowed_length", "dry_penalty_last_n", "mirostat") if k in given})
    try:
        base = {} if stored is None else {k: getattr(stored, k) for k in CHAIN_PARAMS}
        return ChainOptions(**{**base, "samplers": body.get("samplers") or order, **given})
    except SamplingError as e:
        raise RequestError(400, str(e)) from None


def spec_types(model: Any) -> str:
    """llama-server's `speculative.types`: --spec-type's drafters, ',' between (none: off)."""
    return ",".join(model.speculation.types) if model.speculation is not None else "none"


def complete(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"), lora=body.get("lora"))
    model = loaded.model
    asked = _prompts(body, model, service.config.media)
    kwargs = _kwargs(loaded, service, body)
    key = "n_cmpl" if "n_cmpl" in body else "n"  # llama-server's alias
    each = each_completion(body.get(key, 1), key, kwargs, model.defaults)
    top = _n_probs(body, model.cfg.n_vocab)
    chain = kwargs["chain"]
    settings = ({k: body[k] for k in NAMES if k in body} | _chain_settings(chain) |
                {"n_ctx": kwargs.get("ctx_size"), "model": service._name(loaded),
                 "speculative.types": spec_types(model)})
    stops = list(kwargs.get("stop") or [])
    form, progress, tokens_too = answer_format(body), asks_progress(body), bool(body.get("return_tokens"))
    spell = speller(model.tokenizer)
    runs = [(k, j) for k in range(len(asked)) for j in range(len(each))]  # prompt k's completion j
    kept = partial(response_fields, _field_paths(body.get("response_fields")))

    def run(k: int, j: int) -> tuple[Iterator[str | PromptProgress], Callable[[str, bool], dict[str, Any]]]:
        text, pictures = asked[k]
        t0 = time.perf_counter()
        pieces = model.generate(text, pictures, stream=True, template=False, format=form, logprobs=top,
                                progress=progress, **each[j])

        def whole(content: str, probabilities: bool = True) -> dict[str, Any]:
            g = model.last_generation
            assert g is not None
            said = model.tokenizer.decode(g.token_ids, skip_special_tokens=True)
            word = stop_word(said, content, stops) if g.ended else None
            out = {"index": k * len(each) + j, "content": content, "tokens": g.token_ids if tokens_too else [],
                   "id_slot": 0, "stop": True, "model": service._name(loaded), "tokens_predicted": len(g.token_ids),
                   "tokens_evaluated": g.prompt_tokens, "tokens_cached": g.reused_tokens,
                   "generation_settings": settings, "prompt": prompt_text(text, model.tokenizer),
                   "has_new_line": "\n" in content, "truncated": False,
                   "stop_type": "word" if word is not None else "eos" if g.ended else "limit",
                   "stopping_word": word or "",
                   "timings": llama_timings(g, time.perf_counter() - t0)}
            if probabilities and top is not None and g.logprobs is not None:
                out["completion_probabilities"] = completion_probabilities(spell, g.logprobs,
                                                                           chain.post_sampling_probs)
            return out

        return pieces, whole

    if not body.get("stream", False):
        replies = []
        for k, j in runs:  # each reply made as soon as its generation ends (model.last_generation)
            pieces, whole = run(k, j)
            replies.append(kept(whole("".join(pieces))))
        return Reply(replies[0] if len(replies) == 1 else replies)  # llama-server's: one alone, several a list

    def events() -> Iterator[dict[str, Any]]:
        for k, j in runs:
            sent = [0]
            chunk = None if top is None else (lambda: completion_probabilities(spell, new_scores(model, sent),
                                                                               chain.post_sampling_probs))
            yield from _stream(*run(k, j), chunk, lambda: model.live, bool(body.get("timings_per_token")),
                               k * len(each) + j, kept)

    return Reply(events=events(), sse=True, sse_done=False)


def _field_paths(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(400, "response_fields: a list of field names (a/b: field b of a)")
    return value


def response_fields(paths: list[str], reply: dict[str, Any]) -> dict[str, Any]:
    """llama-server's response_fields: the reply's fields at `paths` ("a/b": field b of a, under
    the name "a/b"), those it lacks left out; no paths: the whole reply."""
    if not paths:
        return reply
    out = {}
    for path in paths:
        value: Any = reply
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


def _n_probs(body: dict[str, Any], n_vocab: int) -> int | None:
    """llama.cpp's n_probs (or its alias `logprobs`): the alternatives reported a token, none at 0."""
    value = body.get("n_probs", body.get("logprobs"))
    if value is None or value is False or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(400, f"n_probs {value!r}: a whole number, 0 or more")
    return min(value, n_vocab)


def completion_probabilities(spell: Any, scored: list[Any], post_sampling: bool) -> list[dict[str, Any]]:
    """completion_probabilities as llama.cpp's server writes them: each token's id, text, bytes and
    logprob with its top_logprobs; with post_sampling_probs, probabilities from the sampler chain's
    distribution instead ("prob", "top_probs")."""
    out = []
    for s, e in zip(scored, entries(spell, scored)):
        tops = [{"id": i, **t} for (i, _), t in zip(s.top, e["top_logprobs"])]
        if post_sampling:
            e = {"token": e["token"], "bytes": e["bytes"], "prob": math.exp(e["logprob"])}
            tops = [{"id": t["id"], "token": t["token"], "bytes": t["bytes"], "prob": math.exp(t["logprob"])}
                    for t in tops]
            out.append({"id": s.token, **e, "top_probs": tops})
        else:
            out.append({"id": s.token, **e, "top_logprobs": tops})
    return out


def _stream(pieces: Iterator[str | PromptProgress], whole: Callable[[str, bool], dict[str, Any]],
            probabilities: Callable[[], list[dict[str, Any]]] | None, live: Callable[[], Live],
            per_token: bool, index: int = 0,
            kept: Callable[[dict[str, Any]], dict[str, Any]] = lambda reply: reply) -> Iterator[dict[str, Any]]:
    """The stream's events: each piece with the ids of the tokens made since the one before, the
    count made so far (tokens_predicted) and the prompt's (tokens_evaluated), with `per_token` the
    timings so far, and (n_probs) those tokens' probabilities, as llama-server sends them a chunk
    at a time; a PromptProgress as an event of no content; then the whole reply's fields without
    them (`kept`: the fields response_fields keeps). `live`: the running generation (Model.live);
    `index`: the completion's, in a batch."""
    said, sent = [], 0
    for piece in pieces:
        now = live()
        text = "" if isinstance(piece, PromptProgress) else piece
        said.append(text)
        event = {"index": index, "content": text, "tokens": now.ids[sent:], "stop": False, "id_slot": 0,
                 "tokens_predicted": len(now.ids), "tokens_evaluated": now.n_prompt}
        sent = len(now.ids)
        if per_token:
            event["timings"] = now.timings()
        if isinstance(piece, PromptProgress):
            event["prompt_progress"] = piece.to_json()
        elif probabilities is not None and (new := probabilities()):
            event["completion_probabilities"] = new
        yield event
    yield kept({**whole("".join(said), False), "content": ""})


def props(service: Service, body: dict[str, Any]) -> Reply:
    """GET /props, llama.cpp server's: the default model's settings for /completion (its stored
    PARAMETERs over qvl's defaults; temperature 0: greedy), its chat template, whether it sees
    pictures, and the marker that places a picture in a /completion prompt."""
    loaded = service.use(body.get("model"))
    kwargs = generation_options(loaded.params, {}, service.config.ctx_size)
    base = SamplingParams()
    params = {k: kwargs.get(k, getattr(base, k)) for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                                            "repeat_last_n", "seed", "presence_penalty",
                                                            "frequency_penalty")}
    params = {**params, "temperature": params["temperature"] or 0.0, "top_k": params["top_k"] or 0,
              "top_p": 1.0 if params["top_p"] is None else params["top_p"], "min_p": params["min_p"] or 0.0,
              "n_predict": -1, "stop": list(kwargs.get("stop") or []), "n_probs": 0, "grammar": "", "stream": True,
              **_chain_settings(ChainOptions(ORDER_LLAMACPP))}
    model = loaded.model
    params["speculative.types"] = spec_types(model)  # --spec-type
    return Reply({"default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": kwargs.get("ctx_size") or PLAN_CTX,
                                                  "is_processing": False, "params": params},
                  "total_slots": 1, "model_path": str(model.text_file.path), "model_alias": service._name(loaded),
                  "chat_template": model.chat_template or "", "chat_template_caps": {},
                  "modalities": {"vision": model.vision is not None, "audio": False},
                  "media_marker": MEDIA_MARKER, "build_info": f"qvl {VERSION}", "is_sleeping": False})


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/props"): props,
    ("POST", "/completion"): complete,
    ("POST", "/completions"): complete,  # llama.cpp's alias
}
