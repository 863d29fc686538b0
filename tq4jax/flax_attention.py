"""Flax NNX integration (needs the ``flax`` extra; ``import tq4jax`` does not import flax).

* :class:`TQ4MultiHeadAttention`: a drop-in for ``flax.nnx.MultiHeadAttention`` (same
  constructor arguments and parameter tree, plus ``k_bits``/``v_bits``/``seed``). Outside decode
  mode it is the stock module; in decode mode its cache is TQ4-compressed (codes + norms, per-row
  lengths) and attention runs the fused kernel on it. Unlike the stock module a decode call may
  carry several tokens (a prefill chunk). Cache overflow follows :meth:`TQ4Cache.update`:
  a ValueError in eager calls; under ``nnx.jit`` the tokens past ``max_length`` are dropped.
* :func:`swap_attention` / :func:`unswap_attention`: turn every ``nnx.MultiHeadAttention`` of
  a model into a :class:`TQ4MultiHeadAttention` and back, in place (the objects keep their
  parameters; only their class and TQ4 settings change).
* For linen, or nnx without a cache: ``attention_fn=tq4jax.make_attention_fn()``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from .cache import TQ4Cache, TQ4Spec

__all__ = ["TQ4MultiHeadAttention", "swap_attention", "unswap_attention"]

_CACHE_FIELDS = ("tq4_k_codes", "tq4_k_norms", "tq4_v_codes", "tq4_v_norms", "tq4_lengths")


class TQ4MultiHeadAttention(nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` with a TQ4-compressed decode cache (see module docs)."""

    def __init__(self, *args: Any, k_bits: int = 4, v_bits: int = 4, seed: int = 42,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tq4_spec = TQ4Spec(self.head_dim, k_bits, v_bits, seed)

    def init_cache(self, input_shape: tuple, dtype: Any = jnp.float16) -> None:
        """Compressed cache for inputs [batch, max_length, features] (one batch axis).
        ``dtype`` is the compute dtype of decode-mode attention (fp16/bf16; f32 -> fp16)."""
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (batch, max_length, features), got "
                             f"{tuple(input_shape)}")
        b, cap = input_shape[0], input_shape[1]
        c = TQ4Cache.create(1, b, self.num_kv_heads, cap, self.head_dim,
                            k_bits=self.tq4_spec.k_bits, v_bits=self.tq4_spec.v_bits,
                            seed=self.tq4_spec.seed)
        for name, x in zip(_CACHE_FIELDS, (c.k_codes, c.k_norms, c.v_codes, c.v_norms,
                                           c.lengths)):
            setattr(self, name, nnx.Cache(x[0]))
        self.tq4_dtype = jnp.dtype(dtype) if jnp.dtype(dtype) != jnp.float32 else jnp.float16

    def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
                 batch_size: int | tuple | None = None, max_length: int | None = None):
        """``nnx.view`` hook: like the stock module, but the decode cache is compressed."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and getattr(self, "tq4_k_codes", None) is None:
                if batch_size is None or max_length is None:
                    raise TypeError("'batch_size' and 'max_length' must be provided when "
                                    "initializing the cache")
                b = batch_size if isinstance(batch_size, int) else int(batch_size[0])
                self.init_cache((b, max_length, self.in_features),
                                self.dtype or jnp.float16)

    def _cache(self) -> TQ4Cache:
        if getattr(self, "tq4_k_codes", None) is None:
            raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
        vals = [(getattr(self, n)[...],) for n in _CACHE_FIELDS]
        return TQ4Cache(*vals, spec=self.tq4_spec)

    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
                 deterministic=None, rngs=None, sow_weights=False, decode=None,
                 is_causal=False, out_sharding=None, qkv_sharding=None):
        decode = self.decode if decode is None else decode
        if not decode:
            return super().__call__(inputs_q, inputs_k, inputs_v, mask=mask,
                                    deterministic=deterministic, rngs=rngs,
                                    sow_weights=sow_weights, decode=False, is_causal=is_causal,
                                    out_sharding=out_sharding, qkv_sharding=qkv_sharding)
        if mask is not None:
            raise ValueError("mask is not supported in TQ4 decode mode: the cache is causal "
                             "over each row's stored tokens")
        inputs_k = inputs_q if inputs_k is None else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but "
                             f"module expects {self.in_features}.")
        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)
        cache = self._cache().update(0, key, value)
        x = cache.attend(0, query.astype(self.tq4_dtype))
        for name, arr in zip(_CACHE_FIELDS, (cache.k_codes, cache.k_norms, cache.v_codes,
                                             cache.v_norms, cache.lengths)):
            getattr(self, name)[...] = arr[0]
        return self.out(x.astype(query.dtype), out_sharding=out_sharding)


def _attention_modules(model: nnx.Module, cls: type) -> list:
    return [m for _, m in nnx.iter_graph(model) if type(m) is cls]


def swap_attention(model: nnx.Module, *, k_bits: int = 4, v_bits: int = 4,
                   seed: int = 42) -> int:
    """Make every ``nnx.MultiHeadAttention`` in ``model`` a :class:`TQ4MultiHeadAttention`, in
    place, keeping its parameters; returns how many were swapped. Call ``init_cache`` (or
    ``nnx.view(..., decode=True, ...)``) afterwards for decode mode."""
    mods = _attention_modules(model, nnx.MultiHeadAttention)
    for m in mods:
        m.__class__ = TQ4MultiHeadAttention
        m.tq4_spec = TQ4Spec(m.head_dim, k_bits, v_bits, seed)
    return len(mods)


def unswap_attention(model: nnx.Module) -> int:
    """Inverse of :func:`swap_attention`: back to ``nnx.MultiHeadAttention`` (compressed caches
    are dropped); returns how many were restored."""
    mods = _attention_modules(model, TQ4MultiHeadAttention)
    for m in mods:
        for name in _CACHE_FIELDS + ("tq4_spec", "tq4_dtype"):
            if hasattr(m, name):
                delattr(m, name)
        m.__class__ = nnx.MultiHeadAttention
    return len(mods)
