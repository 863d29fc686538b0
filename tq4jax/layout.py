"""Layout constants and the pure-jnp pack/unpack helpers of the TQ4 format (LAYOUTS.md family A).

One source of truth: kernels, reference paths and tests import these.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

#: ``u = x / (||x|| + NORM_EPS)`` before rotating (turboquant-vllm's epsilon).
NORM_EPS = 1e-10
#: Codes always take one nibble: D/2 bytes per vector whatever the codebook's bits.
CODE_BITS = 4
#: Codebooks are padded to this many entries inside kernels, so any nibble indexes in bounds.
CODEBOOK_SLOTS = 1 << CODE_BITS
#: Bytes of one stored norm (float32).
NORM_BYTES = 4
#: Supported number of centroids (bits 1..4) and their boundary counts.
VALID_CENTROIDS = (2, 4, 8, 16)
VALID_BOUNDARIES = tuple(n - 1 for n in VALID_CENTROIDS)
#: Supported input and output dtypes.
FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


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
