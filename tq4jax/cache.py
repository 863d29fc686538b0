"""KV caches for jit-ed model code: a TQ4-compressed cache and its dense fp16 counterpart.

Both are pytrees with static shapes (fixed capacity), one entry per layer (a tuple, so a layer's
arrays go to the kernels without a slice copy), per-row lengths, and the same two methods:

* ``cache.update(layer, key, value, new_lengths=None)``: store new tokens of every batch row
  after its current length (key/value BTNH [B, T, H_KV, D]; ``new_lengths`` [B] counts the
  valid tokens of a right-padded batch, default T). The compressed cache compresses in the
  codec kernel and writes with a scatter, in place when the caller donates the cache under jit.
* ``cache.attend(layer, query, new_lengths=None)``: causal attention of query BTNH
  [B, T, H_Q, D] (the tokens just stored) over the layer's cached keys. The compressed cache
  runs ``flash_attention_tq4_kv`` with per-row key counts: the decoded K/V never exist in
  device memory.

:func:`tq4jax.dot_product_attention` wraps both in a ``jax.nn.dot_product_attention``-style call.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
from jax.experimental import checkify

from .attention import flash_attention_tq4_kv
from .codebook import haar_rotation, lloyd_max
from .codec import compress_kv
from .layout import NORM_BYTES

__all__ = ["TQ4Spec", "TQ4Cache", "DenseCache"]


@dataclasses.dataclass(frozen=True)
class TQ4Spec:
    """Static description of a TQ4 compression: head dim, K and V bits, rotation seed.
    Hashable (a jit static argument); the numpy rotation and codebooks derive from it."""
    head_dim: int
    k_bits: int = 4
    v_bits: int = 4
    seed: int = 42

    @property
    def rotation(self) -> np.ndarray:
        return _rotation(self.head_dim, self.seed)

    def codebook(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(centroids, boundaries) of ``which`` = "k" or "v"."""
        return _codebook(self.head_dim, self.k_bits if which == "k" else self.v_bits)

    def bytes_per_token_head(self) -> int:
        """Compressed bytes of one K or V vector: D/2 code bytes + a float32 norm."""
        return self.head_dim // 2 + NORM_BYTES


@functools.lru_cache(maxsize=None)
def _rotation(d: int, seed: int) -> np.ndarray:
    r = haar_rotation(d, seed=seed)
    r.setflags(write=False)
    return r


@functools.lru_cache(maxsize=None)
def _codebook(d: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    c, b = lloyd_max(d, bits)
    c.setflags(write=False)
    b.setflags(write=False)
    return c, b


def _check_layer(layer: Any, n: int) -> int:
    if isinstance(layer, jax.core.Tracer) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be a Python int (static), got {type(layer).__name__}")
    if not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n}), got {layer}")
    return int(layer)


def _check_new(name: str, x: Any, b: int, h: int, d: int) -> jnp.ndarray:
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[0] != b or x.shape[2] != h or x.shape[3] != d:
        raise ValueError(f"{name} must have shape [{b}, tokens, {h}, {d}] (BTNH), "
                         f"got {tuple(x.shape)}")
    return x


def _positions(lengths: jnp.ndarray, t: int, new_lengths: Any, capacity: int,
               checked: bool = False):
    """Target positions [B, T] of new tokens (``capacity`` = dropped: padding or overflow) and
    the new lengths [B]. Overflow (a row's length + its new tokens > ``capacity``) raises a
    ValueError when the lengths are concrete; traced, the excess tokens are dropped and the
    length clamps, unless ``checked`` (then a ``checkify`` check, see :meth:`TQ4Cache.update`)."""
    b = lengths.shape[0]
    if new_lengths is not None:
        new_lengths = jnp.asarray(new_lengths)
        if new_lengths.shape != (b,) or not jnp.issubdtype(new_lengths.dtype, jnp.integer):
            raise ValueError(f"new_lengths must be an integer array of shape ({b},), got "
                             f"{new_lengths.dtype}{tuple(new_lengths.shape)}")
    n_new = jnp.full((b,), t, jnp.int32) if new_lengths is None else jnp.clip(
        new_lengths.astype(jnp.int32), 0, t)
    total = lengths + n_new
    if not isinstance(total, jax.core.Tracer):
        over = np.flatnonzero(np.asarray(total) > capacity)
        if over.size:
            r = int(over[0])
            raise ValueError(f"cache overflow: row {r} holds {int(lengths[r])} tokens, "
                             f"{int(n_new[r])} more exceed the capacity {capacity}")
    elif checked:
        checkify.check(jnp.all(total <= capacity), f"cache overflow: a row's length + new "
                       f"tokens exceeds the capacity {capacity}")
    pos = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    ok = (jnp.arange(t)[None, :] < n_new[:, None]) & (pos < capacity)
    return jnp.where(ok, pos, capacity), jnp.minimum(lengths + n_new, capacity)


