"""The attention core every backend and the op layer share (pure jax.numpy, no Pallas).

* the softmax scale default, the KV-split merge (one convention: normalized outputs and their
  natural-log log-sum-exp), tile-size rounding;
* the rotation as kernels take it (:class:`Rotation`: 16-bit halves for float32-accurate
  tensor-core products) and the XLA-side rotations around a kernel;
* codebook tables: the 16-bit patterns of a codebook, its byte planes for in-register
  lookups, the static forms of a codebook known at trace time, the int8 levels.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Scale of the low half in a two-fp16 split (keeps the low half out of fp16 subnormals).
SPLIT_SCALE = 2048.0
#: Natural log of 2 and log2(e): kernels run the softmax in base 2.
LN2, LOG2E = math.log(2.0), math.log2(math.e)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tiles need power-of-two element counts)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def default_scale(head_dim: int, scale: Any) -> float:
    """The softmax scale: ``1 / sqrt(head_dim)`` when ``scale`` is None, else ``scale`` as a
    Python float (it is compiled into the kernels: a traced value is a TypeError)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("the softmax scale must be a Python float (static), not a traced value")
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"the softmax scale must be a float or None, got {scale!r}")
    return float(scale)


def merge_splits(o: jnp.ndarray, lse: jnp.ndarray, axis: int,
                 valid: jnp.ndarray | None = None, with_lse: bool = False) -> Any:
    """Log-sum-exp merge of KV splits: ``o`` [..., S, ..., D] normalized per split, ``lse``
    the same shape without D (natural log of each split's softmax sum, -inf for a split that
    saw no key), split axis ``axis`` of ``lse``. ``valid`` (broadcastable to ``lse``) marks
    splits that were written at all: others (their memory is garbage) drop out. A row with
    no key in any split gives zeros; a NaN lse (a non-finite input) makes the row NaN.
    Returns float32 with the split axis removed (and, ``with_lse``, the merged lse)."""
    if valid is not None:
        lse = jnp.where(valid, lse, -jnp.inf)
    top = jnp.max(lse, axis=axis, keepdims=True)  # NaN (a NaN score) propagates to the row
    w = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - jnp.where(top == -jnp.inf, 0.0, top)))
    total = jnp.sum(w, axis=axis)
    num = jnp.sum(w[..., None] * jnp.where(w[..., None] > 0, o, 0.0), axis=axis)
    out = num / jnp.where(total > 0, total, 1.0)[..., None]
    if not with_lse:
        return out
    shift = jnp.squeeze(jnp.where(top == -jnp.inf, 0.0, top), axis)
    return out, jnp.log(total) + shift  # -inf where no split saw a key


# ----------------------------------------------------------------------------------------------
# rotation
# ----------------------------------------------------------------------------------------------

def split16(x: Any, dtype: Any = jnp.float16, scale: float = SPLIT_SCALE,
            xp: Any = jnp) -> tuple[Any, Any]:
    """float32 -> (hi, lo) in a 16-bit float ``dtype`` with ``x ~= hi + lo / scale``
    (about 2**-21 relative for fp16, 2**-16 for bf16).

    Works in and out of kernels (``xp`` jnp) and on concrete numpy arrays (``xp`` numpy); with
    the default scale for |x| <= 1 (rotations, unit vectors, codebooks), with ``scale=1`` for
    any x in range. ``hi`` is ``x`` with its mantissa truncated to the dtype's bits by bit
    masking: a float round trip (f32 -> f16 -> f32) would be folded away by XLA's
    excess-precision rewrite on the GPU.
    """
    keep = 0xFFFFE000 if jnp.dtype(dtype) == jnp.float16 else 0xFFFF0000
    if xp is np:
        x = np.asarray(x, np.float32)
        hi32 = (x.view(np.uint32) & np.uint32(keep)).view(np.float32)
        return hi32.astype(dtype), ((x - hi32) * np.float32(scale)).astype(dtype)
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(keep)
    hi32 = lax.bitcast_convert_type(bits, jnp.float32)
    return hi32.astype(dtype), ((x - hi32) * scale).astype(dtype)


class Rotation(NamedTuple):
    """Pi [D, D] f32 as the kernels take it (16-bit halves in q's dtype, see split16):
    ``q_halves`` = Pi^T's even columns (hi, lo), then its odd columns (hi, lo), [D, D/2] each,
    for the pre-rotation; ``post`` = Pi (hi, lo) for the post-rotation; ``pi`` itself."""
    q_halves: tuple
    post: tuple
    pi: jnp.ndarray


def rotation_parts(rotation: jnp.ndarray, dtype: Any) -> Rotation:
    """Pi [D, D] f32 -> its :class:`Rotation` in ``dtype``."""
    rt = rotation.T
    return Rotation((*split16(rt[:, 0::2], dtype), *split16(rt[:, 1::2], dtype)),
                    split16(rotation, dtype), rotation)


