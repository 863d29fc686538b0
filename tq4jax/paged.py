"""Paged TQ4 cache ops (turboquant-vllm layout, LAYOUTS.md A2): argument checks and backend
dispatch for :func:`paged_write`, :func:`paged_decode`, :func:`paged_prefill`.

``kv_cache [num_blocks, block_size, row_bytes] uint8``: token t of sequence s lives in block
``block_table[s, t // block_size]``, row ``t % block_size``; one row holds every KV head's K
codes, K norms, V codes, V norms at the offsets of :func:`tq4jax.paged_layout` (a cache padded
on purpose declares its row width with ``total_bytes=``). ``centroids``/``boundaries`` come
from :func:`tq4jax.lloyd_max`, ``rotation`` from :func:`tq4jax.haar_rotation`: the reading
side must use the codebook and rotation the cache was written with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax import lax

from . import _checks as ck
from . import pallas_mosaic as mosaic
from . import pallas_triton as triton
from .backend import check_config, kernel_mode, reference_of, resolve_impl
from .codec import compress_kv
from .core import default_scale, post_rotate, rotate_in_xla, rotation_parts
from .layout import PagedLayout, pad_codebook, paged_layout, to_dtype
from .pallas_triton.attention import Paged
from .pallas_triton.lut import codebook_parts, int8_parts
from .pallas_triton.paged import rows_per_kv_head
from .pallas_triton.tuning import (INT8_QK_DEFAULT, PAGED_DECODE_NORM_WORDS,
                                   PAGED_DECODE_PREFETCH, Config, choose_config)
from .reference import attention as ref

__all__ = ["paged_layout", "PagedLayout", "paged_write", "paged_decode", "paged_prefill",
           "paged_write_reference", "paged_decode_reference", "paged_prefill_reference"]


# ----------------------------------------------------------------------------------------------
# write
# ----------------------------------------------------------------------------------------------

def _token_rows(k_packed, k_norms, v_packed, v_norms) -> jax.Array:
    """Codes [N, H, D/2] uint8 and norms [N, H] f32 of K and V -> cache rows [N, row_bytes]."""
    n = k_packed.shape[0]
    as_bytes = lambda x: lax.bitcast_convert_type(x, jnp.uint8).reshape(n, -1)  # noqa: E731
    return jnp.concatenate([k_packed.reshape(n, -1), as_bytes(k_norms),
                            v_packed.reshape(n, -1), as_bytes(v_norms)], axis=1)


def _scatter_rows(kv_cache: jax.Array, rows: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Write ``rows`` [N, row_bytes] into the first row_bytes of cache rows ``slot_mapping``;
    negative (or out-of-range) slots are dropped, padding bytes are kept."""
    nb, bs, tb = kv_cache.shape
    flat = kv_cache.reshape(nb * bs, tb)
    slots = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)  # negative would wrap around
    flat = flat.at[slots, :rows.shape[1]].set(rows, mode="drop")
    return flat.reshape(nb, bs, tb)


def paged_write(kv_cache: ArrayLike, key: ArrayLike, value: ArrayLike, slot_mapping: ArrayLike,
                rotation: ArrayLike, k_boundaries: ArrayLike,
                v_boundaries: ArrayLike | None = None, *, total_bytes: int | None = None,
                impl: str = "auto") -> jax.Array:
    """Compress new tokens and store them in a paged TQ4 cache; returns the updated cache.

    Args:
      kv_cache: [num_blocks, block_size, row_bytes] uint8 (``paged_layout(H_KV, D)``), or
        [..., total_bytes] when ``total_bytes`` declares a padded row.
      key, value: [N, H_KV, D] float. slot_mapping: [N] int32 (``block * block_size + row``,
        negative = skip). rotation: Pi [D, D]. k_boundaries / v_boundaries: from
        :func:`tq4jax.lloyd_max` (V's default to K's).
    Returns:
      The cache with the tokens' rows written (in place when donated under jit); bytes past
      the layout's ``row_bytes`` are untouched; of two tokens with one slot, one wins.
    """
    kv_cache = ck.as_array("kv_cache", kv_cache)
    ck.check_dtype("kv_cache", kv_cache, [jnp.uint8])
    ck.check_ndim("kv_cache", kv_cache, 3, "[num_blocks, block_size, total_bytes]")
    key, value, slots = ck.check_new_tokens(key, value, slot_mapping)
    n, h, d = key.shape
    ck.check_row_width(kv_cache, paged_layout(h, d).row_bytes, total_bytes,
                       f"{h} KV heads x head_dim {d} (key's shape)")
    if n == 0:
        return kv_cache
    kp, kn, vp, vn = compress_kv(key, value, rotation, k_boundaries, v_boundaries, impl=impl)
    return _scatter_rows(kv_cache, _token_rows(kp, kn, vp, vn), slots)


