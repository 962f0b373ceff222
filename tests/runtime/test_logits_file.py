"""llama-perplexity's file of a base model's log-probabilities (runtime/logits_file.py) and the two
runs of `qvl perplexity` around it: rows encoded step for step as llama.cpp's log_softmax encodes
them (a scalar port of it, float32 throughout, is the oracle), the layout read back, a run cut
short leaving no file, and a quantized model measured from the file giving what the base beside
it gives, within the 16-bit steps' error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.loader import load
from qvl.runtime.logits_file import (FLOOR, LogitsFileError, decode, encode, file_bytes, read, row_width, scored,
                                     writing)
from qvl.runtime.perplexity import measure, summary
from tiny_models import TinySpec, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=11)
F32 = np.float32


def _llama_cpp_row(logits: np.ndarray) -> np.ndarray:
    """perplexity.cpp's log_softmax(n_vocab, logits, log_prob, tok), one float32 operation at a time."""
    top, low = F32(logits.max()), F32(logits.min())
    low = max(low, F32(top - F32(16)))
    sum_exp = 0.0
    for v in logits:
        sum_exp += float(np.exp(F32(v - top)))
    log_sum = F32(np.log(sum_exp))
    min_log_prob = F32(F32(low - top) - log_sum)
    scale = F32(F32(top - low) / F32(65535))
    out = np.zeros(row_width(len(logits)), np.uint16)
    out[:4] = np.array([scale, min_log_prob], np.float32).view(np.uint16)
    if scale:
        inv = F32(F32(1) / scale)
        for i, v in enumerate(logits):  # nearest_int: + 1.5 * 2^23 in float32, ties to even
            out[4 + i] = int(F32(F32(inv * F32(v - low)) + F32(12582912)).view(np.int32) & 0x7FFFFF) - 0x400000 \
                if v > low else 0
    return out


ROWS = {
    "spread": torch.randn(3, 37, generator=torch.Generator().manual_seed(0)) * 4,  # odd vocabulary: one pad step
    "past 16 nats": torch.cat([torch.full((1, 10), -30.0), torch.linspace(-5, 5, 10)[None]], 1),
    "all equal": torch.full((1, 8), 2.5),  # scale 0: every step 0, every log p = -ln 8
    "one huge": torch.tensor([[1e4, 0.0, -1e4, 3.0]]),
}


@pytest.mark.parametrize("name", ROWS)
def test_rows_are_llama_cpps_steps(name):
    logits = ROWS[name]
    got = encode(logits)
    want = np.stack([_llama_cpp_row(r) for r in logits.numpy()])
    assert got.shape == (logits.shape[0], row_width(logits.shape[1])) and got.shape[1] % 2 == 0
    head, want_head = got[:, :4].copy().view(np.float32), want[:, :4].copy().view(np.float32)
    np.testing.assert_allclose(head, want_head, rtol=1e-6)  # the sum of exponentials: float64 both, other order
    np.testing.assert_array_equal(got[:, 4:], want[:, 4:])  # the steps: the same float32 operations
    back = decode(got, logits.shape[1])
    true = torch.log_softmax(logits.double(), -1)
    kept = true > true.max(-1, keepdim=True).values - 16  # within the row's 16 nats: the step's error
    step = torch.from_numpy(head[:, :1]).double()
    assert ((back.double() - true).abs()[kept] <= (step / 2 + 1e-5).expand_as(true)[kept]).all()
    assert (back[~kept] <= true.max(-1, keepdim=True).values.float().expand_as(back)[~kept] - 16 + 1e-4).all()


