"""In-kernel pieces shared by the Mosaic GPU decode kernels (:mod:`.decode` contiguous,
:mod:`.paged` paged, :mod:`.vllm` vLLM layout): tile constants, the configuration, the cache
format (:class:`Format`), the operations that differ between compiled and interpret mode
(:class:`Ops`), block-table-driven page copies (:func:`page_issuer`), the loop over a split's
key tiles with its epilogue (:func:`attend_split`), and the wrapper-side query packing and
split merge.

One warpgroup per CTA walks one (sequence, KV head, split) in tiles of T=64 keys. Code tiles
[64, D/2] uint8 and norm vectors [64] f32 arrive in a ``stages``-deep shared-memory ring (one
barrier per slot for K, one for V); the kernel's ``issue`` starts the copies (:class:`Issue`:
paged caches may read a tile's block ids one tile ahead). A code tile decodes in registers
into its even and odd coordinates (:mod:`.lut`), and the tensor cores take the keys on their
M side: ``S^T[64, NQ] = K_even @ Q_even^T + K_odd @ Q_odd^T``
with the group's query heads padded to NQ=16 on N. Norms scale scores and probabilities,
never decoded elements; the online softmax runs along the key axis (axis 0).
``O^T[D, NQ] += V_dec^T @ P^T`` with decoded V [64, D] and P^T through shared memory. Each
split writes its normalized O^T and its log-sum-exp (base 2).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..core import LN2, LOG2E, merge_splits, static_planes
from ..layout import VLLM_NC_EPS
from . import compat
from .lut import decode_prmt, decode_select, nibble_words

T = 64    # keys per tile (wgmma M)
NQ = 16   # query heads of a KV head, padded (wgmma N: P^T is stored swizzled, 2N >= 32 bytes)
D = 128   # the head dim these kernels serve
DB = D // 2
WG = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per key row of a [T, NQ] array
#: A TMA box's innermost start coordinate must be a multiple of 16 bytes: a misaligned one
#: compiles, runs in interpret mode, and faults on the GPU (CUDA_ERROR_ILLEGAL_INSTRUCTION).
TMA_ALIGN = 16


class MosaicConfig(NamedTuple):
    """KV splits per (sequence, KV head), depth of the TMA ring, whether the paged kernels
    read a tile's block ids one tile ahead (:class:`Issue`; measured: no win), and whether
    Pallas puts a warpgroup barrier before and after every shared-memory store
    (``auto_barriers``; False: the kernel's own, two per tile plus the 3-bit unpack's: not
    yet timed)."""
    num_splits: int = 16
    stages: int = 2
    prefetch: bool = False
    auto_barriers: bool = True


class Format(NamedTuple):
    """What a cache's tiles hold (static). Family A: the defaults. vLLM (family B):
    ``low_nibble_first`` (the even coordinate in the low nibble), ``key_nc`` (decoded keys
    divided by their own L2 norm), ``value_offset`` (values are ``(level + value_offset) *
    scale + zero``: the V table holds ``level - value_offset`` centred, antisymmetric levels)
    with per-row (scale, zero) instead of a norm, and ``q_parts=2`` (the query as an fp16
    hi/lo pair: four score products instead of two); ``fp8_keys`` (vLLM's k8v4: key rows are
    D float8 e4m3 bytes, unrotated and unscaled; the query is packed in its first and second
    halves instead of even and odd coordinates); ``dense_v`` (flash_attention_tq4: values
    are fp16 tiles [T, D] in natural coordinate order that feed P@V from the TMA ring, no
    decode; rows past the split's end are zeroed in shared memory first, so garbage there
    cannot reach the output as 0 * inf)."""
    low_nibble_first: bool = False
    key_nc: bool = False
    value_offset: float | None = None
    q_parts: int = 1
    fp8_keys: bool = False  # keys as raw e4m3 bytes [T, D] (no norm), the query in halves
    dense_v: bool = False  # values as fp16 tiles [T, D] (natural order; no norm, no decode)


class Ops:
    """The compiled kernel's Mosaic-only operations, or plain-jnp stand-ins where GPU interpret
    mode lacks them (jax 0.10: layouted loads, wgmma from transposed shared memory; every
    version: wgmma with a register operand, inline PTX, aliased RefUnion members)."""

    def __init__(self, interpret: bool, auto_barriers: bool = True):
        self.interpret, self.full_interp = interpret, compat.INTERPRET_FULL
        self.auto_barriers = auto_barriers

    def sync(self) -> None:
        """Where Pallas's automatic barriers are off (``MosaicConfig.auto_barriers``): a
        warpgroup barrier (with the async-proxy fence of ``commit_smem``) that orders the
        threads' shared-memory stores against other threads' loads; else nothing."""
        if not self.auto_barriers:
            plgpu.commit_smem()

    def launch_params(self, out_of_bounds_reads: str = "uninitialized") -> dict:
        """:func:`launch_params` of this kernel."""
        return launch_params(self.interpret, out_of_bounds_reads, self.auto_barriers)

    def smem(self, shape, dtype, swizzle=None):
        if self.interpret or swizzle is None:
            return plgpu.SMEM(shape, dtype)
        elems = swizzle // jnp.dtype(dtype).itemsize
        return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                    plgpu.SwizzleTransform(swizzle)))

    def load(self, ref, layout, optimized: bool = True):
        if self.interpret and not self.full_interp:
            return ref[...]
        return compat.load(ref, layout, optimized)

    def box_ring(self, stages: int, width: int = 16, dtype: Any = jnp.float32) -> Any:
        """Scratch for TMA boxes of ``width`` bytes per key row [stages, T, width] u8 whose
        bytes hold per-row fields (and codes), aliased as [stages, T, width / size] ``dtype``
        when compiled (interpret mode: the pair, the view unused)."""
        u8 = plgpu.SMEM((stages, T, width), jnp.uint8)
        view = plgpu.SMEM((stages, T, width // jnp.dtype(dtype).itemsize), dtype)
        return (u8, view) if self.interpret else plgpu.RefUnion(u8, view)

    def window_field(self, window, slot, col, dtype: Any = jnp.float32):
        """Column ``col`` (in ``dtype`` units; an int or a traced int32) of ring slot ``slot``
        of a :meth:`box_ring`: [T] f32 in ROWS layout."""
        u8, view = window
        if self.interpret:
            size = jnp.dtype(dtype).itemsize
            raw = lax.dynamic_slice_in_dim(u8.at[slot][...], col * size, size, axis=1)
            return lax.bitcast_convert_type(raw, dtype).reshape(T).astype(jnp.float32)
        # unoptimized: no transfer plan exists for every row stride (a vLLM box's 96 bytes)
        return compat.load(view.at[slot, :, col], ROWS, False).astype(jnp.float32)

    def halfword_column(self, window, slot, col):
        """16-bit column ``col`` (an int or a traced int32) of ring slot ``slot`` of a
        :meth:`box_ring` with a 16-bit view: [T] uint32 in ROWS layout."""
        u8, view = window
        if self.interpret:
            raw = lax.dynamic_slice_in_dim(u8.at[slot][...], col * 2, 2, axis=1)
        else:
            raw = compat.load(view.at[slot, :, col], ROWS, False)
        return lax.bitcast_convert_type(raw, jnp.uint16).reshape(T).astype(jnp.uint32)

    def unpack3(self, window, slot, offset, nib):
        """The D 3-bit codes (LSB-first) at byte ``offset`` (even) of each row of ring slot
        ``slot`` -> a 4-bit code tile [T, DB] u8 of nibbles ``code + 4``, the even coordinate
        in the low nibble (:func:`.lut.nibble_words`), in WG layout. ``nib``: scratch
        [T, DB] u8 aliased as [T, DB / 4] u32 (compiled; None in interpret mode)."""
        words = nibble_words([self.halfword_column(window, slot, offset // 2 + j)
                              for j in range(3 * D // 16)])
        if self.interpret:
            return lax.bitcast_convert_type(jnp.stack(words, axis=1), jnp.uint8).reshape(T, DB)
        u8, u32 = nib
        self.sync()  # other threads' loads of the scratch are done
        for j, w in enumerate(words):  # a key row's words, replicated over its quad
            u32.at[:, j][...] = w
        self.sync()
        return self.load(u8, WG, False)

    @staticmethod
    def nibble_scratch() -> Any:
        """Scratch for :meth:`unpack3` (compiled kernels; interpret mode needs none)."""
        return plgpu.RefUnion(plgpu.SMEM((T, DB), jnp.uint8), plgpu.SMEM((T, DB // 4), jnp.uint32))

    def full(self, shape, value, layout):
        x = jnp.full(shape, value, jnp.float32)
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WG)

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


class Ring(NamedTuple):
    """One operand's TMA ring: ``codes`` [stages, T, W] u8 shared (:func:`code_ring`, or a
    :meth:`Ops.box_ring` member), ``norms(slot)`` -> a tuple of per-row [T] f32 vectors in ROWS
    layout (the norm; or a vLLM value's scale and zero), ``bar``: one barrier per slot,
    ``swizzled``: as the codes; ``offset`` (None: 0, the whole W): the codes' byte column in
    the box (an int or a traced int32), ``width`` bytes of them (a misaligned field copied in
    an aligned box, :func:`aligned_box`); ``window``: the :meth:`Ops.box_ring` pair (16-bit
    view) when the codes are a 3-bit stream (:meth:`Ops.unpack3`), else None."""
    codes: Any
    norms: Callable[[Any], Any]
    bar: Any
    swizzled: bool = True
    offset: Any = None
    width: int = DB
    window: Any = None

    def tile(self, slot):
        """Wait for slot ``slot``; its codes ref [T, width] and per-row vectors."""
        plgpu.barrier_wait(self.bar.at[slot])
        codes = self.codes.at[slot]
        if self.offset is not None:
            codes = codes.at[:, pl.ds(self.offset, self.width)]
        return codes, self.norms(slot)


def box_width(part_bytes: int) -> int:
    """Bytes of a TMA box that holds ``part_bytes`` starting at any even byte column: the
    part and the <= 14 bytes before it down to a TMA_ALIGN column."""
    return -(-(part_bytes + TMA_ALIGN - 2) // TMA_ALIGN) * TMA_ALIGN


def aligned_box(field: Any, width: int, row_width: int) -> tuple[Any, Any]:
    """The TMA box of ``width`` bytes of a row of ``row_width`` bytes (both multiples of
    TMA_ALIGN) that holds byte column ``field`` (an int, or a traced int32) and what follows
    it: (its start, a multiple of TMA_ALIGN inside the row; ``field``'s offset in it)."""
    if isinstance(field, int):
        start = min(field // TMA_ALIGN * TMA_ALIGN, row_width - width)
    else:
        start = jnp.minimum(field // TMA_ALIGN * TMA_ALIGN, row_width - width)
    return start, field - start


class Issue(NamedTuple):
    """How a kernel starts tile i's copies: ``locate(i)`` -> what they need (a paged cache:
    the tile's block ids, read from the block table in HBM), called one tile ahead of
    ``copy(located, slot)``, which starts them into ring slot ``slot``: the table reads'
    latency overlaps a tile's work instead of stalling the warpgroup before its copies.
    ``locate`` must be safe for any i >= 0 (its result is unused past the split's tiles)."""
    locate: Callable[[Any], Any]
    copy: Callable[[Any, Any], None]


def page_issuer(cache_hbm, bt_row, *, start, end, block_size: int, num_blocks: int,
                cols: tuple, prefetch: bool = False) -> Issue | Callable[[Any, int], None]:
    """The :class:`Issue` (``prefetch``; else ``issue(i, slot)``, the ids read as the
    copies start) of a paged cache [num_blocks * block_size, row bytes] in HBM: tile
    i of the split [start, end) is T / block_size pages; each page's block id is read from
    ``bt_row`` (the sequence's block-table row in HBM; entries past the split's last block are
    never read, nor any past the row: the last valid one stands in, its rows masked by the
    length; ids are clamped into the cache) and every ``(byte column, width, ring, barrier)``
    of ``cols`` is copied by TMA into its ring slot. Byte columns must be multiples of
    TMA_ALIGN (:func:`aligned_box`)."""
    def locate(i):
        first = (start + i * T) // block_size
        # the sequence's last block in this split (0 for an empty split: read, never used)
        last = jnp.clip((end - 1) // block_size, 0, bt_row.shape[0] - 1)
        return tuple(jnp.clip(bt_row[jnp.minimum(first + j, last)], 0, num_blocks - 1)
                     for j in range(T // block_size))

    def copy(blocks, slot):
        for j, blk in enumerate(blocks):
            rows, dst = pl.ds(blk * block_size, block_size), pl.ds(j * block_size, block_size)
            for col, width, buf, bar in cols:
                plgpu.copy_gmem_to_smem(cache_hbm.at[rows, pl.ds(col, width)],
                                        buf.at[slot, dst], bar.at[slot])
    return Issue(locate, copy) if prefetch else (lambda i, slot: copy(locate(i), slot))


def attend_split(ops: Ops, *, start, end, stages: int, issue: Issue | Callable[[Any, int], None],
                 k: Ring, v: Ring, q_hbm, q_smem, q_bar, kt_ref, vt_ref, planes: tuple,
                 o_ref, lse_ref, fmt: Format = Format(), nib: Any = None) -> None:
    """The keys [start, end) of one split (``end <= start``: none) in tiles of T, then the
    split's output: ``o_ref`` [D, NQ] f32 (O^T normalized, coordinates even then odd) and
    ``lse_ref`` [NQ] (base 2; -inf for no keys). ``issue``: an :class:`Issue`, or
    ``issue(i, slot)`` that starts tile i's copies into ring slot ``slot`` of ``k`` and ``v``;
    ``q_hbm`` [2 * q_parts, NQ, DB] f16 (even, odd
    coordinates per part, pre-scaled) is copied to ``q_smem`` first; ``kt_ref``/``vt_ref``:
    K and V codebooks [16] f32; ``planes``: their prmt tables (None: select lookups); ``fmt``:
    :class:`Format`; ``nib``: :meth:`Ops.nibble_scratch` where a ring holds 3-bit codes. The
    loop's decoded-V and P tiles and the epilogue's output buffers are scoped one after the
    other, so they share shared memory (more CTAs per SM)."""
    plgpu.copy_gmem_to_smem(q_hbm, q_smem, q_bar)
    plgpu.barrier_wait(q_bar)
    tables = [[ref[i].astype(jnp.float16) for i in range(16)] for ref in (kt_ref, vt_ref)]
    n_tiles = jnp.maximum(end - start + (T - 1), 0) // T
    if not isinstance(issue, Issue):
        issue = Issue(lambda i: jnp.asarray(i, jnp.int32), issue)
    for s in range(stages):
        pl.when(s < n_tiles)(lambda s=s: issue.copy(issue.locate(s), s))

    def halves(ring, codes, slot, table, lut):
        """A ring slot's code tile -> (even, odd coordinates) fp16 [T, DB] each."""
        if ring.window is None:
            tile = ops.load(codes, WG, ring.swizzled)
        else:
            tile = ops.unpack3(ring.window, slot, ring.offset, nib)
        high, low = ops.decode(tile, table, lut)
        return (low, high) if fmt.low_nibble_first else (high, low)

    def fp8_halves(codes):
        """Raw e4m3 key bytes [T, D] -> (first, second half) fp16 [T, DB] each."""
        return tuple(lax.bitcast_convert_type(ops.load(codes.at[:, pl.ds(n * DB, DB)], WG, False),
                                              jnp.float8_e4m3fn).astype(jnp.float16)
                     for n in range(2))

    def zero_rows_from(tile, n):
        """Rows n.. of a dense V tile [T, D] fp16 in shared memory set to zero."""
        x = ops.load(tile, WG)
        tile[...] = jnp.where(ops.iota((T, D), 0) < n, x, jnp.zeros_like(x))

    def step(i, carry, vdec, p_smem):
        acc, m, l_rows, z_rows, ahead = carry
        slot = lax.rem(i, stages)
        ops.sync()  # the previous tile's P@V has read vdec and P (and every warp is past it)
        k_codes, k_rows = k.tile(slot)
        if fmt.fp8_keys:
            k_even, k_odd = fp8_halves(k_codes)  # the halves pair with the query's halves
        else:
            k_even, k_odd = halves(k, k_codes, slot, tables[0], planes[0])
        s = ops.scores([(half, q_smem.at[2 * j + n]) for j in range(fmt.q_parts)
                        for n, half in enumerate((k_even, k_odd))], (T, NQ))
        if k_rows:
            k_scale = k_rows[0]
            if fmt.key_nc:  # the decoded key's own L2 norm, per row (a reduction along D)
                sq = (jnp.square(k_even.astype(jnp.float32))
                      + jnp.square(k_odd.astype(jnp.float32)))
                k_scale = k_scale * lax.rsqrt(sq.sum(axis=1) + VLLM_NC_EPS)
            s = s * lax.broadcast_in_dim(k_scale, (T, NQ), [0])
        valid = (start + i * T + ops.iota((T, NQ), 0)) < end
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=0))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (T, NQ), [1]))
        # the softmax sum stays per key row (summed over the rows once, after the loop): one
        # cross-warp reduction per tile (the max) instead of two
        l_rows = l_rows * lax.broadcast_in_dim(alpha, (T, NQ), [1]) + p
        v_codes, v_rows = v.tile(slot)
        if fmt.dense_v:
            first = start + i * T
            pl.when(first + T > end)(lambda: zero_rows_from(v_codes, end - first))
            p_val, v_src = p, v_codes
        else:
            v_even, v_odd = halves(v, v_codes, slot, tables[1], planes[1])
            p_val = p * lax.broadcast_in_dim(v_rows[0], (T, NQ), [0])  # the norm, or scale
            vdec.at[:, pl.ds(0, DB)][...] = v_even
            vdec.at[:, pl.ds(DB, DB)][...] = v_odd
            v_src = vdec
        p_smem[...] = jnp.where(valid, p_val, 0.0).astype(jnp.float16)
        plgpu.commit_smem()
        if fmt.value_offset is not None:  # sum_keys p * (zero + offset * scale), per row
            zero = lax.broadcast_in_dim(v_rows[1] + fmt.value_offset * v_rows[0], (T, NQ), [0])
            z_rows = (z_rows * lax.broadcast_in_dim(alpha, (T, NQ), [1])
                      + jnp.where(valid, p * zero, 0.0))
        acc = ops.pv(acc * lax.broadcast_in_dim(alpha, (D, NQ), [1]), v_src, p_smem)
        pl.when(i + stages < n_tiles)(lambda: issue.copy(ahead, slot))
        return acc, m_new, l_rows, z_rows, issue.locate(i + stages + 1)

    def loop(*bufs):
        vdec, p_smem = bufs if len(bufs) == 2 else (None, bufs[0])
        rows = ops.full((T, NQ), 0.0, WG)
        carry = (ops.full((D, NQ), 0.0, WG), ops.full((NQ,), -jnp.inf, WG.reduce(0)), rows,
                 None if fmt.value_offset is None else rows, issue.locate(stages))
        acc, m, l_rows, z_rows, _ = lax.fori_loop(
            0, n_tiles, lambda i, c: step(i, c, vdec, p_smem), carry)
        if z_rows is not None:
            acc = acc + lax.broadcast_in_dim(z_rows.sum(axis=0), (D, NQ), [1])
        return acc, m, l_rows.sum(axis=0)

    bufs = [] if fmt.dense_v else [ops.smem((T, D), jnp.float16, 32)]  # decoded V
    acc, m, l = pl.run_scoped(loop, *bufs, ops.smem((T, NQ), jnp.float16, 32))

    def epilogue(o_smem, lse_smem):
        ops.sync()  # the buffers reuse the loop's
        o_smem[...] = acc / lax.broadcast_in_dim(jnp.where(l == 0.0, 1.0, l), (D, NQ), [1])
        lse_smem[...] = m + jnp.log(l) * LOG2E  # -inf for an empty split
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref)
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref)
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(epilogue, ops.smem((D, NQ), jnp.float32), ops.smem((NQ,), jnp.float32))


def code_swizzle(column: int, row_width: int | None) -> int | None:
    """The swizzle (bytes: 64, 32, or None for plain) of code tiles copied by TMA from byte
    column ``column`` (plus any multiple of 64) of rows of ``row_width`` bytes (None: a
    contiguous [.., S, DB] array, 64). Mosaic tiles the source array like the tile (8 rows x
    swizzle bytes) and indexes it in whole tiles, so both must be multiples of the swizzle: a
    column off that grid lowers, passes interpret mode, and reads the wrong bytes on the GPU
    (found on an H200: the V codes of 8 KV heads at byte 544). Plain tiles load with bank
    conflicts (vLLM's 134-byte slots: 1072-byte rows at 8 KV heads)."""
    if row_width is None:
        return DB
    for swz in (DB, 32):
        if column % swz == 0 and row_width % swz == 0:
            return swz
    return None


def code_ring(ops: Ops, stages: int, swizzle: int | None = DB, width: int = DB) -> Any:
    """A ring of code tiles [stages, T, width] u8 (``swizzle``: :func:`code_swizzle`)."""
    return ops.smem((stages, T, width), jnp.uint8, swizzle)


def query_scratch(ops: Ops, q_parts: int = 1) -> dict:
    """The query tile [2 * q_parts, NQ, DB] f16 and its barrier (every decode kernel)."""
    return dict(q_smem=ops.smem((2 * q_parts, NQ, DB), jnp.float16, 128),
                q_bar=plgpu.Barrier(num_arrivals=1))


def split_chunk(keys: int, num_splits: int) -> int:
    """Keys per split: the cache's ``keys`` in ``num_splits`` whole tiles."""
    return pl.cdiv(pl.cdiv(keys, T), num_splits) * T


def pack_query(q_rot: jax.Array, scale: float, q_parts: int = 1,
               halves: bool = False) -> jax.Array:
    """[B, H, G, D] rotated queries -> [B, H, 2 * q_parts, NQ, DB] f16: even and odd
    coordinates (``halves``: first and second half; ``q_parts=2``: of the fp16 hi part, then
    of the lo remainder), rows padded to NQ, pre-scaled by ``scale * log2 e`` (base 2)."""
    g = q_rot.shape[2]
    q = q_rot.astype(jnp.float32) * (scale * LOG2E)
    if halves:
        q = jnp.stack([q[..., :DB], q[..., DB:]], axis=2)
    else:
        q = jnp.stack([q[..., 0::2], q[..., 1::2]], axis=2)
    parts = [q.astype(jnp.float16)]
    if q_parts == 2:
        parts.append((q - parts[0].astype(jnp.float32)).astype(jnp.float16))
    q = jnp.concatenate(parts, axis=2)
    return jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, NQ - g), (0, 0)))


