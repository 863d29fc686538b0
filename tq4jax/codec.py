"""TQ4 codec: compress / decompress / dequantize (LAYOUTS.md family A).

Each op has a Pallas-Triton kernel, a pure-jnp reference with the same math, and a public
wrapper that checks arguments and picks one (``impl=``). Rows are flattened: any leading shape.

* compress:   x [..., D] f16/bf16/f32 -> packed uint8 [..., D/2], norms f32 [...]
* decompress: packed, norms -> y [..., D] in rotated space, ``y = c[idx] * norm``
* dequantize: packed, norms -> x_hat [..., D] in original space, ``x_hat = y @ Pi``

The kernels never slice a loaded value (it does not lower): the rotation is pre-split into its
even and odd output columns so even/odd codes come out of two dots, ready to nibble-pack.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _checks as ck
from ._config import KernelMode, kernel_mode, next_pow2, pallas_call, resolve_impl
from ._tiles import (decode_pair, dot_split, interleave, load_rows, load_tile, split16,
                     split_nibbles, store_rows, store_tile, tile_index)
from .layout import (NORM_EPS, finite_or_nan, pack_nibbles, pad_codebook, saturate,
                     unpack_nibbles)



def padded_dims(d: int) -> tuple[int, int]:
    """(Dp, Hp): head_dim and half head_dim padded to kernel tile sizes (powers of two, >= 16)."""
    dp = max(32, next_pow2(d))
    return dp, dp // 2


#: (rows per program, warps) per op, measured on an H200 at D=128 (bench/codec.py --sweep).
DEFAULT_TILING = {"compress": (64, 4), "decompress": (64, 8), "dequantize": (64, 4)}


def tiling(op: str, block_rows: int | None, num_warps: int | None) -> tuple[int, int]:
    """Resolve and check the (block_rows, num_warps) knobs of ``op``."""
    br, nw = DEFAULT_TILING[op]
    return (ck.check_pow2("block_rows", block_rows or br, 16),
            ck.check_pow2("num_warps", num_warps or nw, 1, 16))


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


def bucketize(y: jnp.ndarray, bnd_ref: Any, n_bounds: int) -> jnp.ndarray:
    """Code index = number of boundaries <= y (a value on a boundary goes up); int32."""
    idx = jnp.zeros(y.shape, jnp.int32)
    for j in range(n_bounds):
        idx += (y >= bnd_ref[j]).astype(jnp.int32)
    return idx


# ----------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------

#: Rows up to which compress runs as one row block split into column blocks of this many
#: packed bytes (decode-time cache updates: a few rows per layer). Each program then loads only
#: its slice of the rotation, so the launch is short instead of one program streaming all of it.
SMALL_ROWS, SMALL_CHUNK = 64, 16


def _compress_kernel(*refs, n_streams: int, block_rows: int, n_bounds: tuple[int, ...],
                     chunk: int):
    """Grid (row blocks, streams, column blocks): program (i, s, j) compresses rows block i of
    stream s and writes packed bytes [j * chunk, (j + 1) * chunk) (and, for j = 0, the norms).
    refs: Pi^T halves (even hi, lo, odd hi, lo), the streams' x [N, D], their boundaries,
    then per stream its outputs packed [N, D/2] and norms [N]."""
    reh_ref, rel_ref, roh_ref, rol_ref = refs[:4]
    xs, bnds = refs[4:4 + n_streams], refs[4 + n_streams:4 + 2 * n_streams]
    outs = refs[4 + 2 * n_streams:]
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
        code = jnp.where((norm < jnp.inf)[:, None], code, 0)
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


@partial(jax.jit, static_argnames=("block_rows", "num_warps", "mode"))
def _compress_pallas(xs: tuple, rotation: jnp.ndarray, boundaries: tuple, *, block_rows: int,
                     num_warps: int, mode: KernelMode) -> tuple:
    """xs: S arrays [N, D] (one shape), boundaries: S arrays -> (packed [N, D/2] uint8,
    norms [N] f32) per stream, flattened: (packed_0, norms_0, packed_1, ...)."""
    n, d = xs[0].shape
    halves = rotation_t_halves(rotation)
    hp = halves[0].shape[1]
    chunk = min(hp, SMALL_CHUNK if n <= min(block_rows, SMALL_ROWS) else 64)
    kernel = partial(_compress_kernel, n_streams=len(xs), block_rows=block_rows,
                     n_bounds=tuple(b.shape[0] for b in boundaries), chunk=chunk)
    out_shape = (jax.ShapeDtypeStruct((n, d // 2), jnp.uint8),
                 jax.ShapeDtypeStruct((n,), jnp.float32)) * len(xs)
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, block_rows), len(xs), hp // chunk),
        out_shape=out_shape, num_warps=num_warps, num_stages=1,
    )(*halves, *xs, *boundaries)


def compress_reference(x: jnp.ndarray, rotation: jnp.ndarray,
                       boundaries: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pure-jnp compress of rows x [N, D] (float32 math)."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1))
    u = xf / (norm[..., None] + NORM_EPS)
    y = jnp.matmul(u, rotation.T, precision=lax.Precision.HIGHEST)
    idx = jnp.sum(y[..., None] >= boundaries, axis=-1)
    norm = finite_or_nan(norm)
    return pack_nibbles(jnp.where((norm < jnp.inf)[..., None], idx, 0)), norm


def compress(x: Any, rotation: Any, boundaries: Any, *, impl: str = "auto",
             block_rows: int | None = None,
             num_warps: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Quantize vectors to 4-bit TQ4 codes.

    Args:
      x: [..., D] float16/bfloat16/float32, D even.
      rotation: Pi, float32 [D, D] orthogonal; the kernel rotates ``y = x @ Pi^T``.
      boundaries: float32 [2**bits - 1], sorted (from :func:`lloyd_max`).
    Returns:
      ``(packed uint8 [..., D/2], norms float32 [...])``; high nibble = even coordinate.
    """
    packed, norms = _compress_streams({"x": x}, rotation, [("boundaries", boundaries)], impl,
                                      block_rows, num_warps)
    return packed, norms