def test_written_whole_and_read_back(tmp_path):
    n_ctx, n_vocab, tokens = 10, 41, list(range(20, 40))
    rows = torch.randn(2 * scored(n_ctx), n_vocab, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "base.kld"
    with writing(path, n_ctx, n_vocab, tokens + [1, 2, 3]) as add:  # a part chunk's tokens are not written
        assert not path.exists()
        add(rows[:3])
        add(rows[3:])
    assert path.stat().st_size == file_bytes(n_ctx, n_vocab, 2) == 8 + 12 + 4 * 20 + 2 * 8 * 46
    assert [p.name for p in tmp_path.iterdir()] == ["base.kld"]
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_" and np.frombuffer(raw, np.int32, 3, 8).tolist() == [10, 41, 2]
    got = read(path)
    assert (got.n_ctx, got.n_vocab, got.n_chunk, got.tokens) == (10, 41, 2, tokens)
    torch.testing.assert_close(got.log_probs(1, 1, 3), decode(encode(rows[5:7]), n_vocab), rtol=0, atol=0)


def test_a_run_cut_short_leaves_nothing(tmp_path):
    path = tmp_path / "base.kld"
    with pytest.raises(KeyboardInterrupt):
        with writing(path, 10, 5, list(range(10))) as add:
            add(torch.zeros(2, 5))
            raise KeyboardInterrupt
    with pytest.raises(LogitsFileError, match="2 rows written of 4"):
        with writing(path, 10, 5, list(range(10))) as add:
            add(torch.zeros(2, 5))
    with pytest.raises(LogitsFileError, match="rows of 6 logits, the file's vocabulary is 5"):
        with writing(path, 10, 5, list(range(10))) as add:
            add(torch.zeros(2, 6))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LogitsFileError, match="no folder"):
        with writing(tmp_path / "none" / "base.kld", 10, 5, list(range(10))):
            pass
    with pytest.raises(LogitsFileError, match="is a folder"):
        with writing(tmp_path, 10, 5, list(range(10))):
            pass


def test_files_that_are_not_whole_are_refused(tmp_path):
    path = tmp_path / "base.kld"
    with writing(path, 10, 5, list(range(10))) as add:
        add(torch.zeros(4, 5))
    whole = path.read_bytes()
    for name, data, expect in (
        ("short", whole[:-2], "cut short"),
        ("long", whole + b"\0\0", "cut short"),
        ("magic", b"_logitz_" + whole[8:], "not a file of log-probabilities"),
        ("empty", b"", "not a file of log-probabilities"),
        ("header", whole[:8] + np.array([10, 0, 1], np.int32).tobytes() + whole[20:], "0 in the vocabulary"),
        ("token", whole[:20] + np.array([7], np.int32).tobytes() + whole[24:], "outside the vocabulary of 5"),
    ):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(LogitsFileError, match=expect):
            read(bad)
    with pytest.raises(LogitsFileError, match="No such file"):
        read(tmp_path / "none")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("kld")
    src = make_checkpoint(d / "ckpt", SPEC)
    return {t: to_gguf(src, d / f"m-{t}.gguf", t, "f32") for t in ("f32", "q4_k_m")}


STEP_TOL = 2e-4  # nats: half a 16-bit step of a 16-nat span (1.2e-4), and float32 sums (measured 5.7e-5)
KLD_TOL = 5e-5  # a token's KL divergence: the steps' errors weighted by the base's probabilities (measured 5.2e-6)


