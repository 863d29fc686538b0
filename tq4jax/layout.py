"""Layout constants and the pure-jnp pack/unpack helpers of both byte layouts (LAYOUTS.md
family A, turboquant-vllm TQ4; family B, upstream vLLM TurboQuant slots).

One source of truth: kernels, reference paths and tests import these.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

#: ``u = x / (||x|| + NORM_EPS)`` before rotating (turboquant-vllm's epsilon).
NORM_EPS = 1e-10
#: Codes always take one nibble: D/2 bytes per vector whatever the codebook's bits.
CODE_BITS = 4
#: Codebooks are padded to this many entries inside kernels, so any nibble indexes in bounds.
CODEBOOK_SLOTS = 1 << CODE_BITS
#: Bytes of one stored norm (float32).
NORM_BYTES = 4
#: The kernels address caches with 32-bit offsets: a cache must stay below 2 GiB.
MAX_CACHE_BYTES = 1 << 31
#: Supported number of centroids (bits 1..4) and their boundary counts.
VALID_CENTROIDS = (2, 4, 8, 16)
VALID_BOUNDARIES = tuple(n - 1 for n in VALID_CENTROIDS)
#: Supported input and output dtypes.
FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def saturate(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """``x`` cast to the float ``dtype`` with values beyond its finite range clamped to
    +-max (NaN stays NaN): the one overflow rule of every op's 16-bit outputs and stored
    fields. Other dtypes: a plain cast."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating) \
            and jnp.finfo(x.dtype).max > jnp.finfo(dtype).max:
        big = float(jnp.finfo(dtype).max)  # selects, not min/max: Triton's drop NaN
        x = jnp.where(x > big, big, jnp.where(x < -big, -big, x))
    return x.astype(dtype)


def zero_rows(ok: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Integer ``x`` [..., C] with the rows where ``ok`` [...] is False set to 0, by an integer
    product: Triton cannot move a broadcast boolean tile through shared memory (an i1
    ``local_alloc`` fails to compile), and an integer factor has no NaN to propagate."""
    return x * ok.astype(x.dtype)[..., None]


def to_dtype(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """:func:`saturate` for XLA-side outputs, with the 16-bit rounding pinned by
    ``reduce_precision``: under jit XLA may drop an f32 -> f16 -> f32 round trip (excess
    precision), so without it a jitted caller would see unrounded values an eager one does
    not (and quantize them differently downstream)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating) \
            and jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits:
        info = jnp.finfo(dtype)
        rounded = lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
        if info.nexp < jnp.finfo(x.dtype).nexp:  # reduce_precision flushes subnormals: round
            step = float(info.smallest_subnormal)  # them onto dtype's subnormal grid instead
            sub = jnp.round(x * (1.0 / step)) * step  # exact in x's dtype; ties to even
            rounded = jnp.where(jnp.abs(x) < float(info.tiny), sub, rounded)
        x = rounded
    return saturate(x, dtype)


def finite_or_nan(norm: jnp.ndarray) -> jnp.ndarray:
    """A vector norm, or NaN when it is not finite (an Inf/NaN input coordinate, or a float32
    sum of squares that overflows): the non-finite rule of every store (``x < inf`` is False
    for NaN too, and lowers in every backend)."""
    return jnp.where(norm < jnp.inf, norm, jnp.nan)


def bytes_per_token_head(head_dim: int) -> int:
    """Bytes one compressed vector takes: D/2 code bytes + one float32 norm (68 at D=128)."""
    return head_dim // 2 + NORM_BYTES


def pack_nibbles(idx: jnp.ndarray) -> jnp.ndarray:
    """int codes [..., D] (0..15) -> uint8 [..., D/2]; high nibble = even coordinate."""
    idx = idx.astype(jnp.uint8)
    return (idx[..., 0::2] << 4) | idx[..., 1::2]