# ----------------------------------------------------------------------------------------------
# decode and prefill
# ----------------------------------------------------------------------------------------------

def _check_read(q, kv_cache, block_table, seq_lens, num_kv_heads, head_dim, block_size,
                total_bytes, centroids, v_centroids, rotation, per_token: bool):
    """Checks of paged_decode (q [S, H_Q, D]) and paged_prefill (``per_token``: q [N, H_Q, D],
    S from seq_lens); returns them normalized, with both codebooks and the raw ones."""
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
    raw = (centroids, centroids if v_centroids is None else v_centroids)
    centroids = ck.check_centroids(centroids)
    v_centroids = centroids if v_centroids is None else ck.check_centroids(v_centroids,
                                                                           "v_centroids")
    return (q, kv_cache, block_table, seq_lens, centroids, v_centroids,
            ck.check_rotation(rotation, head_dim), raw)


def paged_decode(q: ArrayLike, kv_cache: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike,
                 centroids: ArrayLike, rotation: ArrayLike, *, num_kv_heads: int, head_dim: int,
                 block_size: int, sm_scale: float | None = None,
                 v_centroids: ArrayLike | None = None, total_bytes: int | None = None,
                 local_window_size: int | tuple[int, int] | None = None,
                 logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                 config: Config | None = None, impl: str = "auto") -> jax.Array:
    """One query per sequence against a paged TQ4 cache.

    Args:
      q: [S, H_Q, D] fp16/bf16, the query of each sequence's last position.
      kv_cache: [num_blocks, block_size, H_KV*(D+8)] uint8 (``total_bytes``: a declared
        padded row width). block_table: [S, max_blocks] int32 (entries past a sequence's
        blocks are never read). seq_lens: [S] int32 (0 gives zeros; clipped to the table).
      centroids / v_centroids / rotation: the codebooks and Pi the cache was written with.
      num_kv_heads, head_dim, block_size: the cache's shape (static ints).
      sm_scale: softmax scale (None = 1/sqrt(D)); config: Triton tiling
        (:class:`~tq4jax.pallas_triton.tuning.Config`, None = measured default), or a
        :class:`~tq4jax.pallas_mosaic.MosaicConfig` with ``impl="mosaic"``.
      local_window_size, logit_soft_cap, sinks: sliding window (relative to each query's
        position), logit soft cap, per-head sink logits [H_Q], as :func:`tq4jax.flash_attention`.
      impl: :mod:`tq4jax.backend`; ``"mosaic"`` (Hopper) serves D=128, <= 16 query heads
        per KV head, block_size 8/16/32/64, rows a multiple of 16 bytes, no window, soft cap
        or sinks (``"auto"`` keeps the Triton-lowered kernel: faster on an H200).
    Returns:
      [S, H_Q, D] in q's dtype.
    """
    q, kv_cache, block_table, seq_lens, cent, v_cent, rotation, raw = _check_read(
        q, kv_cache, block_table, seq_lens, num_kv_heads, head_dim, block_size, total_bytes,
        centroids, v_centroids, rotation, per_token=False)
    scale = default_scale(head_dim, sm_scale)
    window, softcap, sinks = ck.check_attention_extras(q.shape[1], local_window_size,
                                                   logit_soft_cap, sinks)
    group = q.shape[1] // num_kv_heads
    mosaic_ok = (window is None and softcap is None and sinks is None
                 and mosaic.paged_supported(head_dim, group, block_size, kv_cache.shape[2]))
    path = resolve_impl(impl, mosaic=mosaic_ok)
    config = check_config(config, mosaic.MosaicConfig if path == "mosaic" else Config, path,
                          "paged_decode")
    if q.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    if path == "reference":
        return to_dtype(ref.paged_decode(q, kv_cache, block_table, seq_lens, cent, v_cent,
                                         rotation, num_kv_heads, head_dim, scale, window, softcap,
                                         sinks), q.dtype)
    ck.check_cache_size(kv_cache)
    if path == "mosaic":
        s, hq, d = q.shape
        lens = jnp.clip(seq_lens, 0, block_table.shape[1] * block_size)
        q_rot = rotate_in_xla(q, rotation, jnp.float32).reshape(s, num_kv_heads, group, d)
        out = mosaic.paged_decode(q_rot, kv_cache, block_table, lens, pad_codebook(cent),
                                  pad_codebook(v_cent), scale, block_size=block_size,
                                  raw_k=raw[0], raw_v=raw[1], config=config,
                                  interpret=kernel_mode().interpret)
        return to_dtype(post_rotate(out, rotation).reshape(q.shape), q.dtype)
    k_table, k_lut = codebook_parts(cent, q.dtype, raw[0])
    v_table, v_lut = codebook_parts(v_cent, q.dtype, raw[1])
    s, hq, d = q.shape
    cfg = config or choose_config(s, num_kv_heads, hq // num_kv_heads,
                                  block_table.shape[1] * block_size, d, compressed=True)
    paged = Paged(block_size, num_kv_heads, paged_layout(num_kv_heads, head_dim),
                  prefetch_norms=PAGED_DECODE_PREFETCH)
    return triton.paged.paged_attention(
        q, kv_cache, block_table, seq_lens, None, k_table, v_table,
        rotation_parts(rotation, q.dtype), sinks, paged=paged, k_lut=k_lut, v_lut=v_lut,
        scale=scale, cfg=cfg, mode=kernel_mode(), norm_words=PAGED_DECODE_NORM_WORDS,
        window=window, softcap=softcap)


