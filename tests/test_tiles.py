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
    regs = {"$4": x}
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
    return [regs[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_lut_program_decodes_every_byte(rng, dtype):
    """4 code bytes per register -> per byte, its two centroids as one uint32."""
    cent = np.sort(rng.standard_normal(16)).astype(np.float32)  # arbitrary, asymmetric
    bits = np.asarray(codebook_bits(jnp.asarray(cent), dtype)).astype(np.uint32)
    x = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    x[:64] = np.arange(256, dtype=np.uint32).reshape(64, 4) @ (1 << 8 * np.arange(4, dtype=np.uint32))
    words = run_program(lut_program(tuple(int(b) for b in bits)), x)
    for k in range(4):  # word k = centroid of byte k's high nibble | low nibble's << 16
        byte = (x >> np.uint32(8 * k)) & 0xFF
        np.testing.assert_array_equal(words[k] & 0xFFFF, bits[byte >> 4])
        np.testing.assert_array_equal(words[k] >> np.uint32(16), bits[byte & 15])


def test_lut_asm_text():
    cent, _ = tq.lloyd_max(128, 4)
    bits = tuple(int(b) for b in np.asarray(codebook_bits(jnp.asarray(cent), jnp.float16)))
    asm = lut_asm(bits)
    assert asm.count("prmt.b32") == 16 and "$4" in asm and asm.startswith("{")
