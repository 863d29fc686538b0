"""In-kernel decode helpers: the prmt codebook program, checked by a numpy model of PTX."""

import itertools
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from tq4jax.core import codebook_bits, lut_planes, static_planes
from tq4jax.pallas_triton.lut import lut_asm, lut_program, split_lut_asm


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


def lop3(a, b, c, lut):
    """PTX ``lop3.b32``: bit i of the result is bit (4a + 2b + c) of ``lut``."""
    out = np.zeros_like(a)
    for idx in range(8):
        if lut >> idx & 1:
            out |= ((a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c))
    return out


def run_ptx(text: str, regs: dict) -> dict:
    """Execute the straight-line PTX of an asm block (and, shr, shl, prmt, lop3 on .b32) on
    uint32 arrays; ``regs`` maps operand names ($i) to values and collects the results."""
    regs = dict(regs)
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        dst, *src = [a.strip() for a in rest.split(",")]
        a = [regs[v] if v.startswith("$") or v.isalpha() or not v[0].isdigit()
             else np.uint32(int(v, 0)) for v in src]
        name = op.split(".")[0]
        if name == "mov":
            regs[dst] = a[0]
        elif name == "not":
            regs[dst] = ~a[0]
        elif name == "and":
            regs[dst] = a[0] & a[1]
        elif name == "or":
            regs[dst] = a[0] | a[1]
        elif name == "xor":
            regs[dst] = a[0] ^ a[1]
        elif name == "sub":
            regs[dst] = a[0] - a[1]
        elif name == "shr":
            regs[dst] = a[0] >> a[1]
        elif name == "shl":
            regs[dst] = a[0] << a[1]
        elif name == "prmt":
            regs[dst] = prmt(*(x.astype(np.uint32) for x in np.broadcast_arrays(*a)))
        elif name == "fma":  # fma.rn.{f16x2,bf16x2} on exactly representable values
            dt = np.float16 if op.endswith(".f16x2") else jnp.bfloat16
            lanes = []
            for sh in (0, 16):
                f = [np.asarray((x >> np.uint32(sh)) & 0xFFFF, np.uint16).view(dt).astype(
                    np.float64) for x in np.broadcast_arrays(*a)]
                r = np.asarray(f[0] * f[1] + f[2]).astype(dt).view(np.uint16)
                lanes.append(r.astype(np.uint32) << np.uint32(sh))
            regs[dst] = lanes[0] | lanes[1]
        elif name == "lop3":
            regs[dst] = lop3(a[0], a[1], a[2], int(src[3], 16))
        else:
            raise AssertionError(op)
    return regs


@pytest.mark.parametrize("table", ["general", "symmetric", "linear"])
@pytest.mark.parametrize("low_first", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_split_asm_decodes_every_byte(rng, dtype, low_first, table):
    """4 code bytes in $2 and the table planes -> $0/$1 = the 4 even (or odd) coordinates:
    (c[even(b0)], c[even(b1)]), (c[even(b2)], c[even(b3)]) with even = the high nibble
    (``low_first``: the low nibble, vLLM's order)."""
    cent = (rng.standard_normal(16) * 0.3).astype(np.float32)  # arbitrary, unsorted
    if table == "symmetric":  # c[15 - j] == -c[j]: the 4-word table of entries 8-15
        cent[:8] = -cent[:7:-1]
    if table == "linear":  # entry n = n (vLLM's value levels): bit tricks, no table
        cent = np.arange(16, dtype=np.float32)
    bits = np.asarray(codebook_bits(jnp.asarray(cent), dtype)).astype(np.uint32)
    planes = np.asarray(lut_planes(jnp.asarray(bits, jnp.uint16))).view(np.uint32)
    static = static_planes(cent, dtype)
    assert static[0] == table
    b = rng.integers(0, 256, (4, 4096)).astype(np.uint32)
    for k in range(4):  # every byte in every position
        b[k, :256] = np.roll(np.arange(256), 64 * k)
    x = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
    inputs = {"$2": x, **{f"${3 + 4 * k}": np.uint32(planes[k]) for k in range(8)}}
    hi, lo = b >> 4, b & 15
    for odd, imm in itertools.product((False, True), (False, True)):  # imm: the unary form
        regs = run_ptx(split_lut_asm(odd, low_first, static if imm else None), inputs)
        want = bits[(lo if low_first else hi) if not odd else (hi if low_first else lo)]
        for r in (0, 1):
            np.testing.assert_array_equal(regs[f"${r}"] & 0xFFFF, want[2 * r])
            np.testing.assert_array_equal(regs[f"${r}"] >> np.uint32(16), want[2 * r + 1])


@pytest.mark.parametrize("bits3", [False, True], ids=["4bit", "3bit-nibbles"])
def test_mosaic_prmt_program_decodes_every_byte(rng, bits3):
    """The Mosaic GPU kernels' lookup (``pallas_mosaic.lut.prmt_program``, run compiled only)
    on the numpy PTX model: 4 code bytes in $4 -> the even coordinates (high nibbles) of bytes
    (0, 1) in $0 and (2, 3) in $1, the odd ones (low nibbles) in $2/$3, fp16, for an
    antisymmetric Lloyd-Max codebook; ``3bit-nibbles``: an 8-entry codebook in entries 4-11
    (``nibble_codebook``), read through nibbles 4-11 as the 3-bit path makes them."""
    from tq4jax.pallas_mosaic.lut import nibble_codebook, prmt_program
    from tq4jax.pallas_mosaic.tiles import prmt_planes
    cent = np.asarray(tq.lloyd_max(128, 3 if bits3 else 4)[0], np.float32)
    table = nibble_codebook(cent) if bits3 else cent
    planes = prmt_planes(table)
    assert planes is not None  # Lloyd-Max codebooks are antisymmetric in fp16
    bits = table.astype(np.float16).view(np.uint16).astype(np.uint32)
    lo, hi = (4, 12) if bits3 else (0, 16)
    b = rng.integers(lo, hi, (4, 4096, 2)).astype(np.uint32)
    b = b[..., 0] << 4 | b[..., 1]
    x = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
    regs = run_ptx(prmt_program(planes), {"$4": x})
    for k, (nib, r) in enumerate([(b >> 4, 0), (b & 15, 2)]):
        for half in (0, 1):
            word = regs[f"${r + half}"]
            np.testing.assert_array_equal(word & 0xFFFF, bits[nib[2 * half]], err_msg=str(k))
            np.testing.assert_array_equal(word >> np.uint32(16), bits[nib[2 * half + 1]])
