"""The dequantizing matmul (tiled GEMM for M > 8, split-K GEMV for M <= 8, kernels/qgemv.py)
against its torch reference (gguf-py dequantization + float32 matmul), and its epilogue (bias,
residual, SwiGLU over stacked [gate; up] rows) against the same in torch.

Tolerance table (float32 accumulation on both sides; only the summation order differs):
| weights | inputs | rtol on max |y| | why |
| every type | float32 N(0,1) | 1e-5 | K <= 768 float32 adds in another order: ~K * 2^-24 relative |
| every type | float32, epilogue | 1e-5 | the same sums; bias, residual, silu: a rounding each |
| every type | bfloat16 (GEMM) | 1e-2 | each decoded weight rounded to bf16 (2^-9 relative); measured <= 4.2e-3 |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from quant_weights import quant_weights

from qvl.kernels.qmatmul import qmatmul, qmatmul_ref
from qvl.runtime.iq_grids import GRID_TYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0, T.Q4_0, T.Q5_K, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, *GRID_TYPES]
RTOL = {qtype: 1e-5 for qtype in TYPES}
RTOL_BF16 = 1e-2


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(1, 1, 256), (1, 33, 512), (3, 7, 256), (8, 17, 768), (5, 16, 256),  # GEMV
                                   (9, 7, 256), (17, 33, 512), (33, 17, 768)])  # M > 8: the tiled GEMM
def test_matches_reference(qtype, m, n, k):
    raw = quant_weights(n, k, qtype, "normal", seed=m * 100 + n)
    x = torch.from_numpy(np.random.default_rng(k).standard_normal((m, k)).astype(np.float32))
    ref = qmatmul_ref(x, raw, qtype)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k).cpu()
    err = (got - ref).abs().max().item()
    assert err <= RTOL[qtype] * max(ref.abs().max().item(), 1e-30) + 1e-30, err


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["zero-blocks", "huge", "tiny"])
@pytest.mark.parametrize("m", [1, 2, 12])  # GEMV (batch 1: its own loop), GEMV, GEMM
def test_awkward_values(qtype, kind, m):
    n, k = 9, 512
    raw = quant_weights(n, k, qtype, kind, seed=3)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((m, k)).astype(np.float32))
    ref = qmatmul_ref(x, raw, qtype)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k).cpu()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= RTOL[qtype] * ref.abs().max().item()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k,kind", [(9, 7, 256, "normal"), (33, 17, 768, "normal"), (12, 9, 512, "huge"),
                                        (12, 9, 512, "zero-blocks")])
def test_bf16_gemm(qtype, m, n, k, kind):
    """bf16 activations (prefill, vision tower on a GPU): tensor-core products of x and the
    decoded tile rounded to bf16, against the float32 reference on the same bf16 x."""
    raw = quant_weights(n, k, qtype, kind, seed=m + n)
    x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)).to(torch.bfloat16)
    ref = qmatmul_ref(x.float(), raw, qtype)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k).cpu()
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= RTOL_BF16 * ref.abs().max().item()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("block_m,block_n,block_k", [(16, 16, 64), (16, 32, 128), (32, 16, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_tiles(qtype, block_m, block_n, block_k, dtype):
    """The GEMM decoding a quarter, a half or all of each super-block at a time (a GPU takes 64),
    with tiles that leave partial blocks of M and N."""
    m, n, k = 33, 17, 768
    raw = quant_weights(n, k, qtype, "normal", seed=block_k)
    x = torch.from_numpy(np.random.default_rng(block_m).standard_normal((m, k)).astype(np.float32)).to(dtype)
    ref = qmatmul_ref(x.float(), raw, qtype)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k, block_m=block_m, block_n=block_n, block_k=block_k).cpu()
    rtol = RTOL[qtype] if dtype == torch.float32 else RTOL_BF16
    assert (got - ref).abs().max().item() <= rtol * ref.abs().max().item()


WIDE_TYPES = [T.Q8_0, T.Q5_0, T.Q4_0, T.Q4_1, T.Q5_1, T.IQ4_NL]  # 32-weight blocks: rows need not be whole 256-weight steps


@pytest.mark.parametrize("qtype", WIDE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 12])  # batch-1 GEMV, GEMV, GEMM
def test_head_columns_of_a_wider_row(qtype, m):
    """The first 512 columns of 7 rows 800 wide (25 blocks of 32: 3 steps and 32 weights past
    them), read in place through a strided view: the 72B's 29568-wide ffn_down rows."""
    raw = quant_weights(7, 800, qtype, "normal", seed=m)
    head = raw[:, :raw.shape[1] * 512 // 800]
    assert not head.is_contiguous()
    x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, 512)).astype(np.float32))
    ref = qmatmul_ref(x, head.contiguous(), qtype)
    got = qmatmul(x.to(DEVICE), head.to(DEVICE) if DEVICE == "cpu" else raw.to(DEVICE)[:, :head.shape[1]],
                  qtype, 7, 512).cpu()
    assert (got - ref).abs().max().item() <= RTOL[qtype] * ref.abs().max().item()


