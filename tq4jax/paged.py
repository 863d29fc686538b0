"""Paged TQ4 cache (turboquant-vllm layout, LAYOUTS.md A2): paged_write, paged_decode,
paged_prefill.

``kv_cache [num_blocks, block_size, total_bytes] uint8``: token t of sequence s lives in block
``block_table[s, t // block_size]``, row ``t % block_size``; one row holds every KV head's K
codes, K norms, V codes, V norms at the offsets of :func:`paged_layout`.

* ``paged_write`` compresses new tokens with the codec kernel and scatters their rows (XLA
  scatter: in place when the caller donates the cache under jit).
* ``paged_decode`` runs the attention kernel of :mod:`tq4jax.attention` with a paged K/V
  source: one program per (sequence, KV head, KV split) serving all query heads of the group,
  block ids read from the block table inside the kernel, lanes past ``seq_lens`` masked (they
  read neither the block table nor the cache), splits merged by log-sum-exp.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import _checks as ck
from ._config import kernel_mode, pallas_call, resolve_impl
from .attention import (LOG2E, Paged, _attn_kernel, _codebook_parts, _rotation_parts,
                        attention_reference, choose_config, finish, merge_splits,
                        rotate_in_kernel, rotate_in_xla, whole_spec)
from .codec import compress_kv, dequantize_reference
from ._tiles import int8_codebook
from .layout import (CODEBOOK_SLOTS, NORM_BYTES, PagedLayout, pad_codebook, paged_layout,
                     saturate)

#: The kernel's in-cache offsets are int32 (jax without x64): caches must stay below 2 GiB.
MAX_CACHE_BYTES = 1 << 31

__all__ = ["paged_layout", "paged_write", "paged_write_reference", "paged_decode",
           "paged_decode_reference", "paged_prefill", "paged_prefill_reference", "PagedLayout"]


# ----------------------------------------------------------------------------------------------
# write
# ----------------------------------------------------------------------------------------------

def _token_rows(k_packed, k_norms, v_packed, v_norms) -> jnp.ndarray:
    """Codes [N, H, D/2] uint8 and norms [N, H] f32 of K and V -> cache rows [N, row_bytes]."""
    n = k_packed.shape[0]
    as_bytes = lambda x: lax.bitcast_convert_type(x, jnp.uint8).reshape(n, -1)  # noqa: E731
    return jnp.concatenate([k_packed.reshape(n, -1), as_bytes(k_norms),
                            v_packed.reshape(n, -1), as_bytes(v_norms)], axis=1)


def _scatter_rows(kv_cache: jnp.ndarray, rows: jnp.ndarray, slot_mapping: jnp.ndarray):
    """Write ``rows`` [N, row_bytes] into the first row_bytes of cache rows ``slot_mapping``;
    negative (or out-of-range) slots are dropped, padding bytes are kept."""
    nb, bs, tb = kv_cache.shape
    flat = kv_cache.reshape(nb * bs, tb)
    slots = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)  # negative would wrap around
    flat = flat.at[slots, :rows.shape[1]].set(rows, mode="drop")
    return flat.reshape(nb, bs, tb)


def _check_write(kv_cache, key, value, slot_mapping, rotation, k_boundaries, v_boundaries,
                 total_bytes):
    kv_cache = ck.as_array("kv_cache", kv_cache)
    ck.check_dtype("kv_cache", kv_cache, [jnp.uint8])
    ck.check_ndim("kv_cache", kv_cache, 3, "[num_blocks, block_size, total_bytes]")
    key, value, slot_mapping = ck.check_new_tokens(key, value, slot_mapping)
    n, h, d = key.shape
    ck.check_row_width(kv_cache, paged_layout(h, d).row_bytes, total_bytes,
                       f"{h} KV heads x head_dim {d} (key's shape)")
    rotation = ck.check_rotation(rotation, d)
    k_boundaries = ck.check_boundaries(k_boundaries, "k_boundaries")
    v_boundaries = (k_boundaries if v_boundaries is None
                    else ck.check_boundaries(v_boundaries, "v_boundaries"))
    return kv_cache, key, value, slot_mapping, rotation, k_boundaries, v_boundaries


def paged_write(kv_cache: Any, key: Any, value: Any, slot_mapping: Any, rotation: Any,
                k_boundaries: Any, v_boundaries: Any = None, *, total_bytes: int | None = None,
                impl: str = "auto") -> jnp.ndarray:
    """Compress new tokens and store them in a paged TQ4 cache; returns the updated cache.

    kv_cache [num_blocks, block_size, row_bytes] uint8 (``tq.paged_layout(H_KV, D)``), or
    [..., total_bytes] when the caller declares a padded row with ``total_bytes``;
    key/value [N, H_KV, D] float; slot_mapping [N] int32 (``block * block_size + row``,
    negative = skip); boundaries from :func:`tq4jax.lloyd_max` (``v_boundaries`` for a
    different V codebook). Bytes past the layout's ``row_bytes`` are left untouched. Two
    tokens with the same slot: one of them wins.
    """
    kv_cache, key, value, slots, rotation, kb, vb = _check_write(
        kv_cache, key, value, slot_mapping, rotation, k_boundaries, v_boundaries, total_bytes)
    if key.shape[0] == 0:
        return kv_cache
    kp, kn, vp, vn = compress_kv(key, value, rotation, kb, vb, impl=impl)
    return _scatter_rows(kv_cache, _token_rows(kp, kn, vp, vn), slots)


def paged_write_reference(kv_cache, key, value, slot_mapping, rotation, k_boundaries,
                          v_boundaries=None, *, total_bytes=None):
    """:func:`paged_write` through the pure-jnp compress."""
    return paged_write(kv_cache, key, value, slot_mapping, rotation, k_boundaries, v_boundaries,
                       total_bytes=total_bytes, impl="reference")


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------

def _gather_sequences(kv_cache, block_table, seq_lens, num_kv_heads, head_dim):
    """Reference gather: codes [S, H, T, D/2] and norms [S, H, T] of K and V for positions
    T = max_blocks * block_size, and the validity mask [S, T]. Invalid positions read row 0
    and get norm 0 (never NaN, whatever bytes row 0 holds)."""
    nb, bs, tb = kv_cache.shape
    s, mb = block_table.shape
    lay = paged_layout(num_kv_heads, head_dim)
    t = jnp.arange(mb * bs)
    valid = t[None, :] < jnp.clip(seq_lens, 0, mb * bs)[:, None]
    blk = jnp.clip(jnp.take_along_axis(block_table, (t // bs)[None, :].repeat(s, 0), axis=1),
                   0, nb - 1)
    rows = jnp.where(valid, blk * bs + t % bs, 0)
    data = kv_cache.reshape(nb * bs, tb)[rows]  # [S, T, total_bytes]
    hd = head_dim // 2

    def part(codes_at, norms_at):
        codes = data[..., codes_at:codes_at + num_kv_heads * hd]
        codes = codes.reshape(s, mb * bs, num_kv_heads, hd)
        nbytes = data[..., norms_at:norms_at + NORM_BYTES * num_kv_heads]
        norms = lax.bitcast_convert_type(nbytes.reshape(s, mb * bs, num_kv_heads, NORM_BYTES),
                                         jnp.float32)
        norms = jnp.where(valid[:, :, None], norms, 0.0)  # row 0 may hold garbage (NaN bits)
        return jnp.swapaxes(codes, 1, 2), jnp.swapaxes(norms, 1, 2)

    return part(lay.k_codes, lay.k_norms), part(lay.v_codes, lay.v_norms), valid


def paged_decode_reference(q, kv_cache, block_table, seq_lens, centroids, rotation, *,
                           num_kv_heads: int, head_dim: int, block_size: int,
                           sm_scale: float | None = None, v_centroids=None) -> jnp.ndarray:
    """Pure-jnp paged decode: gather, dequantize, float32 attention with length masking.
    Returns float32 [S, H_Q, D]; sequences of length 0 give zeros."""
    (kp, kn), (vp, vn), valid = _gather_sequences(kv_cache, block_table, seq_lens, num_kv_heads,
                                                  head_dim)
    k = dequantize_reference(kp, kn, centroids, rotation, jnp.float32)
    v = dequantize_reference(vp, vn, centroids if v_centroids is None else v_centroids,
                             rotation, jnp.float32)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    mask = jnp.where(valid, 0.0, -jnp.inf)[:, None, None, :]  # [S, 1, 1, T]
    return attention_reference(q[:, :, None, :], k, v, scale, False, mask)[:, :, 0, :]


def paged_schedule(query_start_loc: jnp.ndarray, group: int, block_m: int,
                   n_blocks: int) -> jnp.ndarray:
    """Row blocks of the paged kernel: sequence s has ``cdiv(group * q_len_s, block_m)``
    blocks of its query rows. Returns int32 [2 * n_blocks]: the sequence of block i (-1 past
    the last block), then its first row."""
    q_len = jnp.maximum(query_start_loc[1:] - query_start_loc[:-1], 0)
    per_seq = (group * q_len + block_m - 1) // block_m
    ends = jnp.cumsum(per_seq)
    i = jnp.arange(n_blocks, dtype=jnp.int32)
    seq = jnp.sum(ends[None, :] <= i[:, None], axis=1, dtype=jnp.int32)  # one fused op
    live = seq < q_len.shape[0]
    seq = jnp.where(live, seq, 0)
    row0 = (i - (ends[seq] - per_seq[seq])) * block_m
    return jnp.concatenate([jnp.where(live, seq, -1), jnp.where(live, row0, 0)])


def rows_per_kv_head(n_tokens: int, n_seqs: int, group: int) -> int:
    """Typical query rows per KV head and sequence (``group`` heads x mean tokens per
    sequence; decode: ``group``): the row count behind the tile and rotation choices."""
    return group * max(1, n_tokens // max(1, n_seqs))


def schedule_blocks(n_tokens: int, n_seqs: int, group: int, block_m: int) -> int:
    """Static upper bound of the row blocks of :func:`paged_schedule` (each sequence's last
    block may be partial; with group <= block_m a block holds at least one token)."""
    bound = pl.cdiv(n_tokens * group, block_m) + n_seqs - 1
    return max(1, min(bound, n_tokens) if group <= block_m else bound)


@partial(jax.jit, static_argnames=("paged", "k_lut", "v_lut", "scale", "cfg", "mode",
                                   "int8_qk"))
def _paged_pallas(q, kv_cache, block_table, seq_lens, query_start_loc, k_table, v_bits, rot, *,
                  paged, k_lut, v_lut, scale, cfg, mode, int8_qk=False):
    """q [N, H_Q, D] (the queries of every sequence, back to back) -> [N, H_Q, D] in q's
    dtype; tokens outside ``query_start_loc``'s ranges give zeros. ``query_start_loc`` None:
    decode (token s is sequence s's last position; the schedule is static)."""
    n, hq, d = q.shape
    hkv, bs = paged.num_kv_heads, paged.block_size
    group, splits, n_seqs = hq // hkv, cfg.splits, seq_lens.shape[0]
    cap = block_table.shape[1] * bs
    decode = query_start_loc is None
    in_kernel = rotate_in_kernel(d, rows_per_kv_head(n, n_seqs, group))
    if not in_kernel:
        q = rotate_in_xla(q, rot)
    if decode:
        query_start_loc = jnp.arange(n + 1, dtype=jnp.int32)
    if decode and group <= cfg.block_m:  # one block per sequence
        n_blocks = n
        sched = jnp.asarray(np.concatenate([np.arange(n), np.zeros(n)]).astype(np.int32))
    else:
        n_blocks = schedule_blocks(n, n_seqs, group, cfg.block_m)
        sched = paged_schedule(query_start_loc, group, cfg.block_m, n_blocks)
    rows = n * hq
    args = [q.reshape(rows, d)] + (list(rot.q_halves) if in_kernel else [])
    args += [kv_cache.reshape(-1, kv_cache.shape[2])]
    if paged.norm_words:  # the same bytes as float32 words (a bitcast, no copy)
        args += [lax.bitcast_convert_type(kv_cache.reshape(-1, NORM_BYTES), jnp.float32)]
    args += [block_table.reshape(-1), seq_lens, query_start_loc, sched, k_table, v_bits]
    args += list(rot.post) if in_kernel else []
    out_dt = q.dtype if in_kernel else jnp.float32
    if splits == 1:
        out_shape = (jax.ShapeDtypeStruct((rows, d), out_dt),)
    else:
        out_shape = (jax.ShapeDtypeStruct((splits * rows, d), jnp.float32),
                     *(jax.ShapeDtypeStruct((splits * rows,), jnp.float32),) * 2)
    kernel = partial(_attn_kernel, k_tq4=True, v_tq4=True, rot_q=in_kernel, post=in_kernel,
                     k_lut=k_lut, v_lut=v_lut, has_mask=False, mask_heads=False, causal=True,
                     scale_log2=scale * LOG2E, cfg=cfg, group=group, sq=n, sk=cap, d=d,
                     paged=paged, int8_qk=int8_qk)
    outs = pallas_call(kernel, mode=mode, grid=(n_blocks, hkv, splits), out_shape=out_shape,
                       in_specs=[whole_spec(x) for x in args],
                       out_specs=tuple(whole_spec(o) for o in out_shape),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)(*args)
    if splits > 1:
        outs = (outs[0].reshape(splits, rows, d), outs[1].reshape(splits, rows),
                outs[2].reshape(splits, rows))
        outs = (merge_splits(*outs, axis=0),)
    out = finish(outs, (n, hq, d), q.dtype, None if in_kernel else rot)
    if decode:
        return out
    t = jnp.arange(n)
    inside = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    return saturate(jnp.where(inside[:, None, None], out, 0), q.dtype)


def _check_codebooks(centroids, v_centroids, rotation, sm_scale, head_dim):
    """-> (raw K and V codebooks (for static LUTs), checked K and V codebooks, rotation,
    softmax scale)."""
    raw_k, raw_v = centroids, (centroids if v_centroids is None else v_centroids)
    centroids = ck.check_centroids(centroids)
    v_centroids = centroids if v_centroids is None else ck.check_centroids(v_centroids,
                                                                           "v_centroids")
    rotation = ck.check_rotation(rotation, head_dim)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    return raw_k, raw_v, centroids, v_centroids, rotation, scale


def _paged_spec(kv_cache: jnp.ndarray, num_kv_heads: int, head_dim: int,
                decode: bool) -> Paged:
    """The kernel's static cache description. Decode loads norms as float32 words (when a
    row's width is a multiple of 4: every unpadded layout) a key tile ahead: B=8 32K 0.27 vs
    0.33 ms on an H200. Prefill keeps the byte loads in the tile (5.2 ms; 10.7 with both)."""
    words = decode and kv_cache.shape[2] % NORM_BYTES == 0
    return Paged(kv_cache.shape[1], num_kv_heads, paged_layout(num_kv_heads, head_dim),
                 norm_words=words, prefetch_norms=decode)


def _check_cache_size(kv_cache: jnp.ndarray) -> None:
    if kv_cache.size >= MAX_CACHE_BYTES:
        raise ValueError(f"kv_cache has {kv_cache.size} bytes: the paged kernel addresses the "
                         f"cache with 32-bit offsets (< {MAX_CACHE_BYTES}); split the cache "
                         f"(e.g. one per layer) or use impl='reference'")


def _check_decode(q, kv_cache, block_table, seq_lens, num_kv_heads, head_dim, block_size,
                  total_bytes, per_token: bool = False):
    """Argument checks of paged_decode (q [S, H_Q, D]) and paged_prefill (``per_token``:
    q [N, H_Q, D], S from seq_lens)."""
    q = ck.as_array("q", q)
    ck.check_dtype("q", q, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("q", q, 3, "[num_tokens, heads_q, head_dim]" if per_token
                  else "[num_seqs, heads_q, head_dim]")
    _, hq, d = q.shape
    if d != head_dim:
        raise ValueError(f"q must have head_dim {head_dim} as its last axis, got {tuple(q.shape)}")
    ck.check_head_dim("q", d)
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide heads_q ({hq})")
    kv_cache = ck.as_array("kv_cache", kv_cache)
    ck.check_dtype("kv_cache", kv_cache, [jnp.uint8])
    lay = paged_layout(num_kv_heads, head_dim)
    if kv_cache.ndim != 3 or kv_cache.shape[1] != block_size:
        raise ValueError(f"kv_cache must have shape [num_blocks, {block_size}, {lay.row_bytes}]"
                         f" for block_size {block_size}, {num_kv_heads} KV heads x head_dim "
                         f"{head_dim}, got {tuple(kv_cache.shape)}")
    ck.check_row_width(kv_cache, lay.row_bytes, total_bytes,
                       f"num_kv_heads={num_kv_heads} x head_dim={head_dim}")
    seq_lens = ck.as_array("seq_lens", seq_lens)
    ck.check_dtype("seq_lens", seq_lens, [jnp.int32])
    s = seq_lens.shape[0] if per_token and seq_lens.ndim == 1 else q.shape[0]
    seq_lens, block_table = ck.check_seq_table(seq_lens, block_table, s)
    return q, kv_cache, block_table, seq_lens


def paged_decode(q: Any, kv_cache: Any, block_table: Any, seq_lens: Any, centroids: Any,
                 rotation: Any, *, num_kv_heads: int, head_dim: int, block_size: int,
                 sm_scale: float | None = None, v_centroids: Any = None,
                 total_bytes: int | None = None, impl: str = "auto") -> jnp.ndarray:
    """One query per sequence against a paged TQ4 cache.

    q [S, H_Q, D] fp16/bf16 (the query of each sequence's last position); kv_cache
    [num_blocks, block_size, H_KV*(D+8)] uint8 (``total_bytes``: a declared padded row
    width); block_table [S, max_blocks] int32; seq_lens [S] int32 (0 gives zeros; clipped to
    max_blocks * block_size). Returns q's shape and dtype.
    """
    q, kv_cache, block_table, seq_lens = _check_decode(q, kv_cache, block_table, seq_lens,
                                                       num_kv_heads, head_dim, block_size,
                                                       total_bytes)
    raw_k, raw_v, centroids, v_centroids, rotation, scale = _check_codebooks(
        centroids, v_centroids, rotation, sm_scale, head_dim)
    if q.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    if resolve_impl(impl) == "reference":
        return saturate(paged_decode_reference(
            q, kv_cache, block_table, seq_lens, centroids, rotation, num_kv_heads=num_kv_heads,
            head_dim=head_dim, block_size=block_size, sm_scale=scale,
            v_centroids=v_centroids), q.dtype)
    _check_cache_size(kv_cache)
    k_bits, k_lut = _codebook_parts(centroids, q.dtype, raw_k)
    v_bits, v_lut = _codebook_parts(v_centroids, q.dtype, raw_v)
    s, hq, d = q.shape
    cfg = choose_config(s, num_kv_heads, hq // num_kv_heads, block_table.shape[1] * block_size,
                        d, compressed=True)
    paged = _paged_spec(kv_cache, num_kv_heads, head_dim, decode=True)
    return _paged_pallas(q, kv_cache, block_table, seq_lens, None, k_bits, v_bits,
                         _rotation_parts(rotation, q.dtype), paged=paged, k_lut=k_lut,
                         v_lut=v_lut, scale=scale, cfg=cfg, mode=kernel_mode())



# ----------------------------------------------------------------------------------------------
# prefill
# ----------------------------------------------------------------------------------------------

#: ``paged_prefill``'s default for ``use_int8_qk``: the faster path in bench/paged.py (4 x 2K
#: new tokens on 6K context, H200: int8 5.05-5.07 ms vs fp16 5.20-5.23 ms in two runs). int8
#: costs accuracy: about 1% relative L2 error against float64 where fp16 stays near 0.3%.
INT8_QK_DEFAULT = True


def paged_prefill_reference(q, kv_cache, block_table, seq_lens, query_start_loc, centroids,
                            rotation, *, num_kv_heads: int, head_dim: int, block_size: int,
                            sm_scale: float | None = None, use_int8_qk: bool = False,
                            v_centroids=None) -> jnp.ndarray:
    """Pure-jnp paged prefill (float32 scores whatever ``use_int8_qk`` says). Token t of
    sequence s (``query_start_loc[s] <= t < query_start_loc[s+1]``) is position
    ``seq_lens[s] - q_len_s + (t - query_start_loc[s])`` and sees the keys up to it; tokens
    outside every sequence give zeros. Returns float32 [N, H_Q, D]."""
    del use_int8_qk
    (kp, kn), (vp, vn), valid = _gather_sequences(kv_cache, block_table, seq_lens, num_kv_heads,
                                                  head_dim)
    k = dequantize_reference(kp, kn, centroids, rotation, jnp.float32)
    v = dequantize_reference(vp, vn, centroids if v_centroids is None else v_centroids,
                             rotation, jnp.float32)
    n, cap = q.shape[0], valid.shape[1]
    t = jnp.arange(n)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], t, side="right"), 0,
                   seq_lens.shape[0] - 1)
    inside = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    seq_len = jnp.clip(seq_lens[seq], 0, cap)
    at = seq_len - q_len + (t - query_start_loc[seq])
    keys = jnp.arange(cap)[None, :]
    visible = inside[:, None] & (keys < seq_len[:, None]) & (keys <= at[:, None])
    mask = jnp.where(visible, 0.0, -jnp.inf)[:, None, None, :]  # [N, 1, 1, T]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    return attention_reference(q[:, :, None, :], k[seq], v[seq], scale, False, mask)[:, :, 0, :]


