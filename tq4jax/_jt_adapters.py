"""Argument-order adapters around turboquant-vllm's own ``@triton.jit`` kernels, for
``jax_triton.triton_call`` (which passes the outputs after all inputs and scalars, where the
originals take them mid-signature). Each adapter only forwards its arguments: the kernel body
that runs is the original's, inlined by Triton.

Imports triton and turboquant-vllm (and so torch) when imported: :mod:`tq4jax.triton_originals`
imports it lazily.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .verify import original_modules

_MODS = original_modules()
#: The originals' kernels (Triton JITFunctions; the decode kernel's autotuner unwrapped).
COMPRESS_KERNEL = _MODS.tq4_compress._tq4_compress_kernel
DECODE_KERNEL = _MODS.fused_paged_tq4_attention._fused_paged_tq4_decode_kernel.fn
#: The decode kernel's own autotuning configurations (BLOCK_N, stages, warps).
DECODE_CONFIGS = _MODS.fused_paged_tq4_attention._FUSED_DECODE_CONFIGS


@triton.jit
def compress_adapter(X, Rot_T_even, Rot_T_odd, Boundaries, M, Packed_out, Norms_out,
                     D: tl.constexpr, HALF_D: tl.constexpr, N_BOUND: tl.constexpr,
                     BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, HALF_D_PAD: tl.constexpr):
    """``_tq4_compress_kernel`` with its outputs last."""
    COMPRESS_KERNEL(X, Rot_T_even, Rot_T_odd, Boundaries, Packed_out, Norms_out, M, D, HALF_D,
                    N_BOUND, BLOCK_K, D_PAD, HALF_D_PAD)


@triton.jit
def _decode_adapter(Q_rot, KV_cache, Block_table, Seq_lens, Centroids,
                    stride_qz, stride_qh, stride_qk, stride_cache_block, stride_cache_token,
                    stride_bt_seq, stride_bt_block, stride_oz, stride_oh, stride_ok, sm_scale,
                    Out, H_Q: tl.constexpr, H_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, HALF_D: tl.constexpr,
                    K_NORM_OFFSET: tl.constexpr, V_IDX_OFFSET: tl.constexpr,
                    V_NORM_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_fused_paged_tq4_decode_kernel`` (fp16 Q @ K path, its INT8/QJL inputs unused) with
    its output last."""
    DECODE_KERNEL(Q_rot, KV_cache, Block_table, Seq_lens, Centroids, Out,
                  Q_rot, Q_rot, Q_rot, Q_rot,  # INT8/QJL pointers: compiled out
                  stride_qz, stride_qh, stride_qk, stride_cache_block, stride_cache_token,
                  stride_bt_seq, stride_bt_block, stride_oz, stride_oh, stride_ok, sm_scale,
                  H_Q, H_KV, HEAD_DIM, BLOCK_SIZE, HALF_D, K_NORM_OFFSET, V_IDX_OFFSET,
                  V_NORM_OFFSET, False, 0, BLOCK_N)


#: The decode adapter autotuned over the original's configurations, as the original launches.
decode_adapter = triton.autotune(configs=DECODE_CONFIGS, key=["HEAD_DIM"])(_decode_adapter)
