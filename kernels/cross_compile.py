"""Compile every kernel for a GPU that is not here, with the launches the runtime makes.

The CI has no GPU: its kernel tests run in Triton's interpreter, which neither compiles the
kernels nor knows a GPU's limits. Triton's compiler itself needs no GPU (it ships LLVM and
ptxas), so this module compiles each kernel to a cubin for a chosen compute capability through
the kernels' own Python entry points (qmatmul, attention, ...), on CPU tensors shaped like the
3B / 7B models' work, with the launch parameters those entry points pick on a GPU. Nothing runs:
Triton is pointed at a stand-in driver that reports the target, and every launch is turned
into Triton's compile-only `warmup`. What comes back per launch: registers per thread, stack
(register spills and local arrays) and shared memory, checked against the GPU's limits — a
kernel that needs more shared memory than the GPU has fails there at its first launch — and
the number of tensor-core instructions in its PTX.

Must run in a process where TRITON_INTERPRET is unset when the kernels are imported
(`scripts/compile_kernels.py`; the test runs it in a subprocess).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
from gguf import GGML_QUANT_SIZES

from .target import PTX_TRITON, Target, pretending

# compute capability -> (GPUs, shared memory a block may use in bytes from CUDA's tables, SMs of the first GPU named)
ARCHS: dict[int, tuple[str, int, int]] = {
    75: ("T4, RTX 20xx", 64 * 1024, 40),
    80: ("A100", 163 * 1024, 108),
    86: ("RTX 3090, A10", 99 * 1024, 82),
    89: ("RTX 4090, L4", 99 * 1024, 128),
    90: ("H100, H200", 227 * 1024, 132),
    120: ("RTX 50xx", 99 * 1024, 170),
}
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM, all of these GPUs: a block must fit
# Stack bytes per thread let pass, a few registers' worth: ptxas 13.4, under the
# --regAllocOptLevel=2 Triton 3.9 gives it, kept the reduce-every-step Q4_K GEMV on sm_90 at 56
# registers with a 16-byte stack frame, and keeps the bf16 decode attention there at 64 with
# one; the spills this check is for were 3-10 KB a thread (decode attention, float32 GEMM and
# attention).
STACK_ALLOWANCE = 32
# a tensor-core instruction and its shape: (opcode, m, n, k)
TENSOR_CORE_OP = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\S*?\.m(\d+)n(\d+)k(\d+)")
ATOMIC_OP = re.compile(r"\batom(?:\.[\w:]+)+")


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one launch case."""

    case: str
    kernel: str
    arch: int
    num_warps: int
    registers: int
    stack: int  # bytes per thread of local memory (spills, local arrays)
    shared: int  # bytes per block
    tensor_core_ops: int  # mma.sync (sm_80+) / wgmma.mma_async (sm_90) instructions in the PTX
    atomics: int = 0  # atom instructions in the PTX
    unordered_atomics: int = 0  # of which without acq_rel semantics at GPU scope
    loop_instructions: int = 0  # SASS instructions in the longest loop body (the kernel's main loop; 0: not read)
    loop_barriers: int = 0  # of which BAR (a block-wide wait each iteration)
    loop_conversions: int = 0  # of which int-to-float conversions (I2F*: a quarter of the FMA rate or less)
    loop_prefetches: int = 0  # of which prefetches into a cache (CCTL...PF*)
    loop_shuffles: int = 0  # of which exchanges between a warp's threads (SHFL)
    tensor_core_macs: int = 0  # multiply-adds of those instructions for one pass of the program (tensor_core_macs)
    scattered_packs: int = 0  # packed inline assembly whose pack is not a run of consecutive elements (packed_runs)

    def problems(self) -> list[str]:
        """Why this launch would fail (or spill) on the GPU; empty when it fits."""
        limit = ARCHS[self.arch][1]
        found = []
        if self.shared > limit:
            found.append(f"needs {self.shared} bytes of shared memory, sm_{self.arch} has {limit}")
        if self.registers * 32 * self.num_warps > REGISTER_FILE:
            found.append(f"{self.registers} registers x {32 * self.num_warps} threads exceed {REGISTER_FILE}")
        if self.stack > STACK_ALLOWANCE:
            found.append(f"{self.stack} bytes of stack per thread (register spills)")
        if self.unordered_atomics:  # qgemv's split arrival count orders the partial sums around it
            found.append(f"{self.unordered_atomics} atomic(s) without acquire-release ordering at GPU scope")
        if self.scattered_packs:  # qgemv's Q5_0 assembly reads one qh shift for its pack of 4
            found.append(f"{self.scattered_packs} packed inline assembly op(s) whose packs are not runs of "
                         "consecutive elements of the last axis")
        return found