def paged_prefill(q: Any, kv_cache: Any, block_table: Any, seq_lens: Any, query_start_loc: Any,
                  centroids: Any, rotation: Any, *, num_kv_heads: int, head_dim: int,
                  block_size: int, sm_scale: float | None = None,
                  use_int8_qk: bool | None = None, v_centroids: Any = None,
                  total_bytes: int | None = None, impl: str = "auto") -> jnp.ndarray:
    """Causal attention of the new tokens of many sequences against a paged TQ4 cache that
    already holds them (write them with :func:`paged_write` first).

    q [N, H_Q, D] fp16/bf16: the new tokens of every sequence back to back;
    query_start_loc [S + 1] int32 (cumulative): sequence s owns tokens
    ``query_start_loc[s]:query_start_loc[s+1]``, its last positions (chunked prefill:
    ``seq_lens[s]`` counts the cached context plus these tokens). ``use_int8_qk``: Q @ K^T on
    int8 tensor cores (q quantized per row, K by its codebook's int8 levels; P @ V stays in
    q's dtype); None = :data:`INT8_QK_DEFAULT`. ``total_bytes``: a declared padded row width
    (as :func:`paged_decode`). Returns q's shape and dtype; tokens outside every sequence give
    zeros.
    """
    q, kv_cache, block_table, seq_lens = _check_decode(q, kv_cache, block_table, seq_lens,
                                                       num_kv_heads, head_dim, block_size,
                                                       total_bytes, per_token=True)
    qsl = ck.as_array("query_start_loc", query_start_loc)
    ck.check_dtype("query_start_loc", qsl, [jnp.int32])
    if qsl.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(f"query_start_loc must have shape ({seq_lens.shape[0] + 1},) "
                         f"(num_seqs + 1), got {tuple(qsl.shape)}")
    use_int8_qk = INT8_QK_DEFAULT if use_int8_qk is None else bool(use_int8_qk)
    raw_k, raw_v, centroids, v_centroids, rotation, scale = _check_codebooks(
        centroids, v_centroids, rotation, sm_scale, head_dim)
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    kw = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    if resolve_impl(impl) == "reference":
        return saturate(paged_prefill_reference(q, kv_cache, block_table, seq_lens, qsl,
                                                centroids, rotation, **kw, sm_scale=scale,
                                                v_centroids=v_centroids), q.dtype)
    _check_cache_size(kv_cache)
    if use_int8_qk:
        k_table, k_lut = _int8_parts(centroids, raw_k)
    else:
        k_table, k_lut = _codebook_parts(centroids, q.dtype, raw_k)
    v_bits, v_lut = _codebook_parts(v_centroids, q.dtype, raw_v)
    n, hq, d = q.shape
    s = seq_lens.shape[0]
    cap = block_table.shape[1] * block_size
    cfg = choose_config(1, num_kv_heads, rows_per_kv_head(n, s, hq // num_kv_heads), cap, d,
                        compressed=True)
    paged = _paged_spec(kv_cache, num_kv_heads, head_dim, decode=False)
    return _paged_pallas(q, kv_cache, block_table, seq_lens, qsl, k_table, v_bits,
                         _rotation_parts(rotation, q.dtype), paged=paged, k_lut=k_lut,
                         v_lut=v_lut, scale=scale, cfg=cfg, mode=kernel_mode(),
                         int8_qk=use_int8_qk)


def _int8_parts(centroids, raw_centroids) -> tuple[jnp.ndarray, Any]:
    """K's int8 codebook table (:func:`int8_codebook`) and its static LUT (int8 levels as
    16-bit patterns) when the codebook is concrete and kernels are compiled."""
    if kernel_mode().interpret or isinstance(raw_centroids, jax.core.Tracer):
        return int8_codebook(pad_codebook(centroids)), None
    c = np.zeros(CODEBOOK_SLOTS, np.float32)
    c[:np.size(raw_centroids)] = np.asarray(raw_centroids, np.float32).ravel()
    table = int8_codebook(c, np)
    lut = tuple(int(x) for x in table[:CODEBOOK_SLOTS].astype(np.int16).view(np.uint16))
    return jnp.asarray(table), lut
