"""The inline PTX of the batch-1 GEMV (kernels/qgemv_steps.py: the codes of Q4_K, Q4_0, Q4_1,
Q5_K, Q6_K, Q5_0, Q5_1, Q2_K and Q3_K as magic floats 2^23 + 65536 q, Q8_0's as 2^23 + 128 + q,
IQ4_NL / IQ4_XS's levels as 2^23 + 128 + level, four bytes a register) run through a small PTX
evaluator here, against the formula the interpreter path computes in plain Triton. The
interpreter cannot run inline assembly, so this is what checks the assembly text itself in CI:
each instruction's semantics as the PTX ISA defines them (prmt.b32 default mode: result byte i
is byte c[4i+2:4i] of {b, a}, b the high word). On a GPU the kernel tests run the assembly for
real."""

from __future__ import annotations

import re

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest

from qvl.kernels.qblocks import KVALUES
from qvl.kernels.qgemv_steps import (IQ4_MAGIC_ASM, Q2_K_MAGIC_ASM, Q3_K_MAGIC_ASM, Q4_K_MAGIC_ASM, Q5_0_MAGIC_ASM,
                                     Q5_K_MAGIC_ASM, Q6_K_ASM_0, Q6_K_ASM_1, Q6_K_ASM_2, Q6_K_ASM_3, Q8_0_MAGIC_ASM)

MASK = 0xFFFFFFFF


def run_ptx(code: str, inputs: dict[int, int], n_out: int) -> list[int]:
    """Evaluate the subset of PTX the GEMV uses (.reg, and/or/xor/shl/shr/mov/prmt .b32, mul.lo.u32) on operand
    registers $k = inputs[k]; returns $0 .. $(n_out - 1)."""
    regs: dict[str, int] = {f"${k}": v for k, v in inputs.items()}

    def value(operand: str) -> int:
        operand = operand.strip()
        if operand in regs:
            return regs[operand]
        if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", operand):
            return int(operand, 0)
        raise KeyError(f"register {operand} read before it is written")

    body = code.strip()
    assert body.startswith("{") and body.endswith("}"), code
    for statement in body[1:-1].split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, rest = statement.split(None, 1)
        dst, *src = [s.strip() for s in rest.split(",")]
        a = [value(s) for s in src]
        if op == "and.b32":
            out = a[0] & a[1]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "xor.b32":
            out = a[0] ^ a[1]
        elif op == "mul.lo.u32":
            out = (a[0] * a[1]) & MASK
        elif op == "shl.b32":
            out = (a[0] << a[1]) & MASK
        elif op == "shr.b32":
            out = a[0] >> a[1] if a[1] < 32 else 0  # shift amounts past the width clamp (PTX ISA)
        elif op == "mov.b32":
            out = a[0]
        elif op == "prmt.b32":
            source = a[0] | (a[1] << 32)  # bytes 0-3 from a, 4-7 from b
            out = 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0xF
                assert sel < 8, "sign-replicating selectors are not used"
                out |= ((source >> (8 * sel)) & 0xFF) << (8 * i)
        else:
            raise AssertionError(f"instruction {op} is outside the evaluator's subset")
        regs[dst] = out
    return [regs[f"${k}"] for k in range(n_out)]


def magic(q: int) -> int:
    """The interpreter path's bits (qgemv_steps._magic): 0x4B000000 | q << 16."""
    return 0x4B000000 | (q << 16)


def packed(values: np.ndarray) -> int:
    """Four bytes in one register, element j in byte j (Triton's <4 x i8> bitcast to i32)."""
    return int.from_bytes(bytes(int(v) for v in values), "little")


def test_magic_bits_are_the_float_2_23_plus_65536_q():
    q = np.arange(64, dtype=np.uint32)
    floats = (np.uint32(0x4B000000) | (q << 16)).view(np.float32)
    assert np.array_equal(floats, np.float32(2 ** 23) + 65536 * q.astype(np.float32))


