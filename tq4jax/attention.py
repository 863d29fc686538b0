"""Contiguous attention ops (LAYOUTS.md A1): argument checks and backend dispatch.

* :func:`flash_attention`: dense fp16/bf16 K/V;
* :func:`flash_attention_tq4`: TQ4-compressed K, dense V;
* :func:`flash_attention_tq4_kv`: TQ4-compressed K and V.

Shapes: q [B, H_Q, Sq, D] fp16/bf16; k/v [B, H_KV, Sk, D]; codes [B, H_KV, Sk, D/2] uint8;
norms [B, H_KV, Sk] (or [..., 1]) f32; output [B, H_Q, Sq, D] in q's dtype. Causal masking
aligns the last query with the last key; rows with no visible key give zeros.
``centroids`` come from :func:`tq4jax.lloyd_max`, ``rotation`` from
:func:`tq4jax.haar_rotation`: the ones the codes were written with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks as ck
from . import pallas_triton as triton
from .backend import check_config, kernel_mode, reference_of, resolve_impl
from . import pallas_mosaic as mosaic
from .core import LOG2E, default_scale, post_rotate, rotate_in_xla, rotation_parts
from .layout import pad_codebook, to_dtype
from .pallas_triton.attention import AttnSpec, Codes
from .pallas_triton.lut import codebook_parts
from .pallas_triton.tuning import Config, choose_config, rotate_in_kernel
from .reference import attention as ref
from .reference.codec import dequantize

__all__ = ["flash_attention", "flash_attention_tq4", "flash_attention_tq4_kv",
           "flash_attention_reference", "flash_attention_tq4_reference",
           "flash_attention_tq4_kv_reference", "attention_reference", "Config"]


def _check_q(q: Any) -> jax.Array:
    q = ck.as_array("q", q)
    ck.check_dtype("q", q, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("q", q, 4, "[batch, heads_q, seq_q, head_dim]")
    ck.check_head_dim("q", q.shape[-1])
    return q


def _check_kv(name: str, x: Any, q: jax.Array, last: int, like: jax.Array | None = None,
              dtype: Any = None) -> jax.Array:
    """[B, H_KV, Sk, ``last``] matching q (and ``like``'s H_KV and Sk), dtype ``dtype``."""
    x = ck.as_array(name, x)
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have q's dtype {dtype}, got {x.dtype}")
    b, hq = q.shape[0], q.shape[1]
    if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != last:
        raise ValueError(f"{name} must have shape [{b}, heads_kv, seq_kv, {last}] to match q "
                         f"{tuple(q.shape)}, got {tuple(x.shape)}")
    if hq % x.shape[1]:
        raise ValueError(f"{name}: heads_q ({hq}) must be a multiple of heads_kv "
                         f"({x.shape[1]})")
    if like is not None and x.shape[1:3] != like.shape[1:3]:
        raise ValueError(f"{name} must have heads_kv and seq_kv {tuple(like.shape[1:3])}, got "
                         f"{tuple(x.shape)}")
    return x


def _check_codes(pname: str, nname: str, packed: Any, norms: Any, q: jax.Array,
                 like: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    packed, norms = ck.check_packed(packed, norms, pname, nname)
    _check_kv(pname, packed, q, q.shape[-1] // 2, like)
    return packed, norms


def _check_mask(mask: Any, q: jax.Array, sk: int) -> jax.Array | None:
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


def _check_lengths(kv_lengths: Any, q_offsets: Any, q: jax.Array) -> jax.Array | None:
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
        out.append(ck.check_batch_ints(name, x, b))
    return jnp.concatenate(out)


def _run(q, k, v, rotation, mask, lens, *, causal: bool, scale: float, config,
         raw_k=None, raw_v=None, impl: str, offsets: bool = False, window=None, softcap=None,
         sinks=None) -> jax.Array:
    """The common tail of the three ops after their checks: empty shapes, the reference
    path, or a kernel backend (``k``/``v`` dense arrays or (codes, norms, centroids) triples;
    ``offsets``: the caller gave q_offsets; window, softcap, sinks: see the ops)."""
    b, hq, sq, d = q.shape
    compressed_k, compressed_v = isinstance(k, tuple), isinstance(v, tuple)
    hkv, sk = (k[0] if compressed_k else k).shape[1:3]
    group = hq // hkv
    plain = mask is None and window is None and softcap is None and sinks is None
    mosaic_ok = (compressed_k and plain and not (causal and offsets)
                 and (compressed_v or v.dtype == jnp.float16)  # dense V: fp16 tiles
                 and mosaic.supported(d, group, sq, sk))
    path = resolve_impl(impl, mosaic=mosaic_ok)
    config = check_config(config, mosaic.MosaicConfig if path == "mosaic" else Config, path,
                          "attention")
    if sq == 0 or sk == 0 or b == 0:
        return jnp.zeros(q.shape, q.dtype)
    if path == "reference":
        kd = dequantize(*k[:2], k[2], rotation, jnp.float32) if compressed_k else k
        vd = dequantize(*v[:2], v[2], rotation, jnp.float32) if compressed_v else v
        return ref.contiguous(q, kd, vd, scale, causal, mask, lens, window, softcap, sinks)
    if path == "mosaic":
        kv_len = jnp.full((b,), sk, jnp.int32) if lens is None else jnp.clip(lens[:b], 0, sk)
        q_rot = rotate_in_xla(q, rotation, jnp.float32).reshape(b, hkv, group, d)
        vc, vn, vt = (v[0], v[1], pad_codebook(v[2])) if compressed_v else (v, None, None)
        out = mosaic.decode(q_rot, k[0], k[1], vc, vn, pad_codebook(k[2]), vt, kv_len, scale,
                            raw_k=raw_k, raw_v=raw_v, config=config,
                            interpret=kernel_mode().interpret)
        if compressed_v:
            out = post_rotate(out, rotation)
        return to_dtype(out.reshape(q.shape), q.dtype)
    cfg = config or choose_config(b, hkv, group * sq, sk, d, compressed=compressed_k)
    in_kernel = rotate_in_kernel(d, group * sq)
    rot = None if rotation is None else rotation_parts(rotation, q.dtype)

    def parts(x, raw):
        if not isinstance(x, tuple):
            return x, None
        table, lut = codebook_parts(x[2], q.dtype, raw)
        return Codes(x[0], x[1], table), lut

    (kk, k_lut), (vv, v_lut) = parts(k, raw_k), parts(v, raw_v)
    if compressed_k and not in_kernel:
        q = rotate_in_xla(q, rotation)
    spec = AttnSpec(cfg, group, sq, sk, d, scale * LOG2E, causal, k_lut=k_lut,
                    v_lut=v_lut, rot_q=compressed_k and in_kernel,
                    post=compressed_v and in_kernel,
                    mask_heads=mask is not None and mask.shape[1] > 1, window=window,
                    softcap=softcap)
    return triton.attention.attention(q, kk, vv, rot, mask, lens, sinks, spec=spec,
                                      mode=kernel_mode())


_LENGTHS_DOC = """
      kv_lengths: [B] int (optional): batch row b sees keys ``[0, kv_lengths[b])`` only (a
        fixed-capacity cache).
      q_offsets: [B] int: the position of row b's first query for the causal mask (default
        ``kv_lengths - Sq``: the last query at the last valid key). Rows with no visible key
        give zeros.
      local_window_size: int or (left, right): the query at position p sees keys
        ``[p - left, p + right]`` only (sliding window; with is_causal, right is moot).
      logit_soft_cap: static float c: logits become ``c * tanh(logits / c)`` (Gemma) before
        ``attention_mask``.
      sinks: [H_Q] float: one logit per query head that joins every row's softmax
        denominator (attention sinks) without a value.
      config: the backend's tiling: Triton :class:`tq4jax.pallas_triton.tuning.Config` (None =
        :func:`~tq4jax.pallas_triton.tuning.choose_config`), Mosaic
        :class:`tq4jax.pallas_mosaic.MosaicConfig`.
      impl: "auto" | "pallas" | "triton" | "mosaic" | "reference" (:mod:`tq4jax.backend`;
        ``mosaic``: flash_attention_tq4_kv and flash_attention_tq4 (fp16 V) decode only,
        D=128, no mask).
    Returns:
      [B, H_Q, Sq, D] in q's dtype."""


def flash_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, sm_scale: float | None = None,
                    is_causal: bool = False, attention_mask: ArrayLike | None = None, *,
                    kv_lengths: ArrayLike | None = None, q_offsets: ArrayLike | None = None,
                    local_window_size: int | tuple[int, int] | None = None,
                    logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                    config: Config | None = None, impl: str = "auto") -> jax.Array:
    """FlashAttention-2 forward on dense fp16/bf16 K/V with GQA, causal and additive masks.

    Args:
      q: [B, H_Q, Sq, D] fp16/bf16; k, v: [B, H_KV, Sk, D] in q's dtype (H_Q % H_KV == 0,
        K/V never repeated in memory).
      sm_scale: softmax scale (static float; None = 1/sqrt(D)); is_causal: bottom-right causal.
      attention_mask: additive float mask broadcastable to [B, H_Q, Sq, Sk]."""
    q = _check_q(q)
    k = _check_kv("k", k, q, q.shape[-1], dtype=q.dtype)
    v = _check_kv("v", v, q, q.shape[-1], k, dtype=q.dtype)
    window, cap, sinks = ck.check_attention_extras(q.shape[1], local_window_size,
                                                   logit_soft_cap, sinks)
    return _run(q, k, v, None, _check_mask(attention_mask, q, k.shape[2]),
                _check_lengths(kv_lengths, q_offsets, q), causal=bool(is_causal),
                scale=default_scale(q.shape[-1], sm_scale), config=config, impl=impl,
                window=window, softcap=cap, sinks=sinks)


def flash_attention_tq4(q: ArrayLike, k_packed: ArrayLike, k_norms: ArrayLike, v: ArrayLike,
                        centroids: ArrayLike, rotation: ArrayLike, sm_scale: float | None = None,
                        is_causal: bool = False, *, attention_mask: ArrayLike | None = None,
                        kv_lengths: ArrayLike | None = None, q_offsets: ArrayLike | None = None,
                        local_window_size: int | tuple[int, int] | None = None,
                        logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                        config: Config | None = None, impl: str = "auto") -> jax.Array:
    """Attention with TQ4-compressed K (decoded in the kernel) and dense fp16/bf16 V.

    Args:
      q: [B, H_Q, Sq, D] fp16/bf16; k_packed [B, H_KV, Sk, D/2] uint8, k_norms [B, H_KV, Sk]
        f32; v [B, H_KV, Sk, D] in q's dtype; centroids [2**bits] f32; rotation Pi [D, D].
      sm_scale, is_causal, attention_mask: as :func:`flash_attention`."""
    q = _check_q(q)
    k_packed, k_norms = _check_codes("k_packed", "k_norms", k_packed, k_norms, q)
    v = _check_kv("v", v, q, q.shape[-1], k_packed, dtype=q.dtype)
    window, cap, sinks = ck.check_attention_extras(q.shape[1], local_window_size,
                                                   logit_soft_cap, sinks)
    return _run(q, (k_packed, k_norms, ck.check_centroids(centroids)), v,
                ck.check_rotation(rotation, q.shape[-1]),
                _check_mask(attention_mask, q, k_packed.shape[2]),
                _check_lengths(kv_lengths, q_offsets, q), causal=bool(is_causal),
                scale=default_scale(q.shape[-1], sm_scale), config=config, raw_k=centroids,
                impl=impl, window=window, softcap=cap, sinks=sinks)


def flash_attention_tq4_kv(q: ArrayLike, k_packed: ArrayLike, k_norms: ArrayLike,
                           v_packed: ArrayLike, v_norms: ArrayLike, centroids: ArrayLike,
                           rotation: ArrayLike, sm_scale: float | None = None,
                           is_causal: bool = False, v_centroids: ArrayLike | None = None, *,
                           attention_mask: ArrayLike | None = None,
                           kv_lengths: ArrayLike | None = None, q_offsets: ArrayLike | None = None,
                           local_window_size: int | tuple[int, int] | None = None,
                           logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
                           config: Config | None = None, impl: str = "auto") -> jax.Array:
    """Attention with TQ4-compressed K and V, both decoded in the kernel.

    Args:
      q: [B, H_Q, Sq, D] fp16/bf16; k_packed/v_packed [B, H_KV, Sk, D/2] uint8;
        k_norms/v_norms [B, H_KV, Sk] f32; centroids [2**bits] f32 (K's codebook);
        rotation Pi [D, D]; v_centroids: V's codebook when it differs from K's (e.g. K 4-bit,
        V 3-bit), None = ``centroids``.
      sm_scale, is_causal, attention_mask: as :func:`flash_attention`."""
    raw_k, raw_v = centroids, (centroids if v_centroids is None else v_centroids)
    q = _check_q(q)
    k_packed, k_norms = _check_codes("k_packed", "k_norms", k_packed, k_norms, q)
    v_packed, v_norms = _check_codes("v_packed", "v_norms", v_packed, v_norms, q, k_packed)
    centroids = ck.check_centroids(centroids)
    vc = centroids if v_centroids is None else ck.check_centroids(v_centroids, "v_centroids")
    window, cap, sinks = ck.check_attention_extras(q.shape[1], local_window_size,
                                                   logit_soft_cap, sinks)
    return _run(q, (k_packed, k_norms, centroids), (v_packed, v_norms, vc),
                ck.check_rotation(rotation, q.shape[-1]),
                _check_mask(attention_mask, q, k_packed.shape[2]),
                _check_lengths(kv_lengths, q_offsets, q), causal=bool(is_causal),
                scale=default_scale(q.shape[-1], sm_scale), config=config, raw_k=raw_k,
                raw_v=raw_v, impl=impl, offsets=q_offsets is not None, window=window,
                softcap=cap, sinks=sinks)


for _op in (flash_attention, flash_attention_tq4, flash_attention_tq4_kv):
    _op.__doc__ += _LENGTHS_DOC

flash_attention_reference = reference_of(flash_attention)
flash_attention_tq4_reference = reference_of(flash_attention_tq4)
flash_attention_tq4_kv_reference = reference_of(flash_attention_tq4_kv)
#: The reference of :func:`flash_attention` (kept under its historic name).
attention_reference = flash_attention_reference
