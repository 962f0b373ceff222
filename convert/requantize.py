"""A GGUF text model -> the same model in another type, as llama-quantize does (`qvl quantize`).

The types are qvl-convert's `--type` choices, with the same per-tensor plan (plan.py: llama.cpp's
`llama_tensor_get_type`) and the same quantizers (bytes identical to ggml's), so quantizing
qvl-convert's bf16 or f32 output gives the very bytes that converting the checkpoint straight to
that type gives. As llama-quantize: the metadata is copied (general.file_type and
general.quantization_version set, at the end), the tensors come in its order, vectors and norms
are copied as they are, a matrix whose type
does not change is copied, and a matrix that is quantized already is refused unless requantizing
is allowed (it is dequantized first: its error adds to the new one's); with an importance matrix
(--imatrix: llama-imatrix's file, imatrix.py) its values weigh each matrix's columns in the
quantizers as ggml's weigh them, and its four quantize.imatrix.* keys are written after those
two. As Ollama's quantizer: in
a one-file model (Ollama's layout) the vision tensors (`v.*`, `mm.*`) are copied untouched. A
vision projector alone (mmproj) is refused: qvl-convert --vision-type q8_0 makes a quantized one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ..runtime.gguf_file import SPLIT_KEYS, GGUFError, GGUFFile, TensorInfo, part_name
from ..runtime.lora import LoraError, LoraFactor, LoraSource, load_loras
from ..runtime.modelfile import Creation
from ..runtime.store import Store
from .errors import ConvertError
from .imatrix import ImportanceMatrix, read_imatrix
from .layout import OutTensor
from .metadata import KV
from .pipeline import ConvertOptions, Job, OutputFile, run_counted
from .plan import TEXT_TYPES, Overrides, PlannedTensor, TextType, keeps_float, plan_text, requires_imatrix
from .quant import block_size, can_hold, dequantize, quantize

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
FLOATS = (T.F32, T.F16, T.BF16)
# written by the GGUF writer itself, or not copied (the writer lays data out at its own alignment;
# a split source's keys, which llama-quantize drops too: the output is one file)
NOT_COPIED = ("general.architecture", "general.alignment", *SPLIT_KEYS)


def _llama_order(name: str) -> tuple[int, str]:
    """llama-quantize's tensor order (llama_model_loader's weight_name_comparer): the tensors
    outside the blocks first, then block by block, by name within each."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


_BLOCK = re.compile(r"blk\.(\d+)\.")  # a decoder layer's tensor (a vision block's is v.blk.N)


def _renumbered(tensors: dict[str, TensorInfo], prune: tuple[int, ...], n_layer: int) -> dict[int, int]:
    """--prune-layers: each kept block's new number (the kept ones counted in order), as
    llama-quantize's remap_layer; every block kept as it is without."""
    found = sorted({int(m.group(1)) for name in tensors if (m := _BLOCK.match(name))})
    for i in prune:
        if not 0 <= i < n_layer:
            raise ConvertError(f"--prune-layers {i}: the model's layers are 0 to {n_layer - 1}")
    pruned = set(prune)
    kept = [i for i in found if i not in pruned]
    if prune and not kept:
        raise ConvertError(f"--prune-layers: all {n_layer} layers; at least one has to stay")
    return {old: new for new, old in enumerate(kept)} if prune else {i: i for i in found}


def _vision(name: str) -> bool:
    return name.startswith(("v.", "mm."))


