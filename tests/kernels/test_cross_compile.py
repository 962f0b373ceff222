"""Every kernel compiled to a cubin for sm_75, 80, 86, 89, 90 and 120 with the launches the runtime
makes (kernels/cross_compile.py, through scripts/compile_kernels.py in a process without
TRITON_INTERPRET): the compiles succeed, and no launch needs more shared memory or registers
than its GPU has, or spills registers. The interpreter tests check what the kernels compute;
these check what the interpreter cannot: that they build for the GPUs, and fit there. The
compiles start in the background once pytest has collected these tests, and the suite runs
them last (cross_compile_jobs.py: which types each architecture compiles, and why)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import cross_compile_jobs
import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
from cross_compile_jobs import SAMPLED_TYPES, types_for
import torch
from paths import REPO
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from qvl.kernels.attention import head_dim_split, launch
from qvl.kernels.cross_compile import (ARCHS, STACK_ALLOWANCE, Compiled, main_loop, packed_runs, tensor_core_macs,
                                      unordered_atomics)
from qvl.kernels.qblocks import SUPPORTED
from qvl.kernels.qmatmul import gemm_tiles
from qvl.kernels.target import Target

KERNEL_MODULES = ("attention", "decode_attention", "decode_inputs", "dequant", "kv_store", "qgemv", "qgemv_q8", "qmatmul", "rmsnorm", "rope")


@pytest.fixture(scope="module")
def compiled() -> dict[int, tuple[int, list[dict], str]]:
    """arch -> (exit status, one record per launch, stderr): the compiles cross_compile_jobs.py
    started in the background once pytest collected these tests."""
    return cross_compile_jobs.results()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_launch_compiles_and_fits(compiled, arch):
    rc, records, stderr = compiled[arch]
    bad = [f"{r['case']} / {r['kernel']}: {'; '.join(r['problems'])}" for r in records if r["problems"]]
    assert not bad, "\n".join(bad)
    assert rc == 0, stderr[-2000:]
    assert len(records) >= 50  # the cases' launches, one each


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_split_launches_count_arrivals_with_ordering(compiled, arch):
    """A GEMV with K split, and decode attention split over the cache, count their programs in
    with an atomic (arrival.py: the last one combines the partials), as do GEMVs that apply an
    RMSNorm after them, or write a SwiGLU output's int8 form (the last program of a 32-output
    block quantizes it); the check sees each such atomic's ordering (a relaxed one is a problem,
    test_problems_name_each_limit); a GEMV with one split and no norm needs none."""
    _, records, _ = compiled[arch]
    decode = [r for r in records if r["kernel"] == "decode_attention_kernel"]
    assert len(decode) == 4 and all(r["atomics"] == 1 and r["unordered_atomics"] == 0 for r in decode)
    int8_out = [r for r in records if r["kernel"] in ("qgemv_kernel", "qgemv_q8_kernel") and "int8 output" in r["case"]]
    assert len(int8_out) == 2 * 3 + 2 and all(r["atomics"] >= 1 and r["unordered_atomics"] == 0 for r in int8_out)
    gemv = {r["case"]: r for r in records if r["kernel"] == "qgemv_kernel"}
    split = [r for case, r in gemv.items() if "K split" in case]
    single = [r for case, r in gemv.items() if "one split" in case]
    n_types, n_split = len(types_for(arch)), len(SAMPLED_TYPES)  # K split as asked: SAMPLED_TYPES'
    assert len(split) == 2 * n_split and all(r["atomics"] == 1 and r["unordered_atomics"] == 0 for r in split)
    assert len(single) == n_split and all(r["atomics"] == 0 for r in single)
    normed = [r for case, r in gemv.items() if "RMSNorm" in case and "int8 output" not in case]  # the launch's count
    assert len(normed) == n_types and all(r["atomics"] >= 1 and r["unordered_atomics"] == 0 for r in normed)


NO_PTX_PROBE = """
import torch
from gguf import GGMLQuantizationType as T
from qvl.kernels.cross_compile import compile_only
from qvl.kernels.qmatmul import qmatmul
from qvl.kernels.target import Target, pretending
for ptx in (True, False):
    with compile_only(90) as launched, pretending(Target(90, 132, ptx=ptx)):
        qmatmul(torch.zeros(1, 512), torch.zeros(16, 2 * 144, dtype=torch.uint8), T.Q4_K, 16, 512)
    code = launched[-1][1].asm["ptx"]
    print(ptx, "prmt.b32" in code and "0x4B000000" in code, "prefetch.global.L2" in code)
