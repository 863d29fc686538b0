"""Drop-ins for attention calls in model code.

* :func:`dot_product_attention`: ``jax.nn.dot_product_attention``'s arguments (BTNH layout) plus
  ``cache`` and ``layer``. With a cache it stores the new keys/values and attends over the
  cache, returning ``(out, cache)``; without one it quantizes K/V on the fly (TQ4) and returns
  ``out``, for quality evaluation without a cache.
* :func:`make_attention_fn`: an ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``
  and ``flax.nnx.MultiHeadAttention`` (quantize-on-the-fly). Needs no flax import.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from . import _checks as ck
from .attention import flash_attention_tq4_kv
from .cache import DenseCache, TQ4Cache, TQ4Spec
from .codec import compress_kv

__all__ = ["dot_product_attention", "make_attention_fn"]


def _additive(bias: Any, mask: Any) -> jnp.ndarray | None:
    """jax.nn-style bias (float) and mask (bool, True = keep) -> one additive mask or None."""
    out = None if bias is None else jnp.asarray(bias, jnp.float32)
    if mask is not None:
        m = jnp.where(jnp.asarray(mask, bool), 0.0, -jnp.inf)
        out = m if out is None else out + m
    return out


def _check_lengths(name: str, x: Any, b: int) -> jnp.ndarray | None:
    """``query_seq_lengths`` / ``key_value_seq_lengths``: int [B] or None."""
    return None if x is None else ck.check_batch_ints(name, x, b)


def _check_broadcast(name: str, x: Any, want: tuple, kind: str) -> jnp.ndarray | None:
    """``bias`` (float) or ``mask`` (bool, or numbers: nonzero = attend) broadcastable to
    ``want`` = [B, N, T, S]."""
    if x is None:
        return None
    x = ck.as_array(name, x)
    if kind == "float":
        ck.check_float(name, x)
    if x.ndim > 4 or any(m not in (1, w) for m, w in zip(x.shape[::-1], want[::-1])):
        raise ValueError(f"{name} must broadcast to [batch, heads, q_len, kv_len] = {want}, got "
                         f"{tuple(x.shape)}")
    return x


def _check_qkv(query: Any, key: Any, value: Any, with_cache: bool):
    """BTNH query [B, T, N, H] (or TNH [T, N, H]) float; key/value [B, S, K, H] (or [S, K, H])
    of one shape, N % K == 0. Returns 4-D views and whether the inputs were 3-D."""
    query = ck.as_array("query", query)
    ck.check_float("query", query)
    ck.check_ndim("query", query, (3, 4), "[batch, q_len, num_heads, head_dim] (BTNH) or "
                  "[q_len, num_heads, head_dim]")
    unbatched = query.ndim == 3
    key, value = ck.as_array("key", key), ck.as_array("value", value)
    if unbatched:
        query = query[None]
        key, value = (x[None] if getattr(x, "ndim", 0) == 3 else x for x in (key, value))
    b, _, n, d = query.shape
    for name, x in (("key", key), ("value", value)):
        ck.check_float(name, x)
        if x.ndim != 4 or x.shape[0] != b or x.shape[3] != d:
            raise ValueError(f"{name} must have shape [{b}, kv_len, num_kv_heads, {d}] (BTNH, "
                             f"matching query {tuple(query.shape)}), got {tuple(x.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {tuple(key.shape)}, got "
                         f"{tuple(value.shape)}")
    if n % key.shape[2]:
        raise ValueError(f"query's num_heads ({n}) must be a multiple of key's num_kv_heads "
                         f"({key.shape[2]})")
    if with_cache and key.shape[1] != query.shape[1]:
        raise ValueError(f"with a cache, key/value are the new tokens: kv_len must equal "
                         f"query's q_len {query.shape[1]}, got {tuple(key.shape)}")
    return query, key, value, unbatched


def _check_scale(scale: Any) -> Any:
    """None, a Python float (compiled into the kernels) or a traced scalar (folded into q)."""
    if scale is None or isinstance(scale, jax.core.Tracer):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def _kernel_query(query: jax.Array, scale: Any) -> tuple[jax.Array, float | None]:
    """The query as the kernels take it (fp16/bf16; float32 -> float16) and the static scale:
    a traced ``scale`` is folded into the query (the kernels compile the scale in)."""
    dt = query.dtype if query.dtype in (jnp.float16, jnp.bfloat16) else jnp.float16
    if isinstance(scale, jax.core.Tracer):
        return (query.astype(jnp.float32) * scale).astype(dt), 1.0
    return query.astype(dt), scale


def _dead_rows(b, t, s, n, mask, kv_len, causal, window) -> jax.Array | None:
    """[B, N|1, T] rows that see no key (jax.nn gives them the mean of every value), or None
    when no row can be empty."""
    if mask is None and kv_len is None and window is None:
        return None
    keys, rows = jnp.arange(s)[None, None, None, :], jnp.arange(t)[None, None, :, None]
    vis = jnp.ones((1, 1, t, s), bool) if mask is None else jnp.asarray(mask, bool)
    vis = vis.reshape((1,) * (4 - vis.ndim) + vis.shape)
    if kv_len is not None:
        vis = vis & (keys < kv_len[:, None, None, None])
    if causal:
        vis = vis & (keys <= rows)
    if window is not None:
        vis = vis & (keys >= rows - window[0]) & (keys <= rows + window[1])
    return ~jnp.any(vis, axis=-1)


def dot_product_attention(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                          bias: ArrayLike | None = None, mask: ArrayLike | None = None, *,
                          scale: Any = None, is_causal: bool = False,
                          query_seq_lengths: ArrayLike | None = None,
                          key_value_seq_lengths: ArrayLike | None = None,
                          local_window_size: int | tuple[int, int] | None = None,
                          implementation: str | None = None, return_residual: bool = False,
                          cache: TQ4Cache | DenseCache | None = None, layer: int | None = None,
                          spec: TQ4Spec | None = None, logit_soft_cap: float | None = None,
                          sinks: ArrayLike | None = None):
    """``jax.nn.dot_product_attention`` on TQ4-compressed K/V, with jax.nn's arguments and
    results (within 4-bit quantization error).

    Args:
      query: [B, T, N, H] (BTNH) or [T, N, H]; float16/bfloat16/float32 (float32 runs the
        kernels in float16 and returns float32). key, value: [B, S, K, H] or [S, K, H],
        N % K == 0.
      bias, mask: as jax.nn (broadcastable to [B, N, T, S]; mask True = attend).
      scale: softmax scale; a traced value is folded into the query. is_causal: top-left
        causal mask as jax.nn. query_seq_lengths / key_value_seq_lengths: [B] int.
      local_window_size: int or (left, right): query t sees keys [t - left, t + right].
      implementation: None or "tq4jax" (the kernels on a GPU, the reference elsewhere),
        "triton" or "mosaic" (that kernel backend, :mod:`tq4jax.backend`; "mosaic" serves
        decode with a cache), "xla" (the pure-jnp reference path); "cudnn" is refused.
      return_residual: refused (True): the kernels return no log-sum-exp.
      cache, layer: a :class:`TQ4Cache` (or :class:`DenseCache`) and the layer index: key and
        value are the T new tokens; they are stored after each row's length
        (``query_seq_lengths``: the valid new tokens of a right-padded batch) and the query
        attends over the cache, causal with the new tokens last (``is_causal=False``: every
        stored key). ``bias``, ``mask`` and ``key_value_seq_lengths`` are refused with a cache.
      spec: the compression without a cache (default ``TQ4Spec(H)``).
      logit_soft_cap, sinks: logit soft-capping and per-head attention sinks (see
        :func:`tq4jax.flash_attention`).
    Returns:
      ``out`` in query's shape and dtype; with a cache ``(out, cache)``. As jax.nn: padded
      query rows give 0, rows that see no key give the mean of the values.
    """
    if implementation not in (None, "tq4jax", "triton", "mosaic", "xla"):
        raise ValueError(f"implementation must be None, 'tq4jax', 'triton', 'mosaic' or 'xla' "
                         f"(the reference path), got {implementation!r}")
    if return_residual:
        raise ValueError("return_residual=True is not supported by tq4jax attention")
    impl = {"xla": "reference", "triton": "triton", "mosaic": "mosaic"}.get(implementation,
                                                                             "auto")
    query, key, value, unbatched = _check_qkv(query, key, value, cache is not None)
    b, t, n, d = query.shape
    s = key.shape[1]
    scale = _check_scale(scale)
    q_lens = _check_lengths("query_seq_lengths", query_seq_lengths, b)
    kv_lens = _check_lengths("key_value_seq_lengths", key_value_seq_lengths, b)
    want = (b, n, t, s)
    bias = _check_broadcast("bias", bias, want, "float")
    mask = _check_broadcast("mask", mask, want, "bool")
    extras = dict(local_window_size=local_window_size, logit_soft_cap=logit_soft_cap,
                  sinks=sinks)
    q_kernel, kscale = _kernel_query(query, scale)
    if cache is not None:
        if layer is None:
            raise ValueError("layer is required with a cache")
        for name, x in (("bias", bias), ("mask", mask), ("key_value_seq_lengths", kv_lens)):
            if x is not None:
                raise ValueError(f"{name} is not supported with a cache (it tracks lengths)")
        cache = cache.update(layer, key, value, q_lens)
        out = cache.attend(layer, q_kernel, q_lens, scale=kscale, is_causal=is_causal,
                           **extras, **({} if isinstance(cache, DenseCache) else {"impl": impl}))
        out = out.astype(query.dtype)
        return (out[0] if unbatched else out), cache
    spec = TQ4Spec(d) if spec is None else spec
    rot = spec.rotation
    kp, kn, vp, vn = compress_kv(jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2), rot,
                                 spec.codebook("k")[1], spec.codebook("v")[1], impl=impl)
    kv_len = jnp.full((b,), s, jnp.int32) if kv_lens is None else kv_lens
    am = _additive(bias, mask)
    if am is not None:
        am = am.reshape((1,) * (4 - am.ndim) + am.shape)
    out = flash_attention_tq4_kv(jnp.swapaxes(q_kernel, 1, 2), kp, kn, vp, vn,
                                 spec.codebook("k")[0], rot, kscale, is_causal,
                                 v_centroids=spec.codebook("v")[0], attention_mask=am,
                                 kv_lengths=kv_len, q_offsets=jnp.zeros((b,), jnp.int32),
                                 impl=impl, **extras)
    out = jnp.swapaxes(out, 1, 2).astype(query.dtype)  # [B, T, N, H]
    window = local_window_size
    window = (window, window) if isinstance(window, (int, np.integer)) else window
    dead = _dead_rows(b, t, s, n, mask, kv_lens, is_causal, window)
    if dead is not None:  # jax.nn: softmax over all -large logits = the mean of every value
        mean_v = jnp.repeat(jnp.mean(value.astype(jnp.float32), axis=1), n // key.shape[2],
                            axis=1)  # [B, N, H]
        dead = jnp.swapaxes(jnp.broadcast_to(dead, (b, dead.shape[1], t)), 1, 2)  # [B, T, N|1]
        out = jnp.where(dead[..., None], mean_v[:, None].astype(out.dtype), out)
    if q_lens is not None:
        keep = jnp.arange(t)[None, :] < q_lens[:, None]
        out = jnp.where(keep[:, :, None, None], out, 0)
    return out[0] if unbatched else out


def make_attention_fn(spec: TQ4Spec | None = None) -> Callable[..., jnp.ndarray]:
    """An ``attention_fn`` for flax's attention modules that compresses K/V (TQ4, ``spec``;
    default 4-bit from the head dim) and runs the fused kernel. Query/key/value
    [batch..., length, heads, head_dim]; flax's boolean ``mask`` [batch..., heads|1, q, kv] and
    ``bias`` are honoured; dropout is not (inference only: a nonzero rate on a
    non-deterministic call raises)."""

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, is_causal=False, **unused):
        del broadcast_dropout, dropout_rng, precision, module, unused
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("tq4jax attention is inference-only: dropout is not supported")
        batch = query.shape[:-3]
        flat = lambda x: None if x is None else jnp.reshape(  # noqa: E731
            jnp.broadcast_to(x, batch + x.shape[-3:]) if x.ndim > 3 else x, (-1,) + x.shape[-3:])
        q, k, v = (jnp.reshape(x, (-1,) + x.shape[-3:]) for x in (query, key, value))
        in_dtype = q.dtype
        if q.dtype not in (jnp.float16, jnp.bfloat16):
            q = q.astype(jnp.float16)
        out = dot_product_attention(q, k, v, flat(bias), flat(mask), is_causal=is_causal,
                                    spec=spec or TQ4Spec(q.shape[-1]))
        return out.reshape(query.shape).astype(dtype or in_dtype)

    return attention_fn
