"""In-kernel helpers shared by the Pallas kernels: masked 2-D tile loads/stores and
TQ4 nibble decoding. Every tile has power-of-two sides (a Triton requirement); masks cover the
ragged edges, so nothing reads or writes outside an array."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

#: Scale of the low half in a two-fp16 split (keeps the low half out of fp16 subnormals).
SPLIT_SCALE = 2048.0


def tile_index(start: Any, size: int, limit: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Indices ``start + arange(size)`` and their in-bounds mask (``< limit``)."""
    idx = start + jnp.arange(size, dtype=jnp.int32)
    return idx, idx < limit


def _mask2(rmask: jnp.ndarray | None, cmask: jnp.ndarray | None) -> jnp.ndarray | None:
    if rmask is None:
        return None if cmask is None else cmask[None, :]
    return rmask[:, None] if cmask is None else rmask[:, None] & cmask[None, :]


def load_tile(ref: Any, rows: jnp.ndarray, rmask: jnp.ndarray | None, cols: jnp.ndarray,
              cmask: jnp.ndarray | None, other: float = 0) -> jnp.ndarray:
    """Gather-load of ``ref[rows, cols]`` as a [len(rows), len(cols)] tile; a ``None`` mask
    means that axis is known to be in bounds (an unmasked, vectorizable load)."""
    mask = _mask2(rmask, cmask)
    ptr = ref.at[rows[:, None], cols[None, :]]
    return plgpu.load(ptr) if mask is None else plgpu.load(ptr, mask=mask, other=other)


def store_tile(ref: Any, rows: jnp.ndarray, rmask: jnp.ndarray | None, cols: jnp.ndarray,
               cmask: jnp.ndarray | None, val: jnp.ndarray) -> None:
    """Store of a [len(rows), len(cols)] tile into ``ref[rows, cols]`` (masks as in
    :func:`load_tile`)."""
    plgpu.store(ref.at[rows[:, None], cols[None, :]], val.astype(ref.dtype),
                mask=_mask2(rmask, cmask))


def load_rows(ref: Any, rows: jnp.ndarray, rmask: jnp.ndarray, other: float = 0) -> jnp.ndarray:
    """Masked gather-load of a 1-D ``ref[rows]``."""
    return plgpu.load(ref.at[rows], mask=rmask, other=other)


def store_rows(ref: Any, rows: jnp.ndarray, rmask: jnp.ndarray, val: jnp.ndarray) -> None:
    """Masked store of a 1-D ``val`` into ``ref[rows]``."""
    plgpu.store(ref.at[rows], val.astype(ref.dtype), mask=rmask)


def split_nibbles(packed: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 tile -> (even-coordinate codes, odd-coordinate codes) as int32."""
    p = packed.astype(jnp.int32)
    return p >> 4, p & 0xF


def decode_pair(cent_ref: Any, packed: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 tile [R, C] -> centroid values (even coords, odd coords), float32 [R, C] each.

    ``cent_ref`` holds the codebook padded to 16 entries, so every nibble is in bounds.
    """
    hi, lo = split_nibbles(packed)
    return cent_ref[hi], cent_ref[lo]


def pair_table(centroids16: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Codebook [16] -> [256] uint32 table (built outside kernels): entry ``b`` holds the
    centroids of both nibbles of the packed byte ``b`` as 16-bit floats of ``dtype``, the
    even coordinate (``b >> 4``) in the low half, the odd one (``b & 15``) in the high half."""
    bits = lax.bitcast_convert_type(centroids16.astype(dtype), jnp.uint16).astype(jnp.uint32)
    b = jnp.arange(256)
    return bits[b >> 4] | (bits[b & 15] << 16)


def decode_bytes(table_ref: Any, packed: jnp.ndarray,
                 dtype: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 tile [R, C] -> (even coords, odd coords) [R, C] in ``dtype`` (fp16/bf16): one
    gather per byte from a :func:`pair_table`, then shifts and bitcasts (no float convert)."""
    w = table_ref[packed.astype(jnp.int32)]
    even = lax.bitcast_convert_type((w & 0xFFFF).astype(jnp.uint16), dtype)
    odd = lax.bitcast_convert_type((w >> 16).astype(jnp.uint16), dtype)
    return even, odd


def interleave(even: jnp.ndarray, odd: jnp.ndarray) -> jnp.ndarray:
    """[R, C] even and odd columns -> [R, 2C] (lowers to ``tt.join``)."""
    r, c = even.shape
    return jnp.stack([even, odd], axis=-1).reshape(r, 2 * c)


def split16(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 -> (hi, lo) float16 with ``x ~= hi + lo / SPLIT_SCALE`` to about 2**-21 relative.

    Works in and out of kernels; for |x| <= 1 (rotations, unit vectors, codebooks). ``hi`` is
    ``x`` with its mantissa truncated to fp16's 10 bits by bit masking: a float round trip
    (f32 -> f16 -> f32) would be folded away by XLA's excess-precision rewrite on the GPU.
    """
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFE000)
    hi32 = lax.bitcast_convert_type(bits, jnp.float32)
    return hi32.astype(jnp.float16), ((x - hi32) * SPLIT_SCALE).astype(jnp.float16)


_dot32 = partial(jnp.dot, preferred_element_type=jnp.float32)


def dot_split(a_hi: jnp.ndarray, a_lo: jnp.ndarray | None, b_hi: jnp.ndarray,
              b_lo: jnp.ndarray) -> jnp.ndarray:
    """float32-accurate ``a @ b`` from fp16 halves on tensor cores (2 or 3 fp16 dots).

    ``a_lo=None`` when ``a`` is exactly fp16 (e.g. fp16 inputs). The lo*lo term is dropped.
    """
    small = _dot32(a_hi, b_lo)
    if a_lo is not None:
        small = small + _dot32(a_lo, b_hi)
    return _dot32(a_hi, b_hi) + small * (1.0 / SPLIT_SCALE)