def rotate_in_xla(q: jnp.ndarray, rotation: jnp.ndarray, dtype: Any = None) -> jnp.ndarray:
    """``q @ Pi^T`` outside a kernel, float32-accurate, in ``dtype`` (default q's). q's own
    rounding is pinned first (``reduce_precision``): under jit XLA may otherwise use the
    float32 values a caller rounded to q's dtype just before (excess precision), unlike an
    eager call."""
    qf = q.astype(jnp.float32)
    if jnp.finfo(q.dtype).bits < 32:
        info = jnp.finfo(q.dtype)
        qf = lax.reduce_precision(qf, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return jnp.matmul(qf, rotation.T, precision=lax.Precision.HIGHEST).astype(dtype or q.dtype)


def post_rotate(out: jnp.ndarray, rotation: jnp.ndarray) -> jnp.ndarray:
    """``out @ Pi`` (rotated space -> original space) in float32."""
    return jnp.matmul(out.astype(jnp.float32), rotation, precision=lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# codebook tables
# ----------------------------------------------------------------------------------------------

def codebook_bits(centroids16: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Codebook [16] -> its 16-bit float patterns in ``dtype`` (fp16/bf16) as uint16 [16]:
    32 bytes, one memory sector, so an in-kernel gather from it is a single-sector load."""
    return lax.bitcast_convert_type(centroids16.astype(dtype), jnp.uint16)


def lut_planes(bits16: Any, xp: Any = jnp) -> Any:
    """uint16 [16] table patterns -> int32 [8]: the low-byte plane (entries 4k..4k+3 in word
    k, k < 4), then the high-byte plane. ``xp``: jnp (traced tables too) or numpy."""
    b = xp.asarray(bits16).astype(xp.uint32).reshape(4, 4)
    shift = (8 * xp.arange(4, dtype=xp.uint32))[None, :]
    planes = xp.concatenate([xp.sum((b & 0xFF) << shift, axis=1),
                             xp.sum((b >> 8) << shift, axis=1)]).astype(xp.uint32)
    return planes.view(xp.int32) if xp is np else lax.bitcast_convert_type(planes, jnp.int32)


#: 16-bit patterns of 1.0 and of the magic base B (B + n is exact and its low bits are n).
MAGIC = {"float16": (0x3C00, 0x6400), "bfloat16": (0x3F80, 0x4300)}


def static_planes(centroids: Any, dtype: Any) -> tuple:
    """A concrete codebook (up to 16 entries) -> its static table for an in-register lookup,
    tagged: ("linear", one, -base) when entry n is n itself (vLLM's value levels: decoded by
    bit tricks); ("symmetric", 4 words: the byte planes of entries 8-15) when the codebook is
    antisymmetric in ``dtype`` (c[15 - j] == -c[j] bit for bit, as Lloyd-Max codebooks are);
    else ("general", the 8 :func:`lut_planes` words)."""
    c = np.zeros(16, np.float32)
    c[:np.size(centroids)] = np.asarray(centroids, np.float32).ravel()
    bits = c.astype(dtype).view(np.uint16)
    planes = tuple(int(w) for w in lut_planes(bits, np))
    if np.array_equal(c, np.arange(16)) and jnp.dtype(dtype).name in MAGIC:
        one, base = MAGIC[jnp.dtype(dtype).name]
        return ("linear", one * 0x10001, (base | 0x8000) * 0x10001)
    if np.array_equal(bits[::-1], bits ^ np.uint16(0x8000)):
        return ("symmetric",) + planes[2:4] + planes[6:8]
    return ("general",) + planes


#: Entry of an :func:`int8_codebook` table that holds the scale.
INT8_SCALE_AT = 16


def int8_codebook(centroids16: Any, xp: Any = jnp) -> Any:
    """Codebook [16] -> float32 [32]: entries 0-15 the integer levels
    ``round(c * 127 / max|c|)`` (int8 range), entry 16 the scale ``max|c| / 127``. ``xp``:
    jnp, or numpy for a concrete codebook (static LUT)."""
    c = xp.asarray(centroids16, xp.float32)
    amax = xp.max(xp.abs(c))
    scale = xp.where(amax > 0, amax / xp.float32(127.0), xp.float32(1.0)).astype(xp.float32)
    levels = xp.round(c / scale)
    return xp.concatenate([levels, scale[None], xp.zeros(15, xp.float32)]).astype(xp.float32)


def is_static(x: Any) -> bool:
    """Whether ``x`` is known at trace time (numpy, a Python value, a committed jax array,
    also when closed over by a jit-ed caller), so a kernel may compile it in."""
    return x is not None and not isinstance(x, jax.core.Tracer)