def test_rejects_bad_shapes():
    raw = quant_weights(4, 256, T.Q8_0, "normal", 0)
    with pytest.raises(ValueError, match="multiple of 256"):
        qmatmul(torch.zeros(1, 128), raw[:, :136], T.Q8_0, 4, 128)
    with pytest.raises(ValueError, match="supports"):
        qmatmul(torch.zeros(1, 256), raw, T.TQ2_0, 4, 256)  # a block type the kernels do not read
    with pytest.raises(ValueError, match="swiglu"):
        qmatmul(torch.zeros(1, 256), raw, T.Q8_0, 4, 256, bias=torch.zeros(4), swiglu=True)
    with pytest.raises(ValueError, match="swiglu"):
        qmatmul(torch.zeros(1, 256), raw[:3], T.Q8_0, 3, 256, swiglu=True)
    with pytest.raises(ValueError, match="block_k"):
        qmatmul(torch.zeros(9, 256), raw, T.Q8_0, 4, 256, block_k=32)
    odd = torch.zeros(4 * 272 + 1, dtype=torch.uint8)[1:].view(4, 272)  # rows from an odd address
    with pytest.raises(ValueError, match="divisible by 2"):
        qmatmul(torch.zeros(1, 256), odd, T.Q8_0, 4, 256)
    k_quant = torch.zeros(2 * 144 + 2, dtype=torch.uint8)[2:].view(2, 144)  # 2 mod 4: scales read as 32-bit words
    assert k_quant.data_ptr() % 4 == 2
    with pytest.raises(ValueError, match="Q4_K weight rows should start at addresses divisible by 4"):
        qmatmul(torch.zeros(1, 256), k_quant, T.Q4_K, 2, 256)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k,split_k", [(1, 34, 512, 1), (1, 34, 768, 3), (3, 18, 512, 2),  # GEMV: fused epilogue
                                           (8, 18, 256, None), (11, 34, 512, None)])  # and in combine; GEMM
@pytest.mark.parametrize("epilogue", ["bias", "residual", "both", "swiglu"])
def test_epilogue_matches_torch(qtype, m, n, k, split_k, epilogue):
    raw = quant_weights(n, k, qtype, "normal", seed=n + k)
    rng = np.random.default_rng(m)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 10 if epilogue in ("bias", "both") else None
    res = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)) * 10 if epilogue in ("residual", "both") \
        else None
    y = qmatmul_ref(x, raw, qtype)
    if epilogue == "swiglu":
        ref = torch.nn.functional.silu(y[:, :n // 2]) * y[:, n // 2:]
    else:
        ref = y + (bias if bias is not None else 0) + (res if res is not None else 0)
    on = (lambda t: t.to(DEVICE) if t is not None else None)  # noqa: E731
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k, bias=on(bias), residual=on(res),
                  swiglu=epilogue == "swiglu", split_k=split_k).cpu()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= RTOL[qtype] * ref.abs().max().item()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k,split_k", [(1, 1, 256, 1), (1, 33, 768, 3), (3, 17, 1280, 2), (8, 7, 512, 4),
                                           (5, 16, 768, 2), (2, 9, 1280, 3)])  # 5 steps / 3 splits: a short last one
