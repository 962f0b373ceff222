"""The vision tower of both families, in float32 torch, from a GGUF projector.

Qwen2.5-VL: RMSNorm blocks with SwiGLU MLPs, attention inside 112-pixel windows (4x4 merge
units) except on the `fullatt_block_indexes` blocks, RMSNorm + 2-layer GELU merger.
Qwen2-VL: LayerNorm blocks with quick-GELU MLPs, full attention per image, LayerNorm merger.
Both: a Conv3d patch embedding (a matmul over flattened patches), 2-D rotary embedding (rows on
the first half of the frequencies, columns on the second), patches ordered by 2x2 merge unit.
Reads llama.cpp's `clip` projector and the vision half of Ollama's `qwen25vl` file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ConfigError
from .decoder import apply_rope, rms_norm
from .gguf_file import GGUFFile
from .dense_mlp import DenseMLP
from .stack import Stack
from .vision_stream import BlockStream
from .weights import EXACT, Matrix, Weights, kernel_dtype

WINDOW_SIZE = 112  # llama.cpp does not store these two; both families use them
MERGE = 2


@dataclass(frozen=True)
class VisionConfig:
    qwen2_5: bool
    depth: int
    embed_dim: int
    n_head: int
    patch_size: int
    out_dim: int
    eps: float
    fullatt_blocks: tuple[int, ...]
    window_size: int
    tokens_per_second: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    layout: str  # "llamacpp" or "ollama": tensor naming

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_head


def vision_config(g: GGUFFile) -> VisionConfig:
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    clip_std = (0.26862954, 0.26130258, 0.27577711)
    if g.architecture == "clip":
        proj = g.require("clip.projector_type")
        if proj not in ("qwen2vl_merger", "qwen2.5vl_merger"):
            raise ConfigError(f"{g.path}: projector {proj!r} is not a Qwen2-VL / Qwen2.5-VL merger")
        q25 = proj == "qwen2.5vl_merger"
        depth = int(g.require("clip.vision.block_count"))
        full: tuple[int, ...] = ()
        if q25:
            n = int(g.require("clip.vision.n_wa_pattern"))
            full = tuple(i for i in range(depth) if (i + 1) % n == 0)
        return VisionConfig(
            qwen2_5=q25, depth=depth,
            embed_dim=int(g.require("clip.vision.embedding_length")),
            n_head=int(g.require("clip.vision.attention.head_count")),
            patch_size=int(g.require("clip.vision.patch_size")),
            out_dim=int(g.require("clip.vision.projection_dim")),
            eps=float(g.get("clip.vision.attention.layer_norm_epsilon", 1e-6)),
            fullatt_blocks=full, window_size=WINDOW_SIZE, tokens_per_second=2.0,
            image_mean=tuple(g.get("clip.vision.image_mean", clip_mean)),
            image_std=tuple(g.get("clip.vision.image_std", clip_std)),
            layout="llamacpp",
        )
    if g.architecture == "qwen25vl":
        p = "qwen25vl.vision."
        return VisionConfig(
            qwen2_5=True,
            depth=int(g.require(p + "block_count")),
            embed_dim=int(g.require(p + "embedding_length")),
            n_head=int(g.require(p + "attention.head_count")),
            patch_size=int(g.require(p + "patch_size")),
            out_dim=int(g.require("qwen25vl.embedding_length")),
            eps=float(g.get(p + "attention.layer_norm_epsilon", 1e-6)),
            fullatt_blocks=tuple(g.require(p + "fullatt_block_indexes")),
            window_size=int(g.get(p + "window_size", WINDOW_SIZE)),
            tokens_per_second=2.0, image_mean=clip_mean, image_std=clip_std, layout="ollama",
        )
    raise ConfigError(f"{g.path}: architecture {g.architecture!r} carries no Qwen vision tower")


_NAMES = {  # role -> (llama.cpp name, Ollama name)
    "patch0": ("v.patch_embd.weight", "v.patch_embd_0.weight"),
    "patch1": ("v.patch_embd.weight.1", "v.patch_embd_1.weight"),
    "post_ln": ("v.post_ln", "v.merger.ln_q"),
    "mm0": ("mm.0", "v.merger.mlp.0"),
    "mm2": ("mm.2", "v.merger.mlp.2"),
}


@dataclass
class Block:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor | None
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor | None
    q: Matrix
    k: Matrix
    v: Matrix
    qb: torch.Tensor
    kb: torch.Tensor
    vb: torch.Tensor
    out: Matrix
    out_b: torch.Tensor
    up: Matrix
    up_b: torch.Tensor
    down: Matrix
    down_b: torch.Tensor
    gate: Matrix | None
    gate_b: torch.Tensor | None
    mlp: DenseMLP | None = None  # on the kernel path, over dense copies (dense_mlp.py)

    def __post_init__(self) -> None:
        self.qkv = Stack([self.q, self.k, self.v], [self.qb, self.kb, self.vb])  # one GEMM on an accelerator


def merge_unit_positions(grid_thw: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch, patches in merge-unit order, frames repeated."""
    rows, cols = [], []
    for t, h, w in grid_thw:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // MERGE, MERGE, w // MERGE, MERGE)
        rows.append(hh.reshape(shape).transpose(1, 2).flatten().repeat(t))
        cols.append(ww.reshape(shape).transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


def vision_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Angles `(patches, head_dim / 2)` of the 2-D rotary: rows on the first half of the
    frequencies, columns on the second."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
    return torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)


