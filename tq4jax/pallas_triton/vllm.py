"""vLLM-layout kernels (LAYOUTS.md family B, Triton lowering): store, split-KV decode, full
dequant.

* store: one program per block of (token, head) rows computes their whole slots (norm,
  rotation, bucketize, LSB-first bit packing by exact 0/1 x power-of-two products, value
  min/max quantization, fp16 fields); the op scatters them (in place when donated).
* decode: one program per (sequence, KV head, split) holds all query heads of the group, so
  each decoded tile feeds a ``[group, D] x [D, block_n]`` tensor-core dot; values enter as
  their integer levels, ``p @ v = (p * scale) @ levels + sum(p * zero)``; each split writes
  its normalized output and log-sum-exp, empty splits write nothing, the merge skips them.
* dequant: every cached position to fp16 K (rotated space, or raw fp8) and V.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..backend import KernelMode
from ..core import (LOG2E, SPLIT_SCALE, merge_splits, next_pow2, rotate_in_xla, rotation_parts,
                    split16)
from ..layout import (VLLM_NC_EPS, VLLM_NORM_BYTES, VLLM_NORM_EPS, VllmSlot,
                      fp8_key, key_norm, midpoints, pad_codebook, to_dtype, value_codes,
                      value_stats, zero_rows)
from .attention import query_halves
from .call import pallas_call
from .tiles import (M_INIT, bucketize, columns, dot32, dot_split, interleave, key_loop, load_rows,
                    load_tile, lse_of, softmax_step, store_rows, store_tile, tile_index)
from .tuning import CodecConfig, DecodeConfig, rotate_in_kernel
from .vllm_tiles import (cache_views, fetch_slot_codes, fetch_slot_scalars, fetch_slots,
                         key_from_raw, key_split_from_raw, slot_raw, slot_rows, value_from_raw,
                         value_table)


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
    cols, c_ok = columns(d)

    def chunks(bits: int):  # (column slice, column indices and mask, byte offset, bytes)
        per = chunk * bits // 8
        for j in range(dp // chunk):
            ccols, cc_ok = tile_index(j * chunk, chunk, d)
            yield pl.ds(j * chunk, chunk), ccols, cc_ok, j * per, per

    k = load_tile(k_ref, rows, rmask, cols, c_ok).astype(jnp.float32)
    if lay.key_fp8:
        _store_bytes(out_ref, rows, rmask, 0, d, lax.bitcast_convert_type(fp8_key(k), jnp.uint8))
    else:
        norm, stored = key_norm(k)
        ok = stored < jnp.inf
        u_hi, u_lo = split16(k / (norm + VLLM_NORM_EPS)[:, None])
        for sl, _, _, at, per in chunks(lay.mse_bits):
            y = dot_split(u_hi, u_lo, rth_ref[:, sl], rtl_ref[:, sl])
            idx = zero_rows(ok, bucketize(y, mid_ref, mid_ref.shape[0]))
            _store_bytes(out_ref, rows, rmask, at, min(per, lay.mse_bytes - at),
                         _pack_tile(idx, lay.mse_bits, per))
        _store_fp16(out_ref, rows, rmask, lay.norm_at, stored)
    _store_bytes(out_ref, rows, rmask, lay.key_bytes, lay.key_packed_size - lay.key_bytes, None)
    v = load_tile(v_ref, rows, rmask, cols, c_ok).astype(jnp.float32)
    scale, zero = value_stats(v, lay.value_bits, None if c_ok is None else c_ok[None, :])
    for _, ccols, cc_ok, at, per in chunks(lay.value_bits):
        vc = load_tile(v_ref, rows, rmask, ccols, cc_ok).astype(jnp.float32)
        code = value_codes(vc, scale, zero, lay.value_bits)
        _store_bytes(out_ref, rows, rmask, lay.value_at + at, min(per, lay.value_bytes - at),
                     _pack_tile(code, lay.value_bits, per))
    _store_fp16(out_ref, rows, rmask, lay.scale_at, scale)
    _store_fp16(out_ref, rows, rmask, lay.zero_at, zero)
    end = lay.zero_at + VLLM_NORM_BYTES
    _store_bytes(out_ref, rows, rmask, end, lay.slot_bytes - end, None)


@partial(jax.jit, static_argnames=("lay", "config", "mode"))
def store(key: jnp.ndarray, value: jnp.ndarray, rotation: jnp.ndarray, centroids: jnp.ndarray,
          *, lay: VllmSlot, config: CodecConfig, mode: KernelMode) -> jnp.ndarray:
    """key/value [R, D] -> slot bytes uint8 [R, slot_bytes]."""
    r, d = key.shape
    dp = next_pow2(d)
    rt = jnp.pad(rotation.T, ((0, dp - d), (0, dp - d)))
    return pallas_call(partial(_store_kernel, lay=lay, block_rows=config.block_rows,
                               chunk=min(dp, 64)),
                       mode=mode, grid=(pl.cdiv(r, config.block_rows),),
                       out_shape=jax.ShapeDtypeStruct((r, lay.slot_bytes), jnp.uint8),
                       num_warps=config.num_warps, num_stages=1)(
        key, value, *split16(rt), midpoints(centroids))


def split_len(seq_len, splits: int, block_n: int):
    """Keys per split of a sequence (whole ``block_n`` tiles); jnp or in-kernel."""
    per = (seq_len + splits - 1) // splits
    return (per + block_n - 1) // block_n * block_n


class DecodeSpec(NamedTuple):
    """Static description of a decode launch: the slot layout, norm correction, the key and
    value decode modes (:func:`lut.decode_split`), paging, the group's query rows (padded
    to ``block_m``), tiling, the fixed split count and the softmax scale in log2 units."""
    lay: VllmSlot
    nc: bool
    k_lut: Any
    v_lut: Any
    block_size: int
    hkv: int
    group: int
    block_m: int
    cfg: DecodeConfig
    splits: int
    scale_log2: float
    scores: str = "16bit"
    window_left: int | None = None
    softcap: float | None = None


def _decode_kernel(q_ref, q_rot, cache_ref, words_ref, bt_ref, lens_ref, k_table, v_table,
                   o_ref, lse_ref, *, spec: DecodeSpec):
    """Stage 1: program (sequence b, KV head h, split) -> for the group's query heads, the
    split's normalized output ``acc / l`` and its log-sum-exp (natural log), rows
    ``((b * H_Q + hq) * splits + split)``. An empty split writes nothing.

    Refs: q [B * H_Q, D] (rotated unless ``q_rot``, the Pi^T halves; with split scores a
    tuple (hi, lo, per-row score factor [B * H_Q] f32 or None)); the cache as slots
    [rows, slot] uint8 and as fp16 words (flat); the flat block table; seq_lens [B]; the key
    codebook table and the value level table; outputs o [B * H_Q * S, D], lse [B * H_Q * S]."""
    lay, nc, cfg, splits = spec.lay, spec.nc, spec.cfg, spec.splits
    block_size, hkv, group, block_m = spec.block_size, spec.hkv, spec.group, spec.block_m
    k_lut, v_lut, scale_log2 = spec.k_lut, spec.v_lut, spec.scale_log2
    cache_refs = (cache_ref, words_ref)
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn, d = cfg.block_n, lay.head_dim
    max_blocks = bt_ref.shape[0] // lens_ref.shape[0]
    n_blocks = cache_ref.shape[0] // (block_size * hkv)
    seq_len = jnp.clip(lens_ref[b], 0, max_blocks * block_size)
    first = key_window(seq_len, spec.window_left)
    split_len_ = split_len(seq_len - first, splits, bn)
    start = first + sp * split_len_
    stop = jnp.minimum(start + split_len_, seq_len)

    @pl.when(start < stop)
    def _():
        r, r_ok = tile_index(0, block_m, group)
        qrow = (b * hkv + h) * group + r
        cols, c_ok = columns(d)
        if lay.key_fp8:  # raw keys: the raw query
            q = load_tile(q_ref, qrow, r_ok, cols, c_ok)
            dt = q.dtype
        elif spec.scores != "16bit":  # rotated query as (hi, lo) pairs of (even, odd) halves
            q = tuple(query_halves(ref, None, qrow, r_ok, d) for ref in q_ref[:2])
            dt = q[0][0].dtype
            if q_ref[2] is not None:  # the rows were scaled into fp16's range: undo on s
                row_factor = load_rows(q_ref[2], qrow, r_ok)
        else:  # rotated query, even and odd coordinates apart
            q = query_halves(q_ref, q_rot, qrow, r_ok, d)
            dt = q[0].dtype
        dot = dot32
        rows_at = partial(slot_rows, bt_ref, b * max_blocks, block_size=block_size, hkv=hkv,
                            head=h, n_blocks=n_blocks)

        def lanes(j, masked: bool):  # positions of key tile j, in-range lanes, load mask
            pos, ok = tile_index(start + j * bn, bn, stop)
            return pos, ok, (ok if masked else None)

        def rows_of(j, masked: bool):  # cache rows of key tile j and its lane mask
            pos, ok, pmask = lanes(j, masked)
            return ok, pmask, rows_at(pos, pmask)

        def ahead(j):  # rows and fp16 scalars of key tile j (j may be past the range: masked)
            _, pmask, rows = rows_of(j, True)
            return rows, fetch_slot_scalars(cache_refs, rows, pmask, lay)

        def scores(raw_k):  # q @ k^T of a key tile, log2 units, f32 [block_m, block_n]
            if spec.scores == "split":  # float32-accurate: q_hi k_hi + q_lo k_hi + q_hi k_lo / S
                (qh, ql), (kh, kl, kf) = q, key_split_from_raw(raw_k, lay, k_table, dt, k_lut, nc)
                s = sum(dot(qh[i], kh[i].T) + dot(ql[i], kh[i].T)
                        + dot(qh[i], kl[i].T) * (1.0 / SPLIT_SCALE) for i in (0, 1))
                return s * (kf * scale_log2)[None, :]
            k, kf = key_from_raw(raw_k, lay, k_table, dt, k_lut, nc and not cfg.nc_dot)
            if kf is None:
                return dot(q, k.T) * scale_log2
            if spec.scores == "split_q":  # q_hi k + q_lo k
                s = sum(dot(q[0][i], k[i].T) + dot(q[1][i], k[i].T) for i in (0, 1))
                if q_ref[2] is not None:
                    s = s * row_factor[:, None]
            else:
                s = dot(q[0], k[0].T) + dot(q[1], k[1].T)
            s = s * (kf * scale_log2)[None, :]
            if nc and cfg.nc_dot:  # every row: the key's centroid norm squared, on tensor cores
                sq = dot(ones, (k[0] * k[0]).T) + dot(ones, (k[1] * k[1]).T)
                s = s * lax.rsqrt(sq + VLLM_NC_EPS)
            return s

        def step(j, carry, masked: bool):  # online softmax over key tile j
            acc, zacc, m_prev, l_prev, nxt = carry
            if cfg.prefetch:  # this tile's rows came with the previous one
                (_, ok, pmask), rows = lanes(j, masked), nxt[0]
            else:
                ok, pmask, rows = rows_of(j, masked)
            codes = fetch_slot_codes(cache_ref, rows, pmask, lay)
            if cfg.prefetch:  # so did its scalars; fetch the next tile's
                nxt, cur = ahead(j + 1), nxt[1]
            else:
                cur = fetch_slot_scalars(cache_refs, rows, pmask, lay)
            raw_k, raw_v = slot_raw(codes, cur)
            s = scores(raw_k)
            if spec.softcap is not None:  # in log2 units: c * tanh(s / c), c = softcap * log2 e
                s = (spec.softcap * LOG2E) * jnp.tanh(s * (1.0 / (spec.softcap * LOG2E)))
            if masked:
                s = jnp.where(ok[None, :], s, -jnp.inf)
            p, alpha, m_new, l_new = softmax_step(s, m_prev, l_prev)
            lev, v_scale, v_zero = value_from_raw(raw_v, lay, v_table, dt, v_lut)
            pv = (p * v_scale[None, :]).astype(dt)  # acc: (even, odd) output coordinates
            acc = tuple(a * alpha[:, None] + dot(pv, x) for a, x in zip(acc, lev))
            zacc = zacc * alpha + jnp.sum(p * v_zero[None, :], axis=1)
            return acc, zacc, m_new, l_new, nxt

        zero_rows = jnp.zeros((block_m,), jnp.float32)
        half = jnp.zeros((block_m, cols.shape[0] // 2), jnp.float32)
        if nc and cfg.nc_dot and spec.scores != "split":  # weight 1 per coordinate, 0 padding
            _, h_ok = columns(d // 2)
            ones = jnp.ones(half.shape, dt) if h_ok is None else jnp.broadcast_to(
                h_ok[None, :].astype(dt), half.shape)
        carry = ((half, half), zero_rows, jnp.full((block_m,), M_INIT, jnp.float32),
                 zero_rows, ahead(0) if cfg.prefetch else ())
        acc, zacc, m, l_fin, _ = key_loop(0, (stop - start) // bn, pl.cdiv(stop - start, bn),
                                          step, carry)
        orow = qrow * splits + sp
        out = (interleave(*acc) + zacc[:, None]) / l_fin[:, None]
        store_tile(o_ref, orow, r_ok, cols, c_ok, out)
        store_rows(lse_ref, orow, r_ok, lse_of(m, l_fin))


def compute_dtype(query_dtype: Any, scores: str, key_fp8: bool) -> Any:
    """The 16-bit type the decode kernel's tiles (query, codebook, P) use: fp16 for
    ``split_q`` scores (bf16 queries too: fp16's 11-bit mantissa keeps the codebook 8x finer),
    else the query's."""
    return jnp.float16 if scores == "split_q" and not key_fp8 else query_dtype


def split_query(q32: jnp.ndarray, ct: Any, from_bf16: bool) -> tuple:
    """Rotated queries f32 [R, D] -> (hi, lo, row factor) in ``ct`` with ``q ~= (hi + lo) *
    factor``: bf16 queries (``from_bf16``) in fp16 tiles are first scaled per row by a power of
    two so their largest coordinate is at most 2**14 (factor f32 [R]); else factor None
    (fp16 queries: ``||q|| < 65504``, as every fp16 kernel needs)."""
    factor = None
    if from_bf16 and jnp.dtype(ct) == jnp.float16:
        top = jnp.max(jnp.abs(q32), axis=1)
        factor = jnp.exp2(jnp.maximum(0.0, jnp.ceil(jnp.log2(top / 2.0 ** 14))))
        q32 = q32 / factor[:, None]
    return (*split16(q32, ct, scale=1.0), factor)


def key_window(seq_len: Any, left: int | None) -> Any:
    """First position a decode query (at ``seq_len - 1``) sees with a window of ``left``
    keys to its left (None: 0); jnp or in-kernel."""
    return 0 if left is None else jnp.maximum(seq_len - 1 - left, 0)


@partial(jax.jit, static_argnames=("lay", "nc", "k_lut", "v_lut", "scale", "splits", "cfg",
                                   "mode", "window_left", "softcap"))
def decode(query: jnp.ndarray, kv_cache: jnp.ndarray, block_table: jnp.ndarray,
           seq_lens: jnp.ndarray, rotation: jnp.ndarray | None, k_table: jnp.ndarray,
           sinks: jnp.ndarray | None = None, *, lay: VllmSlot, nc: bool, k_lut: Any,
           v_lut: Any, scale: float, splits: int, cfg: DecodeConfig, mode: KernelMode,
           window_left: int | None = None, softcap: float | None = None) -> jnp.ndarray:
    """query [B, H_Q, D] (raw) against a cache [blocks, block_size, H_KV, slot] ->
    [B, H_Q, D] in query's dtype: stage 1 (the kernel, ``splits`` fixed splits per sequence
    over the positions the query sees: the last ``window_left + 1`` or all), the log-sum-exp
    merge of the splits that saw keys, and the ``sinks`` [H_Q] f32 in each row's softmax
    denominator (``1 / (1 + exp(sink - lse))``)."""
    b, hq, d = query.shape
    nb, bs, hkv, sb = kv_cache.shape
    group = hq // hkv
    block_m = max(16, next_pow2(group))
    dt = query.dtype
    scores = "16bit" if lay.key_fp8 else cfg.scores
    ct = compute_dtype(dt, cfg.scores, lay.key_fp8)
    rot_q = scores == "16bit" and not lay.key_fp8 and rotate_in_kernel(d, group)
    q_rot = tuple(rotation_parts(rotation, dt).q_halves) if rot_q else None
    query = query.reshape(b * hq, d)
    if scores != "16bit":  # q @ Pi^T in float32, as 16-bit (hi, lo) with q ~= hi + lo
        query = split_query(rotate_in_xla(query, rotation, jnp.float32), ct,
                            dt == jnp.bfloat16)
    elif not lay.key_fp8 and not rot_q:
        query = rotate_in_xla(query, rotation)
    v_table, _ = value_table(ct)
    rows = b * hq * splits
    spec = DecodeSpec(lay, nc, k_lut, v_lut, bs, hkv, group, block_m, cfg, splits,
                      scale * LOG2E, scores, window_left, softcap)
    o, lse = pallas_call(partial(_decode_kernel, spec=spec), mode=mode, grid=(b, hkv, splits),
                         out_shape=(jax.ShapeDtypeStruct((rows, d), jnp.float32),
                                    jax.ShapeDtypeStruct((rows,), jnp.float32)),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)(
        query, q_rot, *cache_views(kv_cache), block_table.reshape(-1),
        seq_lens, k_table, v_table)
    o, lse = o.reshape(b, hq, splits, d), lse.reshape(b, hq, splits)
    seq = jnp.clip(seq_lens, 0, block_table.shape[1] * bs)
    seen = seq - key_window(seq, window_left)
    written = jnp.arange(splits)[None, :] * split_len(seen, splits, cfg.block_n)[:, None] \
        < seen[:, None]  # empty splits never wrote their rows
    out, lse = merge_splits(o, lse, 2, written[:, None, :], with_lse=True)
    if sinks is not None:
        out = out / (1.0 + jnp.exp(sinks[None, :] - lse))[..., None]
    return to_dtype(out, dt)


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
    rows = slot_rows(bt_ref, b * max_blocks, pos, valid, block_size, hkv, h,
                     cache_ref.shape[0] // (block_size * hkv))
    raw_k, raw_v = fetch_slots((cache_ref, words_ref), rows, valid, lay)
    k, kf = key_from_raw(raw_k, lay, k_table, jnp.float32, False, nc)
    if kf is not None:
        k = interleave(*k) * kf[:, None]
    lev, v_scale, v_zero = value_from_raw(raw_v, lay, v_table, jnp.float32, False)
    v = interleave(*lev) * v_scale[:, None] + v_zero[:, None]
    cols, c_ok = columns(lay.head_dim)
    orow = bh * max_seq + pos
    keep = valid[:, None]
    store_tile(k_ref, orow, ok, cols, c_ok, jnp.where(keep, k, 0.0))
    store_tile(v_ref, orow, ok, cols, c_ok, jnp.where(keep, v, 0.0))


@partial(jax.jit, static_argnames=("lay", "nc", "max_seq", "config", "mode"))
def dequant(kv_cache: jnp.ndarray, block_table: jnp.ndarray, seq_lens: jnp.ndarray,
            centroids: jnp.ndarray, *, lay: VllmSlot, nc: bool, max_seq: int,
            config: CodecConfig, mode: KernelMode) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every cached position -> (k, v) float16 [B, H_KV, max_seq, D]; past seq_lens: zeros."""
    nb, bs, hkv, sb = kv_cache.shape
    b, d = block_table.shape[0], lay.head_dim
    bn = config.block_rows
    v_table, _ = value_table(jnp.float32)
    shape = jax.ShapeDtypeStruct((b * hkv * max_seq, d), jnp.float16)
    kernel = partial(_dequant_kernel, lay=lay, nc=nc, block_size=bs, hkv=hkv, block_n=bn,
                     max_seq=max_seq)
    k, v = pallas_call(kernel, mode=mode, grid=(b * hkv, pl.cdiv(max_seq, bn)),
                       out_shape=(shape, shape), num_warps=config.num_warps, num_stages=2)(
        *cache_views(kv_cache), block_table.reshape(-1), seq_lens, pad_codebook(centroids),
        v_table)
    return k.reshape(b, hkv, max_seq, d), v.reshape(b, hkv, max_seq, d)