def test_q4_k_low_and_high_nibbles():
    rng = np.random.default_rng(0)
    words = [np.array([b, 255 - b, (b * 7) % 256, (b * 13 + 5) % 256]) for b in range(256)]
    words += [rng.integers(0, 256, 4) for _ in range(200)]
    for word in words:
        got = run_ptx(Q4_K_MAGIC_ASM.value, {8: packed(word)}, 8)
        assert got[:4] == [magic(int(b) & 15) for b in word], word
        assert got[4:] == [magic(int(b) >> 4) for b in word], word


@pytest.mark.parametrize("t,code", enumerate([Q6_K_ASM_0, Q6_K_ASM_1, Q6_K_ASM_2, Q6_K_ASM_3]))
def test_q6_k_quarter(t, code):
    """Quarter t: the low (t < 2) or high nibble of ql, and bits 2t, 2t + 1 of qh as bits 4, 5."""
    rng = np.random.default_rng(t)
    for _ in range(500):
        ql, qh = rng.integers(0, 256, 4), rng.integers(0, 256, 4)
        got = run_ptx(code.value, {4: packed(ql), 5: packed(qh)}, 4)
        nib = [int(v) & 15 if t < 2 else int(v) >> 4 for v in ql]
        assert got == [magic(n | (((int(h) >> (2 * t)) & 3) << 4)) for n, h in zip(nib, qh)], (ql, qh)


def test_q8_0_signed_bytes():
    """Every int8 code q: the float of the bits is 2^23 + 128 + q, so that f - (2^23 + 128) = q
    exactly (the kernel's next instruction)."""
    codes = np.arange(-128, 128).reshape(64, 4)
    for word in codes:
        got = run_ptx(Q8_0_MAGIC_ASM.value, {4: packed(word.astype(np.int8).view(np.uint8))}, 4)
        assert got == [0x4B000000 | (int(q) + 128) for q in word], word
        floats = np.array(got, dtype=np.uint32).view(np.float32)
        assert np.array_equal(floats - np.float32(2 ** 23 + 128), word.astype(np.float32))


def test_q5_0_codes_of_a_run():
    """A run j0 .. j0 + 3 (j0 = 0, 4, 8, 12) of a Q5_0 block: the low nibbles of qs with qh's bits
    j0 .. j0 + 3 above them, the high nibbles with bits 16 + j0 ..; the other elements' copies
    of qh and j0 (operands $10-$12, $14-$16, $18-$20) must not matter, so they hold junk."""
    rng = np.random.default_rng(5)
    for trial in range(600):
        qs = rng.integers(0, 256, 4)
        qh = int(rng.integers(0, 2 ** 32)) if trial else 0xFFFFFFFF
        j0 = 4 * (trial % 4)
        junk = {k: int(rng.integers(0, 2 ** 32)) for k in (10, 11, 12, 14, 15, 16, 18, 19, 20)}
        got = run_ptx(Q5_0_MAGIC_ASM.value, {8: packed(qs), 9: qh & 0xFFFF, 13: qh >> 16, 17: j0} | junk, 8)
        low = [(int(b) & 15) | (((qh >> (j0 + i)) & 1) << 4) for i, b in enumerate(qs)]
        high = [(int(b) >> 4) | (((qh >> (16 + j0 + i)) & 1) << 4) for i, b in enumerate(qs)]
        assert got == [magic(q) for q in low + high], (qs, hex(qh), j0)


