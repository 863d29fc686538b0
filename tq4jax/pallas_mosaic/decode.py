"""TQ4 decode attention on a contiguous compressed cache in Pallas Mosaic GPU (LAYOUTS.md A1).

Grid (split, KV head, batch), one warpgroup per CTA. The split's keys are walked in tiles of
T=64: K and V code tiles [64, D/2] uint8 and norm vectors [64] f32 arrive by TMA in a
``stages``-deep shared-memory ring (one barrier per slot for K, one for V). A code tile decodes
in registers into its even and odd coordinates (:mod:`.lut`), and the tensor cores take the
keys on their M side: ``S^T[64, NQ] = K_even @ Q_even^T + K_odd @ Q_odd^T`` with the group's
query heads padded to NQ=16 on N, so 4 heads are not padded to 64 rows. Norms scale scores and
probabilities, never decoded elements; the online softmax runs along the key axis (axis 0).
``O^T[D, NQ] += V_dec^T @ P^T`` with decoded V [64, D] and P^T through shared memory. Each
split writes its normalized O^T and its log-sum-exp; the wrapper merges the splits
(:func:`tq4jax.core.merge_splits`) and restores the coordinate order.

Status: correct on an H200 (relative L2 3.6e-4, Lane and Warpgroup semantics) but slower than
the Triton-lowered kernel (bench/RESULTS.md: 0.234 against 0.169 ms at B=8, 32K): an
experimental backend, chosen only by ``impl="mosaic"``. The loop's tiles and the epilogue's
buffers share shared memory (43 KB per CTA instead of 52 KB), and the softmax sum is kept per
key row (one cross-warp reduction per tile instead of two): 0.2635 -> 0.2339 ms.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..core import LN2, LOG2E, merge_splits, static_planes
from . import compat
from .lut import decode_prmt, decode_select

T = 64    # keys per tile (wgmma M)
NQ = 16   # query heads of a KV head, padded (wgmma N: P^T is stored swizzled, 2N >= 32 bytes)
D = 128   # the head dim this kernel serves
DB = D // 2
_WG = plgpu.Layout.WGMMA
_ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per key row of a [T, NQ] array


class MosaicConfig(NamedTuple):
    """KV splits per (sequence, KV head) and depth of the TMA ring."""
    num_splits: int = 16
    stages: int = 2


def supported(head_dim: int, group: int, sq: int, sk: int) -> bool:
    """Shapes this kernel serves: decode (one query per sequence), D = 128, <= 16 query heads
    per KV head, a cache length ``sk`` that is a multiple of 8 (the TMA tiling of the code and
    norm arrays' key axis: other lengths fail to compile on the GPU)."""
    return head_dim == D and group <= NQ and sq == 1 and sk % 8 == 0


class _Ops:
    """The compiled kernel's Mosaic-only operations, or plain-jnp stand-ins where GPU interpret
    mode lacks them (jax 0.10: layouted loads, wgmma from transposed shared memory; every
    version: wgmma with a register operand, inline PTX)."""

    def __init__(self, interpret: bool):
        self.interpret, self.full_interp = interpret, compat.INTERPRET_FULL

    def smem(self, shape, dtype, swizzle=None):
        if self.interpret or swizzle is None:
            return plgpu.SMEM(shape, dtype)
        elems = swizzle // jnp.dtype(dtype).itemsize
        return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                    plgpu.SwizzleTransform(swizzle)))

    def load(self, ref, layout):
        if self.interpret and not self.full_interp:
            return ref[...]
        return compat.load(ref, layout)

    def full(self, shape, value, layout):
        x = jnp.full(shape, value, jnp.float32)
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_WG)

    def decode(self, codes, table, planes):
        """A code tile -> (even, odd) fp16: prmt with static ``planes``, else selects."""
        if planes is not None and not self.interpret:
            return decode_prmt(codes, planes)
        return decode_select(codes, table)

    def scores(self, pairs, shape):
        """sum_i a_i @ b_i^T, a_i registers [T, DB], b_i shared [NQ, DB]."""
        if self.interpret:
            return sum(jnp.dot(a.astype(jnp.float32), b[...].astype(jnp.float32).T)
                       for a, b in pairs)

        def body(acc_ref):
            for a, b in pairs:
                plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
            return acc_ref[...]
        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def pv(self, acc, vdec, p_smem):
        """acc + vdec^T @ p (vdec shared [T, D], p shared [T, NQ])."""
        if self.interpret and not self.full_interp:
            return acc + jnp.dot(vdec[...].astype(jnp.float32).T,
                                 p_smem[...].astype(jnp.float32))
        if self.interpret:
            def fresh(acc_ref):
                plgpu.wgmma(acc_ref, vdec.transpose((1, 0)), p_smem)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

        def body(acc_ref):
            plgpu.wgmma(acc_ref, vdec.transpose((1, 0)), p_smem)
            plgpu.wgmma_wait(0)
        return pl.run_state(body)(plgpu.ACC.init(acc))


