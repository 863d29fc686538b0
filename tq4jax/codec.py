"""TQ4 codec ops (LAYOUTS.md family A): argument checks and backend dispatch.

* :func:`compress`: x [..., D] -> packed uint8 [..., D/2], norms f32 [...]
* :func:`compress_kv`: keys and values in one kernel launch (a KV-cache update)
* :func:`decompress`: packed, norms -> ``c[idx] * norm`` [..., D] (rotated space)
* :func:`dequantize`: packed, norms -> ``(c[idx] * norm) @ Pi`` [..., D] (original space)

Rows are flattened: any leading shape. ``centroids``/``boundaries`` come from
:func:`tq4jax.lloyd_max` and ``rotation`` from :func:`tq4jax.haar_rotation` (or your own
orthogonal Pi); reading side and writing side must use the same ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks as ck
from . import pallas_triton as triton
from .backend import check_config, kernel_mode, reference_of, resolve_impl
from .pallas_triton.tuning import CODEC, CodecConfig
from .reference import codec as ref

__all__ = ["compress", "compress_kv", "decompress", "dequantize", "compress_reference",
           "compress_kv_reference", "decompress_reference", "dequantize_reference",
           "CodecConfig"]


def _tiling(op: str, config: CodecConfig | None, path: str) -> CodecConfig:
    config = check_config(config, CodecConfig, path, op) or CODEC[op]
    ck.check_pow2("config.block_rows", config.block_rows, 16)
    ck.check_pow2("config.num_warps", config.num_warps, 1, 16)
    return config


def compress(x: ArrayLike, rotation: ArrayLike, boundaries: ArrayLike, *,
             config: CodecConfig | None = None, impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Quantize vectors to 4-bit TQ4 codes.

    Args:
      x: [..., D] float16/bfloat16/float32, D even.
      rotation: Pi, float32 [D, D] orthogonal; the kernel rotates ``y = x @ Pi^T``.
      boundaries: float32 [2**bits - 1], sorted (from :func:`tq4jax.lloyd_max`).
      config: Triton tiling (:class:`CodecConfig`); None = the measured default.
      impl: "auto" | "pallas" | "triton" | "reference" (see :mod:`tq4jax.backend`).
    Returns:
      ``(packed uint8 [..., D/2], norms float32 [...])``; high nibble = even coordinate.
      A vector with an Inf/NaN coordinate gets norm NaN and codes 0.
    """
    packed, norms = _compress_streams({"x": x}, rotation, [("boundaries", boundaries)], impl,
                                      config)
    return packed, norms


def compress_kv(key: ArrayLike, value: ArrayLike, rotation: ArrayLike, k_boundaries: ArrayLike,
                v_boundaries: ArrayLike | None = None, *, config: CodecConfig | None = None,
                impl: str = "auto") -> tuple[jax.Array, ...]:
    """:func:`compress` of keys and values in one kernel launch (a KV-cache update).

    Args:
      key, value: [..., D] float of one shape (each its own dtype).
      rotation, k_boundaries: as :func:`compress`; ``v_boundaries`` defaults to K's.
    Returns:
      ``(k_packed, k_norms, v_packed, v_norms)`` as :func:`compress` returns them.
    """
    v_bounds = ("k_boundaries", k_boundaries) if v_boundaries is None else ("v_boundaries",
                                                                            v_boundaries)
    return tuple(_compress_streams({"key": key, "value": value}, rotation,
                                   [("k_boundaries", k_boundaries), v_bounds], impl, config))