def test_split_k_gemv_matches_reference(qtype, m, n, k, split_k):
    raw = quant_weights(n, k, qtype, "normal", seed=m * 7 + n)
    x = torch.from_numpy(np.random.default_rng(k + m).standard_normal((m, k)).astype(np.float32))
    ref = qmatmul_ref(x, raw, qtype)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k, block_n=16, split_k=split_k).cpu()
    assert got.shape == (m, n)
    assert (got - ref).abs().max().item() <= RTOL[qtype] * ref.abs().max().item()


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("m,n_out,k,block_n,split_k", [(1, 7, 512, 4, 1), (1, 7, 768, 4, 3), (3, 9, 1280, 8, 2),
                                                       (8, 5, 512, 2, 2), (2, 16, 768, 32, 3)])
def test_swiglu_pairs_within_a_program(qtype, m, n_out, k, block_n, split_k):
    """SwiGLU over [gate; up] with programs of block_n / 2 outputs (gate and up rows
    interleaved): output counts that leave a partial last program, one split (finished in the
    program) and several (finished by the last to arrive), against torch."""
    n = 2 * n_out
    raw = quant_weights(n, k, qtype, "normal", seed=n + block_n)
    x = torch.from_numpy(np.random.default_rng(k).standard_normal((m, k)).astype(np.float32))
    y = qmatmul_ref(x, raw, qtype)
    ref = torch.nn.functional.silu(y[:, :n_out]) * y[:, n_out:]
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), qtype, n, k, swiglu=True, block_n=block_n, split_k=split_k).cpu()
    assert got.shape == (m, n_out)
    assert (got - ref).abs().max().item() <= RTOL[qtype] * ref.abs().max().item()


def test_split_counters_left_at_zero():
    """The last program of each row block resets its arrival counter, so the next launch (or a
    CUDA graph's replay) starts from zero: three launches of different shapes on one buffer give
    the same bits as each alone, and the buffer ends all zeros."""
    from qvl.kernels.arrival import counters

    dev = torch.device(DEVICE)
    cases = [(T.Q4_K, 1, 33, 1280, 5, False), (T.Q8_0, 3, 18, 768, 3, True), (T.Q4_K, 1, 33, 1280, 5, False)]
    outs = []
    for qtype, m, n, k, split_k, swiglu in cases:
        raw = quant_weights(n, k, qtype, "normal", seed=n)
        x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32))
        outs.append(qmatmul(x.to(dev), raw.to(dev), qtype, n, k, swiglu=swiglu, block_n=4, split_k=split_k).cpu())
        assert not counters(dev, 64).any()
    assert torch.equal(outs[0], outs[2])


def test_split_gemv_same_bits_every_launch():
    """The last-to-arrive program adds the partials in split order whichever program arrives last,
    so repeated launches give identical bits. On a GPU (the device's kernel stage) this runs a
    7B projection 200 times with its default split, where a partial read before it is written
    (a wrong memory order around the arrival count) would show as a changed result; in the
    interpreter (programs in order) a small one 3 times."""
    gpu = DEVICE == "cuda"
    n, k, repeats = (3584, 3584, 200) if gpu else (33, 1280, 3)
    raw = quant_weights(n, k, T.Q4_K, "normal", seed=5)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((1, k)).astype(np.float32))
    res = torch.from_numpy(np.random.default_rng(7).standard_normal((1, n)).astype(np.float32))
    ref = qmatmul_ref(x, raw, T.Q4_K) + res
    xd, rawd, resd = x.to(DEVICE), raw.to(DEVICE), res.to(DEVICE)
    split_k = None if gpu else 5
    first = qmatmul(xd, rawd, T.Q4_K, n, k, residual=resd, block_n=16, split_k=split_k)
    assert (first.cpu() - ref).abs().max().item() <= RTOL[T.Q4_K] * ref.abs().max().item()
    for _ in range(repeats):
        assert torch.equal(qmatmul(xd, rawd, T.Q4_K, n, k, residual=resd, block_n=16, split_k=split_k), first)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k,block_n,split_k", [(1, 33, 512, 16, 1), (1, 1100, 256, 128, 1),  # 2 norm chunks
                                                   (3, 40, 768, 8, 3), (8, 17, 1280, 4, 2), (2, 7, 256, 128, 1)])
