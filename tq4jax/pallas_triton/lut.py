"""In-register codebook lookups for the Triton-lowered kernels (PTX ``prmt`` through
``elementwise_inline_asm``) and the codebook tables the kernels take.

A static codebook is decoded without memory access: ``prmt`` (byte permute) looks up 4 bytes
by 4 selector nibbles in an 8-byte table held in two registers. Interpret mode (no PTX)
gathers from the table instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plgpu

from ..backend import kernel_mode
from ..core import (MAGIC, codebook_bits, int8_codebook, is_static, lut_planes, split16,
                    static_planes)
from ..layout import CODEBOOK_SLOTS, pad_codebook
from .tiles import interleave, split_nibbles

# A static codebook is decoded without memory access: PTX ``prmt`` (byte permute) looks up 4
# bytes by 4 selector nibbles in an 8-byte table held in two registers. The 16 16-bit entries
# are split into byte planes (low bytes l, high bytes h; 4 registers each); per 4 nibbles,
# 3 prmt per plane (entries 0-7, 8-15, pick by the nibble's bit 3) and 2 prmt to pair the
# planes back into 16-bit values: 13 integer instructions for 4 coordinates. One asm instance
# reads 4 int8 lanes holding code bytes (b0, b0, b1, b1) - the packed tile joined with itself -
# and writes 4 16-bit lanes (c[b0 >> 4], c[b0 & 15], c[b1 >> 4], c[b1 & 15]): the decoded
# tile comes out already interleaved, [rows, D].
_PAIR_SEL = (0x4051, 0x6273)  # bytes (l1, h1, l0, h0) and (l3, h3, l2, h2) of (rl, rh)
_PAIR_SEL_LOW_FIRST = (0x5140, 0x7362)  # (l0, h0, l1, h1), (l2, h2, l3, h3): low nibble first


def lut_program(bits16: tuple[int, ...], low_first: bool = False) -> list[tuple]:
    """Straight-line program (op, dst, *srcs) of one asm instance for a static codebook (16
    uint16 patterns). Ops: mov, shr, and, or (immediate second operand), prmt (a, b, sel).
    ``low_first``: a byte's low nibble is the earlier coordinate (vLLM's LSB-first order)."""
    plane = lambda shift, i: sum(((bits16[i + j] >> shift) & 0xFF) << (8 * j)  # noqa: E731
                                 for j in range(4))
    prog = [("mov", f"{n}{k}", plane(sh, 4 * k)) for n, sh in (("l", 0), ("h", 8))
            for k in range(4)]
    prog += [("prmt", "s", "$2", "$2", 0x0020),  # nibbles (b0 & 15, b0 >> 4, b1 & 15, b1 >> 4)
             ("and", "sel", "s", 0x7777), ("shr", "sel2", "s", 1),
             ("and", "sel2", "sel2", 0x4444), ("or", "sel2", "sel2", 0x3210)]
    for n in ("l", "h"):
        prog += [("prmt", "lo", f"{n}0", f"{n}1", "sel"), ("prmt", "hi", f"{n}2", f"{n}3", "sel"),
                 ("prmt", f"r{n}", "lo", "hi", "sel2")]
    sel = _PAIR_SEL_LOW_FIRST if low_first else _PAIR_SEL
    prog += [("prmt", f"${i}", "rl", "rh", sel[i]) for i in (0, 1)]
    return prog


def lut_asm(bits16: tuple[int, ...], low_first: bool = False) -> str:
    """PTX text of :func:`lut_program` for ``elementwise_inline_asm`` (pack=4)."""
    prog = lut_program(bits16, low_first)
    regs = sorted({op[1] for op in prog if not op[1].startswith("$")})
    lines = ["{", f".reg .b32 {', '.join(regs)};"]
    for op, dst, *src in prog:
        src = [f"{x:#x}" if isinstance(x, int) else x for x in src]
        lines.append(f"{op}.b32 {dst}, {', '.join(src)};")
    return "\n".join(lines + ["}"])


def decode_codes(table_ref: Any, packed: jnp.ndarray, dtype: Any,
                 lut: tuple[int, ...] | None = None, low_first: bool = False) -> jnp.ndarray:
    """uint8 code tile [R, C] -> centroids [R, 2C] in ``dtype``, coordinates in order (even =
    high nibble first; ``low_first``: even = low nibble).

    ``dtype`` fp16/bf16: ``table_ref`` is the :func:`codebook_bits` of the codebook (32 bytes:
    one memory sector). ``dtype`` float32: ``table_ref`` is the float32 codebook. ``dtype``
    int8: ``table_ref`` is an :func:`int8_codebook` table and the result holds the codebook's
    int8 levels. ``lut`` (the table's 16 16-bit patterns, static) decodes in registers with
    ``prmt`` (compiled kernels only); otherwise two gathers per byte from ``table_ref``.
    """
    int8 = jnp.dtype(dtype) == jnp.int8
    if lut is not None:
        b = lax.bitcast_convert_type(packed, jnp.int8)  # Triton integers are signless
        shape = (packed.shape[0], 2 * packed.shape[1])
        [out] = plgpu.elementwise_inline_asm(
            lut_asm(lut, low_first), args=[interleave(b, b)], constraints="=r,=r,r", pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int16 if int8 else dtype)])
        return out.astype(jnp.int8) if int8 else out
    hi, lo = split_nibbles(packed)
    first, second = (lo, hi) if low_first else (hi, lo)
    if int8:
        return interleave(table_ref[first], table_ref[second]).astype(jnp.int32).astype(jnp.int8)
    if table_ref.dtype == jnp.dtype(dtype):
        return interleave(table_ref[first], table_ref[second])
    return interleave(lax.bitcast_convert_type(table_ref[first], dtype),
                      lax.bitcast_convert_type(table_ref[second], dtype))


# Split decode (the attention kernels' path): an asm instance reads 4 code bytes (8 nibbles)
# and writes the 4 even or the 4 odd coordinates as 16-bit values, so no join or shuffle is
# needed and each half feeds its own tensor-core dot. The even and the odd instance hold the
# same lookup code (ptxas merges it; a Pallas asm call has one result). The 16-entry table is
# 8 words of byte planes (:func:`lut_planes`): immediates for a codebook known at trace time
# (:func:`static_planes`, also a 4-word antisymmetric and a table-free linear form), otherwise
# asm operands loaded from memory. General form, per 4 nibbles: 4 prmt look up entries 0-7 and
# 8-15 of both planes, a prmt in sign-replicate mode turns each nibble's bit 3 into a 0x00/0xFF
# byte mask, 2 lop3 pick by it, 2 prmt pair the planes into 16-bit values: 23 instructions for
# 8 coordinates.
_PAIR_SEL_SPLIT = (0x7351, 0x6240)  # lanes (n1, n3), (n0, n2): a byte's high, low nibbles
_PLANE_REGS = tuple(f"${3 + 4 * k}" for k in range(8))  # table arg k, pack 4: $3+4k .. $6+4k


def split_lut_asm(odd: bool, low_first: bool = False,
                  planes: tuple[int, ...] | None = None) -> str:
    """PTX of one split-decode instance (pack=4): $2 holds 4 code bytes, $0/$1 get their even
    (``odd``: odd) coordinates, two 16-bit values each. Even coordinates are high nibbles
    (``low_first``: low nibbles). The table planes are the operands _PLANE_REGS, or with
    static ``planes`` (:func:`static_planes`) immediates: then the asm is unary, and Triton
    can move a following layout conversion to the code load instead of the decoded tile."""
    if planes is not None and planes[0] != "general":
        form = {"symmetric": _symmetric_lut_asm, "linear": _linear_lut_asm}[planes[0]]
        return form(odd, low_first, planes[1:])
    lines = ["{", ".reg .b32 s0, s1, x4, m0, m1, lx, ly, hx, hy, l, h;"]
    regs = _PLANE_REGS
    if planes is not None:
        regs = tuple(f"t{k}" for k in range(8))
        lines += [f".reg .b32 {', '.join(regs)};"]
        lines += [f"mov.b32 t{k}, {w & 0xFFFFFFFF:#x};" for k, w in enumerate(planes[1:])]
    l0, l1, l2, l3, h0, h1, h2, h3 = regs
    pair = _PAIR_SEL_SPLIT[odd != low_first]
    lines += ["and.b32 s0, $2, 0x7777;", "shr.b32 s1, $2, 16;", "and.b32 s1, s1, 0x7777;",
              "shl.b32 x4, $2, 4;",
              "prmt.b32 m0, x4, $2, 0xD9C8;",  # lanes: bit 3 of nibbles 0-3 -> 0x00 / 0xFF
              "prmt.b32 m1, x4, $2, 0xFBEA;"]  # nibbles 4-7
    for half, (s, m) in enumerate((("s0", "m0"), ("s1", "m1"))):
        lines += [f"prmt.b32 lx, {l0}, {l1}, {s};", f"prmt.b32 ly, {l2}, {l3}, {s};",
                  f"lop3.b32 l, lx, ly, {m}, 0xD8;",  # (lx & ~m) | (ly & m)
                  f"prmt.b32 hx, {h0}, {h1}, {s};", f"prmt.b32 hy, {h2}, {h3}, {s};",
                  f"lop3.b32 h, hx, hy, {m}, 0xD8;",
                  f"prmt.b32 ${half}, l, h, {pair:#x};"]
    return "\n".join(lines + ["}"])


def _symmetric_lut_asm(odd: bool, low_first: bool, planes: tuple[int, ...]) -> str:
    """:func:`split_lut_asm` for an antisymmetric codebook: the table holds entries 8-15 only
    (low-byte plane, high-byte plane: 4 words); nibble n >= 8 reads entry n, n < 8 reads
    entry 15 - n and flips the sign bit. 18 instructions for 8 coordinates."""
    pair = _PAIR_SEL_SPLIT[odd != low_first]
    lines = ["{", ".reg .b32 t, u, s0, s1, x4, m0, m1, l, h, lm0, lm1, hm0, hm1;"]
    lines += [f"mov.b32 {r}, {w & 0xFFFFFFFF:#x};"
              for r, w in zip(("lm0", "lm1", "hm0", "hm1"), planes)]
    lines += ["not.b32 t, $2;", "and.b32 t, t, 0x88888888;",  # bit 3 of negative nibbles
              "shr.b32 u, t, 3;", "sub.s32 u, t, u;",  # 7 in each negative nibble
              "xor.b32 s0, $2, u;", "and.b32 s0, s0, 0x77777777;",  # entry index (15 - n) & 7
              "shr.b32 s1, s0, 16;", "shl.b32 x4, $2, 4;",
              "prmt.b32 m0, x4, $2, 0xD9C8;",  # lanes of nibbles 0-3: 0xFF if n >= 8
              "prmt.b32 m1, x4, $2, 0xFBEA;"]  # nibbles 4-7
    for half, (sel, m) in enumerate((("s0", "m0"), ("s1", "m1"))):
        lines += [f"prmt.b32 l, lm0, lm1, {sel};", f"prmt.b32 h, hm0, hm1, {sel};",
                  f"not.b32 t, {m};", "and.b32 t, t, 0x80808080;", "xor.b32 h, h, t;",
                  f"prmt.b32 ${half}, l, h, {pair:#x};"]
    return "\n".join(lines + ["}"])


def _linear_lut_asm(odd: bool, low_first: bool, consts: tuple[int, int]) -> str:
    """:func:`split_lut_asm` for the identity table (entry n = n): each nibble goes into the
    low mantissa bits of the magic base B (exact B + n), then one fma per pair subtracts B.
    12 instructions for 8 coordinates."""
    one, neg_base = consts
    base = (neg_base & 0x7FFF) * 0x10001
    ty = "bf16x2" if one & 0xFFFF == MAGIC["bfloat16"][0] else "f16x2"
    shift = odd == low_first  # this half's nibbles are the high ones
    lines = ["{", ".reg .b32 y, z, c1, cb;", "mov.b32 z, 0;", f"mov.b32 c1, {one:#x};",
             f"mov.b32 cb, {neg_base:#x};"]
    for half in (0, 1):  # bytes (0, 1), then (2, 3) -> the two 16-bit lanes
        sel = 0x4140 if half == 0 else 0x4342
        lines += [f"prmt.b32 y, $2, z, {sel:#x};"]
        if shift:
            lines += ["shr.b32 y, y, 4;"]
        lines += ["and.b32 y, y, 0x000F000F;", f"or.b32 y, y, {base:#x};",
                  f"fma.rn.{ty} ${half}, y, c1, cb;"]
    return "\n".join(lines + ["}"])


def decode_split(table_ref: Any, packed: jnp.ndarray, dtype: Any, planes: bool | tuple,
                 low_first: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 code tile [R, C] -> (even coordinates, odd coordinates), each [R, C] in ``dtype``
    (fp16/bf16). Byte j holds coordinates 2j (high nibble; ``low_first``: low nibble) and
    2j+1. ``planes`` True: ``table_ref`` is int32 [8] :func:`lut_planes`, decoded in registers
    (compiled kernels); a tuple: the planes themselves (static), ``table_ref`` unused; False:
    ``table_ref`` is the :func:`codebook_bits`, two gathers per byte."""
    if planes:
        static = isinstance(planes, tuple)  # static_planes
        b = lax.bitcast_convert_type(packed, jnp.int8)  # Triton integers are signless
        words = [] if static else [jnp.full(packed.shape, table_ref[k], jnp.int32)
                                   for k in range(8)]
        cons = ",".join(["=r"] * 2 + ["r"] * (1 + 4 * len(words)))
        return tuple(plgpu.elementwise_inline_asm(
            split_lut_asm(odd, low_first, planes if static else None), args=[b] + words,
            constraints=cons, pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, dtype)])[0]
            for odd in (False, True))
    hi, lo = split_nibbles(packed)
    first, second = (lo, hi) if low_first else (hi, lo)
    if table_ref.dtype == jnp.dtype(dtype):
        return table_ref[first], table_ref[second]
    return (lax.bitcast_convert_type(table_ref[first], dtype),
            lax.bitcast_convert_type(table_ref[second], dtype))


