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

import jax.numpy as jnp

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


def dot_product_attention(query: Any, key: Any, value: Any, bias: Any = None, mask: Any = None,
                          *, scale: float | None = None, is_causal: bool = False,
                          query_seq_lengths: Any = None, key_value_seq_lengths: Any = None,
                          local_window_size: Any = None, implementation: str | None = None,
                          cache: TQ4Cache | DenseCache | None = None, layer: int | None = None,
                          spec: TQ4Spec | None = None):
    """``jax.nn.dot_product_attention`` on TQ4-compressed K/V.

    query [B, T, N, H], key/value [B, S, K, H] (BTNH; N % K == 0), fp16/bf16 query.

    * ``cache`` given (with ``layer``): key/value are the T new tokens; they are stored after
      each row's length (``query_seq_lengths`` [B]: valid new tokens of a right-padded batch)
      and the query attends over the cache, causal with the new tokens last
      (``is_causal=False``: every stored key). ``bias``, ``mask``, ``key_value_seq_lengths``
      and ``local_window_size`` are not supported with a cache. Returns ``(out, cache)``.
    * no cache: K/V are compressed with ``spec`` (default ``TQ4Spec(H)``) and attended by the
      fused kernel; ``is_causal`` is top-left aligned as in jax.nn; ``query_seq_lengths`` zeroes
      padded query rows. Returns ``out`` [B, T, N, H] in query's dtype.

    ``implementation`` is accepted for signature compatibility: None or "tq4jax".
    """
    if implementation not in (None, "tq4jax"):
        raise ValueError(f"implementation must be None or 'tq4jax', got {implementation!r}")
    if local_window_size is not None:
        raise ValueError("local_window_size is not supported by tq4jax attention")
    query = jnp.asarray(query)
    if query.ndim != 4:
        raise ValueError(f"query must have shape [batch, tokens, heads, head_dim] (BTNH), "
                         f"got {tuple(query.shape)}")
    if cache is not None:
        if layer is None:
            raise ValueError("layer is required with a cache")
        for name, x in (("bias", bias), ("mask", mask),
                        ("key_value_seq_lengths", key_value_seq_lengths)):
            if x is not None:
                raise ValueError(f"{name} is not supported with a cache (it tracks lengths)")
        cache = cache.update(layer, key, value, query_seq_lengths)
        out = cache.attend(layer, query, query_seq_lengths, scale=scale, is_causal=is_causal)
        return out.astype(query.dtype), cache
    key, value = jnp.asarray(key), jnp.asarray(value)
    b, t, _, d = query.shape
    if key.ndim != 4 or key.shape[0] != b or key.shape[-1] != d or value.shape != key.shape:
        raise ValueError(f"key and value must have shape [{b}, S, K, {d}] (BTNH), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    spec = TQ4Spec(d) if spec is None else spec
    rot = spec.rotation
    kp, kn, vp, vn = compress_kv(jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2), rot,
                                 spec.codebook("k")[1], spec.codebook("v")[1])
    s = key.shape[1]
    kv_len = (jnp.full((b,), s, jnp.int32) if key_value_seq_lengths is None
              else jnp.asarray(key_value_seq_lengths, jnp.int32))
    am = _additive(bias, mask)
    if am is not None:
        am = am.reshape((1,) * (4 - am.ndim) + am.shape)
    out = flash_attention_tq4_kv(jnp.swapaxes(query, 1, 2), kp, kn, vp, vn,
                                 spec.codebook("k")[0], rot, scale, is_causal,
                                 v_centroids=spec.codebook("v")[0], attention_mask=am,
                                 kv_lengths=kv_len, q_offsets=jnp.zeros((b,), jnp.int32))
    out = jnp.swapaxes(out, 1, 2)
    if query_seq_lengths is not None:
        keep = jnp.arange(t)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
        out = jnp.where(keep[:, :, None, None], out, 0)
    return out.astype(query.dtype)


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
