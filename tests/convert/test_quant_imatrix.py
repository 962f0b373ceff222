"""Our quantizers with an importance matrix against the bytes ggml's own wrote with it, and
Q3_K's, Q2_K's, IQ4_NL's, IQ4_XS's, IQ3_XXS's, IQ3_S's, IQ2_S's and IQ1_M's without one
(tests/convert/ggml-extra-vectors.npz, made by scripts/make_ggml_vectors.py through ctypes from a
libggml-base built from llama.cpp's sources: ggml_quantize_chunk with the imatrix, the function
llama-quantize --imatrix calls). The rows are the shared fixture's, eight of each kind (zeros,
constant, tiny, huge, outlier, sparse, ...) under each of two importance matrices (one
log-normal, one with zero and enormous columns), and eight made with holes for the grid types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qvl.convert.quant import QuantError, dequantize, quantize

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS",
         "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
GRID = ["IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
WEIGHTED_ONLY = ["IQ2_XXS", "IQ2_XS", "IQ1_S"]  # ggml quantizes them only with an importance matrix


@pytest.fixture(scope="module")
def ggml(fixtures_dir):
    made = np.load(Path(__file__).parent / "ggml-extra-vectors.npz")
    shared = np.load(fixtures_dir / "ggml-quant-vectors.npz")
    return made, shared["input"][made["rows"]], shared


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_with_an_importance_matrix(ggml, name, which):
    made, x, shared = ggml
    rows = made["which"] == which
    got = quantize(x[rows], T[name], made["imatrix"][which])
    bad = np.flatnonzero((got != made[name][rows]).any(axis=1))
    kinds = sorted(set(shared["kind"][made["rows"][rows][bad]].tolist()))
    assert bad.size == 0, f"{name}: {bad.size} rows differ from ggml, kinds {kinds}"
    if name not in WEIGHTED_ONLY:
        plain = quantize(x[rows], T[name])
        assert (plain != got).any(axis=1).mean() > 0.5  # the matrix did change most rows


@pytest.mark.parametrize("name", ["Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"])
def test_the_other_types_bytes_equal_ggml(ggml, name):
    """The types the shared fixture has no bytes of, without an importance matrix (IQ4_NL and
    IQ4_XS as quantize_iq4_nl / quantize_iq4_xs write them, llama-quantize's: 7 trial scales)."""
    made, x, shared = ggml
    got = quantize(x, T[name])
    bad = np.flatnonzero((got != made[f"{name}_plain"]).any(axis=1))
    assert bad.size == 0, f"{name}: rows of kinds {sorted(set(shared['kind'][made['rows'][bad]].tolist()))} differ"


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("name", GRID)
def test_grid_types_with_all_zero_sub_blocks_equal_ggml(ggml, name, weighted):
    """Rows with all-zero runs of 16 weights inside live blocks: each such sub-block keeps a zero
    scale and zero indices (IQ3_S's qs and signs of the live sub-blocks after it move up a place,
    as ggml writes them), and runs of equal values (IQ1's sorted order keeps theirs, as glibc's
    merge sort does); with the first importance matrix and without."""
    made = ggml[0]
    if not weighted and name in WEIGHTED_ONLY:
        with pytest.raises(QuantError, match=f"{name} is quantized only with an importance matrix"):
            quantize(made["holes"], T[name])
        return
    got = quantize(made["holes"], T[name], made["imatrix"][0] if weighted else None)
    np.testing.assert_array_equal(got, made[f"{name}_holes" if weighted else f"{name}_holes_plain"])


def test_the_vectors_cover_the_hard_kinds(ggml):
    made, _, shared = ggml
    assert {"zeros", "constant", "tiny", "huge", "outlier", "sparse"} <= set(shared["kind"][made["rows"]].tolist())
    assert (made["imatrix"][1] == 0).any() and made["imatrix"][1].max() > 1e5 * np.median(made["imatrix"][1])


def test_q8_0_and_float_types_take_none(ggml):
    made, x, _ = ggml
    for t in (T.Q8_0, T.F16, T.F32):
        np.testing.assert_array_equal(quantize(x, t, made["imatrix"][0]), quantize(x, t))


def test_an_importance_matrix_of_another_width_is_refused(ggml):
    made, x, _ = ggml
    with pytest.raises(QuantError, match="an importance matrix of 256 values for rows of 512"):
        quantize(x, T.Q4_K, made["imatrix"][0][:256])


@pytest.mark.parametrize("name", [t for t in TYPES if t not in WEIGHTED_ONLY])
def test_the_matrix_lowers_the_error_it_weighs(name):
    """What an importance matrix is for: with inputs whose mean squares are its values (a few
    columns much larger, as real activations have), the expected squared error of a row's
    product, sum_j imatrix_j * (w_j - q_j)^2, is lower than without it (measured 0.26-0.62 of it
    for these types on this draw; a loose 0.8 here)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 512)).astype(np.float32)
    imatrix = np.exp(rng.normal(0, 2, 512)).astype(np.float32)
    err = {}
    for kind, m in (("plain", None), ("weighted", imatrix)):
        back = dequantize(quantize(w, T[name], m), T[name])
        err[kind] = float(((back - w) ** 2 * imatrix).sum())
    assert err["weighted"] < 0.8 * err["plain"], err


def test_iq4_nearest_level_is_ggmls_binary_search():
    """best_index counts midpoints; ggml's best_index_int8 searches and compares two float32
    differences: the same index for every value, at and beside each midpoint and level too, and
    for infinities and NaN (every comparison false: its search ends at 15)."""
    from qvl.convert.quant.iq4 import LEVELS, best_index

    levels = LEVELS.astype(np.float32)

    def ggml_index(v: np.float32) -> int:
        if v <= levels[0]:
            return 0
        if v >= levels[15]:
            return 15
        lo, hi = 0, 15
        while hi - lo > 1:
            mid = (lo + hi) // 2
            hi, lo = (mid, lo) if v < levels[mid] else (hi, mid)
        return hi - 1 if np.float32(v - levels[hi - 1]) < np.float32(levels[hi] - v) else hi

    mids = (levels[:-1] + levels[1:]) / 2
    xs = np.concatenate([np.random.default_rng(0).uniform(-140, 130, 20000), mids, levels,
                         *(np.nextafter(a, np.float32(s * 1e9)) for a in (mids, levels) for s in (-1, 1)),
                         [-1e30, 1e30, 0.0, -0.0, 114.5, -128.5, np.inf, -np.inf, np.nan]]).astype(np.float32)
    np.testing.assert_array_equal(best_index(xs), [ggml_index(v) for v in xs])
