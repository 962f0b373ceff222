"""Model configuration read from GGUF metadata into typed, frozen dataclasses.

Reads llama.cpp's `qwen2vl` text model and Ollama's single-file `qwen25vl` (whose text keys are
the same under another prefix), and a text-only `qwen2` (Qwen2 / Qwen2.5: a draft model for
--spec-draft-model), whose 1D rotary is M-RoPE with every pair in the first section (its three
positions are equal for text). A missing key is an error that names it and the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_file import GGUFFile

TEXT_ARCHES = ("qwen2vl", "qwen25vl", "qwen2")


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


def text_config(g: GGUFFile) -> TextConfig:
    arch = g.architecture
    if arch not in TEXT_ARCHES:
        raise ConfigError(f"{g.path}: architecture {arch!r} is not a Qwen2-VL text model "
                          f"(expected one of {', '.join(TEXT_ARCHES)})")
    p = arch
    if arch == "qwen2":  # one section: the temporal position, which is the token's
        head_dim = int(g.require(f"{p}.embedding_length")) // int(g.require(f"{p}.attention.head_count"))
        sections = [head_dim // 2, 0, 0]
    else:
        given = g.require(f"{p}.rope.dimension_sections" if arch == "qwen2vl" else f"{p}.rope.mrope_section")
        sections = [int(s) for s in given if s][:3]  # llama.cpp pads to four with 0
    if len(sections) != 3:
        raise ConfigError(f"{g.path}: rope sections {sections} are not three M-RoPE sections")
    tokens = g.require("tokenizer.ggml.tokens")
    cfg = TextConfig(
        arch=arch,
        n_layer=int(g.require(f"{p}.block_count")),
        n_embd=int(g.require(f"{p}.embedding_length")),
        n_ff=int(g.require(f"{p}.feed_forward_length")),
        n_head=int(g.require(f"{p}.attention.head_count")),
        n_head_kv=int(g.require(f"{p}.attention.head_count_kv")),
        context_length=int(g.require(f"{p}.context_length")),
        rope_theta=float(g.require(f"{p}.rope.freq_base")),
        rms_eps=float(g.require(f"{p}.attention.layer_norm_rms_epsilon")),
        mrope_section=(sections[0], sections[1], sections[2]),
        n_vocab=len(tokens),
    )
    if 2 * sum(cfg.mrope_section) != cfg.head_dim:
        raise ConfigError(f"{g.path}: rope sections {list(cfg.mrope_section)} do not cover head dim {cfg.head_dim}")
    return cfg
