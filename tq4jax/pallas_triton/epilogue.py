"""The decode epilogue in one kernel: the log-sum-exp merge of the KV splits, the output's
post-rotation ``@ Pi`` and the cast to the output dtype, which XLA otherwise runs as several
small kernels after the attention kernel (at B=1 they cost about as much as the attention
kernel's own tail). Same results as :func:`tq4jax.core.merge_splits` followed by
:func:`tq4jax.core.post_rotate` and :func:`tq4jax.layout.to_dtype`, the rotation as a
float32-accurate dot of 16-bit halves (as the attention kernel's own post-rotation).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..backend import KernelMode
from ..core import next_pow2, split16
from .call import pallas_call
from .tiles import columns, dot_split, load_rows, load_tile, store_tile, tile_index

#: Output rows per program (a tensor-core dot needs at least 16).
MAX_BLOCK_ROWS = 64


def merge_kernel(o_ref, lse_ref, post, out_ref, *, splits: int, rows: int, block_r: int,
                 d: int):
    """Program (group g, row block r): refs o [G * S * R, D] f32 and lse [G * S * R] f32 (the
    splits of group g's R rows back to back), post None or (Pi hi, Pi lo) [D, D] 16-bit,
    out [G * R, D]. A row whose lse is NaN in any split gives NaN; a row no split saw gives
    zeros."""
    g = pl.program_id(0)
    idx, ok = tile_index(pl.program_id(1) * block_r, block_r, rows)
    cols, c_ok = columns(d)
    inf = float("inf")

    def body(s, carry):
        m, total, acc, nan = carry
        flat = (g * splits + s) * rows + idx
        lse = load_rows(lse_ref, flat, ok, other=-inf)
        x = load_tile(o_ref, flat, ok, cols, c_ok)
        nan = jnp.where(lse != lse, 1.0, nan)
        m_new = jnp.maximum(m, lse)
        shift = jnp.where(m_new == -inf, 0.0, m_new)
        alpha = jnp.where(m == -inf, 0.0, jnp.exp(m - shift))
        w = jnp.where(lse == -inf, 0.0, jnp.exp(lse - shift))
        acc = acc * alpha[:, None] + w[:, None] * jnp.where(w[:, None] > 0, x, 0.0)
        return m_new, total * alpha + w, acc, nan

    carry = (jnp.full((block_r,), -inf, jnp.float32), jnp.zeros((block_r,), jnp.float32),
             jnp.zeros((block_r, next_pow2(d)), jnp.float32), jnp.zeros((block_r,), jnp.float32))
    _, total, acc, nan = jax.lax.fori_loop(0, splits, body, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]
    if post is not None:
        p_hi, p_lo = (load_tile(ref, cols, c_ok, cols, c_ok) for ref in post)
        out = dot_split(*split16(out, p_hi.dtype), p_hi, p_lo)
    out = jnp.where(nan[:, None] > 0, jnp.nan, out)
    store_tile(out_ref, g * rows + idx, ok, cols, c_ok, out)


@partial(jax.jit, static_argnames=("dtype", "mode"))
def merge_rotate(o: jnp.ndarray, lse: jnp.ndarray, post: tuple | None, *, dtype: Any,
                 mode: KernelMode) -> jnp.ndarray:
    """o [G, S, R, D] f32 (each split normalized) and lse [G, S, R] f32 (natural log, -inf for
    a split that saw no key) -> [G, R, D] in ``dtype``, post-rotated by ``post`` (Pi's 16-bit
    halves, hi and lo [D, D]) unless None."""
    g, s, r, d = o.shape
    block_r = max(16, min(MAX_BLOCK_ROWS, next_pow2(r)))
    out_shape = jax.ShapeDtypeStruct((g * r, d), dtype)
    kernel = partial(merge_kernel, splits=s, rows=r, block_r=block_r, d=d)
    out = pallas_call(kernel, mode=mode, out_shape=out_shape,
                      grid=(g, math.ceil(r / block_r)), num_warps=4, num_stages=1)(
        o.reshape(g * s * r, d), lse.reshape(g * s * r), post)
    return out.reshape(g, r, d)