def vision_rope(grid_thw: list[tuple[int, int, int]], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (patches, head_dim) with patches in merge-unit order."""
    freqs = vision_angles(*merge_unit_positions(grid_thw), head_dim)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def window_index(grid_thw: list[tuple[int, int, int]], window: int, patch: int) -> tuple[torch.Tensor, list[int]]:
    """Merge-unit order -> window order, and the cumulative patch counts of the windows."""
    per = window // MERGE // patch
    unit = MERGE * MERGE
    index, cu, offset = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // MERGE, w // MERGE
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = per - gh % per, per - gw % per
        padded = F.pad(ids, (0, pw, 0, ph), value=-100)
        nh, nw = (gh + ph) // per, (gw + pw) // per
        padded = padded.reshape(t, nh, per, nw, per).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, per, per)
        counts = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        for c in counts.tolist():
            if c:
                cu.append(cu[-1] + c * unit)
        offset += t * gh * gw
    return torch.cat(index), cu


def _runs(cu: list[int]) -> list[tuple[int, int, int]]:
    """Cumulative window bounds -> (start, window size, count) for runs of equal windows."""
    runs: list[tuple[int, int, int]] = []
    for lo, hi in zip(cu[:-1], cu[1:]):
        if runs and runs[-1][1] == hi - lo:
            start, size, count = runs[-1]
            runs[-1] = (start, size, count + 1)
        else:
            runs.append((lo, hi - lo, 1))
    return runs


class VisionTower:
    """On the CPU, or wholly on `accel` (matmuls through the Triton kernels and the windows
    through the varlen attention kernel when `kernels`); features come back to the CPU. With
    `stream` (on `accel`) the blocks' matrices stay in host memory and are copied to `accel` a
    block ahead while the tower runs (vision_stream.py)."""

    def __init__(self, cfg: VisionConfig, w: Weights, accel: torch.device | None = None, kernels: bool = True,
                 stream: bool = False):
        if stream and accel is None:
            raise ValueError("a streamed vision tower runs on an accelerator: give `accel`")
        self.cfg = cfg
        self.device = accel or torch.device("cpu")
        self.kernels = kernels and accel is not None
        self.attn_dtype = kernel_dtype(w.mode, self.device)  # GEMMs and attention on the accelerator
        pick = 0 if cfg.layout == "llamacpp" else 1

        def name(role: str) -> str:
            return _NAMES[role][pick]

        def vec(n: str) -> torch.Tensor:
            return w.vector(n).to(self.device)

        def opt(n: str) -> torch.Tensor | None:
            return vec(n) if w.has(n) else None

        def mat(n: str) -> Matrix:
            if accel is None:
                return w.matrix(n)
            return w.matrix(n, EXACT).to_device(self.device, kernels, self.attn_dtype)

        p0, p1 = vec(name("patch0")), vec(name("patch1"))  # (E, C, P, P) each
        self.patch = torch.stack([p0, p1], dim=2).reshape(cfg.embed_dim, -1)  # (E, C*2*P*P)
        self.blocks = []
        self.stream = BlockStream(self.device) if stream else None
        for i in range(cfg.depth):
            b = f"v.blk.{i}."
            blk = Block(
                ln1_w=vec(b + "ln1.weight"), ln1_b=opt(b + "ln1.bias"),
                ln2_w=vec(b + "ln2.weight"), ln2_b=opt(b + "ln2.bias"),
                q=mat(b + "attn_q.weight"), k=mat(b + "attn_k.weight"), v=mat(b + "attn_v.weight"),
                qb=vec(b + "attn_q.bias"), kb=vec(b + "attn_k.bias"), vb=vec(b + "attn_v.bias"),
                out=mat(b + "attn_out.weight"), out_b=vec(b + "attn_out.bias"),
                up=mat(b + "ffn_up.weight"), up_b=vec(b + "ffn_up.bias"),
                down=mat(b + "ffn_down.weight"), down_b=vec(b + "ffn_down.bias"),
                gate=mat(b + "ffn_gate.weight") if w.has(b + "ffn_gate.weight") else None,
                gate_b=opt(b + "ffn_gate.bias"),
            )
            if self.kernels and DenseMLP.supports(blk.gate, blk.up, blk.down):
                blk.mlp = DenseMLP(blk.gate, blk.up, blk.down, blk.gate_b, blk.up_b, blk.down_b)  # type: ignore[arg-type]
            if self.stream is not None:
                self.stream.offload(blk)  # a block at a time: the device holds one while they load
            self.blocks.append(blk)
        self.post_w, self.post_b = vec(name("post_ln") + ".weight"), opt(name("post_ln") + ".bias")
        self.mm0, self.mm0_b = mat(name("mm0") + ".weight"), vec(name("mm0") + ".bias")
        self.mm2, self.mm2_b = mat(name("mm2") + ".weight"), vec(name("mm2") + ".bias")

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.qwen2_5:
            return rms_norm(x, weight, self.cfg.eps)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.eps)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) for the residual stream h = x + delta: on the kernel path Qwen2.5-VL's
        RMSNorm and the add in one launch (kernels/rmsnorm.py; torch: ~6 passes over h), h
        float32 and norm(h) in the GEMMs' type (their input: no conversion pass before them)."""
        if self.kernels and self.cfg.qwen2_5:
            from ..kernels.rmsnorm import rmsnorm

            normed, h = rmsnorm(delta, weight, self.cfg.eps, residual=x, out_dtype=self.attn_dtype)
            return h, normed
        h = x + delta
        return h, self._norm(h, weight, bias)

    def _attention(self, b: Block, x: torch.Tensor, rot: torch.Tensor, cu: list[int]) -> torch.Tensor:
        """`rot`: the rotary's (2, patches, head_dim) cos and sin, or on the kernel path its
        half-angles (patches, head_dim / 2) for kernels/rope.py. On the kernel path q, k and v
        stay the bf16 / f16 views of one product with its bias (Stack.linear): q and k rotated
        in place in one launch, read in place by the attention, whose output is in that type
        too, as the o projection's product. (Before: float32 products, a bias pass, ~10
        elementwise passes of torch's rotary, and conversions before each GEMM and the
        attention.)"""
        n, heads, hd = x.shape[0], self.cfg.n_head, self.cfg.head_dim
        if self.kernels:
            from ..kernels.attention import attention
            from ..kernels.rope import apply_rope_

            q, k, v = (t.view(n, heads, hd) for t in b.qkv.linear(x))
            apply_rope_(q, rot, k)
            out = attention(q, k, v, cu, cu, causal=False, dtype=self.attn_dtype, out_dtype=self.attn_dtype)
            return b.out.linear(out.reshape(n, -1), b.out_b)
        q, k, v = (t.view(n, heads, hd) for t in b.qkv.matmul(x))
        cos, sin = rot[0][:, None], rot[1][:, None]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = torch.empty(n, heads, hd, device=x.device)
        for lo, size, count in _runs(cu):  # equal windows side by side: one batched call
            hi = lo + size * count

            def split(t: torch.Tensor) -> torch.Tensor:
                return t[lo:hi].view(count, size, heads, hd).transpose(1, 2)

            o = F.scaled_dot_product_attention(split(q), split(k), split(v))
            out[lo:hi] = o.transpose(1, 2).reshape(hi - lo, heads, hd)
        return b.out.matmul(out.reshape(n, -1), b.out_b)

    def _mlp(self, b: Block, x: torch.Tensor) -> torch.Tensor:
        """The hidden layer stays in the products' precision (bf16 on the CPU's STREAMED
        weights where bf16 GEMMs are native: half the bytes through the elementwise ops;
        float32 for EXACT and on other CPUs), and on the kernel path the output too (added to
        the float32 residual by _add_norm's kernel), through DenseMLP's aligned GEMMs where it
        has one."""
        if b.mlp is not None:  # made on the kernel path only
            return b.mlp.forward(x)
        up = b.up.linear(x, b.up_b)
        if b.gate is not None:  # over the gate's product, as below over 1.702 * up: no buffer beside it
            h = F.silu(b.gate.linear(x, b.gate_b), inplace=True).mul_(up)
        else:
            h = torch.sigmoid_(1.702 * up).mul_(up)  # quick GELU
        return b.down.linear(h, b.down_b) if self.kernels else b.down.matmul(h, b.down_b)

    def forward(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Patches (n, C*2*P*P) of one or more images -> merged tokens (n / 4, out_dim), on the
        tower's device."""
        cfg = self.cfg
        dev = self.device
        x = pixels.to(dev).float() @ self.patch.T
        n = x.shape[0]
        if self.kernels:
            rot = vision_angles(*merge_unit_positions(grid_thw), cfg.head_dim).to(dev)
        else:
            rot = torch.stack(vision_rope(grid_thw, cfg.head_dim)).to(dev)
        full_cu = [0]  # full attention: each frame of each image attends to itself
        for t, h, w in grid_thw:
            for _ in range(t):
                full_cu.append(full_cu[-1] + h * w)
        unit = MERGE * MERGE
        order = None
        win_cu = full_cu
        if cfg.qwen2_5:
            order, win_cu = window_index(grid_thw, cfg.window_size, cfg.patch_size)
            perm = (order[:, None] * unit + torch.arange(unit)).reshape(-1).to(dev)
            x, rot = x[perm], rot[perm] if self.kernels else rot[:, perm]
        normed = self._norm(x, self.blocks[0].ln1_w, self.blocks[0].ln1_b)
        for i in (self.stream.each() if self.stream is not None else range(len(self.blocks))):
            b = self.blocks[i]
            cu = full_cu if (not cfg.qwen2_5 or i in cfg.fullatt_blocks) else win_cu
            x, normed = self._add_norm(x, self._attention(b, normed, rot, cu), b.ln2_w, b.ln2_b)
            after = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            x, normed = self._add_norm(x, self._mlp(b, normed), *((after.ln1_w, after.ln1_b) if after is not None
                                                                   else (self.post_w, self.post_b)))
        x = normed.reshape(n // unit, -1)
        x = self.mm2.matmul(F.gelu(self.mm0.matmul(x) + self.mm0_b)) + self.mm2_b
        if order is not None:
            x = x[torch.argsort(order).to(dev)]
        return x
