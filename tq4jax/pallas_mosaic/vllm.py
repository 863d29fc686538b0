"""vLLM TurboQuant decode (LAYOUTS.md family B) in Pallas Mosaic GPU: 3-bit, 4-bit or fp8 keys,
3-bit or 4-bit values (all four presets: ``turboquant_4bit_nc``, ``turboquant_k8v4``,
``turboquant_k3v4_nc``, ``turboquant_3bit_nc``).

Grid (split, KV head, sequence), one warpgroup per CTA, the loop of :func:`.tiles.attend_split`
with the family-B :class:`.tiles.Format`. The cache [num_blocks, block_size, H_KV, slot] is a
[rows, H_KV * slot] byte matrix to TMA; for each page of a 64-key tile the kernel reads the
block id from the block table in HBM and copies two boxes of its head (:func:`boxes`, each
starting at a 16-byte column as TMA requires, so a few bytes wider than the fields): the key
codes with the fp16 key norm (or the fp8 key bytes), and the value codes with the fp16 value
scale and zero. The fp16 fields are read from shared memory at their byte offsets; the code
tiles stay plain (134-byte slots put the fields off any swizzle grid).

* 3-bit codes (keys or values: an LSB-first bit stream, codes straddling bytes) are first
  re-packed per tile as nibbles ``code + 4`` (:meth:`.tiles.Ops.unpack3`: 16-bit columns of
  the box, shifts and masks per key row, a [T, D/2] scratch) and then take the 4-bit path,
  the 8-entry codebook in entries 4-11 of a 16-entry table (:func:`.lut.nibble_codebook`).
* Keys: 4-bit Lloyd-Max codes, the even coordinate in the low nibble, decoded in registers;
  with ``norm_correction`` divided by the decoded vector's own L2 norm (a reduction along D
  per key row). Scores take the rotated query as an fp16 hi/lo pair (its rounding removed,
  as the Triton-lowered kernel's default ``split_q``). fp8 keys (k8v4): [block_size, D] boxes
  of raw e4m3 bytes converted to fp16 in registers, scored against the unrotated query (in
  halves), no norm.
* Values: uniform 4-bit levels, not rotated: the V table holds ``level - 7.5`` (antisymmetric,
  so the same ``prmt`` lookup), P is scaled by each row's scale and ``sum p * (zero + 7.5 *
  scale)`` is added to every coordinate (3-bit levels: nibble ``level + 4``, the same table,
  ``zero + 3.5 * scale``). No post-rotation.
* Pages past the sequence's last block are never followed; block ids are clamped into the
  cache.

Constraints (:func:`supported`): D = 128, <= 16 query heads per KV head, block_size in {8, 16,
32, 64}, a cache row (H_KV * slot bytes) that is a multiple of 16 bytes. Status: checked in GPU
interpret mode (reads past an array raise), by the sm_90 lowering on a CPU, and compiled on an
H200 (4-bit and fp8 keys: faster than the Triton-lowered kernel at B >= 8, bench/RESULTS.md;
the 3-bit presets: correct there, not yet timed).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..layout import VllmSlot
from .lut import NIBBLE_BIAS3, nibble_codebook
from .tiles import (D, DB, NQ, T, TMA_ALIGN, Format, MosaicConfig, Ops, Ring, aligned_box,
                    attend_split, box_width, merge_output, pack_query,
                    page_issuer, prmt_planes, query_scratch, split_chunk)
from .tuning import choose_config

#: Value levels 0..15 stored centred (antisymmetric, so the prmt lookup serves them).
VALUE_OFFSET = 7.5
VALUE_TABLE = np.arange(16, dtype=np.float32) - VALUE_OFFSET


def boxes(lay: VllmSlot, h: Any, row_width: int) -> tuple:
    """KV head ``h``'s two boxes in a row of ``row_width`` bytes (H_KV slots): (key box
    column, the key's byte offset in it, value box column, the value's offset), every column
    a multiple of TMA_ALIGN. The key box holds the key codes and fp16 norm (or the fp8
    bytes), the value box the value codes, fp16 scale and zero."""
    base = h * lay.slot_bytes
    k_col, k_off = aligned_box(base, box_width(lay.key_bytes), row_width)
    v_col, v_off = aligned_box(base + lay.value_at, box_width(lay.value_bytes + 4), row_width)
    return k_col, k_off, v_col, v_off


def packed3(lay: VllmSlot) -> tuple[bool, bool]:
    """Whether the keys and the values of ``lay`` are 3-bit codes (re-packed as nibbles per
    tile: :meth:`.tiles.Ops.unpack3`)."""
    return not lay.key_fp8 and lay.mse_bits == 3, lay.value_bits == 3


def supported(lay: VllmSlot, group: int, block_size: int, num_kv_heads: int) -> bool:
    """vLLM caches this kernel serves (see the module docstring)."""
    row = num_kv_heads * lay.slot_bytes
    return (lay.head_dim == D and group <= NQ and block_size in (8, 16, 32, 64)
            and row % TMA_ALIGN == 0 and box_width(max(lay.key_bytes, lay.value_bytes + 4)) <= row)


def _kernel(lens_ref, bt_ref, q_ref, kt_ref, vt_ref, cache_hbm, o_ref, lse_ref, *, ops: Ops,
            chunk: int, stages: int, prefetch: bool, planes: tuple, block_size: int,
            num_blocks: int,
            lay: VllmSlot, fmt: Format, kb, vb, q_smem, q_bar, k_bar, v_bar, nib=None):
    """Program (split, KV head h, sequence b): refs lens [S] i32 (within the table's
    capacity); block table [S, max_blocks] i32; q [S, H, 4, NQ, DB] f16 (hi and lo parts);
    K/V tables [16] f32; cache [num_blocks * block_size, H * slot] u8 in HBM; outputs as
    :func:`.tiles.attend_split`. ``kb``/``vb``: rings of key and value boxes
    (:meth:`.tiles.Ops.box_ring`, fp16 views); ``nib``: the 3-bit codes' scratch."""
    split, h, b = lax.axis_index("s"), lax.axis_index("h"), lax.axis_index("b")
    start = split * chunk
    end = jnp.minimum(start + chunk, lens_ref[b])
    k_col, k_off, v_col, v_off = boxes(lay, h, cache_hbm.shape[1])
    kw, vw = kb[0].shape[-1], vb[0].shape[-1]
    issue = page_issuer(cache_hbm, bt_ref.at[b], start=start, end=end, block_size=block_size,
                        num_blocks=num_blocks,
                        cols=((k_col, kw, kb[0], k_bar), (v_col, vw, vb[0], v_bar)),
                        prefetch=prefetch)

    def field(box, byte, slot):  # an fp16 field at a byte offset (even) of the box
        return ops.window_field(box, slot, byte // 2, jnp.float16)

    k_rows = ((lambda slot: ()) if fmt.fp8_keys else
              (lambda slot: (field(kb, k_off + lay.norm_at, slot),)))
    v_scale, v_zero = v_off + lay.value_bytes, v_off + lay.value_bytes + 2
    k3, v3 = packed3(lay)
    attend_split(ops, start=start, end=end, stages=stages, issue=issue,
                 k=Ring(kb[0], k_rows, k_bar, False, k_off, lay.mse_bytes if k3 else
                        D if fmt.fp8_keys else DB, kb if k3 else None),
                 v=Ring(vb[0], lambda slot: (field(vb, v_scale, slot), field(vb, v_zero, slot)),
                        v_bar, False, v_off, lay.value_bytes, vb if v3 else None),
                 q_hbm=q_ref.at[b, h], q_smem=q_smem, q_bar=q_bar, kt_ref=kt_ref,
                 vt_ref=vt_ref, planes=planes, o_ref=o_ref.at[b, h, split],
                 lse_ref=lse_ref.at[b, h, split], fmt=fmt, nib=nib)


def _call(s: int, h: int, num_blocks: int, block_size: int, max_blocks: int, lay: VllmSlot,
          nc: bool, cfg: MosaicConfig, interpret: bool, planes: tuple):
    ops = Ops(interpret, cfg.auto_barriers)
    ns, st = cfg.num_splits, cfg.stages
    fmt = vllm_format(lay, nc)
    pages = T // block_size  # each brings one key box and one value box
    scratch = dict(
        query_scratch(ops, fmt.q_parts),
        kb=ops.box_ring(st, box_width(lay.key_bytes), jnp.float16),
        vb=ops.box_ring(st, box_width(lay.value_bytes + 4), jnp.float16),
        k_bar=plgpu.Barrier(num_arrivals=pages, num_barriers=st),
        v_bar=plgpu.Barrier(num_arrivals=pages, num_barriers=st))
    if any(packed3(lay)) and not interpret:
        scratch["nib"] = Ops.nibble_scratch()
    kernel = partial(_kernel, ops=ops, chunk=split_chunk(max_blocks * block_size, ns), stages=st,
                     prefetch=cfg.prefetch,
                     planes=planes, block_size=block_size, num_blocks=num_blocks, lay=lay,
                     fmt=fmt)
    return plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((s, h, ns, D, NQ), jnp.float32),
                          jax.ShapeDtypeStruct((s, h, ns, NQ), jnp.float32)),
        scratch_types=scratch, grid=(ns, h, s), grid_names=("s", "h", "b"),
        **ops.launch_params(out_of_bounds_reads="raise"))