def _kernel(lens_ref, q_ref, kt_ref, vt_ref, kc_hbm, kn_hbm, vc_hbm, vn_hbm, o_ref, lse_ref,
            *, ops: _Ops, chunk: int, stages: int, planes: tuple, q_smem, kc, kn, vc, vn,
            q_bar, k_bar, v_bar):
    """Program (split, KV head h, batch b): refs lens [B] i32; q [B, H, 2, NQ, DB] f16 (even,
    odd coordinates, pre-scaled by scale * log2 e); K/V tables [16] f32; codes
    [B, H, S, DB] u8 and norms [B, H, S] f32 in HBM; outputs o [B, H, S_, D, NQ] f32 (O^T,
    coordinates even then odd) and lse [B, H, S_, NQ] (base 2). ``planes``: the K and V prmt
    tables (None: select lookups). The loop's decoded-V and P tiles and the epilogue's output
    buffers are scoped one after the other, so they share shared memory (more CTAs per SM)."""
    split, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
    start = split * chunk
    end = jnp.minimum(start + chunk, lens_ref[b])
    n_tiles = jnp.maximum(end - start + (T - 1), 0) // T
    k_table = [kt_ref[i].astype(jnp.float16) for i in range(16)]
    v_table = [vt_ref[i].astype(jnp.float16) for i in range(16)]

    def issue(i, slot):
        rows = pl.ds(start + i * T, T)
        plgpu.copy_gmem_to_smem(kc_hbm.at[b, h, rows], kc.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kn_hbm.at[b, h, rows], kn.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(vc_hbm.at[b, h, rows], vc.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(vn_hbm.at[b, h, rows], vn.at[slot], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar)
    plgpu.barrier_wait(q_bar)
    for s in range(stages):
        pl.when(s < n_tiles)(partial(issue, s, s))

    def step(i, carry, vdec, p_smem):
        acc, m, l_rows = carry
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        k_even, k_odd = ops.decode(ops.load(kc.at[slot], _WG), k_table, planes[0])
        s = ops.scores([(k_even, q_smem.at[0]), (k_odd, q_smem.at[1])], (T, NQ))
        s = s * lax.broadcast_in_dim(ops.load(kn.at[slot], _ROWS), (T, NQ), [0])
        valid = (start + i * T + ops.iota((T, NQ), 0)) < end
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (T, NQ), [1]))
        # the softmax sum stays per key row (summed over the rows once, after the loop): one
        # cross-warp reduction per tile (the max) instead of two
        l_rows = l_rows * lax.broadcast_in_dim(alpha, (T, NQ), [1]) + p
        plgpu.barrier_wait(v_bar.at[slot])
        v_even, v_odd = ops.decode(ops.load(vc.at[slot], _WG), v_table, planes[1])
        v_norm = lax.broadcast_in_dim(ops.load(vn.at[slot], _ROWS), (T, NQ), [0])
        vdec.at[:, pl.ds(0, DB)][...] = v_even
        vdec.at[:, pl.ds(DB, DB)][...] = v_odd
        p_smem[...] = jnp.where(valid, p * v_norm, 0.0).astype(jnp.float16)
        plgpu.commit_smem()
        acc = ops.pv(acc * lax.broadcast_in_dim(alpha, (D, NQ), [1]), vdec, p_smem)
        pl.when(i + stages < n_tiles)(lambda: issue(i + stages, slot))
        return acc, m_new, l_rows

    def loop(vdec, p_smem):
        carry = (ops.full((D, NQ), 0.0, _WG), ops.full((NQ,), -jnp.inf, _WG.reduce(0)),
                 ops.full((T, NQ), 0.0, _WG))
        acc, m, l_rows = lax.fori_loop(0, n_tiles, partial(step, vdec=vdec, p_smem=p_smem),
                                       carry)
        return acc, m, l_rows.sum(axis=0)

    acc, m, l = pl.run_scoped(loop, ops.smem((T, D), jnp.float16, 32),
                              ops.smem((T, NQ), jnp.float16, 32))

    def epilogue(o_smem, lse_smem):
        o_smem[...] = acc / lax.broadcast_in_dim(jnp.where(l == 0.0, 1.0, l), (D, NQ), [1])
        lse_smem[...] = m + jnp.log(l) * LOG2E  # -inf for an empty split
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, split])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, split])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(epilogue, ops.smem((D, NQ), jnp.float32), ops.smem((NQ,), jnp.float32))