def codebook_table(centroids16: jnp.ndarray, dtype: Any, planes: bool) -> jnp.ndarray:
    """A codebook's in-kernel table for :func:`decode_split`: :func:`lut_planes` (compiled
    kernels) or the :func:`codebook_bits` (interpret mode gathers)."""
    bits = codebook_bits(centroids16, dtype)
    return lut_planes(bits) if planes else bits


def codebook_parts(centroids: jnp.ndarray, dtype: Any,
                   raw: Any = None) -> tuple[jnp.ndarray, Any]:
    """A codebook -> its kernel table (:func:`codebook_table`) and how the kernel decodes
    (:func:`decode_split`'s ``planes``): in interpret mode False (gathers from the 16-bit
    patterns); compiled, the static planes when ``raw`` (the caller's codebook) is concrete -
    a numpy or committed jax array, also when closed over by a jit-ed caller - else True
    (planes loaded from the table)."""
    if kernel_mode().interpret:
        return codebook_table(pad_codebook(centroids), dtype, False), False
    table = codebook_table(pad_codebook(centroids), dtype, True)
    if is_static(raw):
        return table, static_planes(raw, dtype)
    return table, True


def codebook_split_parts(centroids: jnp.ndarray, dtype: Any,
                         raw: Any = None) -> tuple[tuple, tuple]:
    """A codebook as two 16-bit tables for float32-accurate scores, ``c ~= hi + lo /
    SPLIT_SCALE`` (:func:`core.split16`): ((hi table, hi decode mode), (lo table, lo decode
    mode)), each as :func:`codebook_parts` returns it (static planes when ``raw`` is
    concrete)."""
    if is_static(raw):
        c = np.asarray(raw, np.float32).ravel()
        parts = split16(c, dtype, xp=np)
        return tuple(codebook_parts(jnp.asarray(x.astype(np.float32)), dtype, x.astype(np.float32))
                     for x in parts)
    return tuple(codebook_parts(x.astype(jnp.float32), dtype) for x in split16(centroids, dtype))


def int8_parts(centroids: jnp.ndarray, raw: Any) -> tuple[jnp.ndarray, Any]:
    """An :func:`int8_codebook` table of ``centroids`` and its static LUT (the int8 levels as
    16-bit patterns, for :func:`decode_codes`) when the codebook is concrete and kernels are
    compiled, else None (gathers)."""
    if kernel_mode().interpret or not is_static(raw):
        return int8_codebook(pad_codebook(centroids)), None
    c = np.zeros(CODEBOOK_SLOTS, np.float32)
    c[:np.size(raw)] = np.asarray(raw, np.float32).ravel()
    table = int8_codebook(c, np)
    lut = tuple(int(x) for x in table[:CODEBOOK_SLOTS].astype(np.int16).view(np.uint16))
    return jnp.asarray(table), lut
