"""Upstream vLLM TurboQuant layout (LAYOUTS.md family B): turboquant_store, turboquant_decode,
full_dequant_kv, and the vLLM presets by name.

``kv_cache [num_blocks, block_size, H_KV, slot] uint8``: K and V of one (token, KV head) share
one slot (:class:`tq4jax.layout.VllmSlot`): LSB-first 3/4-bit Lloyd-Max key codes + fp16 norm
(or the raw key as float8 e4m3), then 3/4-bit uniform value codes + fp16 scale and zero.
Keys live in rotated space (``y = k @ Pi^T``); values are not rotated, so the output needs no
post-rotation. fp8 keys are compared against the raw query.

* ``turboquant_store``: one Pallas kernel computes every slot's bytes (norm, rotation,
  bucketize, bit-stream packing by a 0/1 x power-of-two matrix product, value min/max
  quantization, fp16 fields); an XLA scatter writes them (in place when the cache is donated).
* ``turboquant_decode``: stage 1 is a split-KV Pallas kernel, one program per
  (sequence, KV head, split) holding all query heads of the group, so each decoded tile feeds
  a ``[group, D] x [D, block_n]`` tensor-core dot. The query is rotated (``q @ Pi^T``) by
  the rule of :func:`tq4jax.attention.rotate_in_kernel`: in XLA for a decode's few rows
  per KV head, in the kernel above that. Values enter as their integer levels:
  ``p @ v = (p * scale) @ levels + sum(p * zero)``. Each split writes ``acc / l`` and
  ``m + log l``; empty splits return without writing; stage 2 is a fused jnp log-sum-exp merge
  that skips them (bench/vllm_layout.py measures it).
* ``full_dequant_kv``: every cached token to fp16 K (rotated space, or raw fp8) and V.

Every op has a pure-jnp reference with the same signature (``*_reference``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _checks as ck
from ._config import kernel_mode, next_pow2, pallas_call, resolve_impl
from ._tiles import (decode_split, dot_split, interleave, load_rows, load_tile, split16,
                     store_rows, store_tile, tile_index)
from .attention import (LOG2E, M_INIT, _codebook_parts, _columns, _query_halves,
                        _rotation_parts, attention_reference, rotate_in_kernel, rotate_in_xla)
from .codec import bucketize
from .layout import (CODEBOOK_SLOTS, FP8_E4M3_MAX, FP16_MAX, VLLM_MIN_SCALE, VLLM_NC_EPS,
                     VLLM_NORM_BYTES, VLLM_NORM_EPS, VllmSlot, pad_codebook, saturate,
                     vllm_slot)

__all__ = ["turboquant_decode", "turboquant_decode_reference", "turboquant_store",
           "turboquant_store_reference", "full_dequant_kv", "full_dequant_kv_reference",
           "preset", "PRESETS", "TurboQuantPreset", "vllm_slot", "VllmSlot", "pack_bits",
           "unpack_bits"]

#: The kernels address the cache with 32-bit offsets.
MAX_CACHE_BYTES = 1 << 31
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------

class TurboQuantPreset(NamedTuple):
    """A vLLM ``--kv-cache-dtype turboquant_*`` preset at one head_dim."""
    name: str
    head_dim: int
    mse_bits: int
    value_quant_bits: int
    key_fp8: bool
    norm_correction: bool
    key_packed_size: int
    slot_bytes: int

    def decode_kwargs(self) -> dict:
        """Layout arguments of :func:`turboquant_decode`."""
        return dict(mse_bits=self.mse_bits, key_packed_size=self.key_packed_size,
                    value_quant_bits=self.value_quant_bits, key_fp8=self.key_fp8,
                    norm_correction=self.norm_correction)

    def store_kwargs(self) -> dict:
        """Layout arguments of :func:`turboquant_store`."""
        return dict(mse_bits=self.mse_bits, key_packed_size=self.key_packed_size,
                    value_quant_bits=self.value_quant_bits, key_fp8=self.key_fp8)

    def dequant_kwargs(self) -> dict:
        """Layout arguments of :func:`full_dequant_kv`."""
        return self.decode_kwargs()

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int) -> tuple:
        return (num_blocks, block_size, num_kv_heads, self.slot_bytes)


#: name -> (key mse bits, value bits, fp8 keys, norm correction), as vLLM defines them.
PRESETS = {
    "turboquant_4bit_nc": (4, 4, False, True),
    "turboquant_k3v4_nc": (3, 4, False, True),
    "turboquant_3bit_nc": (3, 3, False, True),
    "turboquant_k8v4": (4, 4, True, False),
}


def preset(name: str, head_dim: int) -> TurboQuantPreset:
    """The preset ``name`` (a key of :data:`PRESETS`) at ``head_dim``, with the current vLLM
    ``key_packed_size`` and the even slot size (134 bytes for turboquant_4bit_nc at D=128)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
    mse, vb, fp8, nc = PRESETS[name]
    lay = vllm_slot(head_dim, mse, vb, None, fp8)
    return TurboQuantPreset(name, lay.head_dim, mse, vb, fp8, nc, lay.key_packed_size,
                            lay.slot_bytes)


# ----------------------------------------------------------------------------------------------
# pure-jnp layout helpers (reference side)
# ----------------------------------------------------------------------------------------------

