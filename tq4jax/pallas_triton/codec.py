"""Codec kernels (Triton lowering): compress, decompress, dequantize (LAYOUTS.md family A).

Rows are flat: [N, D] in, [N, D/2] codes and [N] norms out. The kernels never slice a loaded
value (it does not lower): the rotation is pre-split into its even and odd output columns so
even/odd codes come out of two dots, ready to nibble-pack.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..backend import KernelMode
from ..core import next_pow2, split16
from ..layout import NORM_EPS, finite_or_nan, pad_codebook, zero_rows
from .call import pallas_call
from .tiles import (bucketize, decode_pair, dot_split, interleave, load_rows, load_tile,
                    split_nibbles, store_rows, store_tile, tile_index)
from .tuning import SMALL_CHUNK, SMALL_ROWS, CodecConfig


def padded_dims(d: int) -> tuple[int, int]:
    """(Dp, Hp): head_dim and half head_dim padded to kernel tile sizes (powers of two, >= 16)."""
    dp = max(32, next_pow2(d))
    return dp, dp // 2


def rotation_t_halves(rotation: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Pi [D, D] -> Pi^T even columns (hi, lo) and odd columns (hi, lo): fp16 [Dp, Hp] each,
    zero-padded; ``u @ Pi^T[:, 0::2]`` gives the even coordinates of the rotated vector."""
    d = rotation.shape[0]
    dp, hp = padded_dims(d)
    pad = ((0, dp - d), (0, hp - d // 2))
    rt = rotation.astype(jnp.float32).T
    return (*split16(jnp.pad(rt[:, 0::2], pad)), *split16(jnp.pad(rt[:, 1::2], pad)))


def rotation_halves(rotation: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Pi [D, D] -> even rows (hi, lo) and odd rows (hi, lo) of Pi: fp16 [Hp, Dp] each.

    ``y @ Pi == y_even @ Pi[0::2] + y_odd @ Pi[1::2]``: the inverse rotation of decoded codes
    needs no interleave.
    """
    d = rotation.shape[0]
    dp, hp = padded_dims(d)
    pad = ((0, hp - d // 2), (0, dp - d))
    r = rotation.astype(jnp.float32)
    return (*split16(jnp.pad(r[0::2], pad)), *split16(jnp.pad(r[1::2], pad)))


def _compress_kernel(rot_t, xs, bnds, *outs, block_rows: int, n_bounds: tuple[int, ...],
                     chunk: int):
    """Grid (row blocks, streams, column blocks): program (i, s, j) compresses rows block i of
    stream s and writes packed bytes [j * chunk, (j + 1) * chunk) (and, for j = 0, the norms).

    Refs: ``rot_t`` the Pi^T halves (even hi, lo, odd hi, lo) [Dp, Hp]; ``xs`` the streams'
    x [N, D]; ``bnds`` their boundaries; then per stream its outputs packed [N, D/2] uint8
    and norms [N] f32."""
    reh_ref, rel_ref, roh_ref, rol_ref = rot_t
    n_streams = len(xs)
    i, j = pl.program_id(0), pl.program_id(2)  # read outside pl.when (interpret mode needs it)

    def one(s: int) -> None:
        x_ref, bnd_ref, packed_ref, norm_ref = xs[s], bnds[s], outs[2 * s], outs[2 * s + 1]
        n, d = x_ref.shape
        dp = reh_ref.shape[0]
        rows, rmask = tile_index(i * block_rows, block_rows, n)
        cols, cmask = tile_index(0, dp, d)
        x = load_tile(x_ref, rows, rmask, cols, cmask)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=1))
        denom = (norm + NORM_EPS)[:, None]
        if x.dtype == jnp.float16:   # exact in fp16: rotate x itself, normalize after (2 dots)
            a_hi, a_lo = x, None
        else:                        # rotate u = x / (norm + eps) split into two fp16 halves
            a_hi, a_lo = split16(xf / denom)
        sl = pl.ds(pl.multiple_of(j * chunk, chunk), chunk)
        y_even = dot_split(a_hi, a_lo, reh_ref[:, sl], rel_ref[:, sl])
        y_odd = dot_split(a_hi, a_lo, roh_ref[:, sl], rol_ref[:, sl])
        if a_lo is None:
            y_even, y_odd = y_even / denom, y_odd / denom
        code = ((bucketize(y_even, bnd_ref, n_bounds[s]) << 4)
                | bucketize(y_odd, bnd_ref, n_bounds[s]))
        norm = finite_or_nan(norm)  # the non-finite rule: NaN norm, codes 0
        code = zero_rows(norm < jnp.inf, code)
        hcols, hmask = tile_index(j * chunk, chunk, d // 2)
        store_tile(packed_ref, rows, rmask, hcols, hmask, code)

        @pl.when(j == 0)
        def _():
            store_rows(norm_ref, rows, rmask, norm)

    if n_streams == 1:
        one(0)
    else:
        stream = pl.program_id(1)
        for s in range(n_streams):
            pl.when(stream == s)(partial(one, s))


@partial(jax.jit, static_argnames=("config", "mode"))
def compress(xs: tuple, rotation: jnp.ndarray, boundaries: tuple, *, config: CodecConfig,
             mode: KernelMode) -> tuple:
    """xs: S arrays [N, D] (one shape), boundaries: S arrays -> (packed [N, D/2] uint8,
    norms [N] f32) per stream, flattened: (packed_0, norms_0, packed_1, ...)."""
    n, d = xs[0].shape
    halves = rotation_t_halves(rotation)
    hp = halves[0].shape[1]
    br = config.block_rows
    chunk = min(hp, SMALL_CHUNK if n <= min(br, SMALL_ROWS) else 64)
    kernel = partial(_compress_kernel, block_rows=br,
                     n_bounds=tuple(b.shape[0] for b in boundaries), chunk=chunk)
    out_shape = (jax.ShapeDtypeStruct((n, d // 2), jnp.uint8),
                 jax.ShapeDtypeStruct((n,), jnp.float32)) * len(xs)
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, br), len(xs), hp // chunk),
        out_shape=out_shape, num_warps=config.num_warps, num_stages=1,
    )(tuple(halves), tuple(xs), tuple(boundaries))


def _decode_rows(packed_ref, norm_ref, cent_ref, block_rows: int, hp: int):
    """Load one row block: (rows, rmask, even centroids, odd centroids, norms)."""
    n, h = packed_ref.shape
    rows, rmask = tile_index(pl.program_id(0) * block_rows, block_rows, n)
    hcols, hmask = tile_index(0, hp, h)
    p = load_tile(packed_ref, rows, rmask, hcols, hmask)
    norm = load_rows(norm_ref, rows, rmask)
    c_even, c_odd = decode_pair(cent_ref, p)
    return rows, rmask, c_even, c_odd, norm


def _decompress_kernel(packed_ref, norm_ref, cent_ref, out_ref, *, block_rows: int, hp: int):
    rows, rmask, c_even, c_odd, norm = _decode_rows(packed_ref, norm_ref, cent_ref,
                                                    block_rows, hp)
    y = interleave(c_even, c_odd) * norm[:, None]
    cols, cmask = tile_index(0, 2 * hp, out_ref.shape[1])
    store_tile(out_ref, rows, rmask, cols, cmask, y)


def _dequantize_kernel(packed_ref, norm_ref, chi_ref, clo_ref, peh_ref, pel_ref, poh_ref,
                       pol_ref, out_ref, *, block_rows: int, chunk: int):
    n, h = packed_ref.shape
    hp, dp = peh_ref.shape
    rows, rmask = tile_index(pl.program_id(0) * block_rows, block_rows, n)
    hcols, hmask = tile_index(0, hp, h)
    even, odd = split_nibbles(load_tile(packed_ref, rows, rmask, hcols, hmask))
    norm = load_rows(norm_ref, rows, rmask)[:, None]
    # codebook pre-split into fp16 halves: two gathers per code, fp32-accurate dots
    ce_hi, ce_lo, co_hi, co_lo = chi_ref[even], clo_ref[even], chi_ref[odd], clo_ref[odd]
    for j in range(dp // chunk):
        sl = pl.ds(j * chunk, chunk)
        x = (dot_split(ce_hi, ce_lo, peh_ref[:, sl], pel_ref[:, sl])
             + dot_split(co_hi, co_lo, poh_ref[:, sl], pol_ref[:, sl]))
        cols, cmask = tile_index(j * chunk, chunk, out_ref.shape[1])
        store_tile(out_ref, rows, rmask, cols, cmask, x * norm)


@partial(jax.jit, static_argnames=("dtype", "config", "mode"))
def decompress(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray, *, dtype: Any,
               config: CodecConfig, mode: KernelMode) -> jnp.ndarray:
    """packed [N, D/2] uint8, norms [N] f32 -> ``c[idx] * norm`` [N, D] in ``dtype``."""
    n, h = packed.shape
    _, hp = padded_dims(2 * h)
    kernel = partial(_decompress_kernel, block_rows=config.block_rows, hp=hp)
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, config.block_rows),),
        out_shape=jax.ShapeDtypeStruct((n, 2 * h), dtype), num_warps=config.num_warps,
        num_stages=1,
    )(packed, norms, pad_codebook(centroids))


@partial(jax.jit, static_argnames=("dtype", "config", "mode"))
def dequantize(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray,
               rotation: jnp.ndarray, *, dtype: Any, config: CodecConfig,
               mode: KernelMode) -> jnp.ndarray:
    """packed [N, D/2] uint8, norms [N] f32 -> ``(c[idx] * norm) @ Pi`` [N, D] in ``dtype``."""
    n, h = packed.shape
    _, hp = padded_dims(2 * h)
    halves = rotation_halves(rotation)
    kernel = partial(_dequantize_kernel, block_rows=config.block_rows, chunk=min(2 * hp, 128))
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, config.block_rows),),
        out_shape=jax.ShapeDtypeStruct((n, 2 * h), dtype), num_warps=config.num_warps,
        num_stages=1,
    )(packed, norms, *split16(pad_codebook(centroids)), *halves)