def _compress_streams(xs: dict[str, Any], rotation: Any, bounds: list[tuple[str, Any]],
                      impl: str, config: CodecConfig | None) -> list:
    """Checks of :func:`compress` / :func:`compress_kv` and one compress over the streams
    ``xs`` (argument name -> [..., D] float, one shape), stream i quantized with
    ``bounds[i]`` (argument name, boundaries). Returns [packed, norms] per stream."""
    names = list(xs)
    arrs = [ck.as_array(name, x) for name, x in xs.items()]
    for name, x in zip(names, arrs):
        ck.check_float(name, x)
        ck.check_ndim(name, x, tuple(range(1, 16)), "[..., head_dim]")
        if x.shape != arrs[0].shape:
            raise ValueError(f"{name} must have {names[0]}'s shape {tuple(arrs[0].shape)}, "
                             f"got {tuple(x.shape)}")
    d = arrs[0].shape[-1]
    ck.check_head_dim(names[0], d)
    rotation = ck.check_rotation(rotation, d)
    bnds = [ck.check_boundaries(b, name) for name, b in bounds]
    lead = tuple(arrs[0].shape[:-1])
    rows = tuple(x.reshape(-1, d) for x in arrs)
    path = resolve_impl(impl)
    config = _tiling("compress", config, path)
    if path == "reference" or rows[0].shape[0] == 0:
        out = [y for r, b in zip(rows, bnds) for y in ref.compress(r, rotation, b)]
    else:
        out = triton.codec.compress(rows, rotation, tuple(bnds), config=config,
                                    mode=kernel_mode())
    return [x.reshape(lead + (d // 2,) if i % 2 == 0 else lead) for i, x in enumerate(out)]


def _decode_args(packed, norms, centroids, dtype):
    packed, norms = ck.check_packed(packed, norms)
    centroids = ck.check_centroids(centroids)
    dtype = ck.check_out_dtype(dtype)
    lead, h = tuple(packed.shape[:-1]), packed.shape[-1]
    return packed.reshape(-1, h), norms.reshape(-1), centroids, dtype, lead


def decompress(packed: ArrayLike, norms: ArrayLike, centroids: ArrayLike, dtype: Any = jnp.float16,
               *, config: CodecConfig | None = None, impl: str = "auto") -> jax.Array:
    """TQ4 codes -> vectors in rotated space.

    Args:
      packed: uint8 [..., D/2]; norms: float32 [...] or [..., 1].
      centroids: float32 [2**bits], sorted (the codebook the codes were written with).
      dtype: output dtype (float16, bfloat16 or float32; 16-bit outputs saturate).
    Returns:
      ``centroids[idx] * norm``, [..., D] of ``dtype``.
    """
    p, n, c, dtype, lead = _decode_args(packed, norms, centroids, dtype)
    path = resolve_impl(impl)
    config = _tiling("decompress", config, path)
    if path == "reference" or p.shape[0] == 0:
        y = ref.decompress(p, n, c, dtype)
    else:
        y = triton.codec.decompress(p, n, c, dtype=dtype, config=config, mode=kernel_mode())
    return y.reshape(lead + (y.shape[-1],))


def dequantize(packed: ArrayLike, norms: ArrayLike, centroids: ArrayLike, rotation: ArrayLike,
               dtype: Any = jnp.float16, *, config: CodecConfig | None = None,
               impl: str = "auto") -> jax.Array:
    """TQ4 codes -> vectors in original space, ``(centroids[idx] * norm) @ Pi``.

    Args: as :func:`decompress`, plus ``rotation`` Pi float32 [D, D] (the one the codes were
    written with). Returns [..., D] of ``dtype``.
    """
    p, n, c, dtype, lead = _decode_args(packed, norms, centroids, dtype)
    rotation = ck.check_rotation(rotation, 2 * p.shape[-1])
    path = resolve_impl(impl)
    config = _tiling("dequantize", config, path)
    if path == "reference" or p.shape[0] == 0:
        x = ref.dequantize(p, n, c, rotation, dtype)
    else:
        x = triton.codec.dequantize(p, n, c, rotation, dtype=dtype, config=config,
                                    mode=kernel_mode())
    return x.reshape(lead + (x.shape[-1],))


compress_reference = reference_of(compress)
compress_kv_reference = reference_of(compress_kv)
decompress_reference = reference_of(decompress)
dequantize_reference = reference_of(dequantize)