def test_q5_k_codes_of_a_group():
    """Four lanes of group g (shift 2g = 0, 2, 4, 6): the low nibbles of qs with bit 2g of each
    lane's qh byte above them, the high nibbles with bit 2g + 1; the other elements' copies of
    the shift ($11-$13) hold junk."""
    rng = np.random.default_rng(7)
    for trial in range(800):
        qs, qh = rng.integers(0, 256, 4), rng.integers(0, 256, 4)
        if trial == 0:
            qh[:] = 255
        g = trial % 4
        junk = {k: int(rng.integers(0, 2 ** 32)) for k in (11, 12, 13)}
        got = run_ptx(Q5_K_MAGIC_ASM.value, {8: packed(qs), 9: packed(qh), 10: 2 * g} | junk, 8)
        low = [(int(b) & 15) | (((int(h) >> (2 * g)) & 1) << 4) for b, h in zip(qs, qh)]
        high = [(int(b) >> 4) | (((int(h) >> (2 * g + 1)) & 1) << 4) for b, h in zip(qs, qh)]
        assert got == [magic(q) for q in low + high], (qs, qh, g)


def test_q2_k_q3_k_codes_of_a_run():
    """Four bytes of qs at field j (shift 2j = 0, 2, 4, 6): Q2_K's 2-bit codes; Q3_K's with bit
    4h + j (0..7) of each lane's hmask byte as bit 2. The other elements' copies of the shifts
    (Q2_K $6-$8, Q3_K $7-$9 and $11-$13) hold junk."""
    rng = np.random.default_rng(9)
    for trial in range(800):
        qs, hmask = rng.integers(0, 256, 4), rng.integers(0, 256, 4)
        if trial == 0:
            qs[:] = hmask[:] = 255
        j, bit = trial % 4, (trial // 4) % 8
        junk = {k: int(rng.integers(0, 2 ** 32)) for k in range(6, 14)}
        codes = [(int(b) >> (2 * j)) & 3 for b in qs]
        got = run_ptx(Q2_K_MAGIC_ASM.value, junk | {4: packed(qs), 5: 2 * j}, 4)
        assert got == [magic(q) for q in codes], (qs, j)
        got = run_ptx(Q3_K_MAGIC_ASM.value, junk | {4: packed(qs), 5: packed(hmask), 6: 2 * j, 10: bit}, 4)
        assert got == [magic(q | (((int(h) >> bit) & 1) << 2)) for q, h in zip(codes, hmask)], (qs, hmask, j, bit)


def test_iq4_levels_of_every_byte():
    """Every byte of qs in every lane: the low nibble's level (KVALUES, ggml's kvalues_iq4nl) as
    2^23 + 128 + level in $0..$3, the high nibble's in $4..$7; selectors never ask prmt to
    replicate a sign (the evaluator asserts it)."""
    rng = np.random.default_rng(11)
    for trial in range(256):
        qs = np.array([trial, *rng.integers(0, 256, 3)])[np.roll(np.arange(4), trial % 4)]
        got = run_ptx(IQ4_MAGIC_ASM.value, {8: packed(qs)}, 8)
        want = [KVALUES[int(b) & 15] for b in qs] + [KVALUES[int(b) >> 4] for b in qs]
        assert got == [0x4B000000 | (v + 128) for v in want], qs
        floats = np.array(got, dtype=np.uint32).view(np.float32)
        assert np.array_equal(floats - np.float32(2 ** 23 + 128), np.array(want, dtype=np.float32))


def test_evaluator_knows_prmt_and_rejects_the_unknown():
    # PTX ISA example: prmt.b32 with selector 0x3210 returns a unchanged, 0x7654 returns b
    assert run_ptx("{mov.b32 $0, $1; prmt.b32 $0, $1, $2, 0x3210;}", {1: 0x11223344, 2: 0x55667788}, 1) == [0x11223344]
    assert run_ptx("{prmt.b32 $0, $1, $2, 0x7654;}", {1: 0x11223344, 2: 0x55667788}, 1) == [0x55667788]
    assert run_ptx("{prmt.b32 $0, $1, $2, 0x0123;}", {1: 0x11223344, 2: 0}, 1) == [0x44332211]
    with pytest.raises(AssertionError):
        run_ptx("{add.u32 $0, $1, 1;}", {1: 0}, 1)