def _scatter(buf: jnp.ndarray, pos: jnp.ndarray, val: jnp.ndarray) -> jnp.ndarray:
    """buf [B, H, C, ...] <- val [B, T, H, ...] at positions pos [B, T] (C: dropped)."""
    b, t, h = val.shape[:3]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, None, :]
    return buf.at[bi, hi, pos[:, :, None]].set(val.astype(buf.dtype), mode="drop")


def _reset(lengths: tuple, rows: Any) -> tuple:
    """Per-layer lengths with ``rows`` (indices or a [B] boolean mask) set to 0."""
    rows = jnp.asarray(rows)
    b = lengths[0].shape[0]
    if rows.dtype == jnp.bool_:
        if rows.shape != (b,):
            raise ValueError(f"rows as a mask must have shape ({b},), got {tuple(rows.shape)}")
        return tuple(jnp.where(rows, 0, x) for x in lengths)
    if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise TypeError(f"rows must be integer indices or a boolean mask, got {rows.dtype}")
    return tuple(x.at[rows].set(0, mode="drop") for x in lengths)


def _replace(tup: tuple, i: int, x: Any) -> tuple:
    return tup[:i] + (x,) + tup[i + 1:]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k_codes", "k_norms", "v_codes", "v_norms", "lengths"],
                   meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class TQ4Cache:
    """Compressed KV cache: per layer K/V codes uint8 [B, H_KV, C, D/2], norms f32
    [B, H_KV, C] and lengths int32 [B]. Create with :meth:`create`."""
    k_codes: tuple
    k_norms: tuple
    v_codes: tuple
    v_norms: tuple
    lengths: tuple
    spec: TQ4Spec

    @classmethod
    def create(cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int,
               head_dim: int, *, k_bits: int = 4, v_bits: int = 4, seed: int = 42) -> "TQ4Cache":
        """An empty cache of ``capacity`` tokens per row. ``k_bits``/``v_bits`` (1-4) pick
        the Lloyd-Max codebooks; codes always take a nibble, so a vector costs D/2 + 4 bytes
        whatever the bits (fewer bits trade accuracy, not memory)."""
        spec = TQ4Spec(head_dim, k_bits, v_bits, seed)
        codes = (batch, num_kv_heads, capacity, head_dim // 2)
        rep = lambda f: tuple(f() for _ in range(num_layers))  # noqa: E731
        return cls(rep(lambda: jnp.zeros(codes, jnp.uint8)),
                   rep(lambda: jnp.zeros(codes[:3], jnp.float32)),
                   rep(lambda: jnp.zeros(codes, jnp.uint8)),
                   rep(lambda: jnp.zeros(codes[:3], jnp.float32)),
                   rep(lambda: jnp.zeros((batch,), jnp.int32)), spec)

    @property
    def num_layers(self) -> int:
        return len(self.k_codes)

    @property
    def capacity(self) -> int:
        return self.k_codes[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V data (codes + norms; lengths excluded)."""
        return sum(x.size * x.dtype.itemsize for f in (self.k_codes, self.k_norms, self.v_codes,
                                                       self.v_norms) for x in f)

    def dense_nbytes(self, dtype: Any = jnp.float16) -> int:
        """Bytes of the dense cache of the same capacity that this one replaces."""
        b, h, c, _ = self.k_codes[0].shape
        return 2 * self.num_layers * b * h * c * self.spec.head_dim * jnp.dtype(dtype).itemsize

    def update(self, layer: int, key: ArrayLike, value: ArrayLike,
               new_lengths: ArrayLike | None = None, *, checked: bool = False, impl: str = "auto"
              ) -> "TQ4Cache":
        """Compress and store new tokens (BTNH [B, T, H_KV, D]) after each row's length.

        Overflow (a row's length + new tokens > capacity) is a ValueError when the lengths
        are concrete (eager use). Under ``jax.jit`` they are traced: the tokens past the
        capacity are dropped and the length clamps at the capacity, unless ``checked=True``,
        which adds a ``jax.experimental.checkify`` check (run the step through
        ``checkify.checkify`` and ``err.throw()``)."""
        layer = _check_layer(layer, self.num_layers)
        b, h, c, _ = self.k_codes[layer].shape
        d = self.spec.head_dim
        key, value = _check_new("key", key, b, h, d), _check_new("value", value, b, h, d)
        pos, lens = _positions(self.lengths[layer], key.shape[1], new_lengths, c, checked)
        rot = self.spec.rotation
        kp, kn, vp, vn = compress_kv(key, value, rot, self.spec.codebook("k")[1],
                                     self.spec.codebook("v")[1], impl=impl)
        return dataclasses.replace(
            self,
            k_codes=_replace(self.k_codes, layer, _scatter(self.k_codes[layer], pos, kp)),
            k_norms=_replace(self.k_norms, layer, _scatter(self.k_norms[layer], pos, kn)),
            v_codes=_replace(self.v_codes, layer, _scatter(self.v_codes[layer], pos, vp)),
            v_norms=_replace(self.v_norms, layer, _scatter(self.v_norms[layer], pos, vn)),
            lengths=_replace(self.lengths, layer, lens))

    def reset(self, rows: Any) -> "TQ4Cache":
        """The cache with batch ``rows`` (int array, or a boolean mask [B]) emptied in every
        layer (lengths 0; their old codes are never read again): a finished sequence's row
        handed to a new one."""
        return dataclasses.replace(self, lengths=_reset(self.lengths, rows))

    def attend(self, layer: int, query: ArrayLike, new_lengths: ArrayLike | None = None, *,
               scale: float | None = None, is_causal: bool = True,
               local_window_size: int | tuple[int, int] | None = None,
               logit_soft_cap: float | None = None, sinks: ArrayLike | None = None,
               impl: str = "auto") -> jnp.ndarray:
        """Attention of the T tokens just stored (query BTNH [B, T, H_Q, D] fp16/bf16) over
        the layer's cache; returns BTNH in query's dtype. Query t of row b sits at position
        ``lengths[b] - new_lengths[b] + t``. ``local_window_size``, ``logit_soft_cap``,
        ``sinks``: as :func:`tq4jax.flash_attention`."""
        layer = _check_layer(layer, self.num_layers)
        query = jnp.asarray(query)
        lens = self.lengths[layer]
        t = query.shape[1]
        n_new = t if new_lengths is None else jnp.clip(jnp.asarray(new_lengths, jnp.int32), 0, t)
        c, rot = self.spec.codebook("k")[0], self.spec.rotation
        # one query at position lens - n_new >= lens - 1 sees every stored key: the causal
        # mask is moot, and without it the decode-only kernels (impl="mosaic") can serve it
        causal = bool(is_causal) and (t > 1 or local_window_size is not None)
        out = flash_attention_tq4_kv(
            jnp.swapaxes(query, 1, 2), self.k_codes[layer], self.k_norms[layer],
            self.v_codes[layer], self.v_norms[layer], c, rot, scale, causal,
            v_centroids=self.spec.codebook("v")[0], kv_lengths=lens,
            q_offsets=lens - n_new if causal or local_window_size is not None else None,
            local_window_size=local_window_size, logit_soft_cap=logit_soft_cap, sinks=sinks,
            impl=impl)
        return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"],
                   meta_fields=["implementation"])
@dataclasses.dataclass(frozen=True)
class DenseCache:
    """Dense KV cache with :class:`TQ4Cache`'s interface: per layer K/V [B, C, H_KV, D]
    (BTNH, as ``jax.nn.dot_product_attention`` takes them) and lengths int32 [B].
    ``implementation``: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn")."""
    k: tuple
    v: tuple
    lengths: tuple
    implementation: str | None = None

    @classmethod
    def create(cls, num_layers: int, batch: int, num_kv_heads: int, capacity: int,
               head_dim: int, dtype: Any = jnp.float16,
               implementation: str | None = None) -> "DenseCache":
        shape = (batch, capacity, num_kv_heads, head_dim)
        rep = lambda f: tuple(f() for _ in range(num_layers))  # noqa: E731
        return cls(rep(lambda: jnp.zeros(shape, dtype)), rep(lambda: jnp.zeros(shape, dtype)),
                   rep(lambda: jnp.zeros((batch,), jnp.int32)), implementation)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for f in (self.k, self.v) for x in f)

    def update(self, layer: int, key: ArrayLike, value: ArrayLike,
               new_lengths: ArrayLike | None = None, *, checked: bool = False) -> "DenseCache":
        """As :meth:`TQ4Cache.update` (same overflow rule), stored in fp16."""
        layer = _check_layer(layer, self.num_layers)
        b, c, h, d = self.k[layer].shape
        key, value = _check_new("key", key, b, h, d), _check_new("value", value, b, h, d)
        pos, lens = _positions(self.lengths[layer], key.shape[1], new_lengths, c, checked)
        bi = jnp.arange(b)[:, None]
        put = lambda buf, x: buf.at[bi, pos].set(x.astype(buf.dtype), mode="drop")  # noqa: E731
        return dataclasses.replace(self, k=_replace(self.k, layer, put(self.k[layer], key)),
                                   v=_replace(self.v, layer, put(self.v[layer], value)),
                                   lengths=_replace(self.lengths, layer, lens))

    def reset(self, rows: Any) -> "DenseCache":
        """As :meth:`TQ4Cache.reset`."""
        return dataclasses.replace(self, lengths=_reset(self.lengths, rows))

    def attend(self, layer: int, query: ArrayLike, new_lengths: ArrayLike | None = None, *,
               scale: float | None = None, is_causal: bool = True,
               local_window_size: int | tuple[int, int] | None = None,
               logit_soft_cap: float | None = None, sinks: ArrayLike | None = None) -> jnp.ndarray:
        """As :meth:`TQ4Cache.attend`, on the dense K/V (``jax.nn.dot_product_attention``:
        no soft cap, no sinks)."""
        if logit_soft_cap is not None or sinks is not None:
            raise ValueError("DenseCache attends with jax.nn.dot_product_attention: no "
                             "logit_soft_cap or sinks")
        layer = _check_layer(layer, self.num_layers)
        query = jnp.asarray(query)
        k, v, lens = self.k[layer], self.v[layer], self.lengths[layer]
        t, c = query.shape[1], k.shape[1]
        query = query.astype(k.dtype)
        if jax.default_backend() == "cpu":  # XLA:CPU has no fp16 x fp16 -> f32 dot
            query, k, v = (x.astype(jnp.float32) for x in (query, k, v))
        if (t == 1 or not is_causal) and local_window_size is None:  # every stored key
            return jax.nn.dot_product_attention(query, k, v, scale=scale,
                                                key_value_seq_lengths=lens,
                                                implementation=self.implementation)
        n_new = t if new_lengths is None else jnp.clip(jnp.asarray(new_lengths, jnp.int32), 0, t)
        pos = (lens - n_new)[:, None, None, None] + jnp.arange(t)[None, None, :, None]
        keys = jnp.arange(c)[None, None, None, :]
        mask = keys < lens[:, None, None, None]
        if is_causal:
            mask = mask & (keys <= pos)
        if local_window_size is not None:
            w = local_window_size
            left, right = (w, w) if isinstance(w, int) else w
            mask = mask & (keys >= pos - left) & (keys <= pos + right)
        return jax.nn.dot_product_attention(query, k, v, scale=scale, mask=mask)
