"""Family-A codec math (LAYOUTS.md): ``norm = ||x||``, ``y = (x / (norm + eps)) @ Pi^T``,
code = number of boundaries <= y, nibble-packed; decode ``c[idx] * norm`` (rotated space) and
``@ Pi`` (original space)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from ..layout import (NORM_EPS, finite_or_nan, pack_nibbles, pad_codebook, to_dtype,
                      unpack_nibbles, zero_rows)


def compress(x: jnp.ndarray, rotation: jnp.ndarray,
             boundaries: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x [..., D] float -> (packed uint8 [..., D/2], norms f32 [...]). A vector with a
    non-finite coordinate gets norm NaN and codes 0 (the store rule)."""
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1))
    u = xf / (norm[..., None] + NORM_EPS)
    y = jnp.matmul(u, rotation.T, precision=lax.Precision.HIGHEST)
    idx = jnp.sum(y[..., None] >= boundaries, axis=-1)
    norm = finite_or_nan(norm)
    return pack_nibbles(zero_rows(norm < jnp.inf, idx)), norm


def decompress(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray,
               dtype: Any = jnp.float16) -> jnp.ndarray:
    """``c[idx] * norm`` [..., D] in rotated space, in ``dtype`` (16-bit: saturated)."""
    y = pad_codebook(centroids)[unpack_nibbles(packed)] * norms[..., None]
    return to_dtype(y, dtype)


def dequantize(packed: jnp.ndarray, norms: jnp.ndarray, centroids: jnp.ndarray,
               rotation: jnp.ndarray, dtype: Any = jnp.float16) -> jnp.ndarray:
    """``(c[idx] * norm) @ Pi`` [..., D] in original space, in ``dtype``."""
    y = decompress(packed, norms, centroids, jnp.float32)
    return to_dtype(jnp.matmul(y, rotation, precision=lax.Precision.HIGHEST), dtype)