def unordered_atomics(ptx: str) -> int:
    """Atomic instructions in `ptx` that neither publish earlier stores nor see other
    programs' (not `.acq_rel` at `.gpu` scope)."""
    return sum(1 for op in ATOMIC_OP.findall(ptx) if ".acq_rel" not in op or ".gpu" not in op)


def tensor_core_macs(ptx: str, num_warps: int) -> int:
    """Multiply-adds the tensor-core instructions in `ptx` do when the program runs through
    each once (a loop body once): m x n x k each, times the warps that issue it (mma.sync is
    a warp's, wgmma a warp group's of 4). Compared with a tile's useful work (BLOCK_M x
    BLOCK_N x head dim for q k^T), it shows padded columns and products that several warps
    repeat."""
    total = 0
    for op, m, n, k in TENSOR_CORE_OP.findall(ptx):
        issuers = num_warps if op == "mma.sync" else max(1, num_warps // 4)
        total += int(m) * int(n) * int(k) * issuers
    return total


LAYOUT_DEF = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*?order = \[([\d, ]+)\]", re.M)
PACKED_ASM = re.compile(r"tt\.elementwise_inline_asm .*?packed_element = (\d+) : i32"
                        r".*?\} %[^:]*: tensor<[^,>]*, (#\w+)>")


def packed_runs(ttgir: str) -> tuple[int, int]:
    """(packed inline assembly ops, of which scattered) in a kernel's TTGIR. Triton hands a
    packed op the next `pack` elements a thread holds; they are a run of consecutive elements
    of the last axis when that axis is the layout's fastest and a thread holds a multiple of
    `pack` of it (sizePerThread). Assembly that treats its pack as such a run (qgemv's Q5_0:
    one qh shift for 4 codes) is right only then; an op whose first operand has another layout
    (a linear layout, a pack split across rows) counts as scattered."""
    layouts = {name: ([int(v) for v in size.split(",")], [int(v) for v in order.split(",")])
               for name, size, order in LAYOUT_DEF.findall(ttgir)}
    total = scattered = 0
    for pack, layout in PACKED_ASM.findall(ttgir):
        if int(pack) == 1:  # an element at a time (dp4a): any layout will do
            continue
        total += 1
        size, order = layouts.get(layout, ([], []))
        if not size or order[0] != len(size) - 1 or size[-1] % int(pack):
            scattered += 1
    return total, scattered


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports one compile target, launches nothing."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):  # a triton GPUTarget
        return self.target

    def get_current_device(self) -> int:
        return self.arch  # Triton keeps a kernel cache per device: one per target

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list[tuple[str, object]]]:
    """Within: every Triton launch compiles for sm_`arch` and is recorded, none runs; a launch
    whose tensors are on more than one device raises."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("cross-compiling needs TRITON_INTERPRET unset (the kernels were built for the interpreter)")
    launched: list[tuple[str, object]] = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **options):
        devices = {str(a.device) for a in args if isinstance(a, torch.Tensor)}
        if len(devices) > 1:  # on a GPU: a host pointer in a kernel, an illegal memory access
            raise RuntimeError(f"{self.fn.__name__}: tensors on {', '.join(sorted(devices))} in one launch")
        kernel = run(self, *args, grid=grid, warmup=True, **options)
        launched.append((self.fn.__name__, kernel))
        return kernel

    # set_active's state as it is (reset_active() would make a real driver, and fail without a
    # GPU): `_active` / `_default` since Triton 3.5, `active` / `default` (lazy proxies) before
    previous = dict(vars(driver))
    driver.set_active(_TargetDriver(arch))
    JITFunction.run = compile_instead
    try:
        yield launched
    finally:
        JITFunction.run = run
        vars(driver).clear()
        vars(driver).update(previous)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def main_loop(sass: str) -> list[str]:
    """The SASS instructions (opcode and operands) of the longest loop in `sass`: the span from
    a backward branch's target to the branch."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    best: list[str] = []
    for at, ins in code:
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < at:
            body = [i for a, i in code if int(target.group(1), 16) <= a <= at]
            best = max(best, body, key=len)
    return best


