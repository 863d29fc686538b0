"""The FlashAttention-2 forward kernel (Triton lowering) behind every attention op.

K and V tiles come dense (fp16/bf16), as TQ4 codes of a contiguous cache (:class:`Codes`), or
from a paged TQ4 cache (:class:`PagedSource`, LAYOUTS.md A2); codes are decoded right after
their load (in registers, :func:`lut.decode_split`) and never exist in device memory.

Rows. A program serves a block of the ``group * Sq`` query rows that share one KV head,
ordered position-major (row r is query position r // group of query head r % group), so a
decoded K/V tile feeds every query head of its group and a causal block spans few positions.
Physically q and the output are viewed as [B, HKV, group * Sq, D] (head-major, a free reshape
of [B, HQ, Sq, D]): row r lives at (r % group) * Sq + r // group.

Compressed tiles decode into their even and odd coordinates, each half feeding its own
tensor-core dot: ``s = q_even @ k_even^T + q_odd @ k_odd^T``, ``acc_even += p @ v_even``.
Norms scale scores and probabilities, not decoded elements:
``s = norm_k * (q_rot . c[k_codes])``, ``acc += (p * norm_v) @ c[v_codes]``. With ``rot_q``
the program rotates its query tile itself (``q @ Pi^T``, two 16-bit dots); with ``post`` it
post-rotates its normalized output (``o @ Pi``), so rotated-space values never leave it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..backend import KernelMode
from ..core import INT8_SCALE_AT, LOG2E, Rotation, merge_splits, post_rotate, split16
from ..layout import NORM_BYTES, PagedLayout, to_dtype
from .call import head_spec, pallas_call, whole_spec
from .epilogue import merge_rotate
from .lut import decode_codes, decode_split
from .tiles import (M_INIT, cache_rows, columns, dot32, dot_split, interleave, key_loop,
                    load_rows, load_scalar, load_tile, lse_of, scalar_value, softmax_step,
                    store_rows, store_tile, tile_index)
from .tuning import Config


class Codes(NamedTuple):
    """A TQ4-compressed K or V of a contiguous cache, as kernel inputs: codes
    [B, HKV, Sk, D/2] uint8, norms [B, HKV, Sk] f32, the codebook's table
    (:func:`lut.codebook_parts`)."""
    codes: Any
    norms: Any
    table: Any


class PagedSource(NamedTuple):
    """A paged TQ4 cache as kernel inputs: the cache as rows [slots, W] uint8, the same bytes
    as float32 words (flat; None when rows are not 4-byte aligned or prefill), the flat block
    table, seq_lens [S], query_start_loc [S + 1], the row-block schedule
    (:func:`paged.paged_schedule`), the K and V codebook tables."""
    cache: Any
    words: Any
    block_table: Any
    seq_lens: Any
    query_start_loc: Any
    schedule: Any
    k_table: Any
    v_table: Any


class Paged(NamedTuple):
    """Static description of a paged cache. ``prefetch_norms``: each key tile loads the next
    tile's cache rows and K/V norms a loop iteration ahead."""
    block_size: int
    num_kv_heads: int
    layout: PagedLayout
    prefetch_norms: bool = False


class AttnSpec(NamedTuple):
    """Static description of one kernel launch. ``k_lut``/``v_lut``: how compressed K/V
    decode (:func:`lut.decode_split`'s ``planes``; unused for dense); ``rot_q``/``post``: the
    kernel rotates q / post-rotates its output; ``mask_heads``: the additive mask has a head
    axis; ``paged``: the K/V source is a :class:`PagedSource` (then ``sq`` counts tokens and
    ``sk`` is the block table's capacity); ``int8_qk``: Q @ K^T on int8 (q per row, K by its
    int8 codebook levels); ``window``: (left, right) keys a query at position p sees,
    ``[p - left, p + right]``; ``softcap``: logits become ``softcap * tanh(logits / softcap)``
    before any mask."""
    cfg: Config
    group: int
    sq: int
    sk: int
    d: int
    scale_log2: float
    causal: bool
    k_lut: Any = None
    v_lut: Any = None
    rot_q: bool = False
    post: bool = False
    mask_heads: bool = False
    paged: Paged | None = None
    int8_qk: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None


def quantize_rows(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[rows, D] float -> (int8 [rows, D], per-row scale f32 [rows]) with x ~= q * scale,
    rounding half away from zero (all-zero rows: scale 1)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    scale = jnp.where(amax > 0, amax * (1.0 / 127.0), 1.0)
    y = xf * (1.0 / scale)[:, None]
    return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int32).astype(jnp.int8), scale


