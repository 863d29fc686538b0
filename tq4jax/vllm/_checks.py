"""Argument checks of the vLLM-layout ops (run at trace time; errors name the argument)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _checks as ck
from ..layout import CODEBOOK_SLOTS, VllmSlot, vllm_slot


def check_cache(kv_cache, lay: VllmSlot, num_kv_heads: int | None = None):
    """uint8 [num_blocks, block_size, H_KV, slot] with exactly the layout's slot bytes."""
    kv_cache = ck.as_array("kv_cache", kv_cache)
    ck.check_dtype("kv_cache", kv_cache, [jnp.uint8])
    want = f"[num_blocks, block_size, {num_kv_heads or 'H_KV'}, {lay.slot_bytes}]"
    if kv_cache.ndim != 4 or kv_cache.shape[3] != lay.slot_bytes or (
            num_kv_heads is not None and kv_cache.shape[2] != num_kv_heads):
        raise ValueError(f"kv_cache must have shape {want} (slot of {lay.slot_bytes} bytes for "
                         f"head_dim {lay.head_dim}), got {tuple(kv_cache.shape)}")
    ck.check_cache_size(kv_cache)
    return kv_cache


def check_centroids(lay: VllmSlot, centroids: Any) -> jnp.ndarray:
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


def check_tables(lay: VllmSlot, Pi: Any, centroids: Any):
    """-> (rotation f32 [D, D] (None for fp8 keys), centroids)."""
    rotation = None if lay.key_fp8 else ck.check_rotation(Pi, lay.head_dim, "Pi")
    return rotation, check_centroids(lay, centroids)


def check_store(kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits, key_packed_size,
                value_quant_bits, key_fp8):
    """turboquant_store's checks -> (kv_cache, key, value, slot_mapping, rotation, centroids,
    slot layout)."""
    key, value, slot_mapping = ck.check_new_tokens(key, value, slot_mapping)
    _, h, d = key.shape
    lay = vllm_slot(d, mse_bits, value_quant_bits, key_packed_size,
                    ck.check_static_bool("key_fp8", key_fp8))
    kv_cache = check_cache(kv_cache, lay, h)
    rotation, centroids = check_tables(lay, Pi, centroids)
    return kv_cache, key, value, slot_mapping, rotation, centroids, lay


def check_decode(query, kv_cache, block_table, seq_lens, Pi, centroids, scale, mse_bits,
                 key_packed_size, value_quant_bits, key_fp8, norm_correction,
                 max_num_kv_splits):
    """turboquant_decode's checks -> (query, kv_cache, block_table, seq_lens, rotation,
    centroids, slot layout, norm correction, scale)."""
    query = ck.as_array("query", query)
    ck.check_dtype("query", query, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("query", query, 3, "[num_seqs, heads_q, head_dim]")
    b, hq, d = query.shape
    ck.check_head_dim("query", d)
    lay = vllm_slot(d, mse_bits, value_quant_bits, key_packed_size,
                    ck.check_static_bool("key_fp8", key_fp8))
    nc = ck.check_static_bool("norm_correction", norm_correction)
    kv_cache = check_cache(kv_cache, lay)
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
    rotation, centroids = check_tables(lay, Pi, centroids)
    return query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc, float(scale)


def infer_head_dim(slot_bytes: int, mse_bits, key_packed_size, value_quant_bits, key_fp8):
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


def check_dequant(kv_cache, block_table, seq_lens, centroids, mse_bits, key_packed_size,
                  value_quant_bits, key_fp8, norm_correction, head_dim, max_seq):
    """full_dequant_kv's checks -> (kv_cache, block_table, seq_lens, centroids, slot layout,
    norm correction, max_seq)."""
    kv_cache = ck.as_array("kv_cache", kv_cache)
    if kv_cache.ndim != 4:
        raise ValueError(f"kv_cache must have shape [num_blocks, block_size, H_KV, slot], got "
                         f"{tuple(kv_cache.shape)}")
    key_fp8 = ck.check_static_bool("key_fp8", key_fp8)
    if head_dim is None:
        found = infer_head_dim(kv_cache.shape[3], mse_bits, key_packed_size, value_quant_bits,
                                key_fp8)
        if len(found) != 1:
            raise ValueError(f"cannot infer head_dim from a {kv_cache.shape[3]}-byte slot "
                             f"(candidates {found}): pass head_dim=")
        head_dim = found[0]
    ck.check_head_dim("head_dim", head_dim)
    lay = vllm_slot(head_dim, mse_bits, value_quant_bits, key_packed_size, key_fp8)
    nc = ck.check_static_bool("norm_correction", norm_correction)
    kv_cache = check_cache(kv_cache, lay)
    block_table = ck.as_array("block_table", block_table)
    ck.check_ndim("block_table", block_table, 2, "[num_seqs, max_blocks]")
    seq_lens, block_table = ck.check_seq_table(seq_lens, block_table, block_table.shape[0])
    cap = block_table.shape[1] * kv_cache.shape[1]
    max_seq = cap if max_seq is None else max_seq
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 1:
        raise ValueError(f"max_seq must be a positive int, got {max_seq!r}")
    return kv_cache, block_table, seq_lens, check_centroids(lay, centroids), lay, nc, max_seq