def _loop_counts(cubin: bytes) -> tuple[int, int, int, int, int]:
    """(instructions, barriers, int-to-float conversions, prefetches, shuffles) of the cubin's main loop."""
    body = main_loop(_cuobjdump(cubin, "-sass"))
    return (len(body), sum(1 for i in body if re.match(r"(@!?U?P\w+\s+)?BAR\b", i)),
            sum(1 for i in body if re.match(r"(@!?U?P\w+\s+)?I2F", i)),
            sum(1 for i in body if re.match(r"(@!?U?P\w+\s+)?CCTL\S*\.PF", i)),
            sum(1 for i in body if re.match(r"(@!?U?P\w+\s+)?SHFL\b", i)))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread from cuobjdump's resource usage of a cubin."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[:200]!r}")
    return int(found.group(1)), int(found.group(2))


def _cases(half: torch.dtype, types: tuple | None = None,
           split_types: tuple | None = None) -> list[tuple[str, Callable[[], object]]]:
    """(name, call) for each launch worth compiling: the runtime's calls at 3B / 7B shapes,
    activations in `half` (bfloat16, or float16 below sm_80) where the runtime uses it; the
    type-dependent GEMV / GEMM / dequantize launches for `types` (default: every supported type),
    and the GEMVs with K split as asked (one split, 2, or 4 at M=5) for those of `split_types`
    too (default: all of them)."""
    from gguf import GGMLQuantizationType as T

    from .attention import attention
    from .decode_attention import decode_attention
    from .decode_inputs import advance, embed_row
    from .dequant import dequant
    from .kv_store import kv_store, kv_store_q8
    from .qgemv import qgemv
    from .qgemv_q8 import qgemv_q8
    from .qmatmul import SUPPORTED, qmatmul, qmatmul_norm
    from .rmsnorm import rmsnorm
    from .rope import apply_rope_

    def raw(qtype: T, n: int, k: int) -> torch.Tensor:
        blk, size = GGML_QUANT_SIZES[qtype]
        return torch.zeros(n, k // blk * size, dtype=torch.uint8)

    def z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype)

    cases: list[tuple[str, Callable[[], object]]] = []
    hidden, inter = 3584, 18944  # 7B
    for qt in SUPPORTED if types is None else types:
        cases += [
            (f"{qt.name} GEMV M=1, bias + residual", lambda qt=qt: qmatmul(
                z(1, hidden), raw(qt, 4608, hidden), qt, 4608, hidden, z(4608), z(1, 4608))),
            (f"{qt.name} GEMV M=1, SwiGLU", lambda qt=qt: qmatmul(
                z(1, hidden), raw(qt, 2 * inter, hidden), qt, 2 * inter, hidden, swiglu=True)),
            (f"{qt.name} GEMV M=1, residual + RMSNorm", lambda qt=qt: qmatmul_norm(
                z(1, hidden), raw(qt, hidden, hidden), qt, hidden, hidden, z(hidden), 1e-6, residual=z(1, hidden))),
            (f"{qt.name} GEMM M=64 {half}", lambda qt=qt: qmatmul(  # sm_75: dequant.py's route
                z(64, hidden, dtype=half), raw(qt, hidden, hidden), qt, hidden, hidden)),
            (f"{qt.name} GEMM M=64 float32", lambda qt=qt: qmatmul(
                z(64, hidden), raw(qt, hidden, hidden), qt, hidden, hidden)),
            (f"{qt.name} dequantize to float16", lambda qt=qt: dequant(raw(qt, 64, hidden), qt, 64, hidden,
                                                                      torch.float16)),
        ]
        if split_types is None or qt in split_types:  # the splits the runtime's defaults may not pick here
            cases += [
                (f"{qt.name} GEMV M=1, one split, bias + residual", lambda qt=qt: qmatmul(
                    z(1, hidden), raw(qt, 4608, hidden), qt, 4608, hidden, z(4608), z(1, 4608), split_k=1)),
                (f"{qt.name} GEMV M=1, SwiGLU, K split in 2", lambda qt=qt: qmatmul(
                    z(1, hidden), raw(qt, 2 * inter, hidden), qt, 2 * inter, hidden, swiglu=True, split_k=2)),
                (f"{qt.name} GEMV M=5, K split in 4", lambda qt=qt: qmatmul(
                    z(5, inter), raw(qt, hidden, inter), qt, hidden, inter, split_k=4)),
            ]
    for dtype in (half, torch.float32):
        cases += [
            (f"vision window attention d=80 {dtype}", lambda dtype=dtype: attention(
                z(400, 16, 80), z(400, 16, 80), z(400, 16, 80), [0, 64, 400], [0, 64, 400], False, dtype)),
            (f"prefill attention GQA 28/4 d=128 {dtype}", lambda dtype=dtype: attention(
                z(300, 28, 128), z(300, 4, 128, dtype=dtype), z(300, 4, 128, dtype=dtype), [0, 300], [0, 300],
                True, dtype)),
        ]
    cases += [
        (f"prefill attention GQA 16/2 d=128 {half}, q8_0 cache", lambda: attention(
            z(300, 16, 128), z(300, 2, 128, dtype=torch.int8), z(300, 2, 128, dtype=torch.int8), [0, 300], [0, 300],
            True, half, k_scale=z(300, 2, 4, dtype=torch.float16), v_scale=z(300, 2, 4, dtype=torch.float16))),
    ]
    length = torch.tensor([1000], dtype=torch.int32)
    for cache in (half, torch.float32):
        cases.append((f"decode attention GQA 28/4 d=128, {cache} cache", lambda cache=cache: decode_attention(
            z(28, 128), z(4, 4096, 128, dtype=cache), z(4, 4096, 128, dtype=cache), length)))
    cases.append(("decode attention GQA 16/2 d=128, q8_0 cache", lambda: decode_attention(
        z(16, 128), z(2, 4096, 128, dtype=torch.int8), z(2, 4096, 128, dtype=torch.int8), length,
        z(2, 4096, 4, dtype=torch.float16), z(2, 4096, 4, dtype=torch.float16))))
    index = torch.tensor([7])
    for cache in (half, torch.float32):
        cases.append((f"kv store d=128, {cache} cache", lambda cache=cache: kv_store(
            z(4, 1, 128), z(4, 1, 128), z(4, 4096, 128, dtype=cache), z(4, 4096, 128, dtype=cache), index)))
    cases.append(("kv store d=128, q8_0 cache", lambda: kv_store_q8(
        z(4, 1, 128), z(4, 1, 128), z(4, 4096, 128, dtype=torch.int8), z(4, 4096, 128, dtype=torch.int8),
        z(4, 4096, 4, dtype=torch.float16), z(4, 4096, 4, dtype=torch.float16), index)))
    q, theta = z(28, 1, 128), z(64)
    cases += [
        (f"kv store + rotary d=128, {half} cache", lambda: kv_store(
            z(4, 1, 128), z(4, 1, 128), z(4, 4096, 128, dtype=half), z(4, 4096, 128, dtype=half), index, q, theta)),
        ("kv store + rotary d=128, q8_0 cache", lambda: kv_store_q8(
            z(4, 1, 128), z(4, 1, 128), z(4, 4096, 128, dtype=torch.int8), z(4, 4096, 128, dtype=torch.int8),
            z(4, 4096, 4, dtype=torch.float16), z(4, 4096, 4, dtype=torch.float16), index, q, theta)),
    ]
    cases += [
        ("rmsnorm 3584", lambda: rmsnorm(z(1, hidden), z(hidden), 1e-6)),
        ("rmsnorm 3584 + residual", lambda: rmsnorm(z(7, hidden), z(hidden), 1e-6, z(7, hidden))),
        ("rope q and k d=128", lambda: apply_rope_(z(3, 28, 128), z(3, 64), z(3, 4, 128))),
        ("rope d=80", lambda: apply_rope_(z(3, 16, 80), z(3, 40))),
        ("rope d=80 bf16 views", lambda: apply_rope_(z(3, 48, 80, dtype=half)[:, :16], z(3, 40),
                                                     z(3, 48, 80, dtype=half)[:, 16:32])),
    ]
    token = torch.zeros(1, dtype=torch.int64)
    cases += [(f"embedding row {qt.name}", lambda qt=qt: embed_row(raw(qt, 1024, hidden), qt, hidden, token,
                                                                    z(1, hidden)))
              for qt in (T.Q4_K, T.Q6_K, T.Q8_0, T.F16)]
    for qt in (T.Q4_K, T.Q5_K, T.Q6_K):
        cases += [
            (f"{qt.name} GEMV M=1 on int8 x, SwiGLU, int8 output", lambda qt=qt: qgemv_q8(
                z(1, hidden), raw(qt, 2 * inter, hidden), qt, 2 * inter, hidden, swiglu=True, q8_out=True)),
            (f"{qt.name} GEMV M=1 on int8 x, residual + RMSNorm, int8 output", lambda qt=qt: qgemv_q8(
                z(1, inter), raw(qt, hidden, inter), qt, hidden, inter, residual=z(1, hidden), norm_weight=z(hidden),
                norm_eps=1e-6, q8_out=True)),
            (f"{qt.name} GEMV M=1 on int8 x, bias, one split", lambda qt=qt: qgemv_q8(
                z(1, hidden), raw(qt, 4608, hidden), qt, 4608, hidden, z(4608), split_k=1)),
        ]
    cases += [  # what writes an int8 GEMV's x writes its int8 form too (q8_activations.py)
        ("Q4_K GEMV M=1, SwiGLU, int8 output", lambda: qgemv(
            z(1, hidden), raw(T.Q4_K, 2 * inter, hidden), T.Q4_K, 2 * inter, hidden, swiglu=True, q8_out=True)),
        ("Q4_K GEMV M=1, residual + RMSNorm, int8 output", lambda: qgemv(
            z(1, hidden), raw(T.Q4_K, hidden, hidden), T.Q4_K, hidden, hidden, residual=z(1, hidden),
            norm_weight=z(hidden), norm_eps=1e-6, q8_out=True)),
        ("decode attention GQA 28/4 d=128, int8 output", lambda: decode_attention(
            z(28, 128), z(4, 4096, 128, dtype=half), z(4, 4096, 128, dtype=half), length, q8_out=True)),
        ("rmsnorm 3584, int8 output", lambda: rmsnorm(z(1, hidden), z(hidden), 1e-6, q8_out=True)),
    ]
    cases.append(("next step's inputs", lambda: advance(token, token.clone(), token.clone(),
                                                         torch.zeros(1, dtype=torch.int32), z(1), z(64), z(64))))
    return cases


