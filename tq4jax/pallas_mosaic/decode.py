"""TQ4 decode attention on a contiguous compressed cache in Pallas Mosaic GPU (LAYOUTS.md A1).

Grid (split, KV head, batch), one warpgroup per CTA: :func:`.tiles.attend_split` walks the
split's keys in tiles of 64, whose K and V code tiles [64, D/2] uint8 and norm vectors [64]
f32 arrive by TMA (one copy each) from the [B, H, S, ...] arrays. The wrapper merges the
splits and restores the coordinate order. Dense values (``flash_attention_tq4``): fp16 V tiles
[64, D] arrive by TMA in the layout P@V reads, no decode and no decoded-V buffer.

Status: correct on an H200 (relative L2 3.6e-4, Lane and Warpgroup semantics) but slower than
the Triton-lowered kernel (bench/RESULTS.md: 0.235 against 0.171 ms at B=8, 32K; 0.043
against 0.034 at B=1 with the tuned splits), chosen only by ``impl="mosaic"``; dense values:
correct on an H200, slower than the Triton-lowered kernel (0.210 against 0.169 ms at B=8,
32K), which reads at 98% of the copy rate there. The loop's tiles and the epilogue's
buffers share shared memory (43 KB per CTA instead of 52 KB), and the softmax sum is kept per
key row (one cross-warp reduction per tile instead of two): 0.2635 -> 0.2339 ms.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .tiles import (D, NQ, ROWS, T, Format, MosaicConfig, Ops, Ring, attend_split, code_ring,
                    merge_output, pack_query, prmt_planes, query_scratch,
                    split_chunk)
from .tuning import choose_config


def supported(head_dim: int, group: int, sq: int, sk: int) -> bool:
    """Shapes this kernel serves: decode (one query per sequence), D = 128, <= 16 query heads
    per KV head, a cache length ``sk`` that is a multiple of 8 (the TMA tiling of the code and
    norm arrays' key axis: other lengths fail to compile on the GPU)."""
    return head_dim == D and group <= NQ and sq == 1 and sk % 8 == 0


def _kernel(lens_ref, q_ref, kt_ref, vt_ref, kc_hbm, kn_hbm, vc_hbm, vn_hbm, o_ref, lse_ref,
            *, ops: Ops, chunk: int, stages: int, planes: tuple, q_smem, kc, kn, vc, vn,
            q_bar, k_bar, v_bar):
    """Program (split, KV head h, batch b): refs lens [B] i32; q [B, H, 2, NQ, DB] f16 (even,
    odd coordinates, pre-scaled by scale * log2 e); K/V tables [16] f32; codes
    [B, H, S, DB] u8 and norms [B, H, S] f32 in HBM (dense V, ``vn`` None: values
    [B, H, S, D] f16 as ``vc_hbm``, ``vn_hbm`` unused); outputs o [B, H, S_, D, NQ] f32 (O^T,
    coordinates even then odd; dense V: natural order) and lse [B, H, S_, NQ] (base 2).
    ``planes``: the K and V prmt tables (None: select lookups)."""
    split, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
    start = split * chunk
    end = jnp.minimum(start + chunk, lens_ref[b])
    dense_v = vn is None

    def issue(i, slot):
        rows = pl.ds(start + i * T, T)
        plgpu.copy_gmem_to_smem(kc_hbm.at[b, h, rows], kc.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kn_hbm.at[b, h, rows], kn.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(vc_hbm.at[b, h, rows], vc.at[slot], v_bar.at[slot])
        if not dense_v:
            plgpu.copy_gmem_to_smem(vn_hbm.at[b, h, rows], vn.at[slot], v_bar.at[slot])

    v_rows = (lambda slot: ()) if dense_v else (lambda slot: (ops.load(vn.at[slot], ROWS),))
    attend_split(ops, start=start, end=end, stages=stages, issue=issue,
                 k=Ring(kc, lambda slot: (ops.load(kn.at[slot], ROWS),), k_bar),
                 v=Ring(vc, v_rows, v_bar),
                 q_hbm=q_ref.at[b, h], q_smem=q_smem, q_bar=q_bar, kt_ref=kt_ref,
                 vt_ref=vt_ref, planes=planes, o_ref=o_ref.at[b, h, split],
                 lse_ref=lse_ref.at[b, h, split], fmt=Format(dense_v=dense_v))


def _call(b: int, h: int, s: int, cfg: MosaicConfig, interpret: bool, planes: tuple,
          dense_v: bool = False):
    ops = Ops(interpret, cfg.auto_barriers)
    ns, st = cfg.num_splits, cfg.stages
    scratch = dict(query_scratch(ops), kc=code_ring(ops, st), kn=ops.smem((st, T), jnp.float32),
                   k_bar=plgpu.Barrier(num_arrivals=2, num_barriers=st),
                   v_bar=plgpu.Barrier(num_arrivals=1 if dense_v else 2, num_barriers=st))
    if dense_v:  # fp16 tiles in the layout P@V reads (as the decoded tiles)
        scratch.update(vc=ops.smem((st, T, D), jnp.float16, 32))
    else:
        scratch.update(vc=code_ring(ops, st), vn=ops.smem((st, T), jnp.float32))
    return plgpu.kernel(
        partial(_kernel, ops=ops, chunk=split_chunk(s, ns), stages=st, planes=planes,
                **(dict(vn=None) if dense_v else {})),
        out_type=(jax.ShapeDtypeStruct((b, h, ns, D, NQ), jnp.float32),
                  jax.ShapeDtypeStruct((b, h, ns, NQ), jnp.float32)),
        scratch_types=scratch, grid=(ns, h, b), grid_names=("s", "h", "b"),
        **ops.launch_params())


@partial(jax.jit, static_argnames=("scale", "config", "interpret", "k_planes", "v_planes"))
def _decode(q_rot, kc, kn, vc, vn, k_table, v_table, lens, *, scale, config, interpret,
            k_planes, v_planes):
    b, h, g, _ = q_rot.shape
    dense_v = vn is None
    o, lse = _call(b, h, kc.shape[2], config, interpret, (k_planes, v_planes), dense_v)(
        lens, pack_query(q_rot, scale), k_table, v_table, kc, kn, vc,
        kn if dense_v else vn)  # dense V: the K norms fill the unused V-norm argument
    return merge_output(o, lse, g, interleaved=not dense_v)


def decode(q_rot: jax.Array, k_codes: jax.Array, k_norms: jax.Array, v_codes: jax.Array,
           v_norms: jax.Array | None, k_centroids: jax.Array, v_centroids: jax.Array | None,
           lens: jax.Array, scale: float, *, raw_k: Any = None, raw_v: Any = None,
           config: MosaicConfig | None = None, interpret: bool = False) -> jax.Array:
    """Decode attention in rotated space.

    Args:
      q_rot: [B, H_KV, G, D] the rotated queries of each KV head's group (G <= 16, D = 128).
      k_codes, v_codes: [B, H_KV, S, D/2] uint8; k_norms, v_norms: [B, H_KV, S] float32.
        Dense values (flash_attention_tq4): ``v_codes`` [B, H_KV, S, D] float16 and
        ``v_norms``/``v_centroids`` None.
      k_centroids, v_centroids: float32 [16] (padded codebooks); ``raw_k``/``raw_v``: the
        caller's codebooks, compiled in as prmt tables when concrete and antisymmetric.
      lens: [B] int32 keys per sequence (0 gives zeros); scale: the softmax scale.
    Returns:
      float32 [B, H_KV, G, D]: in rotated space (compressed values; dense values: as V).
    """
    config = config or choose_config(q_rot.shape[0], q_rot.shape[1], k_codes.shape[2])
    dense_v = v_norms is None
    return _decode(q_rot, k_codes, k_norms.astype(jnp.float32), v_codes,
                   None if dense_v else v_norms.astype(jnp.float32), k_centroids,
                   k_centroids if dense_v else v_centroids, lens,
                   scale=float(scale), config=config, interpret=interpret,
                   k_planes=prmt_planes(raw_k), v_planes=None if dense_v else prmt_planes(raw_v))