def test_the_file_gives_what_the_base_beside_the_model_gives(tiny, tmp_path):
    ids = torch.randint(0, 1000, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    f32, q4 = load(tiny["f32"], device="cpu"), load(tiny["q4_k_m"], device="cpu")
    path = tmp_path / "f32.kld"
    with writing(path, 32, f32.cfg.n_vocab, ids[:96]) as keep:
        written = measure(f32, ids, 32, keep=keep)
    stored = read(path)
    assert stored.tokens == ids[:96] and stored.n_chunk == 3
    itself = measure(f32, ids, 32, stored=stored)
    np.testing.assert_array_equal(itself.nll, written.nll)
    assert np.abs(itself.nll_base - itself.nll).max() <= STEP_TOL and itself.same_top.all()
    assert np.abs(itself.kld).max() <= KLD_TOL
    beside, from_file = measure(q4, ids, 32, base=f32), measure(q4, ids, 32, stored=stored)
    np.testing.assert_array_equal(from_file.nll, beside.nll)
    assert np.abs(from_file.nll_base - beside.nll_base).max() <= STEP_TOL
    assert np.abs(from_file.kld - beside.kld).max() <= KLD_TOL, np.abs(from_file.kld - beside.kld).max()
    assert np.abs(from_file.p_diff - beside.p_diff).max() <= KLD_TOL  # probabilities: measured 2.2e-7
    np.testing.assert_array_equal(from_file.same_top, beside.same_top)
    s_file, s_beside = summary(from_file), summary(beside)
    assert s_beside["kld"] > 100 * KLD_TOL and abs(s_file["kld"] - s_beside["kld"]) <= KLD_TOL
    two = measure(q4, ids, 32, chunks=2, stored=stored)
    np.testing.assert_array_equal(two.kld, from_file.kld[:2 * scored(32)])


def test_the_floor_leaves_out_what_llama_cpp_leaves_out():
    """Base tokens at e^-16 or below add nothing to the KL divergence from a file."""
    from qvl.runtime.perplexity import score_chunk
    from test_perplexity import _Fixed

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(12, 30, generator=gen)
    b = q.clone()
    b[:, :10] -= 40  # far below: no share of the base's distribution
    ids = torch.randint(0, 30, (12,), generator=gen).tolist()
    lb = torch.log_softmax(b, -1)
    got = score_chunk(_Fixed(q), ids, stored=lambda start, stop: lb[6 + start:6 + stop])
    lq = torch.log_softmax(q.double(), -1)[6:11]
    lbd = lb.double()[6:11]
    want = torch.where(lbd > FLOOR, lbd.exp() * (lbd - lq), 0).sum(-1)
    np.testing.assert_allclose(got.kld, want.numpy(), rtol=1e-5)
    assert (want != (lbd.exp() * (lbd - lq)).sum(-1)).any()  # the floor did leave terms out


def test_the_two_runs_of_the_command(tiny, tmp_path):
    text = tmp_path / "text.txt"
    words = "the cat sat on a mat and looked at one dog that ran over the hill".split()
    text.write_text(" ".join(np.random.default_rng(6).choice(words, 200)), encoding="utf-8")
    path = tmp_path / "f32.kld"
    first = CliRunner().invoke(app, ["perplexity", str(tiny["f32"]), "-f", str(text), "-c", "48",
                                     "--kl-divergence-base", str(path), "--json"])
    assert first.exit_code == 0, first.output
    assert f"the log-probabilities written to {path}" in first.stderr and read(path).n_ctx == 48
    second = CliRunner().invoke(app, ["perplexity", str(tiny["q4_k_m"]), "--kl-divergence-base", str(path),
                                      "--kl-divergence", "--json"])
    assert second.exit_code == 0, second.output
    got, base_run = json.loads(second.stdout), json.loads(first.stdout)
    assert got["ctx_size"] == 48 and got["chunks"] == base_run["chunks"] and got["base"] == str(path)
    assert abs(got["ppl_base"] - base_run["ppl"]) <= 1e-3 * base_run["ppl"] and got["kld"] > 0
    words_out = CliRunner().invoke(app, ["perplexity", str(tiny["q4_k_m"]), "--kl-divergence-base", str(path),
                                         "--kl-divergence", "--chunks", "1"])
    assert words_out.exit_code == 0 and "Mean    KLD:" in words_out.stdout and "[1/1]" in words_out.stderr
    for args, expect in (
        (["--kl-divergence"], "--kl-divergence reads the base's log-probabilities from --kl-divergence-base FILE"),
        (["-f", str(text), "--kl-divergence-base", str(path), "--base", str(tiny["f32"])], "one base or the other"),
        (["-f", str(text), "--kl-divergence-base", str(path), "--kl-divergence"], "the text is the one"),
        ([], "the text to score: -f FILE"),
        (["--kl-divergence-base", str(path), "--kl-divergence", "-c", "64"], "was made with chunks of 48 tokens"),
        (["--kl-divergence-base", str(path), "--kl-divergence", "--chunks", "99"], f"holds {got['chunks']}"),
        (["--kl-divergence-base", str(text), "--kl-divergence"], "not a file of log-probabilities"),
        (["-f", str(text), "-c", "400", "--kl-divergence-base", str(tmp_path / "new.kld")], "needs 800 or more"),
    ):
        r = CliRunner().invoke(app, ["perplexity", str(tiny["q4_k_m"]), *args])
        assert r.exit_code == 2 and r.stderr.startswith("qvl perplexity: error: ") and expect in r.stderr \
            and r.stderr.count("\n") == 1, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32.kld", "text.txt"]