def query_halves(q_ref, q_rot, rows, rmask, d: int):
    """The query tile in rotated space as (even, odd) coordinates [rows, D/2]: rotated here
    from the Pi^T halves ``q_rot`` (``q @ Pi^T``, float32-accurate, back to q's dtype), or
    loaded pre-rotated (``q_rot`` None)."""
    bcols, bc_ok = columns(d // 2)
    if q_rot is None:
        return tuple(load_tile(q_ref, rows, rmask, 2 * bcols + i, bc_ok) for i in (0, 1))
    cols, c_ok = columns(d)
    q = load_tile(q_ref, rows, rmask, cols, c_ok)
    rt = [load_tile(ref, cols, c_ok, bcols, bc_ok) for ref in q_rot]
    return tuple(dot_split(q, None, hi, lo).astype(q.dtype) for hi, lo in (rt[:2], rt[2:]))


def _decode(table_ref, codes, dt, lut):
    """A code tile -> (even, odd) halves in ``dt``, or int8 levels [R, D] when ``dt`` is int8."""
    if jnp.dtype(dt) == jnp.int8:
        return decode_codes(table_ref, codes, dt, lut)
    return decode_split(table_ref, codes, dt, lut)


def attn_kernel(q_ref, q_rot, k_src, v_src, post_rot, mask_ref, lens_ref, o_ref, lse_ref=None,
                *, spec: AttnSpec):
    """One program per (row block, batch * KV head, KV split): online softmax over the keys
    of its split; writes the normalized output and, with several splits, the split's
    log-sum-exp (natural log) for :func:`core.merge_splits`.

    Refs: q [B, HKV, rows, D] (paged: [tokens * HQ, D]); ``q_rot`` Pi^T halves or None;
    ``k_src``/``v_src`` a dense [B, HKV, Sk, D] ref, a :class:`Codes`, or (K only) a
    :class:`PagedSource` with ``v_src`` None; ``post_rot`` Pi halves or None; ``mask_ref``
    [Bm, Hm, Sq, Sk] additive or None; ``lens_ref`` [2 * B] int32 (key count, first query's
    position per batch row) or None; output [.., rows, D] (per split), lse [.., rows]."""
    cfg, group, sq, sk, d = spec.cfg, spec.group, spec.sq, spec.sk, spec.d
    paged = spec.paged
    bm, bn = cfg.block_m, cfg.block_n
    blk = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal blocks first
    if paged is None:
        n_rows, shift, seq_len, row0 = group * sq, sk - sq, sk, blk * bm
        if lens_ref is not None:  # per batch row: keys [0, len), query i at offset + i
            n_b = lens_ref.shape[0] // 2
            b = pl.program_id(1) // (pl.num_programs(1) // n_b)
            seq_len, shift = jnp.clip(lens_ref[b], 0, sk), lens_ref[n_b + b]
        r, r_ok = tile_index(row0, bm, n_rows)
        pos = r // group
        # rows past n_rows keep distinct (masked) indices: interpret mode scatters masked
        # lanes too (out-of-bounds ones are dropped)
        phys = ophys = jnp.where(r_ok, (r % group) * sq + pos, r)
    else:
        src = k_src
        n_sched = src.schedule.shape[0] // 2
        seq, row0 = src.schedule[blk], src.schedule[n_sched + blk]
        live = seq >= 0
        seq = jnp.maximum(seq, 0)
        q_start = src.query_start_loc[seq]
        q_len = jnp.maximum(src.query_start_loc[seq + 1] - q_start, 0)
        n_rows = group * q_len
        seq_len = jnp.where(live, jnp.clip(src.seq_lens[seq], 0, sk), 0)  # sk: capacity
        shift = seq_len - q_len  # the queries are the sequence's last q_len positions
        r, r_ok = tile_index(row0, bm, n_rows)
        pos = r // group
        tok = q_start + pos
        r_ok = r_ok & live & (tok >= 0) & (tok < sq)
        total = sq * group * paged.num_kv_heads
        phys = ophys = jnp.where(r_ok, tok * group * paged.num_kv_heads
                                 + pl.program_id(1) * group + r % group, total + r)
        if cfg.splits > 1:
            ophys = jnp.where(r_ok, pl.program_id(2) * total + phys, cfg.splits * total + r)
    cols, c_ok = columns(d)
    bcols, bc_ok = columns(d // 2)
    k_tq4 = paged is not None or isinstance(k_src, Codes)
    v_tq4 = paged is not None or isinstance(v_src, Codes)

    if k_tq4:  # compressed K: rotated query, even and odd coordinates apart
        q_e, q_o = query_halves(q_ref, q_rot, phys, r_ok, d)
        dt = q_e.dtype
    else:
        q = load_tile(q_ref, phys, r_ok, cols, c_ok)
        dt = q.dtype
    k_dt = dt
    if spec.int8_qk:  # s = (q8 . k8) * q_scale * k_scale * norm_k
        q, q_scale = quantize_rows(interleave(q_e, q_o))
        k_dt, k_scale = jnp.int8, k_src.k_table[INT8_SCALE_AT]

    if paged is not None:
        head, lay = pl.program_id(1), paged.layout
        hb = head * (d // 2)
        max_blocks = src.block_table.shape[0] // src.seq_lens.shape[0]
        n_blocks = src.cache.shape[0] // paged.block_size

        def rows_of(k_pos, kmask):
            return cache_rows(src.block_table, seq * max_blocks, k_pos, kmask,
                              paged.block_size, n_blocks)

        def norms_of(rows, kmask, at):
            return scalar_value(load_scalar(src.cache, src.words, rows, kmask, at, NORM_BYTES,
                                            words_after=head), jnp.float32)

        def paged_tile(table, codes_at, norms_at, tdt, lut, k_pos, kmask, rows=None,
                       norms=None):
            rows = rows_of(k_pos, kmask) if rows is None else rows
            codes = load_tile(src.cache, rows, kmask, codes_at + hb + bcols, bc_ok)
            norms = norms_of(rows, kmask, norms_at) if norms is None else norms
            return _decode(table, codes, tdt, lut), norms

        k_tile = partial(paged_tile, src.k_table, lay.k_codes, lay.k_norms, k_dt, spec.k_lut)
        v_tile = partial(paged_tile, src.v_table, lay.v_codes, lay.v_norms, dt, spec.v_lut)
    else:
        def codes_tile(c: Codes, lut, k_pos, kmask):
            codes = load_tile(c.codes, k_pos, kmask, bcols, bc_ok)
            return decode_split(c.table, codes, dt, lut), load_rows(c.norms, k_pos, kmask)

        k_tile = partial(codes_tile, k_src, spec.k_lut) if k_tq4 else None
        v_tile = partial(codes_tile, v_src, spec.v_lut) if v_tq4 else None

    # Key range of this program, and the prefix of whole blocks that needs no masking.
    split_len = pl.cdiv(pl.cdiv(sk, cfg.splits), bn) * bn
    k_start = pl.program_id(2) * split_len
    k_stop = jnp.minimum(k_start + split_len, seq_len)
    hi = safe = k_stop
    last_pos = (jnp.minimum(row0 + bm, n_rows) - 1) // group
    if spec.causal:
        hi = jnp.minimum(k_stop, last_pos + shift + 1)
        safe = jnp.minimum(hi, row0 // group + shift + 1)
    n_all = pl.cdiv(jnp.maximum(hi - k_start, 0), bn)
    n_safe = 0 if mask_ref is not None else jnp.minimum(jnp.maximum(safe - k_start, 0) // bn,
                                                        n_all)
    first = 0
    if spec.window is not None:  # tiles left of the block's window are skipped, all masked
        left, right = spec.window
        hi = jnp.minimum(hi, last_pos + shift + right + 1)
        n_all = pl.cdiv(jnp.maximum(hi - k_start, 0), bn)
        first = n_safe = jnp.clip((row0 // group + shift - left - k_start) // bn, 0, n_all)
    prefetch = paged is not None and paged.prefetch_norms

    def ahead(j):  # cache rows, K and V norms of key tile j (masked: may be past the end)
        k_pos, k_ok = tile_index(k_start + j * bn, bn, k_stop)
        rows = rows_of(k_pos, k_ok)
        return rows, (norms_of(rows, k_ok, lay.k_norms), norms_of(rows, k_ok, lay.v_norms))

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev, nxt = carry
        k_pos, k_ok = tile_index(k_start + j * bn, bn, k_stop)
        kmask = k_ok if masked else None
        kt, vt = k_tile, v_tile
        if prefetch:  # this tile's rows and norms came with the previous one; fetch the next
            rows, (k_norms, v_norms) = nxt
            kt = partial(k_tile, rows=rows, norms=k_norms)
            vt = partial(v_tile, rows=rows, norms=v_norms)
            nxt = ahead(j + 1)
        if spec.int8_qk:
            k, k_norm = kt(k_pos, kmask)
            s = jnp.dot(q, k.T, preferred_element_type=jnp.int32).astype(jnp.float32)
            s = s * q_scale[:, None] * (k_norm * (k_scale * spec.scale_log2))[None, :]
        elif k_tq4:
            (k_e, k_o), k_norm = kt(k_pos, kmask)
            s = (dot32(q_e, k_e.T) + dot32(q_o, k_o.T)) * (k_norm * spec.scale_log2)[None, :]
        else:
            s = dot32(q, load_tile(k_src, k_pos, kmask, cols, c_ok).T) * spec.scale_log2
        if spec.softcap is not None:  # in log2 units: c * tanh(s / c), c = softcap * log2 e
            s = (spec.softcap * LOG2E) * jnp.tanh(s * (1.0 / (spec.softcap * LOG2E)))
        if masked:
            if mask_ref is not None:
                s = s + load_tile(mask_ref, phys if spec.mask_heads else pos, r_ok, k_pos,
                                  k_ok).astype(jnp.float32) * LOG2E
            visible = k_ok[None, :]
            if spec.causal:
                visible = visible & (k_pos[None, :] <= pos[:, None] + shift)
            if spec.window is not None:
                rel = k_pos[None, :] - (pos[:, None] + shift)
                visible = visible & (rel >= -spec.window[0]) & (rel <= spec.window[1])
            s = jnp.where(visible, s, -jnp.inf)
        p, alpha, m_new, l_new = softmax_step(s, m_prev, l_prev)
        if v_tq4:  # acc = (even, odd) output coordinates
            (v_e, v_o), v_norm = vt(k_pos, kmask)
            pv = (p * v_norm[None, :]).astype(dt)
            acc = (acc[0] * alpha[:, None] + dot32(pv, v_e),
                   acc[1] * alpha[:, None] + dot32(pv, v_o))
        else:
            acc = acc * alpha[:, None] + dot32(p.astype(dt), load_tile(v_src, k_pos, kmask,
                                                                       cols, c_ok))
        return acc, m_new, l_new, nxt

    if v_tq4:
        acc = (jnp.zeros((bm, bcols.shape[0]), jnp.float32),) * 2
    else:
        acc = jnp.zeros((bm, cols.shape[0]), jnp.float32)
    m0 = jnp.full((bm,), M_INIT, jnp.float32)
    carry = (acc, m0, jnp.zeros_like(m0), ahead(0) if prefetch else ())
    acc, m, l_fin, _ = key_loop(first, n_safe, n_all, body, carry)
    if v_tq4:
        acc = interleave(*acc)

    out = acc * (1.0 / jnp.where(l_fin > 0, l_fin, 1.0))[:, None]
    if post_rot is not None:  # o @ Pi with o split into 16-bit halves (|o| <= max |v|)
        r_hi, r_lo = (load_tile(ref, cols, c_ok, cols, c_ok) for ref in post_rot)
        out = dot_split(*split16(out, dt), r_hi, r_lo)
    store_tile(o_ref, ophys, r_ok, cols, c_ok, out)
    if lse_ref is not None:  # normalized per split; the merge weighs splits by exp(lse)
        store_rows(lse_ref, ophys, r_ok, lse_of(m, l_fin))


def output_specs(b: int, hkv: int, n_rows: int, d: int, splits: int, dtype: Any,
                 lse: bool = False):
    """(out_shape, out_specs) of a contiguous launch: [B, HKV, rows, D] in ``dtype`` for one
    split (and, with ``lse``, its log-sum-exp [B, HKV, rows]); per split [B, HKV, S, rows, D]
    f32 plus the lse [B, HKV, S, rows] otherwise."""
    if splits == 1:
        out = jax.ShapeDtypeStruct((b, hkv, n_rows, d), dtype)
        if not lse:
            return (out,), (head_spec(out, hkv),)
        lse_out = jax.ShapeDtypeStruct((b, hkv, n_rows), jnp.float32)
        return (out, lse_out), (head_spec(out, hkv), head_spec(lse_out, hkv))
    shapes = ((b, hkv, splits, n_rows, d), (b, hkv, splits, n_rows))

    def split_spec(sh):
        zeros = (0,) * (len(sh) - 3)
        return pl.BlockSpec((None, None, None) + sh[3:],
                            lambda r, i, s: (i // hkv, i % hkv, s) + zeros)

    return (tuple(jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes),
            tuple(split_spec(sh) for sh in shapes))


def finish(outs: tuple, shape: tuple, dtype: Any, split_axis: int | None,
           rotation: Rotation | None, sinks: jnp.ndarray | None = None,
           fused: KernelMode | None = None) -> jnp.ndarray:
    """Kernel outputs -> ``shape`` [..., H_Q, rows, D] in ``dtype``: merge the splits (split
    axis ``split_axis`` of the lse; None: one split), post-rotate by ``rotation`` when the
    kernel did not (None: it did, or V was not compressed), and with ``sinks`` ([H_Q] logits
    in the softmax denominator) scale each row by ``1 / (1 + exp(sink - lse))``. ``fused``:
    run the merge, rotation and cast as one kernel (:func:`.epilogue.merge_rotate`; with
    splits and no sinks) in this kernel mode."""
    if fused is not None and split_axis is not None and sinks is None:
        o, lse = outs
        groups = math.prod(o.shape[:split_axis])
        o = o.reshape(groups, o.shape[split_axis], -1, o.shape[-1])
        out = merge_rotate(o, lse.reshape(o.shape[:3]),
                           None if rotation is None else tuple(rotation.post), dtype=dtype,
                           mode=fused)
        return out.reshape(shape)
    if split_axis is None:
        out, lse = outs[0], (outs[1] if len(outs) > 1 else None)
    else:
        out, lse = merge_splits(outs[0], outs[1], split_axis, with_lse=True)
    out = out.reshape(shape)
    if rotation is not None:
        out = post_rotate(out, rotation.pi)
    if sinks is not None:
        lse = lse.reshape(shape[:-1])
        sink = sinks.astype(jnp.float32).reshape((-1, 1) if len(shape) > 3 else (-1,))
        out = out.astype(jnp.float32) / (1.0 + jnp.exp(sink - lse))[..., None]
    return to_dtype(out, dtype)


@partial(jax.jit, static_argnames=("spec", "mode"))
def attention(q: jnp.ndarray, k: Any, v: Any, rot: Rotation | None, mask: jnp.ndarray | None,
              lens: jnp.ndarray | None, sinks: jnp.ndarray | None = None, *, spec: AttnSpec,
              mode: KernelMode) -> jnp.ndarray:
    """Contiguous attention: q [B, HQ, Sq, D] (already rotated unless ``spec.rot_q`` when K
    is compressed); k/v dense [B, HKV, Sk, D] or :class:`Codes`; ``rot`` the rotation (None
    when nothing is compressed); mask None or [Bm, Hm, Sq, Sk]; lens None or int32 [2 * B];
    sinks None or [HQ] f32 sink logits. Returns [B, HQ, Sq, D] in q's dtype."""
    b, hq, sq, d = q.shape
    hkv, n_rows, splits = hq // spec.group, spec.group * sq, spec.cfg.splits
    q_view = q.reshape(b, hkv, n_rows, d)
    q_rot = tuple(rot.q_halves) if spec.rot_q else None
    post = tuple(rot.post) if spec.post else None

    def spec_of(x):
        return head_spec(x, hkv) if x.ndim >= 3 else whole_spec(x)

    mask_spec = None
    if mask is not None:
        bm_, hm = mask.shape[:2]
        if spec.mask_heads:
            mask = mask.reshape(bm_, hkv, n_rows, mask.shape[-1])
        mask_spec = pl.BlockSpec((None, None) + mask.shape[2:], lambda r, i, s: (
            i // hkv if bm_ > 1 else 0, i % hkv if spec.mask_heads else 0, 0, 0))
    args = (q_view, q_rot, k, v, post, mask, lens)
    in_specs = (head_spec(q_view, hkv), jax.tree.map(whole_spec, q_rot),
                jax.tree.map(spec_of, k), jax.tree.map(spec_of, v),
                jax.tree.map(whole_spec, post), mask_spec, jax.tree.map(whole_spec, lens))
    v_tq4 = isinstance(v, Codes)
    out_shape, out_specs = output_specs(
        b, hkv, n_rows, d, splits,
        jnp.float32 if (v_tq4 and not spec.post) or sinks is not None else q.dtype,
        lse=sinks is not None)
    outs = pallas_call(partial(attn_kernel, spec=spec), mode=mode,
                       grid=(pl.cdiv(n_rows, spec.cfg.block_m), b * hkv, splits),
                       out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                       num_warps=spec.cfg.num_warps, num_stages=spec.cfg.num_stages)(*args)
    return finish(outs, (b, hq, sq, d), q.dtype, 2 if splits > 1 else None,
                  rot if v_tq4 and not spec.post else None, sinks,
                  mode if spec.cfg.epilogue else None)
