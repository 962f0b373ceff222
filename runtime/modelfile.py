"""Ollama's Modelfile: parse one (`qvl create NAME -f Modelfile`), write one (`qvl show --modelfile`),
and the stored parameters a run takes as its defaults.

    # comment
    FROM ./qwen2.5-vl-3b-q4_k_m.gguf        a GGUF file (relative to the Modelfile) or a stored model;
    FROM ./mmproj-qwen2.5-vl-3b-f16.gguf    a second FROM: the vision projector (a `clip` GGUF)
    PARAMETER temperature 0.2               one parameter a line; `stop` may repeat
    SYSTEM \"\"\"You are terse.\"\"\"           a value: bare to the line's end, "quoted" or \"\"\"over lines\"\"\"
    ADAPTER ./my-finetune                   a LoRA adapter (GGUF or PEFT folder): applied at run time to a
                                            GGUF FROM, merged as a checkpoint folder FROM converts
    TEMPLATE ... / LICENSE ...

Parameters are Ollama's names. qvl uses those below (a run's command-line flags win over them);
the others Ollama knows (num_gpu, tfs_z, ...) are refused at create, as a parameter a run would
silently drop is worse than none, and ignored in a pulled model's params. typical_p and mirostat,
mirostat_tau, mirostat_eta are llama.cpp's samplers (sampler_chain.py), which Ollama's own engine
leaves out: qvl runs them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .go_template import TemplateError
from .gguf_file import GGUFFile
from .ollama_template import OllamaTemplate, stored_template
from .sampling import ChainOptions, SamplingError, SamplingParams
from .store import ModelName, Store, StoreError

# Ollama's parameter -> (its type, the argument of qvl-run's run() it stands in for)
USED: dict[str, tuple[type, str]] = {
    "num_ctx": (int, "ctx_size"),
    "num_predict": (int, "max_length"),
    "temperature": (float, "temperature"),
    "top_k": (int, "top_k"),
    "top_p": (float, "top_p"),
    "min_p": (float, "min_p"),
    "repeat_penalty": (float, "repeat_penalty"),
    "repeat_last_n": (int, "repeat_last_n"),
    "presence_penalty": (float, "presence_penalty"),
    "frequency_penalty": (float, "frequency_penalty"),
    "seed": (int, "seed"),
    "stop": (str, "stop"),  # a list: the answer ends before the first it comes to
    "typical_p": (float, "typical"),  # the sampler chain's (sampler_chain.ChainOptions: the same names)
    "mirostat": (int, "mirostat"),
    "mirostat_tau": (float, "mirostat_ent"),
    "mirostat_eta": (float, "mirostat_lr"),
}
CHAIN_PARAMS = ("typical_p", "mirostat", "mirostat_tau", "mirostat_eta")  # Model.generate's `chain`, not a keyword


def generate_key(name: str) -> str:
    """Model.generate's keyword for a PARAMETER qvl uses (num_predict: max_new_tokens; the sampler
    chain's, `chain`)."""
    arg = USED[name][1]
    return "chain" if name in CHAIN_PARAMS else "max_new_tokens" if arg == "max_length" else arg


def generate_kwargs(params: dict[str, Any], chain: ChainOptions | None = None) -> dict[str, Any]:
    """Model.generate's keyword arguments of checked PARAMETERs: the sampler chain's in `chain`
    (over the given one's)."""
    out = {generate_key(k): v for k, v in params.items() if k not in CHAIN_PARAMS}
    if any(k in params for k in CHAIN_PARAMS):
        out["chain"] = replace(chain or ChainOptions(), **{k: params[k] for k in CHAIN_PARAMS if k in params})
    return out


