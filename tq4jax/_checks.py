"""Argument checks shared by the ops: they run at trace time and raise TypeError/ValueError
naming the argument and what was expected."""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .layout import FLOAT_DTYPES, MAX_CACHE_BYTES, VALID_BOUNDARIES, VALID_CENTROIDS

MIN_DIM = 16
MAX_DIM = 512


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _forward_only(x: jnp.ndarray, name: str) -> jnp.ndarray:
    return x


@_forward_only.defjvp
def _no_gradient(name, primals, tangents):
    raise TypeError(
        f"tq4jax ops are forward-only (inference): they define no gradient, and argument "
        f"{name!r} is being differentiated. Wrap it in jax.lax.stop_gradient to differentiate "
        f"the rest of the program around the op.")


def as_array(name: str, x: Any) -> jnp.ndarray:
    """jnp view of ``x`` (arrays, tracers, numpy); TypeError for anything without a dtype.
    A traced float argument gets an identity whose derivative raises a TypeError: every op
    is forward-only, on every backend (the kernels have no JVP rule)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic objects
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}")
    if isinstance(x, jax.core.Tracer) and jnp.issubdtype(x.dtype, jnp.inexact):
        return _forward_only(x, name)
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def check_dtype(name: str, x: Any, allowed: Sequence[Any]) -> None:
    allowed = tuple(jnp.dtype(a) for a in allowed)
    if jnp.dtype(x.dtype) not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def check_float(name: str, x: Any) -> None:
    check_dtype(name, x, FLOAT_DTYPES)


def check_ndim(name: str, x: Any, ndim: int | Sequence[int], what: str) -> None:
    ok = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in ok:
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")


def check_head_dim(name: str, d: int) -> None:
    if d % 2 or not MIN_DIM <= d <= MAX_DIM:
        raise ValueError(
            f"{name}: head_dim must be even and in [{MIN_DIM}, {MAX_DIM}], got {d}")


def check_rotation(rotation: Any, d: int, name: str = "rotation") -> jnp.ndarray:
    rotation = as_array(name, rotation)
    check_float(name, rotation)
    if tuple(rotation.shape) != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}) to match head_dim {d}, "
                         f"got {tuple(rotation.shape)}")
    return rotation.astype(jnp.float32)


def check_sorted(name: str, x: Any) -> None:
    """A concrete 1-D table (numpy, or a jax array outside tracing) must be finite and
    strictly increasing (codebooks and boundaries are sorted); traced tables are taken on
    trust."""
    if isinstance(x, jax.core.Tracer):
        return
    v = np.asarray(x, np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    if v.size > 1 and not np.all(np.diff(v) > 0):
        raise ValueError(f"{name} must be sorted strictly ascending (as tq.lloyd_max returns "
                         f"it), got {np.round(v, 6).tolist()}")


def _check_table(name: str, x: Any, valid: tuple, entries: str) -> jnp.ndarray:
    """A 1-D float table (boundaries or centroids) with one of the ``valid`` lengths, sorted
    (:func:`check_sorted`)."""
    x = as_array(name, x)
    check_float(name, x)
    if x.ndim != 1 or x.shape[0] not in valid:
        raise ValueError(f"{name} must be 1-D with {entries} entries {valid} "
                         f"(bits 1..4), got shape {tuple(x.shape)}")
    check_sorted(name, x)
    return x.astype(jnp.float32)


def check_boundaries(boundaries: Any, name: str = "boundaries") -> jnp.ndarray:
    return _check_table(name, boundaries, VALID_BOUNDARIES, "2**bits - 1")


def check_centroids(centroids: Any, name: str = "centroids") -> jnp.ndarray:
    return _check_table(name, centroids, VALID_CENTROIDS, "2**bits")


def check_packed(packed: Any, norms: Any, pname: str = "packed",
                 nname: str = "norms") -> tuple[jnp.ndarray, jnp.ndarray]:
    """uint8 codes [..., D/2] and float32 norms [...] or [..., 1]; returns norms as [...]."""
    packed, norms = as_array(pname, packed), as_array(nname, norms)
    check_dtype(pname, packed, [jnp.uint8])
    check_ndim(pname, packed, tuple(range(1, 16)), "[..., head_dim // 2]")
    check_head_dim(pname, 2 * packed.shape[-1])
    check_float(nname, norms)
    lead = tuple(packed.shape[:-1])
    if tuple(norms.shape) == lead + (1,):
        norms = norms.reshape(lead)
    if tuple(norms.shape) != lead:
        raise ValueError(f"{nname} must have shape {lead} or {lead + (1,)} to match "
                         f"{pname} {tuple(packed.shape)}, got {tuple(norms.shape)}")
    return packed, norms.astype(jnp.float32)


def check_out_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a float dtype, got {dtype!r}") from e
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of float16, bfloat16, float32, got {dt}")
    return dt


def check_pow2(name: str, value: Any, lo: int = 1, hi: int = 4096) -> int:
    """A tuning knob that must be a power-of-two int in [lo, hi] (Triton tile sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value & (value - 1) \
            or not lo <= value <= hi:
        raise ValueError(f"{name} must be a power-of-two int in [{lo}, {hi}], got {value!r}")
    return value


def check_new_tokens(key: Any, value: Any, slot_mapping: Any):
    """Paged writes: key/value [N, H_KV, D] float of one shape, slot_mapping [N] int32/int64.
    Returns (key, value, slot_mapping as int32)."""
    key, value = as_array("key", key), as_array("value", value)
    check_float("key", key)
    check_float("value", value)
    check_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {tuple(key.shape)}, "
                         f"got {tuple(value.shape)}")
    check_head_dim("key", key.shape[2])
    slot_mapping = as_array("slot_mapping", slot_mapping)
    check_dtype("slot_mapping", slot_mapping, [jnp.int32, jnp.int64])
    n = key.shape[0]
    if slot_mapping.shape != (n,):
        raise ValueError(f"slot_mapping must have shape ({n},), got {tuple(slot_mapping.shape)}")
    return key, value, slot_mapping.astype(jnp.int32)