@dataclass(frozen=True)
class Requantize:
    """What `chunks` needs: the source file, which tensors are copied as they are, and the
    importance matrix's values of the tensors it has (by name)."""

    source: GGUFFile
    copied: frozenset[str]
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    unweighted: tuple[str, ...] = ()  # matrices the type quantizes only with importance values, without them
    loras: dict[str, list[LoraFactor]] = field(default_factory=dict)  # --lora: merged before quantizing

    def chunks(self, p: PlannedTensor, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a planned tensor in its new type (uint8), from the source."""
        raw = self.source.raw(p.tensor.source)  # the source's name (--prune-layers renumbers the blocks)
        if raw.ndim != 2:  # a vector, or a >2-D tensor: one piece (writer._chunks)
            return raw.reshape(-1) if p.tensor.name in self.copied else quantize(
                dequantize(raw.reshape(-1, raw.shape[-1]), self.source.tensors[p.tensor.source].type),
                p.qtype).reshape(-1)
        rows = raw[start:stop]
        if p.tensor.name in self.copied:
            return rows.reshape(-1)
        data = dequantize(rows, self.source.tensors[p.tensor.source].type)
        for f in self.loras.get(p.tensor.source, ()):  # W + s (B A), a slice of B's rows at a time
            data = data + np.float32(f.scale) * (f.b[start:stop] @ f.a).numpy()
        return quantize(data, p.qtype, self.importance.get(p.tensor.name)).reshape(-1)


def _importance(imatrix: ImportanceMatrix, tensors: dict[str, OutTensor]) -> dict[str, np.ndarray]:
    """The matrix's values of the tensors it names, as llama-quantize takes them: a matrix whose
    row length they do not match is refused (the token embedding, which it reads by rows, aside)."""
    taken = {}
    for name, t in tensors.items():
        v = imatrix.values.get(t.source)  # a pruned model's blocks: the source's layers' values, as llama.cpp's
        if v is None or not t.is_matrix:
            continue
        experts = t.shape[0] if len(t.shape) == 3 else 1
        if v.size != t.row_length * experts:
            if name == "token_embd.weight":
                continue
            raise ConvertError(f"{imatrix.path}: {v.size} values for '{name}', whose rows are {t.row_length} "
                               "long: an importance matrix of another model")
        if experts > 1:
            raise ConvertError(f"{imatrix.path}: '{name}' has {experts} experts: qvl quantizes none")
        taken[name] = v
    if not taken:
        raise ConvertError(f"{imatrix.path}: no tensor of the model is in it: an importance matrix of another model")
    return taken


def _imatrix_kvs(imatrix: ImportanceMatrix, given: str) -> list[KV]:
    """llama-quantize's four keys (its kv overrides, in its order; strings cut at 127 bytes)."""
    kvs = [KV("quantize.imatrix.file", given.encode()[:127].decode("utf-8", "ignore"), V.STRING)]
    if imatrix.datasets:
        kvs.append(KV("quantize.imatrix.dataset", imatrix.datasets[0].encode()[:127].decode("utf-8", "ignore"),
                      V.STRING))
    kvs.append(KV("quantize.imatrix.entries_count", len(imatrix.values), V.UINT32))
    if imatrix.chunk_count > 0:
        kvs.append(KV("quantize.imatrix.chunks_count", imatrix.chunk_count, V.UINT32))
    return kvs


def kv_override(option: str) -> KV:
    """--override-kv KEY=TYPE:VALUE as llama-quantize reads it (TYPE int, float, bool or str; an int
    is written as its magnitude, a uint32, as llama-quantize writes it)."""
    key, sep, rest = option.partition("=")
    kind, colon, value = rest.partition(":")
    if not sep or not key or len(key) >= 128 or not colon:
        raise ConvertError(f"--override-kv {option!r}: KEY=TYPE:VALUE (TYPE int, float, bool or str)")
    try:
        if kind == "int":
            return KV(key, abs(int(value)) & 0xFFFFFFFF, V.UINT32)
        if kind == "float":
            return KV(key, float(value), V.FLOAT32)
    except ValueError:
        raise ConvertError(f"--override-kv {option!r}: {value!r} is not a {kind}") from None
    if kind == "bool" and value in ("true", "false"):
        return KV(key, value == "true", V.BOOL)
    if kind == "str" and len(value) <= 127:
        return KV(key, value, V.STRING)
    raise ConvertError(f"--override-kv {option!r}: " + ("a bool is true or false" if kind == "bool" else
                       "a str is at most 127 characters" if kind == "str" else "TYPE is int, float, bool or str"))


@dataclass(frozen=True)
class QuantizeOptions:
    """llama-quantize's options beside the type: requantizing, an importance matrix (and the
    substrings of the names whose entries it keeps or drops: --include-weights /
    --exclude-weights), the per-tensor choices, output.weight left as it is, and keys set."""

    allow_requantize: bool = False
    imatrix: Path | None = None
    include_weights: tuple[str, ...] = ()
    exclude_weights: tuple[str, ...] = ()
    overrides: Overrides = Overrides()
    leave_output: bool = False
    kv: tuple[KV, ...] = ()
    keep_split: bool = False  # a split source's parts kept: one output part per input part
    prune_layers: tuple[int, ...] = ()  # decoder layers left out, the rest renumbered (llama-quantize's --prune-layers)
    lora: tuple[LoraSource, ...] = ()  # LoRA adapters (GGUF or PEFT folder, scale) merged in, as llama-export-lora


def _matrix(o: QuantizeOptions) -> ImportanceMatrix | None:
    """The importance matrix with llama-quantize's filters applied (entries whose name holds an
    excluded string dropped, then only those holding an included one kept); None if none is left."""
    if o.imatrix is None:
        return None
    m = read_imatrix(o.imatrix)
    kept = {k: v for k, v in m.raw.items() if not any(x in k for x in o.exclude_weights)}
    if o.include_weights:
        kept = {k: v for k, v in kept.items() if any(x in k for x in o.include_weights)}
    return replace(m, raw=kept) if kept else None


def plan_quantize(source: Path, out: Path, type_name: str, options: QuantizeOptions = QuantizeOptions(),
                  dry_run: bool = False) -> tuple[Job, Requantize]:
    """The job of writing `source` in `type_name` to `out` with llama-quantize's `options`;
    every refusal before a byte is written. A dry run plans a type that needs an importance matrix
    without one (Requantize.unweighted names what it lacks), as llama-quantize --dry-run does."""
    kind = TEXT_TYPES.get(type_name)
    if kind is None:
        raise ConvertError(f"type {type_name!r}: choose one of {', '.join(TEXT_TYPES)}")
    matrix = _matrix(options)
    try:
        src = GGUFFile(source)
    except GGUFError as e:
        raise ConvertError(str(e)) from None
    try:
        try:
            loras = load_loras(options.lora, src.tensors)
        except LoraError as e:
            raise ConvertError(str(e)) from None
        job, copied, importance = _plan(src, source, out, kind, options, matrix, frozenset(loras))
        lacking = [p for f in job.files for p in f.plan if p.tensor.name not in copied
                   and requires_imatrix(kind, p.tensor.name, p.qtype) and p.tensor.name not in importance]
        if lacking and not dry_run:
            raise ConvertError(unweighted_message(lacking[0], options.imatrix if matrix else None))
    except ConvertError:
        src.close()
        raise
    return job, Requantize(src, frozenset(copied), importance, tuple(p.tensor.name for p in lacking), loras)


def unweighted_message(p: PlannedTensor, imatrix: Path | None) -> str:
    """Why a tensor is not quantized: llama-quantize's refusal of a very low-bit type without importance values."""
    name, qtype = p.tensor.name, p.qtype.name
    if imatrix is None:
        return (f"'{name}' is quantized to {qtype}, which takes importance values: give --imatrix FILE "
                "(qvl imatrix makes one from an f16 model and a text)")
    return f"{imatrix}: no values for '{name}', which is quantized to {qtype} (it takes them)"


def _plan(src: GGUFFile, source: Path, out: Path, kind: TextType, o: QuantizeOptions,
          matrix: ImportanceMatrix | None, adapted: frozenset[str] = frozenset()
          ) -> tuple[Job, set[str], dict[str, np.ndarray]]:
    arch = src.architecture
    if arch == "clip" or arch is None:
        raise ConvertError(f"{source}: {'a vision projector (mmproj)' if arch else 'no general.architecture'}; "
                           "qvl quantize takes a text model (qvl-convert --vision-type q8_0 quantizes a projector)")
    n_layer = src.get(f"{arch}.block_count")
    if not isinstance(n_layer, int):
        raise ConvertError(f"{source}: missing metadata key '{arch}.block_count'")
    # llama-quantize's order: by layer and name, or with --keep-split each part's tensors as they lie
    order = (lambda n: (src.tensors[n].part, src.tensors[n].offset)) if o.keep_split else _llama_order
    blocks = _renumbered(src.tensors, o.prune_layers, n_layer)
    tensors = {}
    for name in sorted(src.tensors, key=order):
        m = _BLOCK.match(name)
        if m is not None and int(m.group(1)) not in blocks:
            continue  # pruned
        new = name if m is None else f"blk.{blocks[int(m.group(1))]}.{name[m.end():]}"
        tensors[new] = OutTensor(new, src.tensors[name].shape, name)
    importance = _importance(matrix, tensors) if matrix is not None else {}
    heads, kv_heads = (src.get(f"{arch}.attention.{k}") for k in ("head_count", "head_count_kv"))
    heads, kv_heads = (v[0] if isinstance(v, list) and v else v for v in (heads, kv_heads))
    n_gqa = heads // kv_heads if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > 0 else 1
    text = plan_text([t for t in tensors.values() if not _vision(t.name)], kind, n_layer, matrix is not None,
                     o.overrides, n_gqa)
    planned = {p.tensor.name: p for p in text}
    plan, copied = [], set()
    for name, t in tensors.items():
        have = src.tensors[t.source].type
        p = planned.get(name)
        if o.leave_output and name == "output.weight" and t.source in adapted:
            raise ConvertError("--leave-output-tensor keeps output.weight as it is, and --lora adapts it: one or the "
                               "other")
        if p is None or p.qtype == have and t.source not in adapted or keeps_float(t) or (
                o.leave_output and name == "output.weight"):
            plan.append(PlannedTensor(t, have))  # vision, unchanged, a vector / norm, or left: as it is
            copied.add(name)
            continue
        if not can_hold(p.qtype, t.row_length):  # a type given for it by name, which takes no fallback
            raise ConvertError(f"tensor '{name}': rows of {t.row_length} do not fill {p.qtype.name}'s blocks of "
                               f"{block_size(p.qtype)}")
        if have not in FLOATS and not o.allow_requantize:
            raise ConvertError(f"{source}: tensor '{name}' is {have.name} already; quantizing starts from f16, "
                               "bf16 or f32 (qvl quantize --allow-requantize adds a second quantization's error)")
        plan.append(p)
    # llama-quantize's order: the source's keys in place, then these two, then its kv overrides (the
    # user's, then the importance matrix's): gguf_set_val moves a key it sets to the end
    updated = [KV("general.quantization_version", QUANTIZATION_VERSION, V.UINT32),
               KV("general.file_type", int(kind.file_type), V.UINT32), *o.kv]
    if matrix is not None:
        updated += _imatrix_kvs(matrix, str(o.imatrix))
    if o.prune_layers:  # set last, as llama-quantize sets it once the blocks are renumbered
        updated.append(KV(f"{arch}.block_count", len(blocks), V.UINT32))
    last = {kv.key: kv for kv in updated}  # a key set twice: its last value, at its last place
    ordered = [kv for i, kv in enumerate(updated) if all(u.key != kv.key for u in updated[i + 1:])]
    kvs = [KV(key, kv.value, kv.type, kv.sub_type) for key, kv in src.fields.items()
           if key not in NOT_COPIED and key not in last]
    if not o.keep_split:
        return Job(source.parent, None, [OutputFile(out, arch, kvs + ordered, plan)]), copied, importance
    # --keep-split: part i of the source's n gives OUT-0000{i+1}-of-0000n.gguf, its split keys last
    # (no split keys for one part, still so named); the first part holds the metadata
    n = len(src.parts)
    prefix = out.name.removesuffix(".gguf")
    files = []
    for i in range(n):
        keys = [KV("split.no", i, V.UINT16), KV("split.count", n, V.UINT16),
                KV("split.tensors.count", len(plan), V.INT32)] if n > 1 else []
        files.append(OutputFile(out.with_name(part_name(prefix, i, n)), arch if i == 0 else None,
                                (kvs + ordered if i == 0 else []) + keys,
                                [p for p in plan if src.tensors[p.tensor.source].part == i]))
    return Job(source.parent, None, files), copied, importance


def default_quantized_out(source: Path, type_name: str) -> Path:
    """`<name>-<TYPE>.gguf` beside the source, its own type's suffix (-f16, -bf16, -f32) and a split
    part's (-00001-of-00003) dropped."""
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", source.stem)
    for suffix in ("-f16", "-bf16", "-f32", "_f16", "_bf16", "_f32"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return source.with_name(f"{stem}-{type_name.upper()}.gguf")


def type_name(name: str) -> str:
    """A TYPE as qvl-convert's --type names it, from it or from Ollama's (q4_K_M, q4_K_S: q4_k)."""
    name = name.lower()
    return "q4_k" if name == "q4_k_s" else name


class Quantization:
    """A stored model's text GGUF quantized (`qvl create --quantize`, /api/create's `quantize`):
    planned on creation (every refusal a ConvertError, nothing written), written by `run` to a
    temporary file in the store's folder, which `close` removes once the model is stored."""

    def __init__(self, store: Store, job: Creation, kind: str):
        self.out = store.scratch_path(".quantize-")
        self.creation = job
        self.job, self.source = plan_quantize(job.model, self.out, type_name(kind))
        self.total = self.job.nbytes
        self.source_type = _mostly(self.source.source)

    def run(self, progress: Callable[[int, int], None], workers: int = ConvertOptions.workers
            ) -> tuple[Path, Path | None]:
        """Write the quantized file (progress: bytes done, bytes in all); (text model, projector)."""
        run_counted(self.job, progress, workers, self.source.chunks)
        return self.out, self.creation.projector

    def close(self) -> None:
        self.source.source.close()
        self.out.unlink(missing_ok=True)


def _mostly(g: GGUFFile) -> str:
    """The type most of a file's matrix bytes are in (F16, BF16, F32...), as Ollama's status names it."""
    sizes: dict[str, int] = {}
    for t in g.tensors.values():
        if len(t.ne) >= 2:
            sizes[t.type.name] = sizes.get(t.type.name, 0) + t.nbytes
    return max(sizes, key=lambda k: sizes[k]) if sizes else "F32"