# Ollama's other options: known, so named as unused rather than unknown
NOT_USED = ("num_keep", "penalize_newline", "tfs_z", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap",
            "use_mlock", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only")
COMMANDS = ("from", "parameter", "template", "system", "license", "adapter", "message", "requires")


class ModelfileError(ValueError):
    """A Modelfile qvl cannot build from; the message names the line or parameter."""


@dataclass(frozen=True)
class Modelfile:
    sources: tuple[str, ...]  # FROM values, in order
    params: dict[str, Any] = field(default_factory=dict)  # checked by check_params
    template: str | None = None
    system: str | None = None
    license: str | None = None
    messages: tuple[dict[str, str], ...] = ()  # MESSAGE lines: a conversation every prompt follows
    adapters: tuple[str, ...] = ()  # ADAPTER lines: LoRA adapters (GGUF files or PEFT folders)


ROLES = ("system", "user", "assistant")


def _value(text: str, pos: int, line: int) -> tuple[str, int]:
    """The value starting at text[pos] (after blanks): \"\"\"...\"\"\", "..." or the rest of the line."""
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileError(f"line {line}: \"\"\" not closed")
        return text[pos + 3:end], end + 3
    if text.startswith('"', pos):
        m = re.compile(r'"((?:[^"\\\n]|\\.)*)"').match(text, pos)
        if m is None:
            raise ModelfileError(f"line {line}: \" not closed on its line")
        try:  # JSON's escapes (what render writes), else a backslash keeps the next character
            return json.loads(m.group()), m.end()
        except json.JSONDecodeError:
            return re.sub(r"\\(.)", r"\1", m.group(1)), m.end()
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].strip(), end


def parse(text: str) -> Modelfile:
    """A Modelfile's instructions (case-insensitive), as Ollama reads them."""
    sources: list[str] = []
    adapters: list[str] = []
    raw: list[tuple[str, str]] = []
    texts: dict[str, str] = {}
    messages: list[dict[str, str]] = []
    pos = 0
    while pos < len(text):
        m = re.compile(r"[ \t\r\n]*(#[^\n]*)?").match(text, pos)
        assert m is not None  # matches the empty string
        pos = m.end()
        if pos >= len(text):
            break
        if m.group(1) is not None:
            continue
        line = text.count("\n", 0, pos) + 1
        word = re.compile(r"\S+").match(text, pos)
        assert word is not None
        command, pos = word.group().lower(), word.end()
        if command not in COMMANDS:
            raise ModelfileError(f"line {line}: {word.group()!r}: an instruction is one of "
                                 f"{', '.join(c.upper() for c in COMMANDS)}")
        if command == "parameter":
            name = re.compile(r"[ \t]*(\S+)").match(text, pos)
            if name is None or "\n" in text[pos:name.end()]:
                raise ModelfileError(f"line {line}: PARAMETER wants a name and a value")
            value, pos = _value(text, name.end(), line)
            raw.append((name.group(1).lower(), value))
            continue
        if command == "message":
            role = re.compile(r"[ \t]*(\S+)").match(text, pos)
            if role is None or "\n" in text[pos:role.end()] or role.group(1).lower() not in ROLES:
                raise ModelfileError(f"line {line}: MESSAGE wants a role ({', '.join(ROLES)}) and a text")
            value, pos = _value(text, role.end(), line)
            messages.append({"role": role.group(1).lower(), "content": value})
            continue
        value, pos = _value(text, pos, line)
        if command == "requires":
            continue
        if not value:
            raise ModelfileError(f"line {line}: {command.upper()} wants a value")
        if command == "from":
            sources.append(value)
        elif command == "adapter":
            adapters.append(value)
        else:
            texts[command] = value
    if not sources:
        raise ModelfileError("no FROM line: name the GGUF file (or stored model) to build from")
    params: dict[str, Any] = {}
    for name, value in raw:
        if name == "stop":
            params.setdefault("stop", []).append(value)
        elif name in params:
            raise ModelfileError(f"PARAMETER {name}: given twice")
        else:
            params[name] = value
    return Modelfile(tuple(sources), check_params(params, strict=True), texts.get("template"),
                     texts.get("system"), texts.get("license"), tuple(messages), tuple(adapters))