def vllm_format(lay: VllmSlot, nc: bool) -> Format:
    """The :class:`.tiles.Format` of a vLLM slot layout."""
    offset = VALUE_OFFSET - (NIBBLE_BIAS3 if lay.value_bits == 3 else 0)
    return Format(low_nibble_first=True, key_nc=nc and not lay.key_fp8,
                  value_offset=offset, q_parts=2, fp8_keys=lay.key_fp8)


@partial(jax.jit, static_argnames=("scale", "lay", "nc", "config", "interpret", "k_planes"))
def _decode(q_rot, kv_cache, block_table, lens, k_table, *, scale, lay, nc, config, interpret,
            k_planes):
    s, h, g, _ = q_rot.shape
    nb, bs = kv_cache.shape[:2]
    cache = kv_cache.reshape(nb * bs, h * lay.slot_bytes)
    call = _call(s, h, nb, bs, block_table.shape[1], lay, nc, config, interpret,
                 (k_planes, prmt_planes(VALUE_TABLE)))
    o, lse = call(lens, block_table, pack_query(q_rot, scale, 2, halves=lay.key_fp8), k_table,
                  jnp.asarray(VALUE_TABLE), cache)
    return merge_output(o, lse, g)


def decode(q_rot: jax.Array, kv_cache: jax.Array, block_table: jax.Array, lens: jax.Array,
           centroids: jax.Array, scale: float, *, lay: VllmSlot, norm_correction: bool,
           raw_centroids: Any = None, config: MosaicConfig | None = None,
           interpret: bool = False) -> jax.Array:
    """vLLM TurboQuant decode (3/4-bit or fp8 keys, 3/4-bit values).

    Args:
      q_rot: [S, H_KV, G, D] float32, the queries rotated (``query @ Pi^T``), per KV head.
      kv_cache: [num_blocks, block_size, H_KV, slot] uint8 of layout ``lay``; block_table:
        [S, max_blocks] int32; lens: [S] int32 within the table's capacity (0 gives zeros).
      centroids: float32 [16] the key codebook, zero-padded (3-bit keys: the first 8 entries;
        ``raw_centroids``: the caller's, compiled in as prmt tables when concrete and
        antisymmetric); scale: the softmax scale.
      norm_correction: keys divided by their decoded vector's L2 norm (vLLM's ``*_nc``).
    Returns:
      float32 [S, H_KV, G, D] (values are not rotated: no post-rotation).
    """
    if packed3(lay)[0]:  # nibbles code + 4 (.lut.nibble_words)
        centroids = nibble_codebook(centroids)
        if raw_centroids is not None and not isinstance(raw_centroids, jax.core.Tracer):
            raw_centroids = nibble_codebook(np.asarray(raw_centroids, np.float32))
    config = config or choose_config(q_rot.shape[0], q_rot.shape[1],
                                     block_table.shape[1] * kv_cache.shape[1])
    return _decode(q_rot, kv_cache, block_table, lens, centroids, scale=float(scale), lay=lay,
                   nc=bool(norm_correction), config=config, interpret=interpret,
                   k_planes=prmt_planes(raw_centroids))
