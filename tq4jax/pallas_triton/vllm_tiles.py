"""In-kernel pieces of the vLLM-layout kernels (LAYOUTS.md family B, Triton lowering):
fetching slot fields through the block table and decoding them.

A cache [num_blocks, block_size, H_KV, slot] is seen as slots [rows, slot_bytes] uint8 and,
flat, as fp16 words (:func:`cache_views`); a (token, KV head) slot is one row. Fetching and
decoding are split so a key tile's scalars can be fetched a loop iteration ahead.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..core import SPLIT_SCALE
from ..layout import CODEBOOK_SLOTS, VLLM_NC_EPS, VllmSlot
from .lut import codebook_parts, decode_split
from .tiles import cache_rows, columns, load_scalar, load_tile, scalar_value


def fp16_value(raw: jnp.ndarray) -> jnp.ndarray:
    """A :func:`tiles.load_scalar` fp16 field -> float32 [R]."""
    return scalar_value(raw, jnp.float16)


def cache_views(kv_cache: jnp.ndarray) -> list[jnp.ndarray]:
    """The kernels' views of a cache [..., slot] (slot even): the slots as bytes
    [slots, slot_bytes] and, flat, as fp16 words (a bitcast, no copy)."""
    sb = kv_cache.shape[-1]
    return [kv_cache.reshape(-1, sb), lax.bitcast_convert_type(kv_cache.reshape(-1, 2),
                                                               jnp.float16)]


def fetch_codes(cache_ref, rows, rmask, at: int, bits: int, d: int) -> tuple:
    """Raw bytes of the LSB-first code stream at ``at``: one [R, Hp] tile for 4-bit codes
    (Hp = next_pow2(D/2)); for 3-bit codes, the two bytes of the 16-bit window of each even
    and each odd coordinate (4 gathers)."""
    hcols, h_ok = columns(d // 2)
    if bits == 4:
        return (load_tile(cache_ref, rows, rmask, at + hcols, h_ok),)
    tiles = []
    for first in (2 * bits * hcols, 2 * bits * hcols + bits):
        byte = at + (first >> 3)
        tiles += [load_tile(cache_ref, rows, rmask, byte, h_ok),
                  load_tile(cache_ref, rows, rmask, byte + 1, h_ok)]
    return tuple(tiles)


def codes_from_raw(raw: tuple, bits: int, d: int) -> jnp.ndarray:
    """:func:`fetch_codes` tiles -> uint8 [R, Hp]: byte m holds coordinate 2m in its low
    nibble and 2m+1 in its high one."""
    if bits == 4:
        return raw[0]
    hcols, _ = columns(d // 2)

    def code(lo, hi, first):
        word = lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 8)
        return (word >> (first & 7)[None, :]) & ((1 << bits) - 1)

    even = code(raw[0], raw[1], 2 * bits * hcols)
    odd = code(raw[2], raw[3], 2 * bits * hcols + bits)
    return (even | (odd << 4)).astype(jnp.uint8)


def fetch_slot_codes(cache_ref, rows, rmask, lay: VllmSlot) -> tuple[tuple, tuple]:
    """The code bytes of slots ``rows``: (key tiles (the raw fp8 key, or the MSE code
    stream), value code tiles)."""
    d = lay.head_dim
    if lay.key_fp8:
        cols, c_ok = columns(d)
        key = (load_tile(cache_ref, rows, rmask, cols, c_ok),)
    else:
        key = fetch_codes(cache_ref, rows, rmask, 0, lay.mse_bits, d)
    return key, fetch_codes(cache_ref, rows, rmask, lay.value_at, lay.value_bits, d)


def fetch_slot_scalars(cache_refs, rows, rmask, lay: VllmSlot) -> tuple:
    """The fp16 scalars of slots ``rows`` (``cache_refs``: :func:`cache_views`): (key norm
    (MSE keys only), value scale, value zero)."""
    ats = (lay.scale_at, lay.zero_at) if lay.key_fp8 else (lay.norm_at, lay.scale_at,
                                                           lay.zero_at)
    return tuple(load_scalar(*cache_refs, rows, rmask, at, 2) for at in ats)


def slot_raw(codes: tuple, scalars: tuple) -> tuple[tuple, tuple]:
    """Code tiles and scalars -> the raw (key, value) tuples of :func:`key_from_raw` and
    :func:`value_from_raw`."""
    return (*codes[0], *scalars[:-2]), (*codes[1], *scalars[-2:])


def fetch_slots(cache_refs, rows, rmask, lay: VllmSlot) -> tuple[tuple, tuple]:
    """Every byte decode needs from slots ``rows``: (key tiles, value tiles)."""
    return slot_raw(fetch_slot_codes(cache_refs[0], rows, rmask, lay),
                     fetch_slot_scalars(cache_refs, rows, rmask, lay))


def nc_factor(norm: jnp.ndarray, halves: tuple, head_dim: int) -> jnp.ndarray:
    """Norm correction: the fp16 ``norm`` [R] divided by the norm of the decoded centroid
    vector, given as float32 (even, odd) halves [R, Dp/2] (padding columns decode c[0] and
    are left out)."""
    _, h_ok = columns(head_dim // 2)
    sq = sum(jnp.sum(x * x if h_ok is None else jnp.where(h_ok[None, :], x * x, 0.0), axis=1)
             for x in halves)
    return norm / jnp.sqrt(sq + VLLM_NC_EPS)


def key_from_raw(raw: tuple, lay: VllmSlot, table_ref, dt, planes: bool | tuple, nc: bool):
    """Key tiles -> (k, per-key factor f32 [R] or None): MSE keys give rotated-space
    centroids as (even, odd) coordinates [R, Dp/2] in ``dt`` and the factor (the fp16 norm,
    divided by the centroid vector's own norm with ``nc``); fp8 keys give the raw key
    [R, Dp] and None."""
    if lay.key_fp8:
        return lax.bitcast_convert_type(raw[0], jnp.float8_e4m3fn).astype(dt), None
    codes = codes_from_raw(raw[:-1], lay.mse_bits, lay.head_dim)
    halves = decode_split(table_ref, codes, dt, planes, low_first=True)
    norm = fp16_value(raw[-1])
    if nc:
        norm = nc_factor(norm, [x.astype(jnp.float32) for x in halves], lay.head_dim)
    return halves, norm


def key_split_from_raw(raw: tuple, lay: VllmSlot, tables: tuple, dt, planes: tuple,
                       nc: bool) -> tuple[tuple, tuple, jnp.ndarray]:
    """MSE key tiles -> float32-accurate centroids as 16-bit (hi, lo) pairs: ((hi even, hi
    odd), (lo even, lo odd)) [R, Dp/2] in ``dt`` with ``c ~= hi + lo / SPLIT_SCALE``
    (``tables``/``planes``: :func:`lut.codebook_split_parts`), and the per-key factor f32 [R]
    (the fp16 norm; with ``nc`` divided by the float32 norm of the centroid vector)."""
    codes = codes_from_raw(raw[:-1], lay.mse_bits, lay.head_dim)
    hi, lo = (decode_split(t, codes, dt, p, low_first=True) for t, p in zip(tables, planes))
    norm = fp16_value(raw[-1])
    if nc:
        norm = nc_factor(norm, [h.astype(jnp.float32) + l.astype(jnp.float32) / SPLIT_SCALE
                                for h, l in zip(hi, lo)], lay.head_dim)
    return hi, lo, norm


def value_from_raw(raw: tuple, lay: VllmSlot, table_ref, dt, planes: bool | tuple):
    """Value tiles -> ((even, odd) integer levels [R, Dp/2] in ``dt``, scale f32 [R],
    zero f32 [R])."""
    codes = codes_from_raw(raw[:-2], lay.value_bits, lay.head_dim)
    levels = decode_split(table_ref, codes, dt, planes, low_first=True)
    return levels, fp16_value(raw[-2]), fp16_value(raw[-1])


def slot_rows(bt_ref, bt_base, pos, pmask, block_size: int, hkv: int, head, n_blocks: int):
    """Cache rows (of the [blocks * block_size * H_KV, slot] view) of positions ``pos`` of
    KV head ``head`` (block ids from the block table, clamped into the cache)."""
    return cache_rows(bt_ref, bt_base, pos, pmask, block_size, n_blocks) * hkv + head


def value_table(dt) -> tuple[jnp.ndarray, Any]:
    """Identity table (level i -> i) for the value codes in ``dt`` and its decode mode (as
    :func:`attention.codebook_parts`, static; float32: the plain levels, gathered)."""
    levels = np.arange(CODEBOOK_SLOTS, dtype=np.float32)
    if jnp.dtype(dt) == jnp.float32:
        return jnp.asarray(levels), False
    return codebook_parts(levels, dt, levels)
