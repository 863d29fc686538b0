"""turboquant-vllm's own Triton kernels on JAX arrays, through jax-triton (no torch tensors).

``jax_triton.triton_call`` launches the originals' ``@triton.jit`` kernels as XLA custom calls,
so they run inside ``jax.jit`` beside tq4jax's kernels, on the same device buffers. The
wrappers repeat what the originals' Python wrappers do around their kernels (query rotation
``q @ Pi^T`` rounded to q's dtype, the output's post-rotation, the byte offsets of the paged
row, the launch grid). Needs a CUDA GPU with jax-triton, triton and turboquant-vllm installed
(``../shared/tools/gpu_wheels.sh``); :func:`available` says why not when they are missing.

Example (GPU)::

    from tq4jax import triton_originals as orig
    f = jax.jit(lambda x: (tq.compress(x, rot, bnd), orig.compress(x, rot, bnd)))
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .backend import on_gpu
from .core import next_pow2

__all__ = ["available", "compress", "paged_decode"]


def available() -> str | None:
    """None when the originals can run through jax-triton here, else the reason."""
    for dep in ("jax_triton", "triton", "torch", "turboquant_vllm"):
        if importlib.util.find_spec(dep) is None:
            return f"{dep.replace('_', '-')} is not installed"
    if not on_gpu():
        return f"jax-triton needs a CUDA GPU (JAX backend: {jax.default_backend()})"
    return None


def _load() -> tuple[Any, Any]:
    reason = available()
    if reason is not None:
        raise ImportError(f"tq4jax.triton_originals: {reason}")
    if "jax_triton" not in sys.modules:
        # jax-triton 0.3.1 sets TRITON_CACHE_DIR="" on import, after which triton kernels
        # launched from torch in the same process (the originals' own wrappers) fail with
        # "Could not create or locate cache dir"; put the caller's setting back
        before = os.environ.get("TRITON_CACHE_DIR")
        importlib.import_module("jax_triton")
        if before is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = before
    import jax_triton

    from . import _jt_adapters
    return jax_triton, _jt_adapters


def compress(x: jax.Array, rotation: Any, boundaries: Any) -> tuple[jax.Array, jax.Array]:
    """The original ``tq4_compress`` kernel: x [N, H, D] fp16/bf16, rotation [D, D] f32,
    boundaries [15] f32 -> (codes [N, H, D/2] uint8, norms [N, H] f32), as
    :func:`tq4jax.compress`."""
    jt, ad = _load()
    n, h, d = x.shape
    rt = jnp.asarray(rotation, jnp.float32).T
    bnd = jnp.asarray(boundaries, jnp.float32)
    m = n * h
    packed, norms = jt.triton_call(
        x.reshape(m, d), rt[:, 0::2], rt[:, 1::2], bnd, m, kernel=ad.compress_adapter,
        out_shape=(jax.ShapeDtypeStruct((m, d // 2), jnp.uint8),
                   jax.ShapeDtypeStruct((m,), jnp.float32)),
        grid=(m,), num_warps=4, num_stages=3, D=d, HALF_D=d // 2, N_BOUND=bnd.shape[0],
        BLOCK_K=min(32, d), D_PAD=next_pow2(d), HALF_D_PAD=next_pow2(d // 2))
    return packed.reshape(n, h, d // 2), norms.reshape(n, h)


def paged_decode(query: jax.Array, kv_cache: jax.Array, block_table: jax.Array,
                 seq_lens: jax.Array, centroids: Any, rotation: Any, num_kv_heads: int,
                 head_dim: int, block_size: int, sm_scale: float | None = None) -> jax.Array:
    """The original ``fused_paged_tq4_decode``: query [B, H_Q, D] fp16/bf16, the paged cache
    [num_blocks, block_size, row bytes] uint8 (LAYOUTS.md A2), block_table [B, max_blocks]
    int32, seq_lens [B] int32 -> [B, H_Q, D] in query's dtype, as :func:`tq4jax.paged_decode`
    with ``num_kv_heads``/``head_dim``/``block_size`` given."""
    jt, ad = _load()
    b, hq, d = query.shape
    if d != head_dim or hq % num_kv_heads:
        raise ValueError(f"query [B, H_Q, D] must have D == head_dim ({head_dim}) and H_Q a "
                         f"multiple of num_kv_heads ({num_kv_heads}), got {query.shape}")
    rot = jnp.asarray(rotation, jnp.float32)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    half = head_dim // 2
    k_norm = num_kv_heads * half
    v_idx = k_norm + num_kv_heads * 4
    if kv_cache.ndim != 3 or kv_cache.shape[1] != block_size or kv_cache.dtype != jnp.uint8:
        raise ValueError(f"kv_cache must be uint8 [num_blocks, block_size={block_size}, row "
                         f"bytes], got {kv_cache.dtype} {kv_cache.shape}")
    q_rot = jnp.matmul(query.astype(jnp.float32), rot.T,
                       precision=jax.lax.Precision.HIGHEST).astype(query.dtype)
    _, bs, row = kv_cache.shape
    mb = block_table.shape[1]
    out_rot = jt.triton_call(
        q_rot, kv_cache, block_table.astype(jnp.int32), seq_lens.astype(jnp.int32),
        jnp.asarray(centroids, jnp.float32),
        hq * d, d, 1, bs * row, row, mb, 1, hq * d, d, 1, np.float32(sm_scale),
        kernel=ad.decode_adapter, out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
        grid=(b, hq), H_Q=hq, H_KV=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HALF_D=half, K_NORM_OFFSET=k_norm, V_IDX_OFFSET=v_idx,
        V_NORM_OFFSET=v_idx + num_kv_heads * half)
    return jnp.matmul(out_rot.astype(jnp.float32), rot,
                      precision=jax.lax.Precision.HIGHEST).astype(query.dtype)