def unpack_nibbles(packed: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., D/2] -> int32 codes [..., D] (inverse of :func:`pack_nibbles`)."""
    p = packed.astype(jnp.int32)
    return jnp.stack([p >> 4, p & 0xF], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pad_codebook(centroids: jnp.ndarray) -> jnp.ndarray:
    """Centroids float32 [n] -> [CODEBOOK_SLOTS], zero-padded (garbage codes decode to 0)."""
    c = jnp.asarray(centroids, jnp.float32)
    return jnp.pad(c, (0, CODEBOOK_SLOTS - c.shape[0]))


class PagedLayout(NamedTuple):
    """Byte offsets inside one token row of a paged TQ4 cache (LAYOUTS.md A2) and its size.

    Head h's K codes start at ``k_codes + h * D/2``, its K norm (float32, little-endian) at
    ``k_norms + 4 * h``; V likewise. A cache row may be wider (``total_bytes >= row_bytes``).
    """
    k_codes: int
    k_norms: int
    v_codes: int
    v_norms: int
    row_bytes: int


def paged_layout(num_kv_heads: int, head_dim: int) -> PagedLayout:
    """Offsets of one token row for ``num_kv_heads`` heads of ``head_dim`` (D + 8 bytes per
    head: 272 bytes at 2 heads x D=128)."""
    codes = num_kv_heads * head_dim // 2
    norms = num_kv_heads * NORM_BYTES
    return PagedLayout(0, codes, codes + norms, 2 * codes + norms, 2 * (codes + norms))


# ----------------------------------------------------------------------------------------------
# Family B: upstream vLLM TurboQuant slots (LAYOUTS.md "Family B")
# ----------------------------------------------------------------------------------------------

#: ``y = (k / (||k|| + VLLM_NORM_EPS)) @ Pi^T`` on the store side.
VLLM_NORM_EPS = 1e-8
#: Norm correction divides the decoded centroid vector by ``sqrt(sum(c^2) + VLLM_NC_EPS)``.
VLLM_NC_EPS = 1e-16
#: Smallest value scale (``max(VLLM_MIN_SCALE, (max - min) / (2^bits - 1))``).
VLLM_MIN_SCALE = 1e-8
#: Value min/max are clamped to the finite fp16 range before the scale is derived.
FP16_MAX = 65504.0
#: Largest finite float8 e4m3fn: fp8 keys saturate here (never NaN for finite inputs).
FP8_E4M3_MAX = 448.0
#: Bytes of the fp16 key norm, and of the value scale + zero.
VLLM_NORM_BYTES = 2
VLLM_SCALE_ZERO_BYTES = 4
VLLM_BITS = (3, 4)


class VllmSlot(NamedTuple):
    """Byte layout of one (token, KV head) slot of a vLLM TurboQuant cache.

    ``[0, mse_bytes)`` key codes, LSB-first (or ``[0, head_dim)`` fp8 key bytes), fp16 key
    norm at ``norm_at``, value codes at ``value_at = key_packed_size``, fp16 value scale at
    ``scale_at``, fp16 value zero (the vector's min) at ``zero_at``; ``slot_bytes`` is even.
    """
    head_dim: int
    mse_bits: int
    value_bits: int
    key_fp8: bool
    key_packed_size: int
    mse_bytes: int
    value_bytes: int
    slot_bytes: int

    @property
    def norm_at(self) -> int:
        return self.mse_bytes

    @property
    def value_at(self) -> int:
        return self.key_packed_size

    @property
    def scale_at(self) -> int:
        return self.key_packed_size + self.value_bytes

    @property
    def zero_at(self) -> int:
        return self.scale_at + VLLM_NORM_BYTES

    @property
    def key_bytes(self) -> int:
        """Bytes the key really uses: codes + norm, or the fp8 vector."""
        return self.head_dim if self.key_fp8 else self.mse_bytes + VLLM_NORM_BYTES


def _bits_arg(name: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int in {VLLM_BITS}, got {bits!r}")
    if int(bits) not in VLLM_BITS:
        raise ValueError(f"{name} must be one of {VLLM_BITS}, got {bits}")
    return int(bits)


def vllm_slot(head_dim: int, mse_bits: int, value_quant_bits: int,
              key_packed_size: int | None = None, key_fp8: bool = False) -> VllmSlot:
    """Checked :class:`VllmSlot`. ``key_packed_size`` None: the current vLLM value
    (``mse_bytes + 2``, or ``head_dim`` for fp8 keys). Raises ValueError for bits outside
    {3, 4}, a ``key_packed_size`` too small for the key, or a head_dim that 3-bit codes cannot
    pack into whole bytes (not a multiple of 8)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) \
            or head_dim < 8 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 8, got {head_dim!r}")
    d = int(head_dim)
    mse_bits = _bits_arg("mse_bits", mse_bits)
    vbits = _bits_arg("value_quant_bits", value_quant_bits)
    for name, b in (("mse_bits", mse_bits), ("value_quant_bits", vbits)):
        if b == 3 and d % 8 and not (name == "mse_bits" and key_fp8):
            raise ValueError(f"{name}=3 needs head_dim to be a multiple of 8, got {d}")
    mse_bytes = -(-d * mse_bits // 8)
    need = d if key_fp8 else mse_bytes + VLLM_NORM_BYTES
    if key_packed_size is None:
        key_packed_size = need
    if isinstance(key_packed_size, bool) or not isinstance(key_packed_size, (int, np.integer)):
        raise TypeError(f"key_packed_size must be a Python int, got {key_packed_size!r}")
    if key_packed_size < need:
        what = (f"the fp8 key ({d} bytes)" if key_fp8 else
                f"{mse_bits}-bit codes + fp16 norm ({mse_bytes} + {VLLM_NORM_BYTES} bytes)")
        raise ValueError(f"key_packed_size {key_packed_size} is too small for {what} at "
                         f"head_dim {d}")
    value_bytes = -(-d * vbits // 8)
    slot = int(key_packed_size) + value_bytes + VLLM_SCALE_ZERO_BYTES
    return VllmSlot(d, mse_bits, vbits, bool(key_fp8), int(key_packed_size), mse_bytes,
                    value_bytes, slot + slot % 2)


# Family B store rule and bit streams (pure jnp: kernels and the reference share them).

def pack_bits(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """int codes [..., D] (< 2**bits) -> uint8 [..., D*bits/8], LSB-first: code i occupies
    stream bits [bits*i, bits*i + bits). D*bits must be a multiple of 8."""
    c = jnp.asarray(codes).astype(jnp.int32)
    stream = (c[..., None] >> jnp.arange(bits)) & 1           # [..., D, bits]
    stream = stream.reshape(*c.shape[:-1], -1, 8)            # [..., bytes, 8]
    return jnp.sum(stream << jnp.arange(8), axis=-1).astype(jnp.uint8)


def unpack_bits(packed: jnp.ndarray, bits: int, d: int) -> jnp.ndarray:
    """uint8 [..., >= D*bits/8] -> int32 codes [..., D] (inverse of :func:`pack_bits`)."""
    p = jnp.asarray(packed).astype(jnp.int32)[..., :d * bits // 8]
    stream = ((p[..., None] >> jnp.arange(8)) & 1).reshape(*p.shape[:-1], d, bits)
    return jnp.sum(stream << jnp.arange(bits), axis=-1)


def fp16_bytes(x: jnp.ndarray) -> jnp.ndarray:
    """float [...] -> its fp16 bytes uint8 [..., 2], little-endian."""
    return lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint8)


def fp16_from(b: jnp.ndarray) -> jnp.ndarray:
    """uint8 [..., 2] -> float32 [...]."""
    return lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)


def midpoints(centroids: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (centroids[:-1] + centroids[1:])


def value_stats(v: jnp.ndarray, bits: int, valid: jnp.ndarray | None = None):
    """float32 rows [..., D] -> (scale, zero): per-row min/max clamped to the fp16 range,
    ``scale = max(1e-8, (max - min) / (2^bits - 1))``, zero = min. ``valid`` masks padded
    columns. A row with a non-finite coordinate gets NaN scale and zero (the store rule)."""
    lo, hi, val = v, v, v
    if valid is not None:
        lo, hi, val = (jnp.where(valid, v, fill) for fill in (jnp.inf, -jnp.inf, 0.0))
    vmin = jnp.maximum(jnp.min(lo, axis=-1), -FP16_MAX)
    vmax = jnp.minimum(jnp.max(hi, axis=-1), FP16_MAX)
    finite = jnp.max(jnp.where(jnp.abs(val) < jnp.inf, 0.0, 1.0), axis=-1) == 0
    scale = jnp.maximum((vmax - vmin) / float((1 << bits) - 1), VLLM_MIN_SCALE)
    return jnp.where(finite, scale, jnp.nan), jnp.where(finite, vmin, jnp.nan)


def value_codes(v: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray, bits: int):
    """``clamp(floor((v - zero) / scale + 0.5), 0, 2^bits - 1)`` as int32 (0 where the scale
    is NaN: a non-finite row)."""
    code = jnp.floor((v - zero[..., None]) / scale[..., None] + 0.5)
    code = jnp.clip(code, 0, (1 << bits) - 1).astype(jnp.int32)
    return zero_rows(scale < jnp.inf, code)


def key_norm(k: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 rows [..., D] -> (the norm, float32; the norm as stored: saturated at the fp16
    maximum, NaN for a row with a non-finite coordinate - the store rule)."""
    norm = jnp.sqrt(jnp.sum(k * k, axis=-1))
    return norm, jnp.where(norm < jnp.inf, jnp.minimum(norm, FP16_MAX), jnp.nan)


def fp8_key(k: jnp.ndarray) -> jnp.ndarray:
    """float32 keys -> float8 e4m3 saturated at +-448; non-finite coordinates -> NaN."""
    k8 = jnp.clip(k, -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return jnp.where(jnp.abs(k) < jnp.inf, k8, jnp.nan).astype(jnp.float8_e4m3fn)