def compress_kv(key: Any, value: Any, rotation: Any, k_boundaries: Any,
                v_boundaries: Any = None, *, impl: str = "auto", block_rows: int | None = None,
                num_warps: int | None = None) -> tuple[jnp.ndarray, ...]:
    """:func:`compress` of keys and values in one kernel launch (a KV-cache update).

    key, value: [..., D] float of one shape (each its own dtype); ``v_boundaries`` defaults to
    ``k_boundaries``. Returns ``(k_packed, k_norms, v_packed, v_norms)`` as :func:`compress`
    returns them for each.
    """
    v_bounds = ("k_boundaries", k_boundaries) if v_boundaries is None else ("v_boundaries",
                                                                            v_boundaries)
    return tuple(_compress_streams({"key": key, "value": value}, rotation,
                                   [("k_boundaries", k_boundaries), v_bounds], impl,
                                   block_rows, num_warps))


def _compress_streams(xs: dict[str, Any], rotation: Any, bounds: list[tuple[str, Any]],
                      impl: str, block_rows: int | None, num_warps: int | None) -> list:
    """Checks of :func:`compress` / :func:`compress_kv` and one compress launch over the
    streams ``xs`` (argument name -> [..., D] float, one shape), stream i quantized with
    ``bounds[i]`` (argument name, boundaries). Returns [packed, norms] per stream."""
    names = list(xs)
    arrs = [ck.as_array(name, x) for name, x in xs.items()]
    for name, x in zip(names, arrs):
        ck.check_float(name, x)
        ck.check_ndim(name, x, tuple(range(1, 16)), "[..., head_dim]")
        if x.shape != arrs[0].shape:
            raise ValueError(f"{name} must have {names[0]}'s shape {tuple(arrs[0].shape)}, "
                             f"got {tuple(x.shape)}")
    d = arrs[0].shape[-1]
    ck.check_head_dim(names[0], d)
    rotation = ck.check_rotation(rotation, d)
    bnds = [ck.check_boundaries(b, name) for name, b in bounds]
    lead = tuple(arrs[0].shape[:-1])
    rows = tuple(x.reshape(-1, d) for x in arrs)
    block_rows, num_warps = tiling("compress", block_rows, num_warps)
    if resolve_impl(impl) == "reference" or rows[0].shape[0] == 0:
        out = [y for r, b in zip(rows, bnds) for y in compress_reference(r, rotation, b)]
    else:
        out = _compress_pallas(rows, rotation, tuple(bnds), block_rows=block_rows,
                               num_warps=num_warps, mode=kernel_mode())
    return [x.reshape(lead + (d // 2,) if i % 2 == 0 else lead) for i, x in enumerate(out)]


# ----------------------------------------------------------------------------------------------
# decompress (rotated space) and dequantize (original space)
# ----------------------------------------------------------------------------------------------

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


@partial(jax.jit, static_argnames=("dtype", "block_rows", "num_warps", "mode"))
def _decompress_pallas(packed, norms, centroids, *, dtype, block_rows, num_warps, mode):
    n, h = packed.shape
    _, hp = padded_dims(2 * h)
    kernel = partial(_decompress_kernel, block_rows=block_rows, hp=hp)
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, block_rows),),
        out_shape=jax.ShapeDtypeStruct((n, 2 * h), dtype), num_warps=num_warps,
        num_stages=1,
    )(packed, norms, pad_codebook(centroids))


