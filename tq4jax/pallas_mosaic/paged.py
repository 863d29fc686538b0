"""TQ4 decode attention on a paged compressed cache in Pallas Mosaic GPU (LAYOUTS.md A2).

Grid (split, KV head, sequence), one warpgroup per CTA, the loop of :func:`.tiles.attend_split`.
A tile of 64 keys is 64 / block_size pages: for each, the kernel reads the block id from the
block table in HBM (a scalar load) and starts TMA copies of the page's rows: this head's K and
V codes (a [block_size, D/2] box at byte column ``h * D/2`` of the K or V code region) and
its norms (a [block_size, 16] box ending with the head's 4 norm bytes: TMA's smallest box row
is 16 bytes; read back as float32 column 3 of an aliased view). Pages past the sequence's last
block are never followed: their table entries are replaced by the last valid one, whose rows
the length mask drops; block ids are clamped into the cache.

Constraints (:func:`supported`): D = 128, <= 16 query heads per KV head, block_size in
{8, 16, 32, 64} (whole pages per tile; 8-row TMA tiling), a cache row width that is a multiple
of 16 bytes (TMA strides); code tiles are swizzled where their columns allow
(:func:`ring_swizzles`: at 8 KV heads, 1088-byte rows, K codes by 64 bytes and V codes, at
byte 544, by 32), else plain (2 KV heads, 272 bytes).
Status: checked in GPU interpret mode (reads past an array raise there), by the sm_90 lowering
on a CPU, and compiled on an H200 (tests/test_mosaic.py, bench/decode.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..layout import NORM_BYTES, PagedLayout, paged_layout
from .tiles import (D, DB, NQ, T, TMA_ALIGN, MosaicConfig, Ops, Ring, aligned_box,
                    attend_split, box_width, code_ring, merge_output, pack_query,
                    code_swizzle, page_issuer, prmt_planes, query_scratch, split_chunk)
from .tuning import choose_config

#: Bytes of the norm window copied per key row (TMA's smallest box row).
WINDOW = 16


def supported(head_dim: int, group: int, block_size: int, row_width: int) -> bool:
    """Paged caches this kernel serves (see the module docstring)."""
    return (head_dim == D and group <= NQ and block_size in (8, 16, 32, 64)
            and row_width % TMA_ALIGN == 0)


def v_aligned(lay: PagedLayout) -> bool:
    """Whether every head's V codes start at a TMA column (H_KV % 4 == 0), so that they
    arrive as plain [block_size, D/2] boxes (else in wider boxes, :func:`tma_columns`)."""
    return lay.v_codes % TMA_ALIGN == 0


def tma_columns(lay: PagedLayout, h: Any, row_width: int) -> tuple:
    """KV head ``h``'s boxes in a row of ``row_width`` bytes, each at a multiple of
    TMA_ALIGN: (K codes column, K norm window column, the norm's float32 column in it, V codes
    box column, the codes' byte offset in it (0 where :func:`v_aligned`, the box then D/2
    wide, else :func:`.tiles.box_width` of D/2), V norm window column, its float32 column)."""
    kn, kn_off = aligned_box(lay.k_norms + NORM_BYTES * h, WINDOW, row_width)
    vn, vn_off = aligned_box(lay.v_norms + NORM_BYTES * h, WINDOW, row_width)
    vc, vc_off = lay.v_codes + h * DB, 0
    if not v_aligned(lay):
        vc, vc_off = aligned_box(vc, box_width(DB), row_width)
    return lay.k_codes + h * DB, kn, kn_off // 4, vc, vc_off, vn, vn_off // 4


def ring_swizzles(lay: PagedLayout, row_width: int) -> tuple:
    """The swizzles of the K and V code rings (:func:`.tiles.code_swizzle` of the regions'
    first columns; V boxes wider than D/2 (not :func:`v_aligned`) stay plain)."""
    v = code_swizzle(lay.v_codes, row_width) if v_aligned(lay) else None
    return code_swizzle(lay.k_codes, row_width), v


def _kernel(lens_ref, bt_ref, q_ref, kt_ref, vt_ref, cache_hbm, o_ref, lse_ref, *, ops: Ops,
            chunk: int, stages: int, prefetch: bool, planes: tuple, block_size: int,
            num_blocks: int, lay: PagedLayout, swizzles: tuple, q_smem, kc, kn, vc, vn, q_bar,
            k_bar, v_bar):
    """Program (split, KV head h, sequence b): refs lens [S] i32 (within the table's
    capacity); block table [S, max_blocks] i32; q [S, H, 2, NQ, DB] f16; K/V tables [16] f32;
    cache [num_blocks * block_size, row_width] u8 in HBM; outputs o [S, H, S_, D, NQ] f32 and
    lse [S, H, S_, NQ] (as :func:`.tiles.attend_split`). ``kn``/``vn``: norm windows
    (:meth:`.tiles.Ops.box_ring`); ``vc``: V code tiles, or wider boxes (not
    :func:`v_aligned`)."""
    split, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
    start = split * chunk
    end = jnp.minimum(start + chunk, lens_ref[b])
    k_col, kn_col, k_field, v_col, v_off, vn_col, v_field = tma_columns(
        lay, h, cache_hbm.shape[1])
    cols = ((k_col, DB, kc, k_bar), (kn_col, WINDOW, kn[0], k_bar),
            (v_col, vc.shape[-1], vc, v_bar), (vn_col, WINDOW, vn[0], v_bar))
    issue = page_issuer(cache_hbm, bt_ref.at[b], start=start, end=end, block_size=block_size,
                        num_blocks=num_blocks, cols=cols, prefetch=prefetch)
    v_plain = v_aligned(lay)
    attend_split(ops, start=start, end=end, stages=stages, issue=issue,
                 k=Ring(kc, lambda slot: (ops.window_field(kn, slot, k_field),), k_bar,
                        swizzles[0] is not None),
                 v=Ring(vc, lambda slot: (ops.window_field(vn, slot, v_field),), v_bar,
                        swizzles[1] is not None, None if v_plain else v_off),
                 q_hbm=q_ref.at[b, h], q_smem=q_smem, q_bar=q_bar, kt_ref=kt_ref,
                 vt_ref=vt_ref, planes=planes, o_ref=o_ref.at[b, h, split],
                 lse_ref=lse_ref.at[b, h, split])


def _call(s: int, h: int, num_blocks: int, block_size: int, max_blocks: int, row_width: int,
          cfg: MosaicConfig, interpret: bool, planes: tuple):
    ops = Ops(interpret, cfg.auto_barriers)
    ns, st = cfg.num_splits, cfg.stages
    lay = paged_layout(h, D)
    swz = ring_swizzles(lay, row_width)
    arrivals = 2 * (T // block_size)  # codes + norms per page
    scratch = dict(
        query_scratch(ops),
        kc=code_ring(ops, st, swz[0]), kn=ops.box_ring(st, WINDOW),
        vc=code_ring(ops, st, swz[1], DB if v_aligned(lay) else box_width(DB)),
        vn=ops.box_ring(st, WINDOW),
        k_bar=plgpu.Barrier(num_arrivals=arrivals, num_barriers=st),
        v_bar=plgpu.Barrier(num_arrivals=arrivals, num_barriers=st))
    kernel = partial(_kernel, ops=ops, chunk=split_chunk(max_blocks * block_size, ns), stages=st,
                     prefetch=cfg.prefetch,
                     planes=planes, block_size=block_size, num_blocks=num_blocks, lay=lay,
                     swizzles=swz)
    return plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((s, h, ns, D, NQ), jnp.float32),
                          jax.ShapeDtypeStruct((s, h, ns, NQ), jnp.float32)),
        scratch_types=scratch, grid=(ns, h, s), grid_names=("s", "h", "b"),
        # boxes never hang past the cache: any read past an array is an error when interpreted
        **ops.launch_params(out_of_bounds_reads="raise"))


@partial(jax.jit, static_argnames=("scale", "config", "interpret", "k_planes", "v_planes",
                                   "block_size"))
def _paged(q_rot, kv_cache, block_table, lens, k_table, v_table, *, scale, config, interpret,
           k_planes, v_planes, block_size):
    s, h, g, _ = q_rot.shape
    nb = kv_cache.shape[0]
    cache = kv_cache.reshape(nb * block_size, kv_cache.shape[2])
    call = _call(s, h, nb, block_size, block_table.shape[1], kv_cache.shape[2], config,
                 interpret, (k_planes, v_planes))
    o, lse = call(lens, block_table, pack_query(q_rot, scale), k_table, v_table, cache)
    return merge_output(o, lse, g)


def paged_decode(q_rot: jax.Array, kv_cache: jax.Array, block_table: jax.Array,
                 lens: jax.Array, k_centroids: jax.Array, v_centroids: jax.Array, scale: float,
                 *, block_size: int, raw_k: Any = None, raw_v: Any = None,
                 config: MosaicConfig | None = None, interpret: bool = False) -> jax.Array:
    """Paged decode attention in rotated space.

    Args:
      q_rot: [S, H_KV, G, D] the rotated queries of each sequence's KV heads (G <= 16, D=128).
      kv_cache: [num_blocks, block_size, row_width] uint8 (LAYOUTS.md A2, H_KV heads;
        row_width a multiple of 16). block_table: [S, max_blocks] int32.
      lens: [S] int32 keys per sequence, within ``max_blocks * block_size`` (0 gives zeros).
      k_centroids, v_centroids: float32 [16] (padded codebooks); ``raw_k``/``raw_v``: the
        caller's codebooks, compiled in as prmt tables when concrete and antisymmetric.
      scale: the softmax scale.
    Returns:
      float32 [S, H_KV, G, D] in rotated space.
    """
    config = config or choose_config(q_rot.shape[0], q_rot.shape[1],
                                     block_table.shape[1] * int(block_size))
    return _paged(q_rot, kv_cache, block_table, lens, k_centroids, v_centroids,
                  scale=float(scale), config=config, interpret=interpret,
                  k_planes=prmt_planes(raw_k), v_planes=prmt_planes(raw_v),
                  block_size=int(block_size))
