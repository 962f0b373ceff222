"""Our quantizers against the bytes ggml itself wrote (fixtures/ggml-quant-vectors.npz)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qvl.convert.quant import QuantError, dequantize, quantize, row_bytes, to_bf16

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def vectors(fixtures_dir):
    return np.load(fixtures_dir / "ggml-quant-vectors.npz")


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_reference(vectors, name):
    rows = vectors["input"]
    expected = vectors[name]
    got = quantize(rows, T[name])
    assert got.shape == expected.shape
    bad = np.flatnonzero((got != expected).any(axis=1))
    kinds = sorted(set(vectors["kind"][bad].tolist()))
    assert bad.size == 0, f"{name}: {bad.size} rows differ from ggml, kinds {kinds}"


def test_fixture_covers_every_kind(vectors):
    # the byte test above only means something if the hard cases are in the file
    kinds = set(vectors["kind"].tolist())
    assert {"zeros", "constant", "tiny", "huge", "outlier", "sparse", "heavy"} <= kinds


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_agrees_with_gguf(vectors, name):
    data = vectors[name]
    ours = dequantize(data, T[name])
    theirs = gguf_dequantize(data, T[name])
    np.testing.assert_array_equal(ours, theirs)
    # and the round trip is close to the input for ordinary rows
    normal = vectors["kind"] == "normal"
    err = np.abs(ours[normal] - vectors["input"][normal]).max()
    assert err < 0.5 * np.abs(vectors["input"][normal]).max()


def test_q8_0_matches_gguf_py_on_random_rows():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((7, 96)).astype(np.float32) * 3
    np.testing.assert_array_equal(quantize(rows, T.Q8_0), gguf_quantize(rows, T.Q8_0))


def test_float_types_and_bf16():
    rows = np.array([[1.0, -2.5, 3.140625, 1e-8]], dtype=np.float32)
    assert quantize(rows, T.F16).view(np.float16).tolist() == [[1.0, -2.5, 3.140625, np.float16(1e-8)]]
    np.testing.assert_array_equal(to_bf16(rows), gguf_quantize(rows, T.BF16))


def test_chunking_does_not_change_bytes(monkeypatch):
    import qvl.convert.quant as q

    rng = np.random.default_rng(1)
    rows = rng.standard_normal((9, 512)).astype(np.float32)
    whole = quantize(rows, T.Q4_K)
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 512)
    np.testing.assert_array_equal(quantize(rows, T.Q4_K), whole)


def test_row_not_multiple_of_block_is_an_error():
    with pytest.raises(QuantError, match="Q4_K"):
        row_bytes(T.Q4_K, 3420)
    with pytest.raises(QuantError):
        quantize(np.zeros((2, 48), np.float32), T.Q8_0)