"""


def test_inline_ptx_only_for_nvidia():
    """A GPU where inline PTX cannot run (ROCm: Target.ptx False) gets the GEMV without it: the
    plain-Triton magic floats, no prefetch; an NVIDIA one gets both."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", NO_PTX_PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True", "False", "False", "False"]


def test_target_ptx_only_on_nvidia_unless_turned_off(monkeypatch):
    """target() on a CUDA device (faked: compute capability 8.9, 128 SMs): inline PTX on an
    NVIDIA build, not under ROCm's HIP, not with QVL_NO_PTX=1, not with a Triton before 3.3."""
    from types import SimpleNamespace

    import qvl.kernels.target as target_module

    monkeypatch.setattr(target_module, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=8, minor=9, multi_processor_count=128))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("QVL_NO_PTX", raising=False)
    cuda = torch.device("cuda")
    assert target_module.target(cuda) == Target(89, 128, ptx=True)
    monkeypatch.setenv("QVL_NO_PTX", "1")
    assert target_module.target(cuda) == Target(89, 128, ptx=False)
    monkeypatch.delenv("QVL_NO_PTX")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert target_module.target(cuda) == Target(89, 128, ptx=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(target_module, "PTX_TRITON", False)  # Triton 3.2: packs of inline assembly scattered
    assert target_module.target(cuda) == Target(89, 128, ptx=False)


def test_inline_assembly_from_triton_3_3_on():
    from qvl.kernels.target import _version

    assert _version("3.2.0") < (3, 3) <= _version("3.3.1") < _version("3.10.0+git4f3c") < _version("4.0")
    assert _version("4") == (4, 0) and _version("dev") == (0, 0)


def test_launches_measured_on_hopper_stay_there():
    """The H200's launch choices (4-warp Q4_K GEMM, 2-stage attention, the gate/up GEMV's 4 x 1)
    are sm_90's; sm_100 and sm_120 (RTX 50xx) take sm_89's, which compile for sm_120 without
    spills where sm_90's Q4_K GEMM spills (ARCHS includes 120: test_every_launch_compiles_and_fits)."""
    from gguf import GGMLQuantizationType as T

    from qvl.kernels.qgemv import gemv_launch

    hopper, ada = Target(90, 132), Target(89, 128)
    assert hopper.hopper and not ada.hopper
    for later in (Target(100, 148), Target(120, 170)):
        assert not later.hopper and later.tensor_cores
        for qtype in (T.Q4_K, T.Q6_K):
            assert gemm_tiles(later, torch.bfloat16, qtype) == gemm_tiles(ada, torch.bfloat16, qtype)
            assert gemv_launch(later, qtype, 1, swiglu=True) == gemv_launch(ada, qtype, 1, swiglu=True)
        assert launch(later, torch.bfloat16, False) == launch(ada, torch.bfloat16, False)
    assert gemm_tiles(hopper, torch.bfloat16, T.Q4_K) != gemm_tiles(ada, torch.bfloat16, T.Q4_K)
    assert gemv_launch(hopper, T.Q4_K, 1, swiglu=True) != gemv_launch(ada, T.Q4_K, 1, swiglu=True)
    assert launch(hopper, torch.bfloat16, False) != launch(ada, torch.bfloat16, False)
    assert 120 in ARCHS


def test_half_attention_widens_where_there_are_no_tensor_cores(monkeypatch):
    """sm_75's attention products are float32 FMA loops: its half-precision operands are widened
    first (Triton 3.3.1 cannot compile the float16 dots there); tensor-core GPUs keep them."""
    from qvl.kernels import attention as module

    monkeypatch.setattr(module, "interpreted", lambda: False)
    assert module._widened(Target(75, 40))
    assert not any(module._widened(Target(a, 100)) for a in (80, 86, 89, 90, 120))


def test_every_kernel_is_compiled(compiled):
    """Each @triton.jit kernel the runtime launches (the *_kernel functions) is in the check, for every arch."""
    kernels = {name for module in KERNEL_MODULES
               for name, obj in vars(importlib.import_module(f"qvl.kernels.{module}")).items()
               if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel")}
    assert {"qgemv_kernel", "qmatmul_kernel", "attention_kernel", "decode_attention_kernel"} <= kernels
    for arch, (_, records, _) in compiled.items():
        assert {r["kernel"] for r in records} == kernels, arch


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_half_precision_products_use_tensor_cores(compiled, arch):
    """bf16 / f16 GEMMs and prefill / vision attention get mma (sm_80+) or wgmma (sm_90)
    instructions; float32 ones none (exact FMA products, as documented in kernels/dot.py). On
    sm_75 Triton 3.9 emits none for f16 either: the launch tables size those tiles for FMA
    (Target.tensor_cores), and this fails if a Triton upgrade changes that."""
    _, records, _ = compiled[arch]
    products = [r for r in records if r["kernel"] in ("qmatmul_kernel", "attention_kernel")]
    half = [r for r in products if "float16" in r["case"]]  # bfloat16 or float16
    full = [r for r in products if "float32" in r["case"]]
    n_types = len(types_for(arch))
    assert len(full) == n_types + 2 and not any(r["tensor_core_ops"] for r in full)  # GEMMs, 2 attentions
    if arch >= 80:
        assert len(half) == n_types + 3 and all(r["tensor_core_ops"] > 0 for r in half)
    else:  # float16 GEMMs go to dequant.py (then cuBLAS); attention stays, on CUDA cores
        assert len(half) == 3 and not any(r["tensor_core_ops"] for r in half)
        routed = [r for r in records if "GEMM" in r["case"] and "float16" in r["case"]]
        assert len(routed) == n_types and {r["kernel"] for r in routed} == {"dequant_kernel"}


@pytest.mark.parametrize("arch", [a for a in sorted(ARCHS) if a >= 80])
def test_tensor_cores_do_only_the_tiles_work(compiled, arch):
    """The tensor-core multiply-adds of one pass through a kernel equal its tile's products:
    attention's q k^T and p v over BLOCK_M x BLOCK_N at the head dim as split (80 = 64 + 16,
    not padded to 128), the GEMM's BLOCK_M x BLOCK_N x BLOCK_K; no product repeated by two
    warps (groups). With 8 warps, sm_90's two warp groups each computed the whole q k^T
    (1.5x at d = 128, 2.4x at d = 80 with the padding) and sm_80's warps of 8 rows did 16."""
    _, records, _ = compiled[arch]
    gpu = Target(arch, ARCHS[arch][2])
    block_m, block_n, _, _ = launch(gpu, torch.bfloat16, False)
    attn = {r["case"]: r for r in records if r["kernel"] == "attention_kernel" and "bfloat16" in r["case"]
            and "q8_0" not in r["case"]}
    for d in (80, 128):
        (case,) = [c for c in attn if f"d={d}" in c]
        assert attn[case]["tensor_core_macs"] == 2 * block_m * block_n * sum(head_dim_split(d)), case
    tm, tn, tk, _, _ = gemm_tiles(gpu, torch.bfloat16)
    gemms = [r for r in records if r["kernel"] == "qmatmul_kernel" and "bfloat16" in r["case"]]
    assert len(gemms) == len(types_for(arch)) and all(r["tensor_core_macs"] == tm * tn * tk for r in gemms)


def test_tensor_core_macs_read_from_ptx():
    ptx = """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r4};
    wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;"""
    assert tensor_core_macs(ptx, 8) == 16 * 8 * 16 * 8 + 64 * 32 * 16 * 2
    assert tensor_core_macs("fma.rn.f32 %f1, %f2, %f3, %f4;", 4) == 0


def test_problems_name_each_limit():
    fits = Compiled("case", "k", 86, num_warps=8, registers=255, stack=STACK_ALLOWANCE, shared=99 * 1024,
                    tensor_core_ops=0)
    assert fits.problems() == []
    over = Compiled("case", "k", 86, num_warps=8, registers=255, stack=STACK_ALLOWANCE + 8, shared=99 * 1024 + 1,
                    tensor_core_ops=0)
    problems = over.problems()
    assert len(problems) == 2 and "shared memory" in problems[0] and "stack" in problems[1]
    # 255 registers x 512 threads is more than an SM's 65536
    assert "registers" in Compiled("case", "k", 75, 16, 255, 0, 0, 0).problems()[0]
    assert "atomic" in Compiled("case", "k", 90, 4, 64, 0, 0, 0, 1, unordered_atomics=1).problems()[0]
    assert "inline assembly" in Compiled("case", "k", 90, 4, 64, 0, 0, 0, scattered_packs=1).problems()[0]


# Ceilings on the batch-1 GEMV's SASS instructions per 256-element K step, sm_75 ... sm_90
# (measured: Q4_K 172-180, Q6_K 226-254, Q8_0 201-228, Q5_0 212-234, Q4_0 172-194, Q5_K 193-204,
# Q4_1 168-195, Q5_1 196-221, Q2_K 239-262, Q3_K 278-321, IQ4_NL 226-251, IQ4_XS 232-268,
# of which the L2 prefetch of a later step takes ~5-8 and moves the register allocation; without
# it Q4_K 167-182, Q6_K 216-236, Q8_0 189-203, Q5_0 202-212). All twelve turn their codes into
# floats with inline PTX (qgemv_steps.py); in plain Triton Q4_K, Q6_K and Q5_0 took 231-234,
# 317-334 and 315-461 without the prefetch. Q8_0 with int-to-float conversions took fewer
# instructions (175-186), but 32 conversions, which CONVERSIONS now rules out. Q5_K's qh loaded
# once and broadcast over its four groups cost 3 barriers and 240 instructions (sm_90): the
# layout change went through shared memory.
# Q2_K / Q3_K took 286-318 / 411-517 with their codes made in plain Triton and Q3_K's scales
# read a byte at a time (sm_90: 482; 287 now).
# The grid types (qgrids.py, decoded a weight at a time with a table lookup, no inline PTX):
# IQ2_XXS 364-391, IQ2_XS 376-402, IQ2_S 359-401, IQ3_XXS 527-554, IQ3_S 529-573, IQ1_S 360-380,
# IQ1_M 412-462; first 431-671 with 8-34 barriers a step (a chunk's fields in another layout
# than its weights, and x loaded in a third) and 36-96 int-to-float conversions.
LOOP_CEILING = {"Q4_K": 190, "Q6_K": 265, "Q8_0": 240, "Q5_0": 245, "Q4_0": 210, "Q5_K": 215, "Q4_1": 210,
                "Q5_1": 235, "Q2_K": 275, "Q3_K": 335, "IQ4_NL": 265, "IQ4_XS": 285, "IQ2_XXS": 410,
                "IQ2_XS": 420, "IQ2_S": 420, "IQ3_XXS": 580, "IQ3_S": 600, "IQ1_S": 400, "IQ1_M": 485}
# Int-to-float conversions in that loop: the sub-block scales' only (IQ4_XS: 2 a thread, Q4_K,
# Q5_K: 4, Q6_K, Q3_K: 8, Q2_K: 16, its scales and mins; as magic floats they cost more instructions
# than they save: Q2_K 256, Q3_K 309 on sm_90); a code converted this way costs a conversion a
# weight, at 16 a clock per SM (a quarter of integer, an eighth of float throughput), the bound
# of the Q8_0 loop before (32 a step).
CONVERSIONS = {"Q4_K": 4, "Q6_K": 8, "Q8_0": 0, "Q5_0": 0, "Q4_0": 0, "Q5_K": 4, "Q4_1": 0, "Q5_1": 0, "Q2_K": 16,
               "Q3_K": 8, "IQ4_NL": 0, "IQ4_XS": 2, **dict.fromkeys(("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                                                    "IQ1_S", "IQ1_M"), 0)}
# L2 prefetches a thread a step: a row's step spans up to 4 (Q2_K), 5 (Q3_K, IQ4_XS), 6 (Q4_K,
# Q4_0, Q4_1, IQ4_NL), 7 (Q5_K), 8 (Q6_K, Q5_0, Q5_1) or 10 (Q8_0: 272 bytes) 32-byte sectors, slots rounded
# to a power of 2 (8 or 16), 16 rows over 128 threads
PREFETCHES = {"Q4_K": 1, "Q6_K": 1, "Q8_0": 2, "Q5_0": 1, "Q4_0": 1, "Q5_K": 1, "Q4_1": 1, "Q5_1": 1, "Q2_K": 1,
              "Q3_K": 1, "IQ4_NL": 1, "IQ4_XS": 1, **dict.fromkeys(("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
                                                                   "IQ1_S", "IQ1_M"), 1)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decode_gemv_loop_has_no_barrier(compiled, arch):
    """Batch-1 decode's GEMV accumulates per lane (or per lane's run of 4 weights) and reduces
    once after its K loop (qgemv_steps._rows): the loop body waits on no barrier (Q4_K / Q6_K: 296 /
    532 instructions with 12 / 8 barriers and 20 / 80 shuffles when each step reduced across
    threads; Q8_0 / Q5_0 had 2 while their scales went through shared memory), stays under
    LOOP_CEILING, converts no quantized code with an int-to-float instruction, and asks L2 for a
    later step (PREFETCHES a thread: qgemv.PREFETCH)."""
    _, records, _ = compiled[arch]
    m1 = [r for r in records if r["kernel"] == "qgemv_kernel" and "M=1" in r["case"]
          and "int8 output" not in r["case"]]  # those: the same K loop (a norm's loop may be longer)
    assert set(LOOP_CEILING) == {t.name for t in SUPPORTED}
    assert {r["case"].split()[0] for r in m1} == {t.name for t in types_for(arch)}
    assert len(m1) == 3 * len(types_for(arch)) + 2 * len(SAMPLED_TYPES)  # the K splits as asked: 2 a sampled type
    for r in m1:
        qtype = r["case"].split()[0]
        assert r["loop_barriers"] == 0 and 0 < r["loop_instructions"] <= LOOP_CEILING[qtype], r
        assert r["loop_conversions"] <= CONVERSIONS[qtype], r
        assert r["loop_prefetches"] == PREFETCHES[qtype], r


# The int8-activation GEMVs' loops (qgemv_q8.py, 8 rows on one warp, 64 weights a thread a step):
# Q4_K 115 SASS instructions (16 IDP.4A, 4 I2F), Q5_K 163 (its fifth bits: ~3 more a word) on
# sm_90; Q6_K's loop takes two steps (its 210-byte blocks: an even step's words are 4-byte
# aligned, the odd step's 2 bytes off), 342 (32 IDP.4A, 16 I2F; one step a loop with 16-bit
# loads took 186). The ceilings, per step, catch a layout falling apart: with the row stride's
# 16-byte alignment unknown to the compiler the Q4_K loop took 288, with 32 shuffles; Q6_K's
# tensors as (row, t, word) spread a thread's words over 4 threads: 302, 32 shuffles and 4
# barriers; its 32-bit words at offsets Triton saw as constants: 486 a pair, 32 shuffles.
INT8_CEILING = {"Q4_K": 130, "Q5_K": 180, "Q6_K": 185}
INT8_STEPS_A_LOOP = {"Q4_K": 1, "Q5_K": 1, "Q6_K": 2}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_int8_gemv_loop_is_short(compiled, arch):
    """The int8 GEMV launches (SwiGLU, bias in one split): the main loop under INT8_CEILING a
    step with no barrier and no shuffle, and at most 8 int-to-float conversions a step. The
    launch with the RMSNorm has the same K loop, but its longest loop is the norm's (once a
    launch, 8 values a thread a chunk quantized for the next GEMV: ~200 instructions), so it
    is not read here."""
    _, records, _ = compiled[arch]
    loops = [r for r in records if r["kernel"] == "qgemv_q8_kernel" and "RMSNorm" not in r["case"]]
    assert len(loops) == 2 * len(INT8_CEILING)
    for r in loops:
        qtype = r["case"].split()[0]
        steps = INT8_STEPS_A_LOOP[qtype]
        assert r["loop_barriers"] == 0 and 0 < r["loop_instructions"] <= INT8_CEILING[qtype] * steps, r
        assert r["loop_shuffles"] == 0 and r["loop_conversions"] <= 8 * steps, r


def test_main_loop_read_from_sass():
    sass = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   FFMA R2, R3, R4, R2 ;
        /*0120*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0130*/              @P0 BRA 0x110 ;
        /*0140*/                   EXIT ;
"""
    body = main_loop(sass)
    assert body == ["FFMA R2, R3, R4, R2", "BAR.SYNC.DEFER_BLOCKING 0x0", "@P0 BRA 0x110"]


def test_packed_runs_read_from_ttgir():
    head = ("#blocked = #ttg.blocked<{sizePerThread = [1, 1, 4], threadsPerWarp = [2, 4, 4], warpsPerCTA = [4, 1, 1], "
            "order = [2, 1, 0]}>\n"
            "#blocked1 = #ttg.blocked<{sizePerThread = [1, 2, 1], threadsPerWarp = [2, 4, 4], warpsPerCTA = [4, 1, 1], "
            "order = [2, 1, 0]}>\n")
    op = ('%f:2 = tt.elementwise_inline_asm "{prmt.b32 $0, $8, 0x4B000000, 0x7054;}" {constraints = "=r,r", '
          'packed_element = 4 : i32, pure = true} %byte, %qh : tensor<16x4x16xi8, LAYOUT>, '
          'tensor<16x4x16xi32, LAYOUT> -> '
          'tensor<16x4x16xf32, LAYOUT>\n')
    assert packed_runs(head + op.replace("LAYOUT", "#blocked")) == (1, 0)
    assert packed_runs(head + op.replace("LAYOUT", "#blocked1")) == (1, 1)  # the last axis 1 a thread
    assert packed_runs(head + op.replace("LAYOUT", "#linear")) == (1, 1)  # a layout it cannot read
    assert packed_runs(head + op.replace("LAYOUT", "#blocked").replace("packed_element = 4", "packed_element = 8")) \
        == (1, 1)
    assert packed_runs(head + 2 * op.replace("LAYOUT", "#blocked")) == (2, 0)
    # one element a call (qgemv_q8's dp4a): no pack to scatter, whatever the layout (Triton 3.3-3.6
    # gave the int8 Q6_K GEMV's dp4a operands a layout whose fastest axis is not the last)
    assert packed_runs(head + op.replace("LAYOUT", "#linear").replace("packed_element = 4", "packed_element = 1")) \
        == (0, 0)


def test_unordered_atomics_read_from_ptx():
    assert unordered_atomics("@%p7 atom.global.gpu.acq_rel.add.u32 %r314, [ %rd38 + 0 ], %r315;") == 0
    assert unordered_atomics("atom.global.gpu.relaxed.add.u32 %r1, [%rd1], %r2;") == 1
    assert unordered_atomics("atom.global.cta.acq_rel.add.u32 %r1, [%rd1], %r2;") == 1
    assert unordered_atomics("st.shared::cta.b32 [%r1], %r2; bar.sync 0;") == 0


def test_compile_kernels_names_an_unknown_type():
    """--types / --split-types take GGML type names; one it does not know is named, exit status 2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for option in ("--types", "--split-types"):
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "compile_kernels.py"), "--arch", "90", option,
                              "Q4_K,Q9_X"], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 2 and f"{option}: Q9_X: not one of" in out.stderr and "Traceback" not in out.stderr
