"""vLLM TurboQuant slot math (LAYOUTS.md family B): the bytes a store writes, the K/V a slot
decodes to, and decode attention over a paged cache of slots."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..layout import (VLLM_NC_EPS, VLLM_NORM_BYTES, VLLM_NORM_EPS, VllmSlot, fp8_key,
                      fp16_bytes, fp16_from, key_norm, midpoints, pack_bits, pad_codebook,
                      unpack_bits, value_codes, value_stats, zero_rows)
from .attention import attention, window_ok


def slots(key: jnp.ndarray, value: jnp.ndarray, rotation: jnp.ndarray | None,
          centroids: jnp.ndarray, lay: VllmSlot) -> jnp.ndarray:
    """key/value [..., D] -> slot bytes uint8 [..., slot_bytes] (float32 math; the store
    rule: finite fields saturate, a non-finite vector stores NaN fields and codes 0)."""
    kf, vf = key.astype(jnp.float32), value.astype(jnp.float32)
    lead = kf.shape[:-1]
    zeros = lambda n: jnp.zeros((*lead, n), jnp.uint8)  # noqa: E731
    if lay.key_fp8:
        kpart = [lax.bitcast_convert_type(fp8_key(kf), jnp.uint8)]
    else:
        norm, stored = key_norm(kf)
        y = jnp.matmul(kf / (norm[..., None] + VLLM_NORM_EPS), rotation.T,
                       precision=lax.Precision.HIGHEST)
        idx = jnp.sum(y[..., None] >= midpoints(centroids), axis=-1)
        idx = zero_rows(stored < jnp.inf, idx)
        kpart = [pack_bits(idx, lay.mse_bits), fp16_bytes(stored)]
    scale, zero = value_stats(vf, lay.value_bits)
    code = value_codes(vf, scale, zero, lay.value_bits)
    parts = kpart + [zeros(lay.key_packed_size - lay.key_bytes), pack_bits(code, lay.value_bits),
                     fp16_bytes(scale), fp16_bytes(zero),
                     zeros(lay.slot_bytes - lay.zero_at - VLLM_NORM_BYTES)]
    return jnp.concatenate(parts, axis=-1)


def dequant_slots(data: jnp.ndarray, centroids: jnp.ndarray, lay: VllmSlot,
                  norm_correction: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """slot bytes [..., slot_bytes] -> (k, v) float32 [..., D]; k in rotated space, or the
    raw fp8 key."""
    d = lay.head_dim
    if lay.key_fp8:
        k = lax.bitcast_convert_type(data[..., :d], jnp.float8_e4m3fn).astype(jnp.float32)
    else:
        c = pad_codebook(centroids)[unpack_bits(data[..., :lay.mse_bytes], lay.mse_bits, d)]
        if norm_correction:
            c = c / jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) + VLLM_NC_EPS)
        k = c * fp16_from(data[..., lay.norm_at:lay.norm_at + 2])[..., None]
    lev = unpack_bits(data[..., lay.value_at:lay.scale_at], lay.value_bits, d)
    scale = fp16_from(data[..., lay.scale_at:lay.scale_at + 2])
    zero = fp16_from(data[..., lay.zero_at:lay.zero_at + 2])
    return k, lev * scale[..., None] + zero[..., None]


def gather_slots(kv_cache: jnp.ndarray, block_table: jnp.ndarray, seq_lens: jnp.ndarray,
                 n_pos: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Slots [B, H, n_pos, slot] of positions [0, n_pos) and their validity [B, n_pos]
    (position < seq_len, within the table); invalid positions read block 0."""
    nb, bs, h, sb = kv_cache.shape
    b, mb = block_table.shape
    t = jnp.arange(n_pos)
    valid = t[None, :] < jnp.clip(seq_lens, 0, min(mb * bs, n_pos))[:, None]
    page = jnp.minimum(t // bs, mb - 1)
    blk = jnp.clip(block_table[:, page], 0, nb - 1)
    blk = jnp.where(valid, blk, 0)
    data = kv_cache[blk, (t % bs)[None, :]]  # [B, T, H, slot]
    return jnp.swapaxes(data, 1, 2), valid


def full_dequant(kv_cache: jnp.ndarray, block_table: jnp.ndarray, seq_lens: jnp.ndarray,
                 centroids: jnp.ndarray, lay: VllmSlot, norm_correction: bool,
                 max_seq: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every position -> (k, v) float32 [B, H_KV, max_seq, D]; zeros past seq_lens."""
    data, valid = gather_slots(kv_cache, block_table, seq_lens, max_seq)
    k, v = dequant_slots(data, centroids, lay, norm_correction)
    keep = valid[:, None, :, None]
    return jnp.where(keep, k, 0.0), jnp.where(keep, v, 0.0)


def decode(query: jnp.ndarray, kv_cache: jnp.ndarray, block_table: jnp.ndarray,
           seq_lens: jnp.ndarray, rotation: jnp.ndarray | None, centroids: jnp.ndarray,
           lay: VllmSlot, norm_correction: bool, scale: float,
           window: tuple[int, int] | None = None, softcap: float | None = None,
           sinks: jnp.ndarray | None = None) -> jnp.ndarray:
    """query [B, H_Q, D] (raw), at position ``seq_len - 1`` -> float32 [B, H_Q, D]: gather,
    dequantize, attention (window (left, right), soft cap, sinks [H_Q]: as
    :func:`attention.attention`)."""
    n_pos = block_table.shape[1] * kv_cache.shape[1]
    k, v = full_dequant(kv_cache, block_table, seq_lens, centroids, lay, norm_correction,
                        n_pos)
    _, valid = gather_slots(kv_cache, block_table, seq_lens, n_pos)
    at = (jnp.clip(seq_lens, 0, n_pos) - 1)[:, None]
    valid = valid & window_ok(jnp.arange(n_pos)[None, :], at, window)
    q = query.astype(jnp.float32)
    if not lay.key_fp8:
        q = jnp.matmul(q, rotation.T, precision=lax.Precision.HIGHEST)
    mask = jnp.where(valid, 0.0, -jnp.inf)[:, None, None, :]
    return attention(q[:, :, None, :], k, v, scale, False, mask, softcap, sinks)[:, :, 0, :]