def merge_output(o: jax.Array, lse: jax.Array, g: int, interleaved: bool = True) -> jax.Array:
    """Split outputs o [B, H, S, D, NQ] (O^T; ``interleaved``: even then odd coordinates,
    else natural order) and lse [B, H, S, NQ] (base 2) -> float32 [B, H, g, D] in the original
    coordinate order."""
    out = merge_splits(jnp.swapaxes(o, 3, 4), lse * LN2, 2)[:, :, :g]  # [B, H, g, D]
    if not interleaved:
        return out
    return jnp.stack([out[..., :DB], out[..., DB:]], axis=-1).reshape(out.shape)


def prmt_planes(raw: Any) -> tuple | None:
    """Static prmt planes of a concrete codebook antisymmetric in fp16, else None."""
    if raw is None or isinstance(raw, jax.core.Tracer) or jnp.size(raw) != 16:
        return None
    form = static_planes(raw, jnp.float16)
    return form[1:] if form[0] == "symmetric" else None


def launch_params(interpret: bool, out_of_bounds_reads: str = "uninitialized",
                  auto_barriers: bool = True) -> dict:
    """``plgpu.kernel`` keywords: interpret params, or the compiler params."""
    if interpret:
        return dict(interpret=compat.interpret_params(out_of_bounds_reads))
    return dict(compiler_params=compat.compiler_params(auto_barriers))
