"""Codebook lookups inside Mosaic GPU kernels (no gather lowers there).

* :func:`decode_prmt`: PTX ``prmt`` byte permutes through ``plgpu.inline_mgpu`` for a codebook
  antisymmetric in fp16 (Lloyd-Max codebooks are), known at trace time: its entries 8-15 are
  two byte planes of two words each (:func:`tq4jax.core.static_planes`); a nibble n >= 8 reads
  entry n, n < 8 reads entry 15 - n with the sign bit flipped. One asm instance takes 4 code
  bytes (8 nibbles) and returns the even coordinates (high nibbles) and the odd ones as fp16.
* :func:`decode_select`: a 4-level select tree over 16 scalars (any codebook; slow; the
  interpret-mode path).
* :func:`nibble_words`: 3-bit codes (vLLM's LSB-first bit stream) re-packed as nibbles
  ``code + 4``, so the 4-bit lookups above serve them with the 8-entry codebook in entries
  4-11 of a 16-entry antisymmetric table (:func:`nibble_codebook`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

#: Byte selectors pairing the low- and high-byte planes into fp16 lanes: high nibbles (even
#: coordinates) and low nibbles (odd coordinates) of a word's 4 bytes.
_EVEN, _ODD = 0x7351, 0x6240


#: A 3-bit code c is looked up as nibble c + 4 (entries 4-11 of the 16-entry table).
NIBBLE_BIAS3 = 4


def nibble_codebook(c8: Any) -> Any:
    """An 8-entry codebook (jnp or numpy, antisymmetric for the prmt lookup) -> its 16-entry
    table for :func:`nibble_words`' nibbles: entries 4-11 the codebook, 0-3 and 12-15 its
    outer entries (never read; they keep the table antisymmetric)."""
    xp = np if isinstance(c8, np.ndarray) else jnp
    c8 = c8[:8]
    return xp.concatenate([xp.repeat(c8[:1], 4), c8, xp.repeat(c8[7:], 4)])


def spread3(x: Any) -> Any:
    """uint32 [..] holding eight 3-bit fields in bits [0, 24) -> eight nibbles (field + 4)."""
    x = (x & 0xFFF) | ((x & 0xFFF000) << 4)
    x = (x & 0x3F003F) | ((x & 0xFC00FC0) << 2)
    x = (x & 0x7070707) | ((x & 0x38383838) << 1)
    return x + 0x44444444


def nibble_words(halfwords: list) -> list:
    """A 3-bit LSB-first code stream as 16-bit words (uint32 arrays, any shape; 3k words:
    16k codes) -> 2k uint32 words of nibbles ``code + 4``, code i at nibble i % 8 of word
    i // 8 (little-endian bytes: the even code in the low nibble)."""
    out = []
    for g in range(0, len(halfwords), 3):
        w0, w1, w2 = halfwords[g:g + 3]
        out += [spread3(w0 | ((w1 & 0xFF) << 16)), spread3((w1 >> 8) | (w2 << 8))]
    return out


def prmt_program(planes: tuple[int, int, int, int]) -> str:
    """PTX for one 32-bit word of codes ($4) -> even coordinates of bytes (0, 1) and (2, 3)
    ($0, $1) and odd coordinates ($2, $3), fp16x2 each. ``planes``: (low plane of entries
    8-11, of 12-15, high plane of 8-11, of 12-15)."""
    lines = ["{", ".reg .b32 L0, L1, H0, H1, t, u, s0, s1, x4, m0, m1, l, h;"]
    lines += [f"mov.b32 {r}, {w & 0xFFFFFFFF:#x};" for r, w in zip(("L0", "L1", "H0", "H1"),
                                                                   planes)]
    lines += ["not.b32 t, $4;", "and.b32 t, t, 0x88888888;",  # bit 3 clear: a negative entry
              "shr.u32 u, t, 3;", "sub.s32 u, t, u;",          # 7 in each such nibble
              "xor.b32 s0, $4, u;", "and.b32 s0, s0, 0x77777777;",  # entry index per nibble
              "shr.u32 s1, s0, 16;", "shl.b32 x4, $4, 4;",
              "prmt.b32 m0, x4, $4, 0xD9C8;",  # 0xFF bytes where n >= 8, nibbles 0-3
              "prmt.b32 m1, x4, $4, 0xFBEA;"]  # nibbles 4-7
    for k in (0, 1):
        lines += [f"prmt.b32 l, L0, L1, s{k};", f"prmt.b32 h, H0, H1, s{k};",
                  f"lop3.b32 h, h, m{k}, 0x80808080, 0xD2;",  # h ^ (~m & 0x80808080)
                  f"prmt.b32 ${k}, l, h, {_EVEN:#x};", f"prmt.b32 ${2 + k}, l, h, {_ODD:#x};"]
    return "\n".join(lines + ["}"])


def decode_prmt(codes: Any, planes: tuple[int, int, int, int]) -> tuple[Any, Any]:
    """uint8 code tile [R, C] in ``plgpu.Layout.WGMMA`` (2 bytes per register) -> (even, odd)
    coordinates, float16 [R, C] each in the same layout (wgmma register operands).
    Compiled kernels only (interpret mode cannot run inline PTX)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA
    out = plgpu.ShapeDtypeStruct(tuple(codes.shape), jnp.float16, layout)
    asm = prmt_program(planes)

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=(out, out))
    def lookup(ctx, c):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        f16x2 = ir.VectorType.get((2,), ir.F16Type.get())
        regs = c.registers
        flat = list(regs.flat)  # vector<2xi8> each: two registers make one word
        even, odd = np.empty_like(regs), np.empty_like(regs)
        struct = llvm.StructType.get_literal([i32] * 4)
        for k in range(0, len(flat), 2):
            word = mu.bitcast(mu.vector_concat([flat[k], flat[k + 1]]), i32)
            res = llvm.inline_asm(struct, [word], asm, "=r,=r,=r,=r,r")
            parts = [mu.bitcast(llvm.extractvalue(i32, res, [j]), f16x2) for j in range(4)]
            even.flat[k], even.flat[k + 1], odd.flat[k], odd.flat[k + 1] = parts

        def wrap(r):
            return mgpu.FragmentedArray(_registers=r, _layout=c.layout, _is_signed=None)

        return wrap(even), wrap(odd)

    return lookup(codes)


def decode_select(codes: Any, table: list) -> tuple[Any, Any]:
    """uint8 code tile -> (even, odd) float16 by a 4-level select tree over ``table`` (16
    float16 scalars). Any codebook; 15 selects per coordinate."""
    c = codes.astype(jnp.uint16)

    def pick(idx):
        bits = [(idx & (1 << k)) != 0 for k in range(4)]
        level = list(table)
        for k in range(4):
            level = [jnp.where(bits[k], level[2 * j + 1], level[2 * j])
                     for j in range(len(level) // 2)]
        return level[0]

    return pick(c >> 4), pick(c & 15)
