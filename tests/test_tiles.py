"""In-kernel decode helpers: the prmt codebook program, checked by a numpy model of PTX."""

import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from tq4jax._tiles import codebook_bits, lut_asm, lut_program


def prmt(a, b, c):
    """PTX ``prmt.b32`` (default mode) on uint32 arrays."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = np.choose(sel & 7, src)
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def run_program(prog, x):
    regs = {"$2": x}
    val = lambda v: np.full_like(x, v) if isinstance(v, int) else regs[v]  # noqa: E731
    for op, dst, *src in prog:
        a = [val(v) for v in src]
        if op == "mov":
            regs[dst] = a[0]
        elif op == "shr":
            regs[dst] = a[0] >> a[1]
        elif op == "and":
            regs[dst] = a[0] & a[1]
        elif op == "or":
            regs[dst] = a[0] | a[1]
        elif op == "prmt":
            regs[dst] = prmt(*a)
        else:
            raise AssertionError(op)
    return [regs["$0"], regs["$1"]]


@pytest.mark.parametrize("low_first", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_lut_program_decodes_every_byte(rng, dtype, low_first):
    """Lanes (b0, b0, b1, b1) -> (c[b0 >> 4], c[b0 & 15]) in $0 and the same for b1 in $1
    (``low_first``: (c[b0 & 15], c[b0 >> 4]), vLLM's order)."""
    cent = np.sort(rng.standard_normal(16)).astype(np.float32)  # arbitrary, asymmetric
    bits = np.asarray(codebook_bits(jnp.asarray(cent), dtype)).astype(np.uint32)
    b = rng.integers(0, 256, (2, 4096)).astype(np.uint32)
    b[:, :256] = [np.arange(256), np.arange(256)[::-1]]  # every byte in both positions
    x = b[0] * 0x0101 + b[1] * 0x01010000
    words = run_program(lut_program(tuple(int(v) for v in bits), low_first), x)
    first, second = (b & 15, b >> 4) if low_first else (b >> 4, b & 15)
    for k in (0, 1):
        np.testing.assert_array_equal(words[k] & 0xFFFF, bits[first[k]])
        np.testing.assert_array_equal(words[k] >> np.uint32(16), bits[second[k]])


def test_lut_asm_text():
    cent, _ = tq.lloyd_max(128, 4)
    bits = tuple(int(b) for b in np.asarray(codebook_bits(jnp.asarray(cent), jnp.float16)))
    asm = lut_asm(bits)
    assert asm.count("prmt.b32") == 9 and "$2" in asm and asm.startswith("{")