def check_params(params: dict[str, Any], strict: bool) -> dict[str, Any]:
    """`params` (Modelfile strings or a params layer's JSON values) as typed values, checked as
    qvl-run checks its flags. `strict` (create) refuses parameters qvl does not use; otherwise
    (a pulled model's params) they are left out."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in USED:
            if strict:
                known = "qvl does not use it" if name in NOT_USED else "unknown parameter"
                raise ModelfileError(f"PARAMETER {name}: {known} (qvl uses {', '.join(USED)})")
            continue
        kind = USED[name][0]
        if name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise ModelfileError(f"PARAMETER stop {value!r}: strings")
            out[name] = list(stops)
            continue
        try:
            typed = _typed(value, kind)
        except ValueError:
            raise ModelfileError(f"PARAMETER {name} {value!r}: {'an integer' if kind is int else 'a number'}") from None
        out[name] = typed
    try:
        SamplingParams(**{k: v for k, v in out.items() if k in SamplingParams.__dataclass_fields__})
        ChainOptions(**{k: out[k] for k in CHAIN_PARAMS if k in out})
    except SamplingError as e:
        raise ModelfileError(f"PARAMETER {e}") from None
    if out.get("num_ctx", 0) < 0:
        raise ModelfileError(f"PARAMETER num_ctx {out['num_ctx']}: 0 or more")
    if out.get("num_predict", 0) < -1:
        raise ModelfileError(f"PARAMETER num_predict {out['num_predict']}: 0 or more, or -1")
    return out


def _typed(value: Any, kind: type) -> int | float:
    """A Modelfile string or a JSON number as `kind` (int or float); ValueError otherwise."""
    if isinstance(value, str):
        return kind(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return kind(value)


def _quote(text: str) -> str:
    """A value `_value` reads back: triple-quoted where that is unambiguous, else a JSON string."""
    return f'"""{text}"""' if '"""' not in text and not text.endswith('"') else json.dumps(text)


def parameter_lines(params: dict[str, Any]) -> list[str]:
    """`name value` a parameter (a line each of a list's values; strings quoted), as Ollama shows them."""
    return [f"{key} {json.dumps(v) if isinstance(v, str) else v}"
            for key, value in params.items() for v in (value if isinstance(value, list) else [value])]