def _call(b: int, h: int, s: int, cfg: MosaicConfig, interpret: bool, planes: tuple):
    ops = _Ops(interpret)
    ns, st = cfg.num_splits, cfg.stages
    chunk = pl.cdiv(pl.cdiv(s, T), ns) * T
    scratch = dict(
        q_smem=ops.smem((2, NQ, DB), jnp.float16, 128),
        kc=ops.smem((st, T, DB), jnp.uint8, 64), kn=ops.smem((st, T), jnp.float32),
        vc=ops.smem((st, T, DB), jnp.uint8, 64), vn=ops.smem((st, T), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=1),
        k_bar=plgpu.Barrier(num_arrivals=2, num_barriers=st),
        v_bar=plgpu.Barrier(num_arrivals=2, num_barriers=st))
    kw = dict(interpret=compat.interpret_params()) if interpret else dict(
        compiler_params=compat.compiler_params())
    return plgpu.kernel(
        partial(_kernel, ops=ops, chunk=chunk, stages=st, planes=planes),
        out_type=(jax.ShapeDtypeStruct((b, h, ns, D, NQ), jnp.float32),
                  jax.ShapeDtypeStruct((b, h, ns, NQ), jnp.float32)),
        scratch_types=scratch, grid=(ns, h, b), grid_names=("s", "h", "b"), **kw)


def _prmt_planes(raw: Any) -> tuple | None:
    """Static prmt planes of a concrete codebook antisymmetric in fp16, else None."""
    if raw is None or isinstance(raw, jax.core.Tracer) or jnp.size(raw) != 16:
        return None
    form = static_planes(raw, jnp.float16)
    return form[1:] if form[0] == "symmetric" else None


@partial(jax.jit, static_argnames=("scale", "config", "interpret", "k_planes", "v_planes"))
def _decode(q_rot, kc, kn, vc, vn, k_table, v_table, lens, *, scale, config, interpret,
            k_planes, v_planes):
    b, h, g, _ = q_rot.shape
    q = q_rot.astype(jnp.float32) * (scale * LOG2E)
    q = jnp.stack([q[..., 0::2], q[..., 1::2]], axis=2)  # [B, H, 2, G, DB]
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, NQ - g), (0, 0))).astype(jnp.float16)
    o, lse = _call(b, h, kc.shape[2], config, interpret, (k_planes, v_planes))(
        lens, q, k_table, v_table, kc, kn, vc, vn)
    out = merge_splits(jnp.swapaxes(o, 3, 4), lse * LN2, 2)  # [B, H, NQ, D]
    out = out[:, :, :g]
    return jnp.stack([out[..., :DB], out[..., DB:]], axis=-1).reshape(out.shape)


def decode(q_rot: jax.Array, k_codes: jax.Array, k_norms: jax.Array, v_codes: jax.Array,
           v_norms: jax.Array, k_centroids: jax.Array, v_centroids: jax.Array,
           lens: jax.Array, scale: float, *, raw_k: Any = None, raw_v: Any = None,
           config: MosaicConfig | None = None, interpret: bool = False) -> jax.Array:
    """Decode attention in rotated space.

    Args:
      q_rot: [B, H_KV, G, D] the rotated queries of each KV head's group (G <= 16, D = 128).
      k_codes, v_codes: [B, H_KV, S, D/2] uint8; k_norms, v_norms: [B, H_KV, S] float32.
      k_centroids, v_centroids: float32 [16] (padded codebooks); ``raw_k``/``raw_v``: the
        caller's codebooks, compiled in as prmt tables when concrete and antisymmetric.
      lens: [B] int32 keys per sequence (0 gives zeros); scale: the softmax scale.
    Returns:
      float32 [B, H_KV, G, D] in rotated space.
    """
    return _decode(q_rot, k_codes, k_norms.astype(jnp.float32), v_codes,
                   v_norms.astype(jnp.float32), k_centroids, v_centroids, lens,
                   scale=float(scale), config=config or MosaicConfig(), interpret=interpret,
                   k_planes=_prmt_planes(raw_k), v_planes=_prmt_planes(raw_v))
