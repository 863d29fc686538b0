"""Contiguous attention: flash_attention, flash_attention_tq4, flash_attention_tq4_kv (LAYOUTS A1).

One FlashAttention-2 forward kernel serves all three: K and V tiles come either dense
(fp16/bf16) or as TQ4 codes that are decoded right after their load and never exist in device
memory. A code tile decodes in registers (PTX ``prmt`` on a 16-entry table held in registers,
:func:`_tiles.decode_split`) into its even and its odd coordinates, and each half feeds its own
tensor-core dot: ``s = q_even @ k_even^T + q_odd @ k_odd^T``, ``acc_even += p @ v_even``. A
codebook known at trace time is an immediate table (4 words when antisymmetric, as Lloyd-Max
codebooks are); a traced one is loaded once per program. Interpret mode gathers instead.
Norms are applied to scores and probabilities, not to decoded elements:
``s = norm_k * (q_rot . c[k_codes])``, ``acc += (p * norm_v) @ c[v_codes]``.

* Compressed K: each program rotates its query tile once (``q @ Pi^T``).
* Compressed V: the output is accumulated in rotated space and post-rotated once
  (``o @ Pi``), inside the kernel, or after the split merge for split-KV decode.

Shapes: q [B, H_Q, Sq, D] fp16/bf16; k/v [B, H_KV, Sk, D]; codes [B, H_KV, Sk, D/2] uint8;
norms [B, H_KV, Sk] (or [..., 1]) f32; output [B, H_Q, Sq, D] in q's dtype. Causal masking
aligns the last query with the last key; rows with no visible key give zeros.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _checks as ck
from ._config import kernel_mode, next_pow2, pallas_call, resolve_impl
from ._tiles import (INT8_SCALE_AT, codebook_table, decode_codes, decode_split, dot_split,
                     interleave, load_rows, load_tile, split16, static_planes, store_rows,
                     store_tile, tile_index)
from .codec import dequantize_reference
from .layout import NORM_BYTES, PagedLayout, pad_codebook, saturate

LOG2E = math.log2(math.e)
MASKED = -jnp.inf
M_INIT = -1e30  # finite running max: a fully masked block gives p = 0, never NaN


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
#
# Rows. A program serves a block of the ``group * Sq`` query rows that share one KV head,
# ordered position-major (row r is query position r // group of query head r % group), so a
# decoded K/V tile feeds every query head of its group and a causal block spans few positions.
# Physically q and the output are viewed as [B, HKV, group * Sq, D] (head-major, a free
# reshape of [B, HQ, Sq, D]): row r lives at (r % group) * Sq + r // group.
#
# Rotations. With compressed K the program rotates its query tile itself (``q @ Pi^T`` as two
# 16-bit dots against the hi/lo halves of Pi^T); with compressed V and one KV split it
# post-rotates the normalized output (``o @ Pi``, three dots), so the rotated-space values
# never leave the kernel. Decoded K/V tiles are interleaved back to [block_n, D] (tt.join).


class Config(NamedTuple):
    """Static kernel configuration: tile sizes, warps, pipeline stages, KV splits."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 1


class Paged(NamedTuple):
    """Static description of a paged TQ4 cache (LAYOUTS.md A2) for the kernel. ``norm_words``:
    the kernel also gets the cache as float32 words (a free bitcast when a row's width is a
    multiple of 4) and loads each norm as one word instead of four bytes. ``prefetch_norms``:
    each key tile loads the next tile's K/V norms (strided 4-byte gathers, one cache row
    each) a loop iteration ahead, so their latency overlaps the decode."""
    block_size: int
    num_kv_heads: int
    layout: PagedLayout
    norm_words: bool = False
    prefetch_norms: bool = False


def _split_refs(refs, k_tq4: bool, v_tq4: bool, rot_q: bool, post: bool, has_mask: bool,
                paged: Paged | None, has_lens: bool = False):
    """Kernel refs -> (q refs, k refs, v refs, post-rotation refs, mask ref, lengths ref,
    output refs)."""
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]  # noqa: E731
    q_refs = take(5 if rot_q else 1)   # q (+ Pi^T even-column hi, lo, odd-column hi, lo)
    if paged is not None:  # cache, (cache words,) block table, seq_lens, query_start_loc,
        k_refs, v_refs = take(7 if paged.norm_words else 6), take(1)  # schedule, K | V table
    else:
        k_refs = take(3 if k_tq4 else 1)   # codes, norms, codebook bits | dense k
        v_refs = take(3 if v_tq4 else 1)
    post_refs = take(2 if post else 0)  # Pi hi, lo
    mask_ref = take(1)[0] if has_mask else None
    lens_ref = take(1)[0] if has_lens else None
    return q_refs, k_refs, v_refs, post_refs, mask_ref, lens_ref, refs


