"""Attention math: float32 softmax attention with GQA, additive masks, per-row lengths and
causal alignment; the family-A paged cache read back (gather + dequantize) for decode and
chunked prefill."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from ..layout import NORM_BYTES, paged_layout, to_dtype
from .codec import dequantize


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, causal: bool,
              mask: jnp.ndarray | None = None, softcap: float | None = None,
              sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """q [B, HQ, Sq, D], k/v [B, HKV, Sk, D] (any float dtype), additive ``mask``
    broadcastable to [B, HQ, Sq, Sk] (-inf hides a key); causal aligns the last query with the
    last key; ``softcap``: logits -> softcap * tanh(logits / softcap) before the mask;
    ``sinks`` [HQ]: a per-head logit that joins each row's softmax denominator. Returns
    float32 [B, HQ, Sq, D]; rows with no visible key are zeros."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, sq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    s = s.reshape(b, hq, sq, sk)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    if mask is not None:
        s = s + mask.astype(jnp.float32)
    if causal:
        s = jnp.where(jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq), s,
                      -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    sink = None
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(1, hq, 1, 1)
        m = jnp.maximum(m, jnp.where(jnp.isfinite(m), sink, -jnp.inf))
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    if sink is not None:
        l = l + jnp.where(l > 0, jnp.exp(sink - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = (p / jnp.where(l > 0, l, 1.0)).reshape(b, hkv, hq // hkv, sq, sk)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    return out.reshape(b, hq, sq, d)


def contiguous(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float, causal: bool,
               mask: jnp.ndarray | None, lens: jnp.ndarray | None,
               window: tuple[int, int] | None = None, softcap: float | None = None,
               sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """:func:`attention` with the ops' per-row ``lens`` (int32 [2 * B]: key counts, then the
    position of each row's first query; None: every key, the last query at the last key) and
    ``window`` (left, right: query at position p sees keys [p - left, p + right]) folded into
    the mask; returns q's dtype."""
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    if lens is not None or window is not None:
        keys, rows = jnp.arange(sk)[None, None, None, :], jnp.arange(sq)[None, None, :, None]
        if lens is None:
            kv_len, off = sk, sk - sq
        else:
            kv_len, off = lens[:b, None, None, None], lens[b:, None, None, None]
        pos = off + rows
        visible = keys < kv_len
        if causal:
            visible = visible & (keys <= pos)
        if window is not None:
            visible = visible & (keys >= pos - window[0]) & (keys <= pos + window[1])
        extra = jnp.where(visible, 0.0, -jnp.inf)
        mask = extra if mask is None else mask.astype(jnp.float32) + extra
        causal = False
    return to_dtype(attention(q, k, v, scale, causal, mask, softcap, sinks), q.dtype)


def gather_paged(kv_cache: jnp.ndarray, block_table: jnp.ndarray, seq_lens: jnp.ndarray,
                 num_kv_heads: int, head_dim: int):
    """Codes [S, H, T, D/2] and norms [S, H, T] of K and V for positions
    T = max_blocks * block_size, and the validity mask [S, T]. Invalid positions read row 0
    and get norm 0 (never NaN, whatever bytes row 0 holds); block ids are clamped."""
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


def _paged_kv(kv_cache, block_table, seq_lens, centroids, v_centroids, rotation,
              num_kv_heads, head_dim):
    (kp, kn), (vp, vn), valid = gather_paged(kv_cache, block_table, seq_lens, num_kv_heads,
                                             head_dim)
    k = dequantize(kp, kn, centroids, rotation, jnp.float32)
    v = dequantize(vp, vn, v_centroids, rotation, jnp.float32)
    return k, v, valid


def window_ok(keys: jnp.ndarray, at: jnp.ndarray, window: tuple[int, int] | None) -> Any:
    """Keys a query at position ``at`` sees inside ``window`` (left, right); all without."""
    if window is None:
        return True
    return (keys >= at - window[0]) & (keys <= at + window[1])


def paged_decode(q: jnp.ndarray, kv_cache: jnp.ndarray, block_table: jnp.ndarray,
                 seq_lens: jnp.ndarray, centroids: jnp.ndarray, v_centroids: jnp.ndarray,
                 rotation: jnp.ndarray, num_kv_heads: int, head_dim: int, scale: float,
                 window: tuple[int, int] | None = None, softcap: float | None = None,
                 sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """q [S, H_Q, D], one query per sequence at its last position -> float32 [S, H_Q, D];
    sequences of length 0 give zeros (window, softcap, sinks: see :func:`attention`)."""
    k, v, valid = _paged_kv(kv_cache, block_table, seq_lens, centroids, v_centroids,
                            rotation, num_kv_heads, head_dim)
    keys = jnp.arange(valid.shape[1])[None, :]
    at = (jnp.clip(seq_lens, 0, valid.shape[1]) - 1)[:, None]
    valid = valid & window_ok(keys, at, window)
    mask = jnp.where(valid, 0.0, -jnp.inf)[:, None, None, :]  # [S, 1, 1, T]
    return attention(q[:, :, None, :], k, v, scale, False, mask, softcap,
                     sinks)[:, :, 0, :]


def paged_prefill(q: jnp.ndarray, kv_cache: jnp.ndarray, block_table: jnp.ndarray,
                  seq_lens: jnp.ndarray, query_start_loc: jnp.ndarray, centroids: jnp.ndarray,
                  v_centroids: jnp.ndarray, rotation: jnp.ndarray, num_kv_heads: int,
                  head_dim: int, scale: float, window: tuple[int, int] | None = None,
                  softcap: float | None = None,
                  sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """Token t of sequence s (``query_start_loc[s] <= t < query_start_loc[s+1]``) is position
    ``seq_lens[s] - q_len_s + (t - query_start_loc[s])`` and sees the keys up to it; tokens
    outside every sequence give zeros. Returns float32 [N, H_Q, D]."""
    k, v, valid = _paged_kv(kv_cache, block_table, seq_lens, centroids, v_centroids,
                            rotation, num_kv_heads, head_dim)
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
    visible = visible & window_ok(keys, at[:, None], window)
    mask = jnp.where(visible, 0.0, -jnp.inf)[:, None, None, :]  # [N, 1, 1, T]
    return attention(q[:, :, None, :], k[seq], v[seq], scale, False, mask, softcap,
                     sinks)[:, :, 0, :]
