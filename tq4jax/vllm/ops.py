"""vLLM TurboQuant ops (LAYOUTS.md family B): :func:`turboquant_store`,
:func:`turboquant_decode`, :func:`full_dequant_kv`: checks and backend dispatch.

``kv_cache [num_blocks, block_size, H_KV, slot] uint8``: K and V of one (token, KV head) share
one slot (:class:`tq4jax.layout.VllmSlot`): LSB-first 3/4-bit Lloyd-Max key codes + fp16 norm
(or the raw key as float8 e4m3), then 3/4-bit uniform value codes + fp16 scale and zero.
Keys live in rotated space (``y = k @ Pi^T``); values are not rotated. ``Pi`` and
``centroids`` must be the ones the cache was written with (vLLM's codebook differs from
:func:`tq4jax.lloyd_max`'s; pass vLLM's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .. import pallas_mosaic as mosaic
from .. import pallas_triton as triton
from .._checks import check_attention_extras
from ..backend import check_config, kernel_mode, reference_of, resolve_impl
from ..core import rotate_in_xla
from ..layout import pad_codebook, to_dtype
from ..pallas_triton.lut import codebook_parts, codebook_split_parts
from ..pallas_triton.tuning import (DEQUANT_TILING, SCORE_MODES, STORE_TILING, CodecConfig,
                                    DecodeConfig, vllm_decode_config)
from ..pallas_triton.vllm_tiles import value_table
from ..reference import vllm as ref
from ._checks import check_decode, check_dequant, check_store

__all__ = ["turboquant_store", "turboquant_decode", "full_dequant_kv",
           "turboquant_store_reference", "turboquant_decode_reference",
           "full_dequant_kv_reference"]


def _scatter_slots(kv_cache: jax.Array, slots: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Write slots [N, H, slot_bytes] to cache rows ``slot_mapping`` (negative or out of range:
    dropped); bytes past slot_bytes are kept."""
    nb, bs, h, sb = kv_cache.shape
    flat = kv_cache.reshape(nb * bs, h, sb)
    idx = jnp.where(slot_mapping < 0, nb * bs, slot_mapping)
    flat = flat.at[idx, :, :slots.shape[-1]].set(slots, mode="drop")
    return flat.reshape(nb, bs, h, sb)



def turboquant_store(kv_cache: ArrayLike, key: ArrayLike, value: ArrayLike,
                     slot_mapping: ArrayLike, Pi: ArrayLike, centroids: ArrayLike, mse_bits: int,
                     key_packed_size: int, value_quant_bits: int, key_fp8: bool = False, *,
                     config: CodecConfig | None = None, impl: str = "auto") -> jax.Array:
    """Quantize new tokens into a vLLM TurboQuant cache; returns the updated cache.

    Args:
      kv_cache: [num_blocks, block_size, H_KV, slot] uint8. key, value: [N, H_KV, D] float.
      slot_mapping: [N] int32 (``block * block_size + offset``; negative = skip).
      Pi: [D, D] (keys are stored as ``(k / (||k|| + 1e-8)) @ Pi^T``); centroids:
        [2**mse_bits] sorted. Both ignored with ``key_fp8``.
      mse_bits, key_packed_size, value_quant_bits, key_fp8: the layout (static; see
        :func:`tq4jax.vllm.preset`). config: Triton tiling (rows per program, warps).
    Returns:
      The cache with whole slots written (padding bytes zero; in place when donated).
    """
    kv_cache, key, value, slots, rotation, centroids, lay = check_store(
        kv_cache, key, value, slot_mapping, Pi, centroids, mse_bits, key_packed_size,
        value_quant_bits, key_fp8)
    n, h, d = key.shape
    path = resolve_impl(impl)
    config = check_config(config, CodecConfig, path, "turboquant_store") or STORE_TILING
    if n == 0:
        return kv_cache
    if path == "reference":
        rows = ref.slots(key, value, rotation, centroids, lay)
    else:
        rot = jnp.eye(d, dtype=jnp.float32) if rotation is None else rotation
        rows = triton.vllm.store(key.reshape(n * h, d), value.reshape(n * h, d), rot, centroids,
                                 lay=lay, config=config, mode=kernel_mode())
        rows = rows.reshape(n, h, lay.slot_bytes)
    return _scatter_slots(kv_cache, rows, slots)