def render(sources: list[str], params: dict[str, Any], template: str | None, system: str | None,
           license_text: str | None, name: str, messages: list[dict[str, str]] | tuple = (),
           adapters: list[str] | tuple = ()) -> str:
    """A Modelfile that `parse` reads back to the same model (`qvl show --modelfile`)."""
    lines = [f'# Modelfile generated by "qvl show {name} --modelfile"',
             f"# To build a new model from this one, replace the FROM lines with: FROM {name}", ""]
    lines += [f"FROM {s}" for s in sources]
    lines += [f"ADAPTER {a}" for a in adapters]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    if system is not None:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f"PARAMETER {line}" for line in parameter_lines(params)]
    lines += [f"MESSAGE {m['role']} {_quote(m['content'])}" for m in messages]
    if license_text is not None:
        lines.append(f"LICENSE {_quote(license_text)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Creation:
    """What `Store.create` is given for a Modelfile."""

    model: Path
    projector: Path | None
    params: dict[str, Any]
    template: str | None
    system: str | None
    license: str | None
    messages: tuple[dict[str, str], ...] = ()
    adapters: tuple[Path, ...] = ()  # LoRA adapter GGUFs or PEFT folders, applied at run time (lora.py)


def resolve(mf: Modelfile, folder: Path, store: Store) -> Creation:
    """The files and texts `mf`'s FROM lines name: GGUF files (relative paths from `folder`,
    the Modelfile's own), a `clip` one being the projector, or one stored model whose layers the
    Modelfile's own instructions override (its params key by key)."""
    model: Path | None = None
    projector: Path | None = None
    base: dict[str, Any] = {}
    texts: dict[str, str | None] = {"template": None, "system": None, "license": None}
    inherited: tuple[dict[str, str], ...] = ()
    adapters: tuple[Path, ...] = ()
    for source in mf.sources:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else folder / path
        if path.is_dir():
            raise ModelfileError(f"FROM {source}: a folder; qvl builds from GGUF files "
                                 "(make them with qvl convert)")
        if path.is_file():
            with GGUFFile(path) as g:
                is_projector = g.architecture == "clip"
            if (projector if is_projector else model) is not None:
                raise ModelfileError(f"FROM {source}: a second {'projector' if is_projector else 'text model'}")
            projector, model = (path, model) if is_projector else (projector, path)
            continue
        stored = stored_creation(store, source, "no such file, nor a stored model of that name")
        if model is not None:
            raise ModelfileError(f"FROM {source}: a second text model")
        model, projector = stored.model, projector or stored.projector
        base, texts = stored.params, {"template": stored.template, "system": stored.system, "license": stored.license}
        inherited, adapters = stored.messages, stored.adapters
    if model is None:
        raise ModelfileError("FROM names only a projector: add the text model GGUF")
    adapters += tuple(_adapter(model, folder, a) for a in mf.adapters)
    return Creation(model, projector, {**base, **mf.params},
                    mf.template if mf.template is not None else texts["template"],
                    mf.system if mf.system is not None else texts["system"],
                    mf.license if mf.license is not None else texts["license"], mf.messages or inherited, adapters)


def _adapter(model: Path, folder: Path, value: str) -> Path:
    """An ADAPTER line's GGUF file or PEFT folder (relative to `folder`), checked against the model."""
    from .lora import LoraError, load_loras

    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    try:
        with GGUFFile(model) as g:
            load_loras([(path, 1.0)], g.tensors)
    except LoraError as e:
        raise ModelfileError(f"ADAPTER {value}: {e}") from None
    return path


@contextmanager
def adapter_files(store: Store, adapters: tuple[Path, ...]) -> Iterator[tuple[Path, ...]]:
    """The adapters as GGUF files to store: PEFT folders written as LoRA GGUFs (qvl convert-lora)
    in the store's folder, removed after."""
    from ..convert.errors import ConvertError
    from ..convert.lora_gguf import write_lora_gguf

    made: list[Path] = []
    try:
        out = []
        for a in adapters:
            if a.is_dir():
                made.append(store.scratch_path("adapter-"))
                try:
                    write_lora_gguf(a, made[-1])
                except ConvertError as e:
                    raise ModelfileError(f"ADAPTER {a}: {e}") from None
            out.append(made[-1] if a.is_dir() else a)
        yield tuple(out)
    finally:
        for p in made:
            p.unlink(missing_ok=True)


def stored_creation(store: Store, source: str, missing: str) -> Creation:
    """A stored model as what a new one starts from: its files, PARAMETERs, TEMPLATE, SYSTEM and
    LICENSE; a ModelfileError "FROM source: `missing`" where there is none of that name."""
    try:
        ModelName.parse(source)
        entry = store.get(source)
    except StoreError:
        raise ModelfileError(f"FROM {source}: {missing}") from None
    model, projector = store.resolve(source)
    texts = [store.text(entry, kind) for kind in ("template", "system", "license")]
    return Creation(model, projector, check_params(store.params(entry), strict=False), *texts,
                    tuple(store.messages(entry)), tuple(store.adapters(entry)))


def stored_defaults(store: Store, name: str) -> tuple[dict[str, Any], str | None]:
    """A stored model's parameters (those qvl uses, checked) and system prompt: a run's defaults."""
    entry = store.get(name)
    try:
        params = check_params(store.params(entry), strict=False)
    except ModelfileError as e:
        raise StoreError(f"model {str(entry.name)!r}: stored {e}") from None
    return params, store.text(entry, "system")


def stored_chat_template(store: Store, name: str) -> OllamaTemplate | None:
    """A stored model's TEMPLATE, to render its prompts (None without one). One that does not
    parse or run here (a pulled model's: qvl create checks its own) is left for the GGUF's chat
    template, with a warning."""
    entry = store.get(name)
    try:
        return stored_template(store.text(entry, "template"), f"model {str(entry.name)!r}: TEMPLATE")
    except TemplateError as e:
        warnings.warn(f"{e}; the GGUF's chat template renders its prompts instead", stacklevel=2)
        return None


def modelfile_of(store: Store, name: str) -> str:
    """`qvl show NAME --modelfile`: FROM the model's blobs, then its layers' texts and params."""
    entry = store.get(name)
    model, projector = store.resolve(name)
    sources = [str(model)] + ([str(projector)] if projector else [])
    return render(sources, store.params(entry), store.text(entry, "template"), store.text(entry, "system"),
                  store.text(entry, "license"), str(entry.name), store.messages(entry),
                  [str(a) for a in store.adapters(entry)])