@partial(jax.jit, static_argnames=("dtype", "block_rows", "num_warps", "mode"))
def _dequantize_pallas(packed, norms, centroids, rotation, *, dtype, block_rows, num_warps, mode):
    n, h = packed.shape
    _, hp = padded_dims(2 * h)
    halves = rotation_halves(rotation)
    kernel = partial(_dequantize_kernel, block_rows=block_rows, chunk=min(2 * hp, 128))
    return pallas_call(
        kernel, mode=mode, grid=(pl.cdiv(n, block_rows),),
        out_shape=jax.ShapeDtypeStruct((n, 2 * h), dtype), num_warps=num_warps,
        num_stages=1,
    )(packed, norms, *split16(pad_codebook(centroids)), *halves)


def decompress_reference(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray,
                         dtype: Any = jnp.float16) -> jnp.ndarray:
    """Pure-jnp decompress: ``c[idx] * norm`` in rotated space, cast to ``dtype``."""
    y = pad_codebook(centroids)[unpack_nibbles(packed)] * norms[..., None]
    return saturate(y, dtype)


def dequantize_reference(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray,
                         rotation: jnp.ndarray, dtype: Any = jnp.float16) -> jnp.ndarray:
    """Pure-jnp dequantize: ``(c[idx] * norm) @ Pi`` in original space, cast to ``dtype``."""
    y = decompress_reference(packed, norms, centroids, jnp.float32)
    return saturate(jnp.matmul(y, rotation, precision=lax.Precision.HIGHEST), dtype)


def _decode_args(packed, norms, centroids, dtype):
    packed, norms = ck.check_packed(packed, norms)
    centroids = ck.check_centroids(centroids)
    dtype = ck.check_out_dtype(dtype)
    lead, h = tuple(packed.shape[:-1]), packed.shape[-1]
    return packed.reshape(-1, h), norms.reshape(-1), centroids, dtype, lead


def decompress(packed: Any, norms: Any, centroids: Any, dtype: Any = jnp.float16, *,
               impl: str = "auto", block_rows: int | None = None,
               num_warps: int | None = None) -> jnp.ndarray:
    """TQ4 codes -> vectors in rotated space.

    Args:
      packed: uint8 [..., D/2]; norms: float32 [...] or [..., 1]; centroids: float32 [2**bits].
      dtype: output dtype (float16, bfloat16 or float32).
    Returns:
      ``centroids[idx] * norm``, [..., D] of ``dtype``.
    """
    p, n, c, dtype, lead = _decode_args(packed, norms, centroids, dtype)
    block_rows, num_warps = tiling("decompress", block_rows, num_warps)
    if resolve_impl(impl) == "reference" or p.shape[0] == 0:
        y = decompress_reference(p, n, c, dtype)
    else:
        y = _decompress_pallas(p, n, c, dtype=dtype, block_rows=block_rows, num_warps=num_warps,
                               mode=kernel_mode())
    return y.reshape(lead + (y.shape[-1],))


def dequantize(packed: Any, norms: Any, centroids: Any, rotation: Any,
               dtype: Any = jnp.float16, *, impl: str = "auto",
               block_rows: int | None = None, num_warps: int | None = None) -> jnp.ndarray:
    """TQ4 codes -> vectors in original space, ``(centroids[idx] * norm) @ Pi``.

    Shapes as :func:`decompress`, plus ``rotation`` float32 [D, D].
    """
    p, n, c, dtype, lead = _decode_args(packed, norms, centroids, dtype)
    block_rows, num_warps = tiling("dequantize", block_rows, num_warps)
    rotation = ck.check_rotation(rotation, 2 * p.shape[-1])
    if resolve_impl(impl) == "reference" or p.shape[0] == 0:
        x = dequantize_reference(p, n, c, rotation, dtype)
    else:
        x = _dequantize_pallas(p, n, c, rotation, dtype=dtype, block_rows=block_rows,
                               num_warps=num_warps,
                               mode=kernel_mode())
    return x.reshape(lead + (x.shape[-1],))
