"""Model configuration read from GGUF metadata into typed, frozen dataclasses.

Reads llama.cpp's `qwen2vl` text model and Ollama's single-file `qwen25vl` (whose text keys are
the same under another prefix). A missing key is an error that names it and the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_file import GGUFFile

TEXT_ARCHES = ("qwen2vl", "qwen25vl")


class ConfigError(ValueError):
    """A GGUF that is not a Qwen2-VL / Qwen2.5-VL model, or lacks a required key."""


@dataclass(frozen=True)
class TextConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    context_length: int
    rope_theta: float
    rms_eps: float
    mrope_section: tuple[int, int, int]
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _key(g: GGUFFile, key: str) -> object:
    value = g.get(key)
    if value is None:
        raise ConfigError(f"{g.path}: missing metadata key '{key}'")
    return value


def text_config(g: GGUFFile) -> TextConfig:
    arch = g.architecture
    if arch not in TEXT_ARCHES:
        raise ConfigError(f"{g.path}: architecture {arch!r} is not a Qwen2-VL text model "
                          f"(expected one of {', '.join(TEXT_ARCHES)})")
    p = arch
    if arch == "qwen2vl":
        sections = list(_key(g, f"{p}.rope.dimension_sections"))  # type: ignore[arg-type]
    else:
        sections = list(_key(g, f"{p}.rope.mrope_section"))  # type: ignore[arg-type]
    sections = [int(s) for s in sections if s][:3]  # llama.cpp pads to four with 0
    if len(sections) != 3:
        raise ConfigError(f"{g.path}: rope sections {sections} are not three M-RoPE sections")
    tokens = _key(g, "tokenizer.ggml.tokens")
    cfg = TextConfig(
        arch=arch,
        n_layer=int(_key(g, f"{p}.block_count")),  # type: ignore[arg-type]
        n_embd=int(_key(g, f"{p}.embedding_length")),  # type: ignore[arg-type]
        n_ff=int(_key(g, f"{p}.feed_forward_length")),  # type: ignore[arg-type]
        n_head=int(_key(g, f"{p}.attention.head_count")),  # type: ignore[arg-type]
        n_head_kv=int(_key(g, f"{p}.attention.head_count_kv")),  # type: ignore[arg-type]
        context_length=int(_key(g, f"{p}.context_length")),  # type: ignore[arg-type]
        rope_theta=float(_key(g, f"{p}.rope.freq_base")),  # type: ignore[arg-type]
        rms_eps=float(_key(g, f"{p}.attention.layer_norm_rms_epsilon")),  # type: ignore[arg-type]
        mrope_section=(sections[0], sections[1], sections[2]),
        n_vocab=len(tokens),  # type: ignore[arg-type]
    )
    if 2 * sum(cfg.mrope_section) != cfg.head_dim:
        raise ConfigError(f"{g.path}: rope sections {list(cfg.mrope_section)} do not cover head dim {cfg.head_dim}")
    return cfg