def paged_prefill(q: ArrayLike, kv_cache: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike,
                  query_start_loc: ArrayLike, centroids: ArrayLike, rotation: ArrayLike, *,
                  num_kv_heads: int, head_dim: int, block_size: int, sm_scale: float | None = None,
                  use_int8_qk: bool | None = None, v_centroids: ArrayLike | None = None,
                  total_bytes: int | None = None,
                  local_window_size: int | tuple[int, int] | None = None,
                  logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                  config: Config | None = None, impl: str = "auto") -> jax.Array:
    """Causal attention of the new tokens of many sequences against a paged TQ4 cache that
    already holds them (write them with :func:`paged_write` first).

    Args:
      q: [N, H_Q, D] fp16/bf16: the new tokens of every sequence back to back.
      query_start_loc: [S + 1] int32 (cumulative): sequence s owns tokens
        ``query_start_loc[s]:query_start_loc[s+1]``, its last positions (chunked prefill:
        ``seq_lens[s]`` counts the cached context plus these tokens).
      use_int8_qk: Q @ K^T on int8 tensor cores (q quantized per row, K by its codebook's
        int8 levels; P @ V stays in q's dtype); None = the measured default
        (:data:`~tq4jax.pallas_triton.tuning.INT8_QK_DEFAULT`).
      Others as :func:`paged_decode`.
    Returns:
      [N, H_Q, D] in q's dtype; tokens outside every sequence give zeros.
    """
    q, kv_cache, block_table, seq_lens, cent, v_cent, rotation, raw = _check_read(
        q, kv_cache, block_table, seq_lens, num_kv_heads, head_dim, block_size, total_bytes,
        centroids, v_centroids, rotation, per_token=True)
    qsl = ck.as_array("query_start_loc", query_start_loc)
    ck.check_dtype("query_start_loc", qsl, [jnp.int32])
    if qsl.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(f"query_start_loc must have shape ({seq_lens.shape[0] + 1},) "
                         f"(num_seqs + 1), got {tuple(qsl.shape)}")
    int8 = INT8_QK_DEFAULT if use_int8_qk is None else bool(use_int8_qk)
    scale = default_scale(head_dim, sm_scale)
    window, softcap, sinks = ck.check_attention_extras(q.shape[1], local_window_size,
                                                   logit_soft_cap, sinks)
    path = resolve_impl(impl)
    config = check_config(config, Config, path, "paged_prefill")
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    if path == "reference":
        return to_dtype(ref.paged_prefill(q, kv_cache, block_table, seq_lens, qsl, cent,
                                          v_cent, rotation, num_kv_heads, head_dim, scale,
                                          window, softcap, sinks), q.dtype)
    ck.check_cache_size(kv_cache)
    if int8:
        k_table, k_lut = int8_parts(cent, raw[0])
    else:
        k_table, k_lut = codebook_parts(cent, q.dtype, raw[0])
    v_table, v_lut = codebook_parts(v_cent, q.dtype, raw[1])
    n, hq, d = q.shape
    cap = block_table.shape[1] * block_size
    cfg = config or choose_config(1, num_kv_heads,
                                  rows_per_kv_head(n, seq_lens.shape[0], hq // num_kv_heads),
                                  cap, d, compressed=True)
    paged = Paged(block_size, num_kv_heads, paged_layout(num_kv_heads, head_dim))
    return triton.paged.paged_attention(
        q, kv_cache, block_table, seq_lens, qsl, k_table, v_table,
        rotation_parts(rotation, q.dtype), sinks, paged=paged, k_lut=k_lut, v_lut=v_lut,
        scale=scale, cfg=cfg, mode=kernel_mode(), int8_qk=int8, window=window, softcap=softcap)


paged_write_reference = reference_of(paged_write)
paged_decode_reference = reference_of(paged_decode)
paged_prefill_reference = reference_of(paged_prefill)