def _columns(width: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Column indices of a tile ``width`` wide, padded to a power of two, and their mask
    (None when no padding)."""
    cols, ok = tile_index(0, next_pow2(width), width)
    return cols, (None if next_pow2(width) == width else ok)


def _decode_tile(refs, rows, rmask, bcols, bc_ok, dt, planes: bool | tuple):
    """TQ4 rows of a K/V tile -> ((even, odd) centroids [rows, D/2] in ``dt``, norms [rows]
    f32)."""
    codes_ref, norms_ref, table_ref = refs
    codes = load_tile(codes_ref, rows, rmask, bcols, bc_ok)
    norms = norms_ref[rows] if rmask is None else load_rows(norms_ref, rows, rmask)
    return decode_split(table_ref, codes, dt, planes), norms


def _paged_rows(paged: Paged, cache_ref, bt_ref, bt_base, k_pos, kmask) -> jnp.ndarray:
    """Flat cache rows of tokens ``k_pos`` of one sequence, whose block-table row starts at
    ``bt_base`` of the flat ``bt_ref``; block ids are clamped into the cache, masked lanes
    read nothing."""
    bs = paged.block_size
    idx = bt_base + k_pos // bs
    blk = bt_ref[idx] if kmask is None else plgpu.load(bt_ref.at[idx], mask=kmask, other=0)
    return jnp.clip(blk, 0, cache_ref.shape[0] // bs - 1) * bs + k_pos % bs


def _paged_norms(paged: Paged, cache_refs, rows, kmask, norms_at: int) -> jnp.ndarray:
    """float32 norms [R] at byte ``norms_at`` of cache ``rows``: one word each from the
    float32 view (``paged.norm_words``), else four bytes each."""
    cache_ref = cache_refs[0]
    if paged.norm_words:
        at = rows * (cache_ref.shape[1] // NORM_BYTES) + norms_at // NORM_BYTES
        return cache_refs[1][at] if kmask is None else load_rows(cache_refs[1], at, kmask)
    four = jnp.arange(NORM_BYTES, dtype=jnp.int32)
    nbytes = load_tile(cache_ref, rows, kmask, norms_at + four, None).astype(jnp.int32)
    word = jnp.sum(nbytes << (8 * four)[None, :], axis=1)  # little-endian float32
    return lax.bitcast_convert_type(word, jnp.float32)


def _paged_tile(paged: Paged, cache_refs, bt_ref, bt_base, table_ref, codes_at: int,
                norms_at: int, k_pos, kmask, bcols, bc_ok, dt, lut, norms=None, rows=None):
    """TQ4 K or V rows of tokens ``k_pos`` of one sequence and head from a paged cache ->
    (decoded (even, odd) halves [rows, D/2] in ``dt``, or int8 levels [rows, D] when ``dt`` is
    int8 (``lut``: the static int8 LUT), norms [rows] f32). Norms and cache rows are looked
    up here unless given (prefetched). ``cache_refs``: the flat cache [slots, W] uint8 (and
    its float32 words, flat, with ``paged.norm_words``)."""
    if rows is None:
        rows = _paged_rows(paged, cache_refs[0], bt_ref, bt_base, k_pos, kmask)
    codes = load_tile(cache_refs[0], rows, kmask, codes_at + bcols, bc_ok)
    if norms is None:
        norms = _paged_norms(paged, cache_refs, rows, kmask, norms_at)
    if jnp.dtype(dt) == jnp.int8:
        return decode_codes(table_ref, codes, dt, lut), norms
    return decode_split(table_ref, codes, dt, lut), norms


def _quantize_rows(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[rows, D] float -> (int8 [rows, D], per-row scale f32 [rows]) with x ~= q * scale,
    rounding half away from zero (all-zero rows: scale 1)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    scale = jnp.where(amax > 0, amax * (1.0 / 127.0), 1.0)
    y = xf * (1.0 / scale)[:, None]
    return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int32).astype(jnp.int8), scale


def _query_halves(q_refs, rows, rmask, rot_q: bool, d: int):
    """The query tile in rotated space as (even, odd) coordinates [rows, D/2]: rotated here
    (``q @ Pi^T``, float32-accurate, back to q's dtype) or loaded pre-rotated."""
    bcols, bc_ok = _columns(d // 2)
    if not rot_q:
        return tuple(load_tile(q_refs[0], rows, rmask, 2 * bcols + i, bc_ok) for i in (0, 1))
    cols, c_ok = _columns(d)
    q = load_tile(q_refs[0], rows, rmask, cols, c_ok)
    rt = [load_tile(ref, cols, c_ok, bcols, bc_ok) for ref in q_refs[1:]]
    return tuple(dot_split(q, None, hi, lo).astype(q.dtype) for hi, lo in (rt[:2], rt[2:]))


def _attn_kernel(*refs, k_tq4: bool, v_tq4: bool, rot_q: bool, post: bool, k_lut, v_lut,
                 has_mask: bool, mask_heads: bool, causal: bool, scale_log2: float, cfg: Config,
                 group: int, sq: int, sk: int, d: int, paged: Paged | None = None,
                 int8_qk: bool = False, has_lens: bool = False):
    """One program per (row block, batch * KV head, KV split): online softmax over the keys
    of its split. It writes the normalized output (post-rotated when V is compressed and
    D <= 128); with several splits, per split in float32 plus the running max m (log2 units)
    and sum l, for the wrapper's log-sum-exp merge (:func:`merge_splits`).

    ``has_lens``: a [2 * B] int32 ref gives each batch row its key count and the position of
    its first query (default: Sk keys, the last query at the last key).

    Paged source (``paged``): q and the outputs are flat [tokens * HQ, D] (per split
    [splits * tokens * HQ, D]); row block ``i`` of the (static, over-sized) grid serves the
    sequence and first row the schedule (:func:`paged_schedule`) gives it, ``sq`` is the
    token count and ``sk`` the block table's capacity. ``int8_qk``: Q @ K^T on int8 (q per
    row, K by the int8 codebook levels)."""
    q_refs, k_refs, v_refs, post_refs, mask_ref, lens_ref, o_refs = _split_refs(
        refs, k_tq4, v_tq4, rot_q, post, has_mask, paged, has_lens)
    bm, bn = cfg.block_m, cfg.block_n
    blk = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal blocks first
    if paged is None:
        n_rows, shift, seq_len, row0 = group * sq, sk - sq, sk, blk * bm
        if has_lens:  # per batch row: keys [0, len), query i at position offset + i
            n_b = lens_ref.shape[0] // 2
            b = pl.program_id(1) // (pl.num_programs(1) // n_b)
            seq_len, shift = jnp.clip(lens_ref[b], 0, sk), lens_ref[n_b + b]
        r, r_ok = tile_index(row0, bm, n_rows)
        pos = r // group
        # rows past n_rows keep distinct (masked) indices: interpret mode scatters masked
        # lanes too (out-of-bounds ones are dropped)
        phys = jnp.where(r_ok, (r % group) * sq + pos, r)
        ophys = phys
    else:
        cache_refs = k_refs[:2 if paged.norm_words else 1]
        bt_ref, lens_ref, qsl_ref, sched_ref, k_table = k_refs[len(cache_refs):]
        n_sched = sched_ref.shape[0] // 2
        seq, row0 = sched_ref[blk], sched_ref[n_sched + blk]
        live = seq >= 0
        seq = jnp.maximum(seq, 0)
        q_start = qsl_ref[seq]
        q_len = jnp.maximum(qsl_ref[seq + 1] - q_start, 0)
        n_rows = group * q_len
        seq_len = jnp.where(live, jnp.clip(lens_ref[seq], 0, sk), 0)  # sk: table capacity
        shift = seq_len - q_len  # the queries are the sequence's last q_len positions
        r, r_ok = tile_index(row0, bm, n_rows)
        pos = r // group
        tok = q_start + pos
        r_ok = r_ok & live & (tok >= 0) & (tok < sq)
        hq = group * paged.num_kv_heads
        total = sq * hq
        phys = jnp.where(r_ok, tok * hq + pl.program_id(1) * group + r % group, total + r)
        ophys = phys
        if cfg.splits > 1:
            ophys = jnp.where(r_ok, pl.program_id(2) * total + phys, cfg.splits * total + r)
    cols, c_ok = _columns(d)
    bcols, bc_ok = _columns(d // 2)
    dot = partial(jnp.dot, preferred_element_type=jnp.float32)

    if k_tq4:  # compressed K: rotated query, even and odd coordinates apart
        q_e, q_o = _query_halves(q_refs, phys, r_ok, rot_q, d)
        dt = q_e.dtype
    else:
        q = load_tile(q_refs[0], phys, r_ok, cols, c_ok)
        dt = q.dtype
    k_dt = dt
    if int8_qk:  # s = (q8 . k8) * q_scale * k_scale * norm_k
        q, q_scale = _quantize_rows(interleave(q_e, q_o))
        k_dt, k_scale = jnp.int8, k_refs[-1][INT8_SCALE_AT]

    if paged is None:
        k_tile = partial(_decode_tile, k_refs, bcols=bcols, bc_ok=bc_ok, dt=dt, planes=k_lut)
        v_tile = partial(_decode_tile, v_refs, bcols=bcols, bc_ok=bc_ok, dt=dt, planes=v_lut)
    else:
        head = pl.program_id(1)
        lay, hb = paged.layout, head * (d // 2)
        max_blocks = bt_ref.shape[0] // lens_ref.shape[0]  # bt_ref: the flat block table
        tile = partial(_paged_tile, paged, cache_refs, bt_ref, seq * max_blocks, bcols=bcols,
                       bc_ok=bc_ok)
        k_tile = partial(tile, k_table, lay.k_codes + hb, lay.k_norms + NORM_BYTES * head,
                         dt=k_dt, lut=k_lut)
        v_tile = partial(tile, v_refs[0], lay.v_codes + hb, lay.v_norms + NORM_BYTES * head,
                         dt=dt, lut=v_lut)

    # Key range of this program, and the prefix of whole blocks that needs no masking.
    split_len = pl.cdiv(pl.cdiv(sk, cfg.splits), bn) * bn
    k_start = pl.program_id(2) * split_len
    k_stop = jnp.minimum(k_start + split_len, seq_len)
    hi = safe = k_stop
    if causal:
        last_pos = (jnp.minimum(row0 + bm, n_rows) - 1) // group
        hi = jnp.minimum(k_stop, last_pos + shift + 1)
        safe = jnp.minimum(hi, row0 // group + shift + 1)
    n_all = pl.cdiv(jnp.maximum(hi - k_start, 0), bn)
    n_safe = 0 if has_mask else jnp.minimum(jnp.maximum(safe - k_start, 0) // bn, n_all)

    prefetch = paged is not None and paged.prefetch_norms

    def tile_norms(j):  # cache rows, K and V norms of key tile j (masked: may be past the end)
        k_pos, k_ok = tile_index(k_start + j * bn, bn, k_stop)
        rows = _paged_rows(paged, cache_refs[0], bt_ref, seq * max_blocks, k_pos, k_ok)
        return rows, tuple(_paged_norms(paged, cache_refs, rows, k_ok, at + NORM_BYTES * head)
                           for at in (lay.k_norms, lay.v_norms))

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev, ahead = carry
        k_pos, k_ok = tile_index(k_start + j * bn, bn, k_stop)
        kmask = k_ok if masked else None
        if prefetch:  # this tile's rows and norms came with the previous one; fetch the next
            rows, (k_norms, v_norms) = ahead
            k_tile_ = partial(k_tile, norms=k_norms, rows=rows)
            v_tile_ = partial(v_tile, norms=v_norms, rows=rows)
            ahead = tile_norms(j + 1)
        else:
            k_tile_, v_tile_ = k_tile, v_tile
        if int8_qk:
            k, k_norm = k_tile_(k_pos, kmask)
            s = jnp.dot(q, k.T, preferred_element_type=jnp.int32).astype(jnp.float32)
            s = s * q_scale[:, None] * (k_norm * (k_scale * scale_log2))[None, :]
        elif k_tq4:
            (k_e, k_o), k_norm = k_tile_(k_pos, kmask)
            s = (dot(q_e, k_e.T) + dot(q_o, k_o.T)) * (k_norm * scale_log2)[None, :]
        else:
            s = dot(q, load_tile(k_refs[0], k_pos, kmask, cols, c_ok).T) * scale_log2
        if masked:
            if mask_ref is not None:
                s = s + load_tile(mask_ref, phys if mask_heads else pos, r_ok, k_pos,
                                  k_ok).astype(jnp.float32) * LOG2E
            visible = k_ok[None, :]
            if causal:
                visible = visible & (k_pos[None, :] <= pos[:, None] + shift)
            s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        if v_tq4:  # acc = (even, odd) output coordinates
            (v_e, v_o), v_norm = v_tile_(k_pos, kmask)
            pv = (p * v_norm[None, :]).astype(dt)
            acc = (acc[0] * alpha[:, None] + dot(pv, v_e), acc[1] * alpha[:, None] + dot(pv, v_o))
        else:
            acc = acc * alpha[:, None] + dot(p.astype(dt), load_tile(v_refs[0], k_pos, kmask,
                                                                     cols, c_ok))
        return acc, m_new, l_new, ahead

    if v_tq4:
        acc = (jnp.zeros((bm, bcols.shape[0]), jnp.float32),) * 2
    else:
        acc = jnp.zeros((bm, cols.shape[0]), jnp.float32)
    m0 = jnp.full((bm,), M_INIT, jnp.float32)
    carry = (acc, m0, jnp.zeros_like(m0), tile_norms(0) if prefetch else ())
    carry = lax.fori_loop(0, n_safe, partial(body, masked=False), carry)
    acc, m, l_fin, _ = lax.fori_loop(n_safe, n_all, partial(body, masked=True), carry)
    if v_tq4:
        acc = interleave(*acc)

    out = acc * (1.0 / jnp.where(l_fin > 0, l_fin, 1.0))[:, None]
    if post:  # o @ Pi with o split into 16-bit halves (o is bounded by max |v|)
        r_hi, r_lo = (load_tile(ref, cols, c_ok, cols, c_ok) for ref in post_refs)
        out = dot_split(*split16(out, dt), r_hi, r_lo)
    store_tile(o_refs[0], ophys, r_ok, cols, c_ok, out)
    if cfg.splits > 1:  # normalized per split; the merge weighs splits by 2**m * l
        store_rows(o_refs[1], ophys, r_ok, m)
        store_rows(o_refs[2], ophys, r_ok, l_fin)


#: Largest head dim whose rotation (two [D, D] 16-bit halves) is applied inside the kernel.
ROTATE_IN_KERNEL_MAX_D = 128
#: Query rows per KV head up to which (decode) q and the output are rotated in XLA instead.
ROTATE_IN_XLA_MAX_ROWS = 64


def rotate_in_kernel(d: int, n_rows: int) -> bool:
    """Whether the kernel rotates q (``q @ Pi^T``) and post-rotates its output itself, for
    ``n_rows`` query rows per KV head. Above ROTATE_IN_KERNEL_MAX_D the 16-bit halves of Pi
    overflow shared memory. Decode (n_rows <= ROTATE_IN_XLA_MAX_ROWS) rotates in XLA: each
    program would load 128 KB of Pi halves for a 16-row tile, and the rotation's registers
    and shared memory stay out of the key loop. H200, 32/8 heads, D=128, 32K keys, kernel
    time: contiguous B=1 0.0348 -> 0.0330 ms, paged B=1 0.0423 -> 0.0405; B=8 wall 0.184 ->
    0.181 / 0.273 -> 0.267; 16-layer model decode step at B=1 about 0.1 ms faster."""
    return d <= ROTATE_IN_KERNEL_MAX_D and n_rows > ROTATE_IN_XLA_MAX_ROWS


#: Streaming multiprocessors to fill (H100/H200: 132); see choose_config's per_sm.
NUM_SMS = 132
#: A KV split covers at least this many keys.
MIN_SPLIT_KEYS = 256


def choose_config(b: int, hkv: int, n_rows: int, sk: int, d: int,
                  compressed: bool = False) -> Config:
    """Tile sizes for ``n_rows = group * Sq`` query rows per KV head over ``sk`` keys, and
    enough KV splits to give every SM ``per_sm`` programs when there are few row blocks.
    Measured on an H200 (bench/attention.py --sweep); compressed K/V want longer key tiles.
    Causal prefill (2026-11-21): dense 8K 256x64 1.11-1.16 ms vs 128x64 1.32 (2K: 0.159 vs
    0.129, so 256 rows only from 16K rows); compressed 8K 128x64 at 8 warps 2.05 vs 2.27 at
    4 warps (256 rows: 2.31).
    Compressed decode runs 2 programs per SM (its registers allow no more), so its splits
    round down to one whole wave: B=8, 8 KV heads, 32K: 4 splits (paged 0.27 ms vs 0.31 at
    9 splits, which spill into a third, nearly empty wave); B=1: 33 (0.051 vs 0.074 at 66)."""
    per_sm, whole_wave = 2, False
    if n_rows <= 64:  # decode / short chunks: one row block, long key tiles
        bm = max(16, next_pow2(n_rows))
        if d > 128:
            cfg = Config(bm, 32, 4, 2)
        elif compressed:
            cfg, whole_wave = Config(bm, 128, 4, 3), True
        else:
            cfg = Config(bm, 64, 4, 3)
    elif d <= 128:  # 8 warps: at 4 the compressed kernels spill (bench/kernel_report.py)
        cfg = Config(256 if n_rows >= 16384 and not compressed else 128, 64, 8, 3)
    else:
        cfg = Config(64, 32, 8, 2)
    programs = pl.cdiv(n_rows, cfg.block_m) * b * hkv
    splits = 1
    if programs < per_sm * NUM_SMS:
        fill = per_sm * NUM_SMS // programs if whole_wave else pl.cdiv(per_sm * NUM_SMS,
                                                                       programs)
        splits = max(1, min(fill, sk // MIN_SPLIT_KEYS))
    return cfg._replace(splits=int(splits))


def head_spec(x, hkv: int) -> pl.BlockSpec:
    """BlockSpec of an array [B, HKV, ...] blocked per (batch, KV head) = grid axis 1."""
    zeros = (0,) * (x.ndim - 2)
    return pl.BlockSpec((None, None) + tuple(x.shape[2:]),
                        lambda r, i, s: (i // hkv, i % hkv) + zeros)


def whole_spec(x) -> pl.BlockSpec:
    """BlockSpec of a small array every program reads whole."""
    return pl.BlockSpec(x.shape, lambda r, i, s: (0,) * x.ndim)


def output_specs(b: int, hkv: int, n_rows: int, d: int, splits: int, dtype: Any):
    """(out_shape, out_specs) of the kernel: [B, HKV, rows, D] in ``dtype`` for one split;
    per split [B, HKV, S, rows, D] f32 plus m and l [B, HKV, S, rows] otherwise."""
    if splits == 1:
        out = jax.ShapeDtypeStruct((b, hkv, n_rows, d), dtype)
        return (out,), (head_spec(out, hkv),)
    shapes = ((b, hkv, splits, n_rows, d), (b, hkv, splits, n_rows), (b, hkv, splits, n_rows))
    outs = tuple(jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes)
    def split_spec(sh):
        zeros = (0,) * (len(sh) - 3)
        return pl.BlockSpec((None, None, None) + sh[3:],
                            lambda r, i, s: (i // hkv, i % hkv, s) + zeros)

    return outs, tuple(split_spec(sh) for sh in shapes)


class Rotation(NamedTuple):
    """Pi [D, D] f32 as the kernels take it (16-bit halves in q's dtype, see split16):
    ``q_halves`` = Pi^T's even columns (hi, lo), then its odd columns (hi, lo), [D, D/2] each,
    for the pre-rotation; ``post`` = Pi (hi, lo) for the post-rotation; ``pi`` itself."""
    q_halves: tuple
    post: tuple
    pi: jnp.ndarray


def rotate_in_xla(q: jnp.ndarray, rot: Rotation) -> jnp.ndarray:
    """``q @ Pi^T`` outside the kernel (see :func:`rotate_in_kernel`), in q's dtype."""
    return jnp.matmul(q.astype(jnp.float32), rot.pi.T,
                      precision=lax.Precision.HIGHEST).astype(q.dtype)


def finish(outs, shape: tuple, dtype: Any, rot: Rotation | None) -> jnp.ndarray:
    """Kernel outputs -> ``shape`` in ``dtype``: merge the splits (when there are several) and
    post-rotate with ``rot`` when that was not done in the kernel (``rot`` None: done)."""
    out = outs[0] if len(outs) == 1 else merge_splits(*outs)
    out = out.reshape(shape)
    if rot is not None:
        out = jnp.matmul(out.astype(jnp.float32), rot.pi, precision=lax.Precision.HIGHEST)
    return saturate(out, dtype)


@partial(jax.jit, static_argnames=("k_lut", "v_lut", "causal", "scale", "cfg", "mode"))
def _attn_pallas(q, k_parts, v_parts, rot, mask, lens, *, k_lut, v_lut, causal, scale, cfg,
                 mode):
    """q [B, HQ, Sq, D]; k/v parts: (x,) dense [B, HKV, Sk, D] or (codes [B, HKV, Sk, D/2],
    norms [B, HKV, Sk], codebook table (:func:`_codebook_parts`)); rot: a :class:`Rotation`,
    or None when nothing is compressed; mask: None or [Bm, Hm, Sq, Sk]; lens: None or int32
    [2 * B] (key counts, then first-query positions). ``k_lut``/``v_lut``: each table's
    decode mode (:func:`_codebook_parts`).

    Returns [B, HQ, Sq, D] in q's dtype."""
    b, hq, sq, d = q.shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    group, n_rows, splits = hq // hkv, (hq // hkv) * sq, cfg.splits
    k_tq4, v_tq4 = len(k_parts) == 3, len(v_parts) == 3
    in_kernel = rotate_in_kernel(d, n_rows)
    rot_q, post = k_tq4 and in_kernel, v_tq4 and in_kernel
    if k_tq4 and not in_kernel:
        q = rotate_in_xla(q, rot)

    def specs(parts):
        return [head_spec(x, hkv) if x.ndim >= 3 else whole_spec(x) for x in parts]

    q_view = q.reshape(b, hkv, n_rows, d)
    q_rot = list(rot.q_halves) if rot_q else []
    args = [q_view] + q_rot + list(k_parts) + list(v_parts)
    in_specs = [head_spec(q_view, hkv)] + [whole_spec(x) for x in q_rot]
    in_specs += specs(k_parts) + specs(v_parts)
    if post:
        args += list(rot.post)
        in_specs += [whole_spec(x) for x in rot.post]
    mask_heads = False
    if mask is not None:
        bm_, hm = mask.shape[:2]
        mask_heads = hm > 1
        if mask_heads:
            mask = mask.reshape(bm_, hkv, n_rows, sk)
        in_specs.append(pl.BlockSpec((None, None) + mask.shape[2:], lambda r, i, s: (
            i // hkv if bm_ > 1 else 0, i % hkv if mask_heads else 0, 0, 0)))
        args.append(mask)
    if lens is not None:
        in_specs.append(whole_spec(lens))
        args.append(lens)

    out_shape, out_specs = output_specs(b, hkv, n_rows, d, splits,
                                        jnp.float32 if v_tq4 and not post else q.dtype)
    kernel = partial(_attn_kernel, k_tq4=k_tq4, v_tq4=v_tq4, rot_q=rot_q, post=post,
                     k_lut=k_lut, v_lut=v_lut,
                     has_mask=mask is not None, mask_heads=mask_heads, causal=causal,
                     scale_log2=scale * LOG2E, cfg=cfg, group=group, sq=sq, sk=sk, d=d,
                     has_lens=lens is not None)
    outs = pallas_call(kernel, mode=mode, grid=(pl.cdiv(n_rows, cfg.block_m), b * hkv, splits),
                       out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)(*args)
    return finish(outs, (b, hq, sq, d), q.dtype, rot if v_tq4 and not post else None)


def merge_splits(o: jnp.ndarray, m: jnp.ndarray, l: jnp.ndarray, axis: int = 2) -> jnp.ndarray:
    """Log-sum-exp merge of per-split normalized outputs ``o`` [..., S, rows, D] with running
    max ``m`` (log2 units) and sum ``l`` [..., S, rows] along the split ``axis``; splits that
    saw no key (l = 0) drop out, rows with no key at all give zeros."""
    wgt = jnp.exp2(m - jnp.max(m, axis=axis, keepdims=True)) * l
    total = jnp.sum(wgt, axis=axis)
    return (jnp.sum(wgt[..., None] * o, axis=axis)
            / jnp.where(total > 0, total, 1.0)[..., None])


def _rotation_parts(rotation: jnp.ndarray, dtype: Any) -> Rotation:
    """Pi [D, D] f32 -> its :class:`Rotation` in ``dtype``."""
    rt = rotation.T
    return Rotation((*split16(rt[:, 0::2], dtype), *split16(rt[:, 1::2], dtype)),
                    split16(rotation, dtype), rotation)


def _codebook_parts(centroids, dtype, raw: Any = None) -> tuple[jnp.ndarray, Any]:
    """A codebook -> its kernel table (:func:`codebook_table`) and how the kernel decodes
    (:func:`decode_split`'s ``planes``): in interpret mode False (gathers from the 16-bit
    patterns); compiled, the static planes when ``raw`` (the caller's codebook) is concrete -
    a numpy or committed jax array, also when closed over by a jit-ed caller - else True
    (planes loaded from the table)."""
    if kernel_mode().interpret:
        return codebook_table(pad_codebook(centroids), dtype, False), False
    table = codebook_table(pad_codebook(centroids), dtype, True)
    if raw is not None and not isinstance(raw, jax.core.Tracer):
        return table, static_planes(raw, dtype)
    return table, True


def _codes_parts(packed, norms, centroids, dtype, raw: Any = None) -> tuple[tuple, Any]:
    """Kernel inputs (codes, norms, codebook table) of one compressed operand, and its
    decode mode (:func:`_codebook_parts`)."""
    table, planes = _codebook_parts(centroids, dtype, raw)
    return (packed, norms, table), planes


def _run(q, k_parts, v_parts, rotation, mask, *, k_lut=None, v_lut=None, causal, scale,
         cfg=None, lens=None):
    """Run the kernel with :func:`choose_config` unless ``cfg`` is given."""
    b, hq, sq, d = q.shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    if cfg is None:
        cfg = choose_config(b, hkv, (hq // hkv) * sq, sk, d, compressed=len(k_parts) == 3)
    rot = None if rotation is None else _rotation_parts(rotation, q.dtype)
    return _attn_pallas(q, k_parts, v_parts, rot, mask, lens, k_lut=k_lut, v_lut=v_lut,
                        causal=causal, scale=scale, cfg=cfg, mode=kernel_mode())


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def attention_reference(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, sm_scale: float,
                        is_causal: bool, attention_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """float32 softmax attention; q [B, HQ, Sq, D], k/v [B, HKV, Sk, D] (any float dtype).

    Returns float32 [B, HQ, Sq, D]; rows with no visible key are zeros.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, sq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * sm_scale
    s = s.reshape(b, hq, sq, sk)
    if attention_mask is not None:
        s = s + attention_mask.astype(jnp.float32)
    visible = jnp.ones((sq, sk), bool)
    if is_causal:
        visible = jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq)
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    p = p.reshape(b, hkv, hq // hkv, sq, sk)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    return out.reshape(b, hq, sq, d)


# ----------------------------------------------------------------------------------------------
# argument checks and public ops
# ----------------------------------------------------------------------------------------------

def _check_q(q: Any) -> jnp.ndarray:
    q = ck.as_array("q", q)
    ck.check_dtype("q", q, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("q", q, 4, "[batch, heads_q, seq_q, head_dim]")
    ck.check_head_dim("q", q.shape[-1])
    return q


def _check_kv_dims(name: str, x: Any, q: jnp.ndarray, last: int, sk: int | None) -> int:
    b, hq = q.shape[0], q.shape[1]
    if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != last:
        raise ValueError(f"{name} must have shape [{b}, heads_kv, seq_kv, {last}] to match q "
                         f"{tuple(q.shape)}, got {tuple(x.shape)}")
    if hq % x.shape[1]:
        raise ValueError(f"{name}: heads_q ({hq}) must be a multiple of heads_kv "
                         f"({x.shape[1]})")
    if sk is not None and x.shape[2] != sk:
        raise ValueError(f"{name} must have seq_kv {sk}, got {tuple(x.shape)}")
    return x.shape[2]


def _check_dense_kv(name: str, x: Any, q: jnp.ndarray, sk: int | None = None,
                    hkv: int | None = None) -> jnp.ndarray:
    x = ck.as_array(name, x)
    if x.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    _check_kv_dims(name, x, q, q.shape[-1], sk)
    if hkv is not None and x.shape[1] != hkv:
        raise ValueError(f"{name} must have {hkv} kv heads, got {tuple(x.shape)}")
    return x


def _check_codes(pname: str, nname: str, packed: Any, norms: Any, q: jnp.ndarray,
                 sk: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    packed, norms = ck.check_packed(packed, norms, pname, nname)
    _check_kv_dims(pname, packed, q, q.shape[-1] // 2, sk)
    return packed, norms


def _check_scale(sm_scale: Any, d: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, jax.core.Tracer):
        raise TypeError("sm_scale must be a Python float (static), not a traced value")
    return float(sm_scale)


def _check_mask(mask: Any, q: jnp.ndarray, sk: int) -> jnp.ndarray | None:
    if mask is None:
        return None
    mask = ck.as_array("attention_mask", mask)
    ck.check_float("attention_mask", mask)
    b, hq, sq = q.shape[:3]
    want = (b, hq, sq, sk)
    if mask.ndim > 4 or any(m not in (1, w) for m, w in zip(mask.shape[::-1], want[::-1])):
        raise ValueError(f"attention_mask must broadcast to {want}, got {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return jnp.broadcast_to(mask, mask.shape[:2] + (sq, sk))  # B and H broadcast in-kernel


def _check_tq4_args(q, k_packed, k_norms, centroids, rotation, sm_scale):
    """Checks shared by the TQ4 attention ops; returns the normalized arguments and scale."""
    q = _check_q(q)
    d = q.shape[-1]
    k_packed, k_norms = _check_codes("k_packed", "k_norms", k_packed, k_norms, q)
    return (q, k_packed, k_norms, ck.check_centroids(centroids), ck.check_rotation(rotation, d),
            _check_scale(sm_scale, d))


def _check_lengths(kv_lengths: Any, q_offsets: Any, q: jnp.ndarray,
                   sk: int) -> jnp.ndarray | None:
    """kv_lengths / q_offsets [B] int -> the kernel's int32 [2 * B] (key counts, then the
    position of each row's first query; default ``kv_lengths - Sq``), or None."""
    if kv_lengths is None:
        if q_offsets is not None:
            raise ValueError("q_offsets needs kv_lengths")
        return None
    b, sq = q.shape[0], q.shape[2]
    out = []
    for name, x in (("kv_lengths", kv_lengths), ("q_offsets", q_offsets)):
        if x is None:
            out.append(out[0] - sq)
            continue
        x = ck.as_array(name, x)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
        if x.shape != (b,):
            raise ValueError(f"{name} must have shape ({b},) (one per batch row), "
                             f"got {tuple(x.shape)}")
        out.append(x.astype(jnp.int32))
    return jnp.concatenate(out)


def _reference_mask(mask, lens, q: jnp.ndarray, sk: int, causal: bool):
    """(additive mask, causal) for attention_reference with the lengths of
    :func:`_check_lengths` folded into the mask."""
    if lens is None:
        return mask, causal
    b, sq = q.shape[0], q.shape[2]
    kv_len, off = lens[:b, None, None, None], lens[b:, None, None, None]
    keys, rows = jnp.arange(sk)[None, None, None, :], jnp.arange(sq)[None, None, :, None]
    visible = keys < kv_len
    if causal:
        visible = visible & (keys <= off + rows)
    extra = jnp.where(visible, 0.0, -jnp.inf)
    return (extra if mask is None else mask.astype(jnp.float32) + extra), False


def _reference(q, k, v, scale: float, causal: bool, mask, lens) -> jnp.ndarray:
    """The reference path of the contiguous ops, lengths folded into the mask; q's dtype."""
    mask, causal = _reference_mask(mask, lens, q, k.shape[2], causal)
    return saturate(attention_reference(q, k, v, scale, causal, mask), q.dtype)


def _empty_or_none(q: jnp.ndarray, sk: int) -> jnp.ndarray | None:
    if q.shape[2] == 0 or sk == 0 or q.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    return None


_LENGTHS_DOC = """
    ``kv_lengths`` [B] int (optional): batch row b sees keys ``[0, kv_lengths[b])`` only (a
    fixed-capacity cache); ``q_offsets`` [B] int: the position of row b's first query for the
    causal mask (default ``kv_lengths - Sq``: the last query at the last valid key). Rows with
    no visible key give zeros."""


def flash_attention(q: Any, k: Any, v: Any, sm_scale: float | None = None,
                    is_causal: bool = False, attention_mask: Any = None, *,
                    kv_lengths: Any = None, q_offsets: Any = None,
                    impl: str = "auto") -> jnp.ndarray:
    """FlashAttention-2 forward on dense fp16/bf16 K/V with GQA, causal and additive masks.

    q [B, HQ, Sq, D]; k, v [B, HKV, Sk, D] (HQ % HKV == 0, K/V never repeated in memory);
    attention_mask: additive float mask broadcastable to [B, HQ, Sq, Sk]. Returns q's shape
    and dtype.
    """
    q = _check_q(q)
    k = _check_dense_kv("k", k, q)
    v = _check_dense_kv("v", v, q, k.shape[2], k.shape[1])
    d, sk = q.shape[-1], k.shape[2]
    scale = _check_scale(sm_scale, d)
    mask = _check_mask(attention_mask, q, sk)
    lens = _check_lengths(kv_lengths, q_offsets, q, sk)
    if (empty := _empty_or_none(q, sk)) is not None:
        return empty
    if resolve_impl(impl) == "reference":
        return _reference(q, k, v, scale, bool(is_causal), mask, lens)
    return _run(q, (k,), (v,), None, mask, causal=bool(is_causal), scale=scale, lens=lens)


def flash_attention_tq4(q: Any, k_packed: Any, k_norms: Any, v: Any, centroids: Any,
                        rotation: Any, sm_scale: float | None = None, is_causal: bool = False,
                        *, attention_mask: Any = None, kv_lengths: Any = None,
                        q_offsets: Any = None, impl: str = "auto") -> jnp.ndarray:
    """Attention with TQ4-compressed K (decoded in the kernel) and dense fp16/bf16 V.

    k_packed [B, HKV, Sk, D/2] uint8, k_norms [B, HKV, Sk] f32, v [B, HKV, Sk, D],
    centroids [2**bits] f32, rotation Pi [D, D]. Returns q's shape and dtype.
    """
    raw_k = centroids
    q, k_packed, k_norms, centroids, rotation, scale = _check_tq4_args(
        q, k_packed, k_norms, centroids, rotation, sm_scale)
    sk = k_packed.shape[2]
    v = _check_dense_kv("v", v, q, sk, k_packed.shape[1])
    mask = _check_mask(attention_mask, q, sk)
    lens = _check_lengths(kv_lengths, q_offsets, q, sk)
    if (empty := _empty_or_none(q, sk)) is not None:
        return empty
    if resolve_impl(impl) == "reference":
        k = dequantize_reference(k_packed, k_norms, centroids, rotation, jnp.float32)
        return _reference(q, k, v, scale, bool(is_causal), mask, lens)
    k_parts, k_lut = _codes_parts(k_packed, k_norms, centroids, q.dtype, raw_k)
    return _run(q, k_parts, (v,), rotation, mask, k_lut=k_lut, causal=bool(is_causal),
                scale=scale, lens=lens)


def flash_attention_tq4_kv(q: Any, k_packed: Any, k_norms: Any, v_packed: Any, v_norms: Any,
                           centroids: Any, rotation: Any, sm_scale: float | None = None,
                           is_causal: bool = False, v_centroids: Any = None, *,
                           attention_mask: Any = None, kv_lengths: Any = None,
                           q_offsets: Any = None, impl: str = "auto") -> jnp.ndarray:
    """Attention with TQ4-compressed K and V, both decoded in the kernel.

    Codes [B, HKV, Sk, D/2] uint8, norms [B, HKV, Sk] f32; ``v_centroids`` is V's codebook when
    it differs from K's (e.g. K 4-bit, V 3-bit). Returns q's shape and dtype.
    """
    raw_k, raw_v = centroids, (centroids if v_centroids is None else v_centroids)
    q, k_packed, k_norms, centroids, rotation, scale = _check_tq4_args(
        q, k_packed, k_norms, centroids, rotation, sm_scale)
    sk = k_packed.shape[2]
    v_packed, v_norms = _check_codes("v_packed", "v_norms", v_packed, v_norms, q, sk)
    if v_packed.shape != k_packed.shape:
        raise ValueError(f"v_packed must have k_packed's shape {tuple(k_packed.shape)}, "
                         f"got {tuple(v_packed.shape)}")
    v_centroids = centroids if v_centroids is None else ck.check_centroids(v_centroids,
                                                                           "v_centroids")
    mask = _check_mask(attention_mask, q, sk)
    lens = _check_lengths(kv_lengths, q_offsets, q, sk)
    if (empty := _empty_or_none(q, sk)) is not None:
        return empty
    if resolve_impl(impl) == "reference":
        k = dequantize_reference(k_packed, k_norms, centroids, rotation, jnp.float32)
        v = dequantize_reference(v_packed, v_norms, v_centroids, rotation, jnp.float32)
        return _reference(q, k, v, scale, bool(is_causal), mask, lens)
    k_parts, k_lut = _codes_parts(k_packed, k_norms, centroids, q.dtype, raw_k)
    v_parts, v_lut = _codes_parts(v_packed, v_norms, v_centroids, q.dtype, raw_v)
    return _run(q, k_parts, v_parts, rotation, mask, k_lut=k_lut, v_lut=v_lut,
                causal=bool(is_causal), scale=scale, lens=lens)


for _op in (flash_attention, flash_attention_tq4, flash_attention_tq4_kv):
    _op.__doc__ += _LENGTHS_DOC