def pack_bits(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """int codes [..., D] (< 2**bits) -> uint8 [..., D*bits/8], LSB-first: code i occupies
    stream bits [bits*i, bits*i + bits). D*bits must be a multiple of 8."""
    c = jnp.asarray(codes).astype(jnp.int32)
    stream = (c[..., None] >> jnp.arange(bits)) & 1           # [..., D, bits]
    stream = stream.reshape(*c.shape[:-1], -1, 8)            # [..., bytes, 8]
    return jnp.sum(stream << jnp.arange(8), axis=-1).astype(jnp.uint8)


def unpack_bits(packed: jnp.ndarray, bits: int, d: int) -> jnp.ndarray:
    """uint8 [..., >= D*bits/8] -> int32 codes [..., D] (inverse of :func:`pack_bits`)."""
    p = jnp.asarray(packed).astype(jnp.int32)[..., :d * bits // 8]
    stream = ((p[..., None] >> jnp.arange(8)) & 1).reshape(*p.shape[:-1], d, bits)
    return jnp.sum(stream << jnp.arange(bits), axis=-1)


def _fp16_bytes(x: jnp.ndarray) -> jnp.ndarray:
    """float [...] -> its fp16 bytes uint8 [..., 2], little-endian."""
    return lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint8)


def _fp16_from(b: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., 2] -> float32 [...]."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def _midpoints(centroids: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (centroids[:-1] + centroids[1:])


def _value_stats(v: jnp.ndarray, bits: int, valid: jnp.ndarray | None = None):
    """float32 rows [..., D] -> (scale, zero): per-row min/max clamped to the fp16 range,
    ``scale = max(1e-8, (max - min) / (2^bits - 1))``, zero = min. ``valid`` masks padded
    columns. A row with a non-finite coordinate gets NaN scale and zero (the store rule)."""
    lo, hi, val = v, v, v
    if valid is not None:
        lo, hi, val = (jnp.where(valid, v, fill) for fill in (jnp.inf, -jnp.inf, 0.0))
    vmin = jnp.maximum(jnp.min(lo, axis=-1), -FP16_MAX)
    vmax = jnp.minimum(jnp.max(hi, axis=-1), FP16_MAX)
    finite = jnp.max(jnp.where(jnp.abs(val) < jnp.inf, 0.0, 1.0), axis=-1) == 0
    scale = jnp.maximum((vmax - vmin) / float((1 << bits) - 1), VLLM_MIN_SCALE)
    return jnp.where(finite, scale, jnp.nan), jnp.where(finite, vmin, jnp.nan)


def _value_codes(v: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray, bits: int):
    """``clamp(floor((v - zero) / scale + 0.5), 0, 2^bits - 1)`` as int32 (0 where the scale
    is NaN: a non-finite row)."""
    code = jnp.floor((v - zero[..., None]) / scale[..., None] + 0.5)
    code = jnp.where((scale < jnp.inf)[..., None], code, 0.0)
    return jnp.clip(code, 0, (1 << bits) - 1).astype(jnp.int32)


def _key_norm(k: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 rows [..., D] -> (the norm, float32; the norm as stored: saturated at the fp16
    maximum, NaN for a row with a non-finite coordinate - the store rule)."""
    norm = jnp.sqrt(jnp.sum(k * k, axis=-1))
    return norm, jnp.where(norm < jnp.inf, jnp.minimum(norm, FP16_MAX), jnp.nan)


def _fp8_key(k: jnp.ndarray) -> jnp.ndarray:
    """float32 keys -> float8 e4m3 saturated at +-448; non-finite coordinates -> NaN."""
    k8 = jnp.clip(k, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return jnp.where(jnp.abs(k) < jnp.inf, k8, jnp.nan).astype(jnp.float8_e4m3fn)


def _slots_reference(key, value, rotation, centroids, lay: VllmSlot) -> jnp.ndarray:
    """key/value [..., D] -> slot bytes uint8 [..., slot_bytes] (float32 math)."""
    kf, vf = key.astype(jnp.float32), value.astype(jnp.float32)
    lead = kf.shape[:-1]
    zeros = lambda n: jnp.zeros((*lead, n), jnp.uint8)  # noqa: E731
    if lay.key_fp8:
        kpart = [lax.bitcast_convert_type(_fp8_key(kf), jnp.uint8)]
    else:
        norm, stored = _key_norm(kf)
        y = jnp.matmul(kf / (norm[..., None] + VLLM_NORM_EPS), rotation.T,
                       precision=lax.Precision.HIGHEST)
        idx = jnp.sum(y[..., None] >= _midpoints(centroids), axis=-1)
        idx = jnp.where((stored < jnp.inf)[..., None], idx, 0)
        kpart = [pack_bits(idx, lay.mse_bits), _fp16_bytes(stored)]
    scale, zero = _value_stats(vf, lay.value_bits)
    code = _value_codes(vf, scale, zero, lay.value_bits)
    parts = kpart + [zeros(lay.key_packed_size - lay.key_bytes), pack_bits(code, lay.value_bits),
                     _fp16_bytes(scale), _fp16_bytes(zero),
                     zeros(lay.slot_bytes - lay.zero_at - VLLM_NORM_BYTES)]
    return jnp.concatenate(parts, axis=-1)


def _dequant_slots_reference(slots, centroids, lay: VllmSlot, norm_correction: bool):
    """slot bytes [..., >= slot_bytes] -> (k, v) float32 [..., D]; k in rotated space, or the
    raw fp8 key."""
    d = lay.head_dim
    if lay.key_fp8:
        k = lax.bitcast_convert_type(slots[..., :d], jnp.float8_e4m3fn).astype(jnp.float32)
    else:
        c = pad_codebook(centroids)[unpack_bits(slots[..., :lay.mse_bytes], lay.mse_bits, d)]
        if norm_correction:
            c = c / jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) + VLLM_NC_EPS)
        k = c * _fp16_from(slots[..., lay.norm_at:lay.norm_at + 2])[..., None]
    lev = unpack_bits(slots[..., lay.value_at:lay.scale_at], lay.value_bits, d)
    scale = _fp16_from(slots[..., lay.scale_at:lay.scale_at + 2])
    zero = _fp16_from(slots[..., lay.zero_at:lay.zero_at + 2])
    return k, lev * scale[..., None] + zero[..., None]


def _gather_slots(kv_cache, block_table, seq_lens, n_pos: int):
    """Reference gather: slots [B, H, n_pos, slot] of positions [0, n_pos) and their validity
    [B, n_pos] (position < seq_len, within the table); invalid positions read block 0."""
    nb, bs, h, sb = kv_cache.shape
    b, mb = block_table.shape
    t = jnp.arange(n_pos)
    valid = t[None, :] < jnp.clip(seq_lens, 0, min(mb * bs, n_pos))[:, None]
    page = jnp.minimum(t // bs, mb - 1)
    blk = jnp.clip(block_table[:, page], 0, nb - 1)
    blk = jnp.where(valid, blk, 0)
    data = kv_cache[blk, (t % bs)[None, :]]  # [B, T, H, slot]
    return jnp.swapaxes(data, 1, 2), valid


# ----------------------------------------------------------------------------------------------
# in-kernel tiles
# ----------------------------------------------------------------------------------------------

def _cache_views(kv_cache: jnp.ndarray) -> list[jnp.ndarray]:
    """The kernels' views of a cache [..., slot] (slot even): the slots as bytes
    [slots, slot_bytes] and, flat, as fp16 words (a bitcast, no copy)."""
    sb = kv_cache.shape[-1]
    return [kv_cache.reshape(-1, sb), lax.bitcast_convert_type(kv_cache.reshape(-1, 2),
                                                               jnp.float16)]


def _fetch_fp16(cache_refs, rows, rmask, at: int) -> jnp.ndarray:
    """The fp16 at byte ``at`` of slots ``rows`` (masked rows: 0): one word load from the fp16
    view (float16 [R]) when ``at`` is even, else its 2 bytes (uint8 [R, 2])."""
    bytes_ref, words_ref = cache_refs
    if at % 2:
        return load_tile(bytes_ref, rows, rmask, at + jnp.arange(2, dtype=jnp.int32), None)
    idx = rows * (bytes_ref.shape[1] // 2) + at // 2
    return words_ref[idx] if rmask is None else load_rows(words_ref, idx, rmask)


def _fp16_from_raw(raw: jnp.ndarray) -> jnp.ndarray:
    """:func:`_fetch_fp16`'s result (float16 [R], or little-endian uint8 [R, 2]) -> float32
    [R]."""
    if raw.ndim == 1:
        return raw.astype(jnp.float32)
    word = jnp.sum(raw.astype(jnp.int32) << (8 * jnp.arange(2, dtype=jnp.int32))[None, :],
                   axis=1)
    return lax.bitcast_convert_type(word.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _fetch_codes(cache_ref, rows, rmask, at: int, bits: int, d: int) -> tuple:
    """Raw bytes of the LSB-first code stream at ``at``: one [R, Hp] tile for 4-bit codes
    (Hp = next_pow2(D/2)); for 3-bit codes, the two bytes of the 16-bit window of each even
    and each odd coordinate (4 gathers)."""
    hcols, h_ok = _columns(d // 2)
    if bits == 4:
        return (load_tile(cache_ref, rows, rmask, at + hcols, h_ok),)
    tiles = []
    for first in (2 * bits * hcols, 2 * bits * hcols + bits):
        byte = at + (first >> 3)
        tiles += [load_tile(cache_ref, rows, rmask, byte, h_ok),
                  load_tile(cache_ref, rows, rmask, byte + 1, h_ok)]
    return tuple(tiles)


def _codes_from_raw(raw: tuple, bits: int, d: int) -> jnp.ndarray:
    """:func:`_fetch_codes` tiles -> uint8 [R, Hp]: byte m holds coordinate 2m in its low
    nibble and 2m+1 in its high one."""
    if bits == 4:
        return raw[0]
    hcols, _ = _columns(d // 2)

    def code(lo, hi, first):
        word = lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 8)
        return (word >> (first & 7)[None, :]) & ((1 << bits) - 1)

    even = code(raw[0], raw[1], 2 * bits * hcols)
    odd = code(raw[2], raw[3], 2 * bits * hcols + bits)
    return (even | (odd << 4)).astype(jnp.uint8)


def _fetch_slot_codes(cache_ref, rows, rmask, lay: VllmSlot) -> tuple[tuple, tuple]:
    """The code bytes of slots ``rows``: (key tiles (the raw fp8 key, or the MSE code
    stream), value code tiles)."""
    d = lay.head_dim
    if lay.key_fp8:
        cols, c_ok = _columns(d)
        key = (load_tile(cache_ref, rows, rmask, cols, c_ok),)
    else:
        key = _fetch_codes(cache_ref, rows, rmask, 0, lay.mse_bits, d)
    return key, _fetch_codes(cache_ref, rows, rmask, lay.value_at, lay.value_bits, d)


def _fetch_slot_scalars(cache_refs, rows, rmask, lay: VllmSlot) -> tuple:
    """The fp16 scalars of slots ``rows`` (``cache_refs``: :func:`_cache_views`): (key norm
    (MSE keys only), value scale, value zero)."""
    ats = (lay.scale_at, lay.zero_at) if lay.key_fp8 else (lay.norm_at, lay.scale_at,
                                                           lay.zero_at)
    return tuple(_fetch_fp16(cache_refs, rows, rmask, at) for at in ats)


def _slot_raw(codes: tuple, scalars: tuple) -> tuple[tuple, tuple]:
    """Code tiles and scalars -> the raw (key, value) tuples of :func:`_key_from_raw` and
    :func:`_value_from_raw`."""
    return (*codes[0], *scalars[:-2]), (*codes[1], *scalars[-2:])


def _fetch_slots(cache_refs, rows, rmask, lay: VllmSlot) -> tuple[tuple, tuple]:
    """Every byte decode needs from slots ``rows``: (key tiles, value tiles)."""
    return _slot_raw(_fetch_slot_codes(cache_refs[0], rows, rmask, lay),
                     _fetch_slot_scalars(cache_refs, rows, rmask, lay))


def _key_from_raw(raw: tuple, lay: VllmSlot, table_ref, dt, planes: bool | tuple, nc: bool):
    """Key tiles -> (k, per-key factor f32 [R] or None): MSE keys give rotated-space
    centroids as (even, odd) coordinates [R, Dp/2] in ``dt`` and the factor (the fp16 norm,
    divided by the centroid vector's own norm with ``nc``); fp8 keys give the raw key
    [R, Dp] and None."""
    if lay.key_fp8:
        return lax.bitcast_convert_type(raw[0], jnp.float8_e4m3fn).astype(dt), None
    codes = _codes_from_raw(raw[:-1], lay.mse_bits, lay.head_dim)
    halves = decode_split(table_ref, codes, dt, planes, low_first=True)
    norm = _fp16_from_raw(raw[-1])
    if nc:
        _, h_ok = _columns(lay.head_dim // 2)

        def sum_sq(x):  # over the real coordinates (padding decodes c[0])
            x = x.astype(jnp.float32) ** 2
            return jnp.sum(x if h_ok is None else jnp.where(h_ok[None, :], x, 0.0), axis=1)

        norm = norm / jnp.sqrt(sum_sq(halves[0]) + sum_sq(halves[1]) + VLLM_NC_EPS)
    return halves, norm


def _value_from_raw(raw: tuple, lay: VllmSlot, table_ref, dt, planes: bool | tuple):
    """Value tiles -> ((even, odd) integer levels [R, Dp/2] in ``dt``, scale f32 [R],
    zero f32 [R])."""
    codes = _codes_from_raw(raw[:-2], lay.value_bits, lay.head_dim)
    levels = decode_split(table_ref, codes, dt, planes, low_first=True)
    return levels, _fp16_from_raw(raw[-2]), _fp16_from_raw(raw[-1])


def _slot_rows(bt_ref, bt_base, pos, pmask, block_size: int, hkv: int, head, n_blocks: int):
    """Cache rows (of the [blocks * block_size * H_KV, slot] view) of positions ``pos``; block
    ids come from the flat block table at ``bt_base`` (masked lanes read nothing) and are
    clamped into the cache."""
    idx = bt_base + pos // block_size
    blk = bt_ref[idx] if pmask is None else plgpu.load(bt_ref.at[idx], mask=pmask, other=0)
    return (jnp.clip(blk, 0, n_blocks - 1) * block_size + pos % block_size) * hkv + head


def _value_table(dt) -> tuple[jnp.ndarray, Any]:
    """Identity table (level i -> i) for the value codes in ``dt`` and its decode mode (as
    :func:`attention._codebook_parts`, static; float32: the plain levels, gathered)."""
    levels = np.arange(CODEBOOK_SLOTS, dtype=np.float32)
    if jnp.dtype(dt) == jnp.float32:
        return jnp.asarray(levels), False
    return _codebook_parts(levels, dt, levels)


# ----------------------------------------------------------------------------------------------
# store
# ----------------------------------------------------------------------------------------------

def _pack_tile(codes: jnp.ndarray, bits: int, n_bytes: int) -> jnp.ndarray:
    """int32 codes [R, Dp] -> LSB-first stream bytes int32 [R, next_pow2(n_bytes)], as ``bits``
    exact fp16 dots of the code bits with 0 / power-of-two placement matrices."""
    dp, nbp = codes.shape[1], max(16, next_pow2(n_bytes))
    i = jnp.arange(dp, dtype=jnp.int32)[:, None]
    j = jnp.arange(nbp, dtype=jnp.int32)[None, :]
    out = None
    for k in range(bits):
        pos = bits * i + k
        place = jnp.where((pos >> 3) == j, jnp.left_shift(1, pos & 7), 0).astype(jnp.float16)
        bit = ((codes >> k) & 1).astype(jnp.float16)
        part = jnp.dot(bit, place, preferred_element_type=jnp.float32)
        out = part if out is None else out + part
    return out.astype(jnp.int32)


def _store_fp16(out_ref, rows, rmask, at: int, x: jnp.ndarray) -> None:
    u = lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    two = jnp.arange(2, dtype=jnp.int32)
    store_tile(out_ref, rows, rmask, at + two, None, (u[:, None] >> (8 * two)[None, :]) & 0xFF)


def _store_bytes(out_ref, rows, rmask, at: int, n: int, val: jnp.ndarray | None) -> None:
    """Store ``val`` [R, >= n] (zeros when None) into bytes [at, at + n) of ``rows``."""
    if n <= 0:
        return
    cols, ok = tile_index(0, max(2, next_pow2(n)) if val is None else val.shape[1], n)
    if val is None:
        val = jnp.zeros((rows.shape[0], cols.shape[0]), jnp.int32)
    store_tile(out_ref, rows, rmask, at + cols, ok, val)


def _store_kernel(k_ref, v_ref, rth_ref, rtl_ref, mid_ref, out_ref, *, lay: VllmSlot,
                  block_rows: int, chunk: int):
    """One program per ``block_rows`` (token, head) rows: their whole slots, padding zeroed.
    Coordinates are rotated, quantized and packed ``chunk`` at a time (``chunk * bits / 8``
    whole bytes), so the rotation's shared-memory tiles stay [Dp, chunk]."""
    n, d = k_ref.shape
    dp = rth_ref.shape[0]
    rows, rmask = tile_index(pl.program_id(0) * block_rows, block_rows, n)
    cols, c_ok = _columns(d)

    def chunks(bits: int):  # (column slice, column indices and mask, byte offset, bytes)
        per = chunk * bits // 8
        for j in range(dp // chunk):
            ccols, cc_ok = tile_index(j * chunk, chunk, d)
            yield pl.ds(j * chunk, chunk), ccols, cc_ok, j * per, per

    k = load_tile(k_ref, rows, rmask, cols, c_ok).astype(jnp.float32)
    if lay.key_fp8:
        _store_bytes(out_ref, rows, rmask, 0, d, lax.bitcast_convert_type(_fp8_key(k), jnp.uint8))
    else:
        norm, stored = _key_norm(k)
        ok = (stored < jnp.inf)[:, None]
        u_hi, u_lo = split16(k / (norm + VLLM_NORM_EPS)[:, None])
        for sl, _, _, at, per in chunks(lay.mse_bits):
            y = dot_split(u_hi, u_lo, rth_ref[:, sl], rtl_ref[:, sl])
            idx = jnp.where(ok, bucketize(y, mid_ref, mid_ref.shape[0]), 0)
            _store_bytes(out_ref, rows, rmask, at, min(per, lay.mse_bytes - at),
                         _pack_tile(idx, lay.mse_bits, per))
        _store_fp16(out_ref, rows, rmask, lay.norm_at, stored)
    _store_bytes(out_ref, rows, rmask, lay.key_bytes, lay.key_packed_size - lay.key_bytes, None)
    v = load_tile(v_ref, rows, rmask, cols, c_ok).astype(jnp.float32)
    scale, zero = _value_stats(v, lay.value_bits, None if c_ok is None else c_ok[None, :])
    for _, ccols, cc_ok, at, per in chunks(lay.value_bits):
        vc = load_tile(v_ref, rows, rmask, ccols, cc_ok).astype(jnp.float32)
        code = _value_codes(vc, scale, zero, lay.value_bits)
        _store_bytes(out_ref, rows, rmask, lay.value_at + at, min(per, lay.value_bytes - at),
                     _pack_tile(code, lay.value_bits, per))
    _store_fp16(out_ref, rows, rmask, lay.scale_at, scale)
    _store_fp16(out_ref, rows, rmask, lay.zero_at, zero)
    end = lay.zero_at + VLLM_NORM_BYTES
    _store_bytes(out_ref, rows, rmask, end, lay.slot_bytes - end, None)


#: (rows per program, warps) of the store kernel.
STORE_TILING = (32, 4)


@partial(jax.jit, static_argnames=("lay", "mode"))
def _store_pallas(key, value, rotation, centroids, *, lay: VllmSlot, mode):
    """key/value [R, D] -> slot bytes uint8 [R, slot_bytes]."""
    r, d = key.shape
    dp = next_pow2(d)
    rt = jnp.pad(rotation.T, ((0, dp - d), (0, dp - d)))
    mids = _midpoints(centroids)
    br, nw = STORE_TILING
    return pallas_call(partial(_store_kernel, lay=lay, block_rows=br, chunk=min(dp, 64)),
                       mode=mode,
                       grid=(pl.cdiv(r, br),),
                       out_shape=jax.ShapeDtypeStruct((r, lay.slot_bytes), jnp.uint8),
                       num_warps=nw, num_stages=1)(key, value, *split16(rt), mids)


def _scatter_slots(kv_cache, slots, slot_mapping):
    """Write slots [N, H, slot_bytes] to cache rows ``slot_mapping`` (negative or out of range:
    dropped); bytes past slot_bytes are kept."""
    nb, bs, h, sb = kv_cache.shape
    flat = kv_cache.reshape(nb * bs, h, sb)
    idx = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)
    flat = flat.at[idx, :, :slots.shape[-1]].set(slots, mode="drop")
    return flat.reshape(nb, bs, h, sb)


def _check_cache(kv_cache, lay: VllmSlot, num_kv_heads: int | None = None):
    kv_cache = ck.as_array("kv_cache", kv_cache)
    ck.check_dtype("kv_cache", kv_cache, [jnp.uint8])
    want = f"[num_blocks, block_size, {num_kv_heads or 'H_KV'}, {lay.slot_bytes}]"
    if kv_cache.ndim != 4 or kv_cache.shape[3] != lay.slot_bytes or (
            num_kv_heads is not None and kv_cache.shape[2] != num_kv_heads):
        raise ValueError(f"kv_cache must have shape {want} (slot of {lay.slot_bytes} bytes for "
                         f"head_dim {lay.head_dim}), got {tuple(kv_cache.shape)}")
    if kv_cache.size >= MAX_CACHE_BYTES:
        raise ValueError(f"kv_cache has {kv_cache.size} bytes: the kernels address it with "
                         f"32-bit offsets (< {MAX_CACHE_BYTES}); use one cache per layer")
    return kv_cache


def _check_static_bool(name: str, x: Any) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {x!r}")
    return bool(x)


def _check_centroids(lay: VllmSlot, centroids: Any) -> jnp.ndarray:
    """centroids f32 [2**mse_bits] (a zero dummy for fp8 keys, which ignore them)."""
    if lay.key_fp8:
        return jnp.zeros((CODEBOOK_SLOTS,), jnp.float32)
    centroids = ck.as_array("centroids", centroids)
    ck.check_float("centroids", centroids)
    if centroids.shape != (1 << lay.mse_bits,):
        raise ValueError(f"centroids must have shape ({1 << lay.mse_bits},) for mse_bits="
                         f"{lay.mse_bits}, got {tuple(centroids.shape)}")
    ck.check_sorted("centroids", centroids)
    return centroids.astype(jnp.float32)


def _check_tables(lay: VllmSlot, Pi: Any, centroids: Any):
    """-> (rotation f32 [D, D] (None for fp8 keys), centroids)."""
    rotation = None if lay.key_fp8 else ck.check_rotation(Pi, lay.head_dim, "Pi")
    return rotation, _check_centroids(lay, centroids)


def _check_store(kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits, key_packed_size,
                 value_quant_bits, key_fp8):
    key, value, slot_mapping = ck.check_new_tokens(key, value, slot_mapping)
    _, h, d = key.shape
    lay = vllm_slot(d, mse_bits, value_quant_bits, key_packed_size,
                    _check_static_bool("key_fp8", key_fp8))
    kv_cache = _check_cache(kv_cache, lay, h)
    rotation, centroids = _check_tables(lay, Pi, centroids)
    return kv_cache, key, value, slot_mapping, rotation, centroids, lay


def turboquant_store(kv_cache: Any, key: Any, value: Any, slot_mapping: Any, Pi: Any,
                     centroids: Any, mse_bits: int, key_packed_size: int,
                     value_quant_bits: int, key_fp8: bool = False, *,
                     impl: str = "auto") -> jnp.ndarray:
    """Quantize new tokens into a vLLM TurboQuant cache; returns the updated cache.

    kv_cache [num_blocks, block_size, H_KV, slot] uint8; key/value [N, H_KV, D] float;
    slot_mapping [N] int32 (``block * block_size + offset``; negative = skip); Pi [D, D]
    (keys are stored as ``(k / (||k|| + 1e-8)) @ Pi^T``); centroids [2**mse_bits] (sorted).
    ``Pi``/``centroids`` are ignored with ``key_fp8``. Writes whole slots (padding bytes zero).
    """
    kv_cache, key, value, slots, rotation, centroids, lay = _check_store(
        kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits, key_packed_size,
        value_quant_bits, key_fp8)
    n, h, d = key.shape
    if n == 0:
        return kv_cache
    if resolve_impl(impl) == "reference":
        rows = _slots_reference(key, value, rotation, centroids, lay)
    else:
        rot = jnp.eye(d, dtype=jnp.float32) if rotation is None else rotation
        rows = _store_pallas(key.reshape(n * h, d), value.reshape(n * h, d), rot, centroids,
                             lay=lay, mode=kernel_mode()).reshape(n, h, lay.slot_bytes)
    return _scatter_slots(kv_cache, rows, slots)


def turboquant_store_reference(kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits,
                               key_packed_size, value_quant_bits, key_fp8=False):
    """:func:`turboquant_store` in pure jnp (float32 math)."""
    return turboquant_store(kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits,
                            key_packed_size, value_quant_bits, key_fp8, impl="reference")


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------

class DecodeConfig(NamedTuple):
    """Static tiling of the decode kernel. ``prefetch``: each key tile loads the next tile's
    cache rows (block-table reads) and fp16 scalars (key norm, value scale and zero: 2-byte
    gathers, one slot each) a loop iteration ahead, so their latency overlaps the decode; the
    next tile reuses those rows (4bit_nc, H200, B=8 32K: 0.322 -> 0.312 ms). ``nc_dot``: norm
    correction sums the squared decoded centroids of each key with two more tensor-core dots
    (a ones matrix times the squared halves) instead of row reductions in registers."""
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True
    nc_dot: bool = True


def default_config(lay: VllmSlot) -> DecodeConfig:
    """Measured on an H200 (bench/vllm_layout.py --sweep [PRESET], D=128, B=8, 32K): 128-key
    tiles, 4 warps, 3 stages for every preset (turboquant_4bit_nc 0.389-0.415 ms, 2 stages
    0.400-0.413, 8 warps 0.6-0.7; turboquant_3bit_nc 0.501 vs 1.33 with 64-key tiles, which
    were faster before values decoded as even/odd halves); wide heads 32-key tiles. Norm
    correction by dots: 0.39 vs 0.42 ms (4bit_nc), 0.45-0.48 vs 0.48-0.50 (3bit_nc). The
    scalar prefetch for fp8 and 4-bit keys (k8v4 0.30 vs 0.32-0.33, 4bit_nc 0.38 vs 0.39);
    3-bit keys are slower with it (3bit_nc 0.50-0.51 vs 0.45-0.48)."""
    prefetch = lay.key_fp8 or lay.mse_bits == 4
    if lay.head_dim > 128:
        return DecodeConfig(block_n=32, num_stages=2, prefetch=prefetch)
    return DecodeConfig(prefetch=prefetch)


def _split_len(seq_len, splits: int, block_n: int):
    """Keys per split of a sequence (whole ``block_n`` tiles); jnp or in-kernel."""
    per = (seq_len + splits - 1) // splits
    return (per + block_n - 1) // block_n * block_n


def _decode_kernel(q_ref, *refs, lay: VllmSlot, nc: bool, rot_q: bool, k_lut, v_lut,
                   block_size: int, hkv: int, group: int, block_m: int, cfg: DecodeConfig,
                   splits: int, scale_log2: float):
    """Stage 1: program (sequence b, KV head h, split) -> for the group's query heads, the
    split's normalized output ``acc / l`` and ``m + log l`` (natural log), rows
    ``((b * H_Q + hq) * splits + split)``. An empty split writes nothing."""
    q_refs = (q_ref, *refs[:4]) if rot_q else (q_ref,)
    cache_ref, words_ref, bt_ref, lens_ref, k_table, v_table, o_ref, lse_ref = \
        refs[4 if rot_q else 0:]
    cache_refs = (cache_ref, words_ref)
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn, d = cfg.block_n, lay.head_dim
    max_blocks = bt_ref.shape[0] // lens_ref.shape[0]
    n_blocks = cache_ref.shape[0] // (block_size * hkv)
    seq_len = jnp.clip(lens_ref[b], 0, max_blocks * block_size)
    split_len = _split_len(seq_len, splits, bn)
    start = sp * split_len
    stop = jnp.minimum(start + split_len, seq_len)

    @pl.when(start < stop)
    def _():
        r, r_ok = tile_index(0, block_m, group)
        qrow = (b * hkv + h) * group + r
        cols, c_ok = _columns(d)
        if lay.key_fp8:  # raw keys: the raw query
            q = load_tile(q_ref, qrow, r_ok, cols, c_ok)
        else:  # rotated query, even and odd coordinates apart
            q = _query_halves(q_refs, qrow, r_ok, rot_q, d)
        dt = q.dtype if lay.key_fp8 else q[0].dtype
        dot = partial(jnp.dot, preferred_element_type=jnp.float32)
        slot_rows = partial(_slot_rows, bt_ref, b * max_blocks, block_size=block_size, hkv=hkv,
                            head=h, n_blocks=n_blocks)

        def lanes(j, masked: bool):  # positions of key tile j, in-range lanes, load mask
            pos, ok = tile_index(start + j * bn, bn, stop)
            return pos, ok, (ok if masked else None)

        def rows_of(j, masked: bool):  # cache rows of key tile j and its lane mask
            pos, ok, pmask = lanes(j, masked)
            return ok, pmask, slot_rows(pos, pmask)

        def ahead(j):  # rows and fp16 scalars of key tile j (j may be past the range: masked)
            _, pmask, rows = rows_of(j, True)
            return rows, _fetch_slot_scalars(cache_refs, rows, pmask, lay)

        def step(j, carry, masked: bool):  # online softmax over key tile j
            acc, zacc, m_prev, l_prev, nxt = carry
            if cfg.prefetch:  # this tile's rows came with the previous one
                (_, ok, pmask), rows = lanes(j, masked), nxt[0]
            else:
                ok, pmask, rows = rows_of(j, masked)
            codes = _fetch_slot_codes(cache_ref, rows, pmask, lay)
            if cfg.prefetch:  # so did its scalars; fetch the next tile's
                nxt, cur = ahead(j + 1), nxt[1]
            else:
                cur = _fetch_slot_scalars(cache_refs, rows, pmask, lay)
            raw_k, raw_v = _slot_raw(codes, cur)
            k, kf = _key_from_raw(raw_k, lay, k_table, dt, k_lut, nc and not cfg.nc_dot)
            if kf is None:
                s = dot(q, k.T) * scale_log2
            else:
                s = (dot(q[0], k[0].T) + dot(q[1], k[1].T)) * (kf * scale_log2)[None, :]
            if nc and cfg.nc_dot:  # every row: the key's centroid norm squared, on tensor cores
                sq = dot(ones, (k[0] * k[0]).T) + dot(ones, (k[1] * k[1]).T)
                s = s * lax.rsqrt(sq + VLLM_NC_EPS)
            if masked:
                s = jnp.where(ok[None, :], s, -jnp.inf)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.exp2(s - m_new[:, None])
            lev, v_scale, v_zero = _value_from_raw(raw_v, lay, v_table, dt, v_lut)
            pv = (p * v_scale[None, :]).astype(dt)  # acc: (even, odd) output coordinates
            acc = tuple(a * alpha[:, None] + dot(pv, x) for a, x in zip(acc, lev))
            zacc = zacc * alpha + jnp.sum(p * v_zero[None, :], axis=1)
            return acc, zacc, m_new, l_prev * alpha + jnp.sum(p, axis=1), nxt

        zero_rows = jnp.zeros((block_m,), jnp.float32)
        half = jnp.zeros((block_m, cols.shape[0] // 2), jnp.float32)
        if nc and cfg.nc_dot:  # weight 1 per coordinate; padding (decodes c[0]) weight 0
            _, h_ok = _columns(d // 2)
            ones = jnp.ones(half.shape, dt) if h_ok is None else jnp.broadcast_to(
                h_ok[None, :].astype(dt), half.shape)
        carry = ((half, half), zero_rows, jnp.full((block_m,), M_INIT, jnp.float32),
                 zero_rows, ahead(0) if cfg.prefetch else ())
        n_full = (stop - start) // bn
        carry = lax.fori_loop(0, n_full, partial(step, masked=False), carry)
        acc, zacc, m, l_fin, _ = lax.fori_loop(n_full, pl.cdiv(stop - start, bn),
                                               partial(step, masked=True), carry)
        orow = qrow * splits + sp
        out = (interleave(*acc) + zacc[:, None]) / l_fin[:, None]
        store_tile(o_ref, orow, r_ok, cols, c_ok, out)
        store_rows(lse_ref, orow, r_ok, (m + jnp.log2(l_fin)) * LN2)


def merge_lse(o: jnp.ndarray, lse: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Stage 2: per-split outputs o [B, H, S, D] and lse [B, H, S] (natural log), split
    validity [B, S] -> [B, H, D] float32. Invalid splits (never written) are ignored; a row
    with no valid split gives zeros."""
    ok = valid[:, None, :]
    lse = jnp.where(ok, lse, -jnp.inf)
    mx = jnp.max(lse, axis=-1, keepdims=True)
    w = jnp.where(ok, jnp.exp(lse - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    total = jnp.sum(w, axis=-1)
    o = jnp.where(ok[..., None], o, 0.0)
    return jnp.sum(w[..., None] * o, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


@partial(jax.jit, static_argnames=("lay", "nc", "k_lut", "v_lut", "scale", "splits", "cfg",
                                   "mode", "stage1_only"))
def _decode_pallas(query, kv_cache, block_table, seq_lens, rotation, k_table, *, lay, nc,
                   k_lut, v_lut, scale, splits, cfg, mode, stage1_only=False):
    b, hq, d = query.shape
    nb, bs, hkv, sb = kv_cache.shape
    group = hq // hkv
    block_m = max(16, next_pow2(group))
    dt = query.dtype
    rot_q = not lay.key_fp8 and rotate_in_kernel(d, group)  # decode: group rows per KV head
    rot = None if lay.key_fp8 else _rotation_parts(rotation, dt)
    if not lay.key_fp8 and not rot_q:
        query = rotate_in_xla(query, rot)
    v_table, _ = _value_table(dt)
    args = [query.reshape(b * hq, d)]
    args += list(rot.q_halves) if rot_q else []
    args += [*_cache_views(kv_cache), block_table.reshape(-1), seq_lens, k_table, v_table]
    rows = b * hq * splits
    kernel = partial(_decode_kernel, lay=lay, nc=nc, rot_q=rot_q, k_lut=k_lut, v_lut=v_lut,
                     block_size=bs, hkv=hkv, group=group, block_m=block_m, cfg=cfg,
                     splits=splits, scale_log2=scale * LOG2E)
    o, lse = pallas_call(kernel, mode=mode, grid=(b, hkv, splits),
                         out_shape=(jax.ShapeDtypeStruct((rows, d), jnp.float32),
                                    jax.ShapeDtypeStruct((rows,), jnp.float32)),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)(*args)
    o, lse = o.reshape(b, hq, splits, d), lse.reshape(b, hq, splits)
    if stage1_only:
        return o, lse
    seq = jnp.clip(seq_lens, 0, block_table.shape[1] * bs)
    valid = jnp.arange(splits)[None, :] * _split_len(seq, splits, cfg.block_n)[:, None] \
        < seq[:, None]
    return saturate(merge_lse(o, lse, valid), dt)


def _check_decode(query, kv_cache, block_table, seq_lens, Pi, centroids, scale, mse_bits,
                  key_packed_size, value_quant_bits, key_fp8, norm_correction,
                  max_num_kv_splits):
    query = ck.as_array("query", query)
    ck.check_dtype("query", query, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("query", query, 3, "[num_seqs, heads_q, head_dim]")
    b, hq, d = query.shape
    ck.check_head_dim("query", d)
    lay = vllm_slot(d, mse_bits, value_quant_bits, key_packed_size,
                    _check_static_bool("key_fp8", key_fp8))
    nc = _check_static_bool("norm_correction", norm_correction)
    kv_cache = _check_cache(kv_cache, lay)
    hkv = kv_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"kv_cache's num_kv_heads ({hkv}) must divide query's heads ({hq})")
    seq_lens, block_table = ck.check_seq_table(seq_lens, block_table, b)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale must be a Python float, got {scale!r}")
    if isinstance(max_num_kv_splits, bool) or not isinstance(max_num_kv_splits, int) \
            or not 1 <= max_num_kv_splits <= 1024:
        raise ValueError(f"max_num_kv_splits must be an int in [1, 1024], "
                         f"got {max_num_kv_splits!r}")
    rotation, centroids = _check_tables(lay, Pi, centroids)
    return query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc, float(scale)


def turboquant_decode(query: Any, kv_cache: Any, block_table: Any, seq_lens: Any, Pi: Any,
                      centroids: Any, scale: float, mse_bits: int, key_packed_size: int,
                      value_quant_bits: int, key_fp8: bool = False,
                      norm_correction: bool = False, max_num_kv_splits: int = 32, *,
                      impl: str = "auto", config: DecodeConfig | None = None) -> jnp.ndarray:
    """One query per sequence against a vLLM TurboQuant cache -> [B, H_Q, D] in query's dtype.

    query [B, H_Q, D] fp16/bf16 (raw: rotated inside by ``Pi^T`` unless ``key_fp8``);
    kv_cache [num_blocks, block_size, H_KV, slot] uint8; block_table [B, max_blocks] int32;
    seq_lens [B] int32; centroids [2**mse_bits] float32; ``scale`` the softmax scale. The
    layout arguments are static Python values; ``max_num_kv_splits`` is the fixed split grid.
    Positions past ``seq_lens`` (or past the block table) are never read; block ids are
    clamped into the cache; a sequence of length 0 gives zeros.
    """
    raw_centroids = centroids
    query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc, scale = _check_decode(
        query, kv_cache, block_table, seq_lens, Pi, centroids, scale, mse_bits,
        key_packed_size, value_quant_bits, key_fp8, norm_correction, max_num_kv_splits)
    if resolve_impl(impl) == "reference":
        return saturate(_decode_reference(query, kv_cache, block_table, seq_lens, rotation,
                                          centroids, lay, nc, scale), query.dtype)
    if lay.key_fp8:
        k_table, k_lut = centroids, False
        rotation = jnp.zeros((lay.head_dim, lay.head_dim), jnp.float32)
    else:
        k_table, k_lut = _codebook_parts(centroids, query.dtype, raw_centroids)
    return _decode_pallas(query, kv_cache, block_table, seq_lens, rotation, k_table, lay=lay,
                          nc=nc, k_lut=k_lut, v_lut=_value_table(query.dtype)[1], scale=scale,
                          splits=max_num_kv_splits,
                          cfg=config or default_config(lay),
                          mode=kernel_mode())


def _decode_reference(query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc,
                      scale):
    n_pos = block_table.shape[1] * kv_cache.shape[1]
    slots, valid = _gather_slots(kv_cache, block_table, seq_lens, n_pos)
    k, v = _dequant_slots_reference(slots, centroids, lay, nc)
    keep = valid[:, None, :, None]
    k, v = jnp.where(keep, k, 0.0), jnp.where(keep, v, 0.0)
    q = query.astype(jnp.float32)
    if not lay.key_fp8:
        q = jnp.matmul(q, rotation.T, precision=lax.Precision.HIGHEST)
    mask = jnp.where(valid, 0.0, -jnp.inf)[:, None, None, :]
    return attention_reference(q[:, :, None, :], k, v, scale, False, mask)[:, :, 0, :]


def turboquant_decode_reference(query, kv_cache, block_table, seq_lens, Pi, centroids, scale,
                                mse_bits, key_packed_size, value_quant_bits, key_fp8=False,
                                norm_correction=False, max_num_kv_splits=32) -> jnp.ndarray:
    """:func:`turboquant_decode` in pure jnp: gather, dequantize, float32 attention.
    Returns float32 [B, H_Q, D]."""
    query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc, scale = _check_decode(
        query, kv_cache, block_table, seq_lens, Pi, centroids, scale, mse_bits,
        key_packed_size, value_quant_bits, key_fp8, norm_correction, max_num_kv_splits)
    return _decode_reference(query, kv_cache, block_table, seq_lens, rotation, centroids, lay,
                             nc, scale)


# ----------------------------------------------------------------------------------------------
# full dequant
# ----------------------------------------------------------------------------------------------

def _dequant_kernel(cache_ref, words_ref, bt_ref, lens_ref, k_table, v_table, k_ref, v_ref, *,
                    lay: VllmSlot, nc: bool, block_size: int, hkv: int, block_n: int,
                    max_seq: int):
    """Program (sequence * KV head, position block) -> fp16 K and V rows; positions past the
    sequence get zeros."""
    bh, j = pl.program_id(0), pl.program_id(1)
    b, h = bh // hkv, bh % hkv
    max_blocks = bt_ref.shape[0] // lens_ref.shape[0]
    seq_len = jnp.clip(lens_ref[b], 0, min(max_blocks * block_size, max_seq))
    pos, ok = tile_index(j * block_n, block_n, max_seq)
    valid = pos < seq_len
    rows = _slot_rows(bt_ref, b * max_blocks, pos, valid, block_size, hkv, h,
                      cache_ref.shape[0] // (block_size * hkv))
    raw_k, raw_v = _fetch_slots((cache_ref, words_ref), rows, valid, lay)
    k, kf = _key_from_raw(raw_k, lay, k_table, jnp.float32, False, nc)
    if kf is not None:
        k = interleave(*k) * kf[:, None]
    lev, v_scale, v_zero = _value_from_raw(raw_v, lay, v_table, jnp.float32, False)
    v = interleave(*lev) * v_scale[:, None] + v_zero[:, None]
    cols, c_ok = _columns(lay.head_dim)
    orow = bh * max_seq + pos
    keep = valid[:, None]
    store_tile(k_ref, orow, ok, cols, c_ok, jnp.where(keep, k, 0.0))
    store_tile(v_ref, orow, ok, cols, c_ok, jnp.where(keep, v, 0.0))


#: Positions per program and warps of the dequant kernel.
DEQUANT_TILING = (32, 4)


@partial(jax.jit, static_argnames=("lay", "nc", "max_seq", "mode"))
def _dequant_pallas(kv_cache, block_table, seq_lens, centroids, *, lay, nc, max_seq, mode):
    nb, bs, hkv, sb = kv_cache.shape
    b, d = block_table.shape[0], lay.head_dim
    bn, nw = DEQUANT_TILING
    v_table, _ = _value_table(jnp.float32)
    shape = jax.ShapeDtypeStruct((b * hkv * max_seq, d), jnp.float16)
    kernel = partial(_dequant_kernel, lay=lay, nc=nc, block_size=bs, hkv=hkv, block_n=bn,
                     max_seq=max_seq)
    k, v = pallas_call(kernel, mode=mode, grid=(b * hkv, pl.cdiv(max_seq, bn)),
                       out_shape=(shape, shape), num_warps=nw, num_stages=2)(
        *_cache_views(kv_cache), block_table.reshape(-1), seq_lens, pad_codebook(centroids),
        v_table)
    return k.reshape(b, hkv, max_seq, d), v.reshape(b, hkv, max_seq, d)


def _infer_head_dim(slot_bytes: int, mse_bits, key_packed_size, value_quant_bits, key_fp8):
    """head_dims whose slot (with these layout arguments) is ``slot_bytes`` wide and whose key
    fills ``key_packed_size`` exactly (vLLM's rule)."""
    found = []
    if isinstance(key_packed_size, int) and isinstance(value_quant_bits, int):
        for extra in (0, 1):
            vdb = slot_bytes - extra - key_packed_size - 4
            d = vdb * 8 // max(value_quant_bits, 1)
            try:
                lay = vllm_slot(d, mse_bits, value_quant_bits, key_packed_size, key_fp8)
            except (ValueError, TypeError):
                continue
            if lay.slot_bytes == slot_bytes and lay.key_bytes == key_packed_size \
                    and d not in found:
                found.append(d)
    return found


def _check_dequant(kv_cache, block_table, seq_lens, centroids, mse_bits, key_packed_size,
                   value_quant_bits, key_fp8, norm_correction, head_dim, max_seq):
    kv_cache = ck.as_array("kv_cache", kv_cache)
    if kv_cache.ndim != 4:
        raise ValueError(f"kv_cache must have shape [num_blocks, block_size, H_KV, slot], got "
                         f"{tuple(kv_cache.shape)}")
    key_fp8 = _check_static_bool("key_fp8", key_fp8)
    if head_dim is None:
        found = _infer_head_dim(kv_cache.shape[3], mse_bits, key_packed_size, value_quant_bits,
                                key_fp8)
        if len(found) != 1:
            raise ValueError(f"cannot infer head_dim from a {kv_cache.shape[3]}-byte slot "
                             f"(candidates {found}): pass head_dim=")
        head_dim = found[0]
    ck.check_head_dim("head_dim", head_dim)
    lay = vllm_slot(head_dim, mse_bits, value_quant_bits, key_packed_size, key_fp8)
    nc = _check_static_bool("norm_correction", norm_correction)
    kv_cache = _check_cache(kv_cache, lay)
    block_table = ck.as_array("block_table", block_table)
    ck.check_ndim("block_table", block_table, 2, "[num_seqs, max_blocks]")
    seq_lens, block_table = ck.check_seq_table(seq_lens, block_table, block_table.shape[0])
    cap = block_table.shape[1] * kv_cache.shape[1]
    max_seq = cap if max_seq is None else max_seq
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 1:
        raise ValueError(f"max_seq must be a positive int, got {max_seq!r}")
    return kv_cache, block_table, seq_lens, _check_centroids(lay, centroids), lay, nc, max_seq


def full_dequant_kv(kv_cache: Any, block_table: Any, seq_lens: Any, centroids: Any,
                    mse_bits: int, key_packed_size: int, value_quant_bits: int,
                    key_fp8: bool = False, norm_correction: bool = False, *,
                    head_dim: int | None = None, max_seq: int | None = None,
                    impl: str = "auto") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Dequantize every cached token (continuation prefill) -> (k, v) float16
    [B, H_KV, max_seq, D]: k in rotated space (raw with ``key_fp8``), v dequantized.

    ``max_seq`` (static) defaults to the block table's capacity; positions at or past
    ``seq_lens`` are zeros. ``head_dim`` defaults to the one the slot size implies.
    """
    kv_cache, block_table, seq_lens, centroids, lay, nc, max_seq = _check_dequant(
        kv_cache, block_table, seq_lens, centroids, mse_bits, key_packed_size,
        value_quant_bits, key_fp8, norm_correction, head_dim, max_seq)
    if resolve_impl(impl) == "reference":
        slots, valid = _gather_slots(kv_cache, block_table, seq_lens, max_seq)
        k, v = _dequant_slots_reference(slots, centroids, lay, nc)
        keep = valid[:, None, :, None]
        return (saturate(jnp.where(keep, k, 0.0), jnp.float16),
                saturate(jnp.where(keep, v, 0.0), jnp.float16))
    return _dequant_pallas(kv_cache, block_table, seq_lens, centroids, lay=lay, nc=nc,
                           max_seq=max_seq, mode=kernel_mode())


def full_dequant_kv_reference(kv_cache, block_table, seq_lens, centroids, mse_bits,
                              key_packed_size, value_quant_bits, key_fp8=False,
                              norm_correction=False, *, head_dim=None, max_seq=None):
    """:func:`full_dequant_kv` in pure jnp."""
    return full_dequant_kv(kv_cache, block_table, seq_lens, centroids, mse_bits,
                           key_packed_size, value_quant_bits, key_fp8, norm_correction,
                           head_dim=head_dim, max_seq=max_seq, impl="reference")