def turboquant_decode(query: ArrayLike, kv_cache: ArrayLike, block_table: ArrayLike,
                      seq_lens: ArrayLike, Pi: ArrayLike, centroids: ArrayLike, scale: float,
                      mse_bits: int, key_packed_size: int, value_quant_bits: int,
                      key_fp8: bool = False, norm_correction: bool = False,
                      max_num_kv_splits: int = 32, *,
                      local_window_size: int | tuple[int, int] | None = None,
                      logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                      config: DecodeConfig | None = None, impl: str = "auto") -> jax.Array:
    """One query per sequence against a vLLM TurboQuant cache.

    Args:
      query: [B, H_Q, D] fp16/bf16 (raw: rotated inside by ``Pi^T`` unless ``key_fp8``).
      kv_cache: [num_blocks, block_size, H_KV, slot] uint8; block_table: [B, max_blocks]
        int32; seq_lens: [B] int32; centroids: [2**mse_bits] float32; scale: the softmax
        scale (static float).
      mse_bits ... norm_correction: the layout (static). max_num_kv_splits: the fixed split
        grid. local_window_size: keys the query (at position ``seq_len - 1``) sees: an int
        ``w`` or ``(w, right)`` - the last ``w + 1`` positions (right is moot for decode).
        logit_soft_cap: logits -> ``cap * tanh(logits / cap)`` (Gemma; static float).
        sinks: [H_Q] float per-head sink logits joining the softmax denominator.
        config: Triton tiling (:class:`~tq4jax.pallas_triton.tuning.DecodeConfig`), or a
        :class:`~tq4jax.pallas_mosaic.MosaicConfig` for the Mosaic backend (whose splits
        replace ``max_num_kv_splits``; None: :mod:`tq4jax.pallas_mosaic.tuning`'s rule).
      impl: :mod:`tq4jax.backend`; ``"mosaic"`` (Hopper) serves D=128 with every preset,
        fp16 queries, block_size 8/16/32/64, H_KV * slot a multiple of 16 bytes (8 KV heads
        at D=128), no window, soft cap or sinks; ``"auto"`` takes it there on an sm_90+ GPU
        for 4-bit or fp8 keys and 4-bit values at B >= 8 over a table of >= 8K keys
        (measured faster, :mod:`tq4jax.pallas_mosaic.tuning`) unless ``config`` is a Triton
        ``DecodeConfig``.
    Returns:
      [B, H_Q, D] in query's dtype. Positions past ``seq_lens`` (or past the block table)
      are never read; block ids are clamped into the cache; length 0 gives zeros.
    """
    raw_centroids = centroids
    query, kv_cache, block_table, seq_lens, rotation, centroids, lay, nc, scale = check_decode(
        query, kv_cache, block_table, seq_lens, Pi, centroids, scale, mse_bits,
        key_packed_size, value_quant_bits, key_fp8, norm_correction, max_num_kv_splits)
    window, softcap, sinks = check_attention_extras(query.shape[1], local_window_size,
                                                    logit_soft_cap, sinks)
    b, hq, d = query.shape
    _, bs, hkv = kv_cache.shape[:3]
    mosaic_ok = (window is None and softcap is None and sinks is None
                 and query.dtype == jnp.float16  # the kernel's fp16 query tiles
                 and mosaic.vllm.supported(lay, hq // hkv, bs, hkv))
    capacity = block_table.shape[1] * bs
    prefer = (not isinstance(config, DecodeConfig)  # a Triton config asks for that backend
              and mosaic.tuning.prefer("vllm_decode_3bit" if any(mosaic.vllm.packed3(lay))
                                       else "vllm_decode", b, capacity))
    path = resolve_impl(impl, mosaic=mosaic_ok, prefer_mosaic=prefer)
    config = check_config(config, mosaic.MosaicConfig if path == "mosaic" else DecodeConfig,
                          path, "turboquant_decode")
    if path == "reference":
        return to_dtype(ref.decode(query, kv_cache, block_table, seq_lens, rotation, centroids,
                                   lay, nc, scale, window, softcap, sinks), query.dtype)
    if path == "mosaic":
        q_rot = (query.astype(jnp.float32) if lay.key_fp8 else
                 rotate_in_xla(query, rotation, jnp.float32)).reshape(b, hkv, hq // hkv, d)
        lens = jnp.clip(seq_lens, 0, capacity)
        out = mosaic.vllm.decode(q_rot, kv_cache, block_table, lens, pad_codebook(centroids),
                                 scale, lay=lay, norm_correction=nc,
                                 raw_centroids=raw_centroids, config=config,
                                 interpret=kernel_mode().interpret)
        return to_dtype(out.reshape(query.shape), query.dtype)
    config = config or vllm_decode_config(lay)
    ct = triton.vllm.compute_dtype(query.dtype, config.scores, lay.key_fp8)
    if lay.key_fp8:
        k_table, k_lut = centroids, False
    elif config.scores not in SCORE_MODES:
        raise ValueError(f"config.scores must be one of {SCORE_MODES}, got {config.scores!r}")
    elif config.scores == "split":
        (hi, hi_lut), (lo, lo_lut) = codebook_split_parts(centroids, ct, raw_centroids)
        k_table, k_lut = (hi, lo), (hi_lut, lo_lut)
    else:
        k_table, k_lut = codebook_parts(centroids, ct, raw_centroids)
    return triton.vllm.decode(query, kv_cache, block_table, seq_lens, rotation, k_table,
                              lay=lay, nc=nc, k_lut=k_lut, v_lut=value_table(ct)[1],
                              scale=scale, splits=max_num_kv_splits, cfg=config,
                              mode=kernel_mode(), sinks=sinks,
                              window_left=None if window is None else window[0],
                              softcap=softcap)


def full_dequant_kv(kv_cache: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike,
                    centroids: ArrayLike, mse_bits: int, key_packed_size: int,
                    value_quant_bits: int, key_fp8: bool = False, norm_correction: bool = False, *,
                    head_dim: int | None = None, max_seq: int | None = None,
                    config: CodecConfig | None = None, impl: str = "auto"
                   ) -> tuple[jax.Array, jax.Array]:
    """Dequantize every cached token (continuation prefill).

    Args:
      kv_cache, block_table, seq_lens, centroids and the layout: as
        :func:`turboquant_decode`. head_dim: defaults to the one the slot size implies.
      max_seq: positions to return (static; default the block table's capacity).
      config: Triton tiling (positions per program, warps).
    Returns:
      (k, v) float16 [B, H_KV, max_seq, D]: k in rotated space (raw with ``key_fp8``), v
      dequantized; positions at or past ``seq_lens`` are zeros.
    """
    kv_cache, block_table, seq_lens, centroids, lay, nc, max_seq = check_dequant(
        kv_cache, block_table, seq_lens, centroids, mse_bits, key_packed_size,
        value_quant_bits, key_fp8, norm_correction, head_dim, max_seq)
    path = resolve_impl(impl)
    config = check_config(config, CodecConfig, path, "full_dequant_kv") or DEQUANT_TILING
    if path == "reference":
        k, v = ref.full_dequant(kv_cache, block_table, seq_lens, centroids, lay, nc, max_seq)
        return to_dtype(k, jnp.float16), to_dtype(v, jnp.float16)
    return triton.vllm.dequant(kv_cache, block_table, seq_lens, centroids, lay=lay, nc=nc,
                               max_seq=max_seq, config=config, mode=kernel_mode())


turboquant_store_reference = reference_of(turboquant_store)
turboquant_decode_reference = reference_of(turboquant_decode)
full_dequant_kv_reference = reference_of(full_dequant_kv)