def test_gemv_with_norm(qtype, m, n, k, block_n, split_k):
    """The GEMV's last row block normalizes the finished rows (o / down projection + the next
    RMSNorm in one launch): y as without the norm, bit for bit; the norm against torch's
    (rmsnorm_kernel's tolerance: the mean of squares summed in another order). One or several
    row blocks and splits, a norm wider than one chunk."""
    from qvl.kernels.qgemv import qgemv
    from qvl.kernels.rmsnorm import rmsnorm_ref

    raw = quant_weights(n, k, qtype, "normal", seed=n + m)
    rng = np.random.default_rng(n)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    res = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)) * 3
    w = torch.from_numpy(1 + 0.1 * rng.standard_normal(n).astype(np.float32))
    d = torch.device(DEVICE)
    plain, none = qgemv(x.to(d), raw.to(d), qtype, n, k, residual=res.to(d), block_n=block_n, split_k=split_k)
    y, normed = qgemv(x.to(d), raw.to(d), qtype, n, k, residual=res.to(d), block_n=block_n, split_k=split_k,
                      norm_weight=w.to(d), norm_eps=1e-6)
    assert none is None and torch.equal(y, plain)
    ref = rmsnorm_ref(y.cpu(), w, 1e-6)[0]
    assert (normed.cpu() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("m", [1, 12])  # the GEMV's fused norm, and the GEMM then rmsnorm_kernel
def test_qmatmul_norm(m):
    from qvl.kernels.qmatmul import qmatmul_norm
    from qvl.kernels.rmsnorm import rmsnorm_ref

    n, k = 40, 512
    raw = quant_weights(n, k, T.Q4_K, "normal", seed=m)
    rng = np.random.default_rng(m)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    bias, res = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in (n, (m, n)))
    w = torch.from_numpy(1 + 0.1 * rng.standard_normal(n).astype(np.float32))
    d = torch.device(DEVICE)
    y, normed = qmatmul_norm(x.to(d), raw.to(d), T.Q4_K, n, k, w.to(d), 1e-6, bias.to(d), res.to(d))
    y_ref = qmatmul_ref(x, raw, T.Q4_K) + bias + res
    assert (y.cpu() - y_ref).abs().max().item() <= RTOL[T.Q4_K] * y_ref.abs().max().item()
    ref = rmsnorm_ref(y.cpu(), w, 1e-6)[0]
    assert (normed.cpu() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    with pytest.raises(ValueError, match="norm weight"):
        qmatmul_norm(x[:1].to(d), raw.to(d), T.Q4_K, n, k, w[:-1].to(d), 1e-6)


def test_a_gemm_over_the_shared_memory_takes_fewer_stages(monkeypatch):
    """A tiled-GEMM launch Triton refuses for shared memory (OutOfResources: older Tritons lay
    the IQ1/IQ2_S tiles out in more than sm_86's 99 KiB at 3 stages) runs again with a stage
    fewer, and later launches of that shape start there; stages the caller gave are not
    changed. Here a stand-in kernel refuses more than one stage."""
    from triton.runtime.errors import OutOfResources

    from qvl.kernels import qmatmul as module

    real, tried = module.qmatmul_kernel, []

    class OneStage:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                tried.append(num_stages)
                if num_stages > 1:
                    raise OutOfResources(98304 * num_stages, 101376, "shared memory")
                return real[grid](*args, num_stages=num_stages, **kwargs)
            return launch

    monkeypatch.setattr(module, "qmatmul_kernel", OneStage())
    monkeypatch.setattr(module, "_STAGES_THAT_FIT", {})
    monkeypatch.setattr(module, "gemm_tiles", lambda gpu, dtype, qtype=None: (32, 32, 256, 4, 3))
    m, n, k = 9, 7, 256
    raw = quant_weights(n, k, T.IQ2_S, "normal", seed=5)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((m, k)).astype(np.float32))
    ref = qmatmul_ref(x, raw, T.IQ2_S)
    got = qmatmul(x.to(DEVICE), raw.to(DEVICE), T.IQ2_S, n, k).cpu()
    assert (got - ref).abs().max().item() <= RTOL[T.IQ2_S] * ref.abs().max().item()
    assert tried == [3, 2, 1]
    assert torch.equal(qmatmul(x.to(DEVICE), raw.to(DEVICE), T.IQ2_S, n, k).cpu(), got)
    assert tried == [3, 2, 1, 1]  # the shape's next launch starts at the stages that fitted
    with pytest.raises(OutOfResources):
        qmatmul(x.to(DEVICE), raw.to(DEVICE), T.IQ2_S, n, k, num_stages=2)