def check_seq_table(seq_lens: Any, block_table: Any, n_seqs: int):
    """Paged reads: seq_lens [n_seqs] int32 and block_table [n_seqs, max_blocks] int32."""
    seq_lens = as_array("seq_lens", seq_lens)
    check_dtype("seq_lens", seq_lens, [jnp.int32])
    if seq_lens.shape != (n_seqs,):
        raise ValueError(f"seq_lens must have shape ({n_seqs},), got {tuple(seq_lens.shape)}")
    block_table = as_array("block_table", block_table)
    check_dtype("block_table", block_table, [jnp.int32])
    if block_table.ndim != 2 or block_table.shape[0] != n_seqs or block_table.shape[1] < 1:
        raise ValueError(f"block_table must have shape [{n_seqs}, max_blocks], got "
                         f"{tuple(block_table.shape)}")
    return seq_lens, block_table


def check_row_width(kv_cache: jnp.ndarray, row_bytes: int, total_bytes: Any, what: str) -> int:
    """A paged cache's row width (last axis) must be exactly ``row_bytes``, the layout's
    size, unless the caller declares a padded width ``total_bytes`` (>= row_bytes), which
    must then match. Returns the width."""
    width = kv_cache.shape[-1]
    if total_bytes is None:
        if width != row_bytes:
            raise ValueError(
                f"kv_cache rows must be {row_bytes} bytes wide for {what}, got "
                f"{tuple(kv_cache.shape)}; a wrong num_kv_heads/head_dim reads garbage. For a "
                f"cache padded on purpose, pass total_bytes={width}")
        return width
    if isinstance(total_bytes, bool) or not isinstance(total_bytes, (int, np.integer)) \
            or total_bytes < row_bytes:
        raise ValueError(f"total_bytes must be an int >= {row_bytes} (the layout's row for "
                         f"{what}), got {total_bytes!r}")
    if width != total_bytes:
        raise ValueError(f"kv_cache rows must be total_bytes={total_bytes} wide, got "
                         f"{tuple(kv_cache.shape)}")
    return width


def check_cache_size(kv_cache: jnp.ndarray) -> None:
    """The kernels address a cache with 32-bit offsets: refuse one of 2 GiB or more (split it,
    e.g. one cache per layer, or use impl='reference')."""
    if kv_cache.size >= MAX_CACHE_BYTES:
        raise ValueError(f"kv_cache has {kv_cache.size} bytes: the kernels address the cache "
                         f"with 32-bit offsets (< {MAX_CACHE_BYTES}); split the cache (e.g. one "
                         f"per layer) or use impl='reference'")


def check_static_bool(name: str, x: Any) -> bool:
    """A static flag: a Python (or numpy) bool."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {x!r}")
    return bool(x)


def check_batch_ints(name: str, x: Any, b: int) -> jnp.ndarray:
    """An integer array of shape (b,) (one value per batch row), as int32."""
    x = as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.shape != (b,):
        raise ValueError(f"{name} must have shape ({b},) (one per batch row), got "
                         f"{tuple(x.shape)}")
    return x.astype(jnp.int32)


def check_attention_extras(num_heads: int, local_window_size: Any, logit_soft_cap: Any,
                           sinks: Any):
    """Sliding window, soft cap and sinks of an attention op -> (window (left, right) or None,
    soft cap or None, sinks f32 [num_heads] or None)."""
    window = None
    if local_window_size is not None:
        w = local_window_size
        w = (w, w) if isinstance(w, (int, np.integer)) and not isinstance(w, bool) else w
        if not (isinstance(w, (tuple, list)) and len(w) == 2 and all(
                isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
                for x in w)):
            raise ValueError(f"local_window_size must be an int >= 0 or a (left, right) pair "
                             f"of them, got {local_window_size!r}")
        window = (int(w[0]), int(w[1]))
    cap = None
    if logit_soft_cap is not None:
        if isinstance(logit_soft_cap, jax.core.Tracer) or isinstance(logit_soft_cap, bool) \
                or not isinstance(logit_soft_cap, (int, float, np.floating)) \
                or not logit_soft_cap > 0:
            raise ValueError(f"logit_soft_cap must be a positive Python float (static), got "
                             f"{logit_soft_cap!r}")
        cap = float(logit_soft_cap)
    if sinks is not None:
        sinks = as_array("sinks", sinks)
        check_float("sinks", sinks)
        if sinks.shape != (num_heads,):
            raise ValueError(f"sinks must have shape ({num_heads},) (one logit per query "
                             f"head), got {tuple(sinks.shape)}")
        sinks = sinks.astype(jnp.float32)
    return window, cap, sinks