def cross_compile(arch: int, progress: Callable[[str], None] | None = None,
                  loops_of: tuple[str, ...] | None = None, types: tuple | None = None,
                  split_types: tuple | None = None) -> list[Compiled]:
    """Compile every case's launches for sm_`arch` (a key of ARCHS); one Compiled per launch;
    the type-dependent launches for `types` (GGML types; default: every supported one), the
    GEMVs with K split as asked for those of `split_types` (default: all of them).
    The main loop's counts are read (a SASS disassembly: ~0.5 s a launch, most of the time
    taken) for the launches of the kernels named in `loops_of`, or all of them without it."""
    if arch not in ARCHS:
        raise ValueError(f"sm_{arch}: one of {', '.join(f'sm_{a}' for a in ARCHS)}")
    half = torch.bfloat16 if arch >= 80 else torch.float16  # as weights.half_dtype picks on the GPU
    results = []
    with compile_only(arch) as launched, pretending(Target(arch, ARCHS[arch][2], ptx=PTX_TRITON)):
        for name, call in _cases(half, types, split_types):
            if progress:
                progress(name)
            launched.clear()
            call()
            for kernel_name, kernel in launched:
                registers, stack = _resources(kernel.asm["cubin"])
                loop, barriers, conversions, prefetches, shuffles = (
                    _loop_counts(kernel.asm["cubin"]) if loops_of is None or kernel_name in loops_of else (0,) * 5)
                results.append(Compiled(name, kernel_name, arch, kernel.metadata.num_warps, registers, stack,
                                        kernel.metadata.shared, len(TENSOR_CORE_OP.findall(kernel.asm["ptx"])),
                                        len(ATOMIC_OP.findall(kernel.asm["ptx"])), unordered_atomics(kernel.asm["ptx"]),
                                        loop, barriers, conversions, prefetches, shuffles,
                                        tensor_core_macs(kernel.asm["ptx"], kernel.metadata.num_warps),
                                        packed_runs(kernel.asm["ttgir"])[1]))
    return results
