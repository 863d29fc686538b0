"""In-kernel helpers shared by the Triton-lowered kernels: masked 2-D tile loads/stores,
nibble splits, float32-accurate dots from 16-bit halves, block-table lookups, scalar loads
from a word view of a byte cache, and the online-softmax step.

Every tile has power-of-two sides (a Triton requirement); masks cover the ragged edges, so
nothing reads or writes outside an array.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from ..core import SPLIT_SCALE, next_pow2
from ..layout import saturate

#: Finite initial running max: a fully masked key tile gives p = 0, never NaN.
M_INIT = -1e30


def tile_index(start: Any, size: int, limit: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Indices ``start + arange(size)`` and their in-bounds mask (``< limit``)."""
    idx = start + jnp.arange(size, dtype=jnp.int32)
    return idx, idx < limit


def columns(width: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Column indices of a tile ``width`` wide, padded to a power of two, and their mask
    (None when no padding)."""
    cols, ok = tile_index(0, next_pow2(width), width)
    return cols, (None if next_pow2(width) == width else ok)


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
    :func:`load_tile`); 16-bit float outputs saturate (:func:`layout.saturate`)."""
    plgpu.store(ref.at[rows[:, None], cols[None, :]], saturate(val, ref.dtype),
                mask=_mask2(rmask, cmask))


def load_rows(ref: Any, rows: jnp.ndarray, rmask: jnp.ndarray | None,
              other: float = 0) -> jnp.ndarray:
    """Gather-load of a 1-D ``ref[rows]`` (masked unless ``rmask`` is None)."""
    if rmask is None:
        return ref[rows]
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
    ``cent_ref`` holds the codebook padded to 16 entries, so every nibble is in bounds."""
    hi, lo = split_nibbles(packed)
    return cent_ref[hi], cent_ref[lo]


def bucketize(y: jnp.ndarray, bnd_ref: Any, n_bounds: int) -> jnp.ndarray:
    """Code index = number of boundaries <= y (a value on a boundary goes up); int32."""
    idx = jnp.zeros(y.shape, jnp.int32)
    for j in range(n_bounds):
        idx += (y >= bnd_ref[j]).astype(jnp.int32)
    return idx


def interleave(even: jnp.ndarray, odd: jnp.ndarray) -> jnp.ndarray:
    """[R, C] even and odd columns -> [R, 2C] (lowers to ``tt.join``)."""
    r, c = even.shape
    return jnp.stack([even, odd], axis=-1).reshape(r, 2 * c)


dot32 = partial(jnp.dot, preferred_element_type=jnp.float32)


def dot_split(a_hi: jnp.ndarray, a_lo: jnp.ndarray | None, b_hi: jnp.ndarray,
              b_lo: jnp.ndarray) -> jnp.ndarray:
    """float32-accurate ``a @ b`` from 16-bit halves on tensor cores (2 or 3 dots).
    ``a_lo=None`` when ``a`` is exactly fp16 (e.g. fp16 inputs). The lo*lo term is dropped."""
    small = dot32(a_hi, b_lo)
    if a_lo is not None:
        small = small + dot32(a_lo, b_hi)
    return dot32(a_hi, b_hi) + small * (1.0 / SPLIT_SCALE)


# ----------------------------------------------------------------------------------------------
# paged caches: block-table lookups and scalar fields
# ----------------------------------------------------------------------------------------------

def cache_rows(bt_ref: Any, bt_base: Any, pos: jnp.ndarray, mask: jnp.ndarray | None,
               block_size: int, n_blocks: Any) -> jnp.ndarray:
    """Token rows (``block * block_size + offset``) of positions ``pos`` of one sequence,
    whose block-table row starts at ``bt_base`` of the flat table ``bt_ref``. Masked lanes read
    no table entry; block ids are clamped into the ``n_blocks`` of the cache, so a garbage
    entry can never address memory outside it."""
    blk = load_rows(bt_ref, bt_base + pos // block_size, mask)
    return jnp.clip(blk, 0, n_blocks - 1) * block_size + pos % block_size


def load_scalar(bytes_ref: Any, words_ref: Any, rows: jnp.ndarray, mask: jnp.ndarray | None,
                at: int, nbytes: int, words_after: Any = 0) -> jnp.ndarray:
    """The ``nbytes``-wide little-endian scalar at byte ``at + nbytes * words_after`` of cache
    ``rows`` (a [rows, width] uint8 ref; ``at`` static, ``words_after`` may be traced, e.g. a
    head index), raw: one load from ``words_ref`` (the same bytes viewed as ``nbytes``-wide
    words, flat; None when there is no such view) when ``at`` is aligned, else ``nbytes``
    bytes [R, nbytes]. :func:`scalar_value` converts either."""
    width = bytes_ref.shape[1]
    if words_ref is not None and at % nbytes == 0 and width % nbytes == 0:
        return load_rows(words_ref, rows * (width // nbytes) + at // nbytes + words_after, mask)
    first = at + nbytes * words_after
    return load_tile(bytes_ref, rows, mask, first + jnp.arange(nbytes, dtype=jnp.int32), None)


def scalar_value(raw: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """:func:`load_scalar`'s result -> float32 [R] (``dtype``: the scalar's float type)."""
    if raw.ndim == 1:
        return raw.astype(jnp.float32)
    n = raw.shape[1]
    word = jnp.sum(raw.astype(jnp.int32) << (8 * jnp.arange(n, dtype=jnp.int32))[None, :],
                   axis=1)
    if n == 2:
        word = word.astype(jnp.uint16)
    return lax.bitcast_convert_type(word, dtype).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# online softmax
# ----------------------------------------------------------------------------------------------

def softmax_step(s: jnp.ndarray, m_prev: jnp.ndarray, l_prev: jnp.ndarray):
    """One key tile of an online softmax in base 2: scores ``s`` [R, N] (log2 units) and the
    running max / sum [R] -> (probabilities p [R, N], the rescale ``alpha`` of what was
    accumulated so far [R], new max, new sum)."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_prev * alpha + jnp.sum(p, axis=1)


def key_loop(first: Any, n_safe: Any, n_all: Any, step: Callable, carry: Any) -> Any:
    """Run ``step(j, carry, masked)`` over key tiles ``[first, n_all)``: tiles before
    ``n_safe`` need no masking, the others do (ragged end, causal or window edge, mask)."""
    carry = lax.fori_loop(first, n_safe, partial(step, masked=False), carry)
    return lax.fori_loop(n_safe, n_all, partial(step, masked=True), carry)


def lse_of(m: jnp.ndarray, l: jnp.ndarray) -> jnp.ndarray:
    """Natural-log log-sum-exp of a split from its base-2 running max and sum (-inf when the
    split saw no key): the merge convention of :func:`tq4jax.core.merge_splits`."""
    return (m + jnp.log2(l)) * 0.6931471805599453
