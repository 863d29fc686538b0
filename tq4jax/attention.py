"""Contiguous attention: flash_attention, flash_attention_tq4, flash_attention_tq4_kv (LAYOUTS A1).

One FlashAttention-2 forward kernel serves all three: K and V tiles come either dense
(fp16/bf16) or as TQ4 codes that are decoded right after their load (nibble unpack, codebook
gather, norm applied to scores / probabilities) and never exist in device memory.

* Compressed K: the query is pre-rotated once (``q @ Pi^T``) and split into its even and odd
  coordinates, so ``s = norm_k * (q_even . c[hi] + q_odd . c[lo])`` needs no interleave.
* Compressed V: the kernel accumulates ``(p * norm_v) @ c`` in rotated space, as even and odd
  halves; the wrapper post-rotates once, ``out = out_even @ Pi[0::2] + out_odd @ Pi[1::2]``.

Shapes: q [B, H_Q, Sq, D] fp16/bf16; k/v [B, H_KV, Sk, D]; codes [B, H_KV, Sk, D/2] uint8;
norms [B, H_KV, Sk] (or [..., 1]) f32; output [B, H_Q, Sq, D] in q's dtype. Causal masking
aligns the last query with the last key; rows with no visible key give zeros.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _checks as ck
from ._config import kernel_mode, next_pow2, pallas_call, resolve_impl
from ._tiles import (decode_bytes, load_rows, load_tile, pair_table, store_rows, store_tile,
                     tile_index)
from .codec import dequantize_reference
from .layout import pad_codebook

LOG2E = math.log2(math.e)
MASKED = -jnp.inf
M_INIT = -1e30  # finite running max: a fully masked block gives p = 0, never NaN


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
#
# Rows. A program serves a block of the ``group * Sq`` query rows that share one KV head,
# ordered position-major (row r is query position r // group of query head r % group), so a
# decoded K/V tile feeds every query head of its group and a causal block spans few positions.
# Physically q and the output are viewed as [B, HKV, group * Sq, W] (head-major, a free
# reshape of [B, HQ, Sq, W]): row r lives at (r % group) * Sq + r // group.


class Config(NamedTuple):
    """Static kernel configuration: tile sizes, warps, pipeline stages, KV splits."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 1


def _split_refs(refs, k_tq4: bool, v_tq4: bool, has_mask: bool):
    """Kernel refs -> (q refs, k refs, v refs, mask ref or None, output refs)."""
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]  # noqa: E731
    q_refs = take(2 if k_tq4 else 1)
    k_refs = take(3 if k_tq4 else 1)
    v_refs = take(3 if v_tq4 else 1)
    mask_ref = take(1)[0] if has_mask else None
    return q_refs, k_refs, v_refs, mask_ref, refs


def _columns(tq4: bool, d: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Column indices of a K/V/q tile (D, or D/2 bytes when compressed, padded to a power of
    two) and their mask (None when no padding)."""
    width = d // 2 if tq4 else d
    cols, ok = tile_index(0, next_pow2(width), width)
    return cols, (None if next_pow2(width) == width else ok)


def _attn_kernel(*refs, k_tq4: bool, v_tq4: bool, has_mask: bool, mask_heads: bool,
                 causal: bool, scale_log2: float, cfg: Config, group: int, sq: int, sk: int,
                 d: int):
    """One program per (row block, batch * KV head, KV split): online softmax over the keys
    of its split. With one split it writes the normalized output; with several it writes
    unnormalized (acc, m, l) per split (log2 units) for the wrapper's log-sum-exp merge."""
    q_refs, k_refs, v_refs, mask_ref, o_refs = _split_refs(refs, k_tq4, v_tq4, has_mask)
    bm, bn = cfg.block_m, cfg.block_n
    n_rows = group * sq
    rb = pl.num_programs(0) - 1 - pl.program_id(0)  # heaviest causal blocks first
    r, r_ok = tile_index(rb * bm, bm, n_rows)
    pos = r // group
    # rows past n_rows keep distinct (masked) indices: interpret mode scatters masked lanes too
    phys = jnp.where(r_ok, (r % group) * sq + pos, r)
    shift = sk - sq  # causal: the last query sees the last key

    kcols, kc_ok = _columns(k_tq4, d)
    vcols, vc_ok = _columns(v_tq4, d)
    q_tiles = [load_tile(ref, phys, r_ok, kcols, kc_ok) for ref in q_refs]
    dt = q_tiles[0].dtype
    dot = partial(jnp.dot, preferred_element_type=jnp.float32)

    # Key range of this program, and the prefix of whole blocks that needs no masking.
    split_len = pl.cdiv(pl.cdiv(sk, cfg.splits), bn) * bn
    k_start = pl.program_id(2) * split_len
    k_stop = jnp.minimum(k_start + split_len, sk)
    hi = safe = k_stop
    if causal:
        last_pos = (jnp.minimum(rb * bm + bm, n_rows) - 1) // group
        hi = jnp.minimum(k_stop, last_pos + shift + 1)
        safe = jnp.minimum(hi, (rb * bm) // group + shift + 1)
    n_all = pl.cdiv(jnp.maximum(hi - k_start, 0), bn)
    n_safe = 0 if has_mask else jnp.minimum(jnp.maximum(safe - k_start, 0) // bn, n_all)

    def body(j, carry, masked: bool):
        accs, m_prev, l_prev = carry
        k_pos, k_ok = tile_index(k_start + j * bn, bn, k_stop)
        kmask = k_ok if masked else None
        if k_tq4:
            kp_ref, kn_ref, kt_ref = k_refs
            k_even, k_odd = decode_bytes(kt_ref, load_tile(kp_ref, k_pos, kmask, kcols, kc_ok), dt)
            s = dot(q_tiles[0], k_even.T) + dot(q_tiles[1], k_odd.T)
            norm = load_rows(kn_ref, k_pos, k_ok) if masked else kn_ref[k_pos]
            s = s * (norm * scale_log2)[None, :]
        else:
            s = dot(q_tiles[0], load_tile(k_refs[0], k_pos, kmask, kcols, kc_ok).T) * scale_log2
        if masked:
            if mask_ref is not None:
                s = s + load_tile(mask_ref, phys if mask_heads else pos, r_ok, k_pos,
                                  k_ok).astype(jnp.float32) * LOG2E
            visible = k_ok[None, :]
            if causal:
                visible = visible & (k_pos[None, :] <= pos[:, None] + shift)
            s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        if v_tq4:
            vp_ref, vn_ref, vt_ref = v_refs
            norm = load_rows(vn_ref, k_pos, k_ok) if masked else vn_ref[k_pos]
            pv = (p * norm[None, :]).astype(dt)
            v_even, v_odd = decode_bytes(vt_ref, load_tile(vp_ref, k_pos, kmask, vcols, vc_ok), dt)
            accs = (accs[0] * alpha[:, None] + dot(pv, v_even),
                    accs[1] * alpha[:, None] + dot(pv, v_odd))
        else:
            v = load_tile(v_refs[0], k_pos, kmask, vcols, vc_ok)
            accs = (accs[0] * alpha[:, None] + dot(p.astype(dt), v),)
        return accs, m_new, l_new

    wv = vcols.shape[0]
    accs = tuple(jnp.zeros((bm, wv), jnp.float32) for _ in range(2 if v_tq4 else 1))
    m0 = jnp.full((bm,), M_INIT, jnp.float32)
    carry = (accs, m0, jnp.zeros_like(m0))
    carry = lax.fori_loop(0, n_safe, partial(body, masked=False), carry)
    accs, m, l_fin = lax.fori_loop(n_safe, n_all, partial(body, masked=True), carry)

    if cfg.splits == 1:
        inv_l = 1.0 / jnp.where(l_fin > 0, l_fin, 1.0)
        for o_ref, acc in zip(o_refs, accs):
            store_tile(o_ref, phys, r_ok, vcols, vc_ok, acc * inv_l[:, None])
        return
    *acc_refs, m_ref, l_ref = o_refs
    for o_ref, acc in zip(acc_refs, accs):
        store_tile(o_ref, phys, r_ok, vcols, vc_ok, acc)
    store_rows(m_ref, phys, r_ok, m)
    store_rows(l_ref, phys, r_ok, l_fin)


#: Streaming multiprocessors to fill (H100/H200: 132); KV splits aim at 2 programs per SM.
NUM_SMS = 132
#: A KV split covers at least this many keys.
MIN_SPLIT_KEYS = 256


def choose_config(b: int, hkv: int, n_rows: int, sk: int, d: int) -> Config:
    """Tile sizes for ``n_rows = group * Sq`` query rows per KV head over ``sk`` keys, and
    enough KV splits to give every SM two programs when there are few row blocks."""
    if n_rows <= 64:  # decode / short chunks: one row block, long key tiles
        bm = max(16, next_pow2(n_rows))
        cfg = Config(bm, 64 if d <= 128 else 32, 4, 3)
    elif d <= 128:
        cfg = Config(128, 64, 8, 3)
    else:
        cfg = Config(64, 32, 8, 2)
    programs = pl.cdiv(n_rows, cfg.block_m) * b * hkv
    splits = 1
    if programs < 2 * NUM_SMS:
        splits = max(1, min(pl.cdiv(2 * NUM_SMS, programs), sk // MIN_SPLIT_KEYS))
    return cfg._replace(splits=int(splits))


def _split_spec(shape: tuple, bh) -> pl.BlockSpec:
    """BlockSpec of a per-split partial output [B, HKV, splits, rows(, W)]."""
    zeros = (0,) * (len(shape) - 3)
    return pl.BlockSpec((None, None, None) + shape[3:], lambda r, i, s: bh(r, i, s) + (s,) + zeros)


@partial(jax.jit, static_argnames=("k_tq4", "v_tq4", "causal", "scale", "d", "cfg", "mode"))
def _attn_pallas(q_parts, k_parts, v_parts, mask, *, k_tq4, v_tq4, causal, scale, d, cfg,
                 mode):
    """q_parts: (q,) or (q_even, q_odd) [B, HQ, Sq, *]; k/v parts: (x,) or (codes, norms,
    pair table); mask: None or [Bm, Hm, Sq, Sk]. Returns a tuple of outputs [B, HQ, Sq, *]:
    (out,) in q's dtype, or (out_even, out_odd) float32 in rotated space for compressed V."""
    b, hq, sq, _ = q_parts[0].shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    group, n_rows, splits = hq // hkv, (hq // hkv) * sq, cfg.splits
    q_view = [x.reshape(b, hkv, n_rows, x.shape[-1]) for x in q_parts]

    def bh(r, i, s):
        return i // hkv, i % hkv

    def rows_spec(x):  # [B, HKV, rows, W] or [B, HKV, Sk] (norms)
        zeros = (0,) * (x.ndim - 2)
        return pl.BlockSpec((None, None) + x.shape[2:], lambda r, i, s: bh(r, i, s) + zeros)

    def kv_specs(parts):
        return [rows_spec(x) if x.ndim >= 3 else pl.BlockSpec(x.shape, lambda r, i, s: (0,))
                for x in parts]

    args = q_view + list(k_parts) + list(v_parts)
    in_specs = [rows_spec(x) for x in q_view] + kv_specs(k_parts) + kv_specs(v_parts)
    mask_heads = False
    if mask is not None:
        bm_, hm = mask.shape[:2]
        mask_heads = hm > 1
        if mask_heads:
            mask = mask.reshape(bm_, hkv, n_rows, sk)
        in_specs.append(pl.BlockSpec((None, None) + mask.shape[2:], lambda r, i, s: (
            i // hkv if bm_ > 1 else 0, i % hkv if mask_heads else 0, 0, 0)))
        args.append(mask)

    widths = (d // 2, d // 2) if v_tq4 else (d,)
    if splits == 1:
        dt = jnp.float32 if v_tq4 else q_parts[0].dtype
        out_shape = tuple(jax.ShapeDtypeStruct((b, hkv, n_rows, w), dt) for w in widths)
        out_specs = tuple(rows_spec(o) for o in out_shape)
    else:
        out_shape = tuple(jax.ShapeDtypeStruct((b, hkv, splits, n_rows, w), jnp.float32)
                          for w in widths)
        out_shape += tuple(jax.ShapeDtypeStruct((b, hkv, splits, n_rows), jnp.float32)
                           for _ in range(2))
        out_specs = tuple(_split_spec(o.shape, bh) for o in out_shape)
    kernel = partial(_attn_kernel, k_tq4=k_tq4, v_tq4=v_tq4, has_mask=mask is not None,
                     mask_heads=mask_heads, causal=causal, scale_log2=scale * LOG2E, cfg=cfg,
                     group=group, sq=sq, sk=sk, d=d)
    outs = pallas_call(kernel, mode=mode, grid=(pl.cdiv(n_rows, cfg.block_m), b * hkv, splits),
                       out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)(*args)
    if splits > 1:  # log-sum-exp merge of the splits (axis 2)
        *accs, m, l = outs
        wgt = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))
        l_tot = jnp.sum(wgt * l, axis=2)
        inv = 1.0 / jnp.where(l_tot > 0, l_tot, 1.0)
        outs = [jnp.sum(wgt[..., None] * a, axis=2) * inv[..., None] for a in accs]
        if not v_tq4:
            outs = [outs[0].astype(q_parts[0].dtype)]
    return tuple(o.reshape(b, hq, sq, o.shape[-1]) for o in outs)


def _run(q_parts, k_parts, v_parts, mask, *, k_tq4, v_tq4, causal, scale, d, cfg=None):
    """Run the kernel with :func:`choose_config` unless ``cfg`` is given."""
    b, hq, sq, _ = q_parts[0].shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    if cfg is None:
        cfg = choose_config(b, hkv, (hq // hkv) * sq, sk, d)
    return _attn_pallas(q_parts, k_parts, v_parts, mask, k_tq4=k_tq4, v_tq4=v_tq4,
                        causal=causal, scale=scale, d=d, cfg=cfg, mode=kernel_mode())


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

def attention_reference(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, sm_scale: float,
                        is_causal: bool, attention_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """float32 softmax attention; q [B, HQ, Sq, D], k/v [B, HKV, Sk, D] (any float dtype).

    Returns float32 [B, HQ, Sq, D]; rows with no visible key are zeros.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, sq, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * sm_scale
    s = s.reshape(b, hq, sq, sk)
    if attention_mask is not None:
        s = s + attention_mask.astype(jnp.float32)
    visible = jnp.ones((sq, sk), bool)
    if is_causal:
        visible = jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq)
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    p = p.reshape(b, hkv, hq // hkv, sq, sk)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST)
    return out.reshape(b, hq, sq, d)


# ----------------------------------------------------------------------------------------------
# argument checks and public ops
# ----------------------------------------------------------------------------------------------

def _check_q(q: Any) -> jnp.ndarray:
    q = ck.as_array("q", q)
    ck.check_dtype("q", q, [jnp.float16, jnp.bfloat16])
    ck.check_ndim("q", q, 4, "[batch, heads_q, seq_q, head_dim]")
    ck.check_head_dim("q", q.shape[-1])
    return q


def _check_kv_dims(name: str, x: Any, q: jnp.ndarray, last: int, sk: int | None) -> int:
    b, hq = q.shape[0], q.shape[1]
    if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != last:
        raise ValueError(f"{name} must have shape [{b}, heads_kv, seq_kv, {last}] to match q "
                         f"{tuple(q.shape)}, got {tuple(x.shape)}")
    if hq % x.shape[1]:
        raise ValueError(f"{name}: heads_q ({hq}) must be a multiple of heads_kv "
                         f"({x.shape[1]})")
    if sk is not None and x.shape[2] != sk:
        raise ValueError(f"{name} must have seq_kv {sk}, got {tuple(x.shape)}")
    return x.shape[2]


def _check_dense_kv(name: str, x: Any, q: jnp.ndarray, sk: int | None = None,
                    hkv: int | None = None) -> jnp.ndarray:
    x = ck.as_array(name, x)
    if x.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    _check_kv_dims(name, x, q, q.shape[-1], sk)
    if hkv is not None and x.shape[1] != hkv:
        raise ValueError(f"{name} must have {hkv} kv heads, got {tuple(x.shape)}")
    return x


def _check_codes(pname: str, nname: str, packed: Any, norms: Any, q: jnp.ndarray,
                 sk: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    packed, norms = ck.check_packed(packed, norms, pname, nname)
    _check_kv_dims(pname, packed, q, q.shape[-1] // 2, sk)
    return packed, norms


def _check_scale(sm_scale: Any, d: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, jax.core.Tracer):
        raise TypeError("sm_scale must be a Python float (static), not a traced value")
    return float(sm_scale)


def _check_mask(mask: Any, q: jnp.ndarray, sk: int) -> jnp.ndarray | None:
    if mask is None:
        return None
    mask = ck.as_array("attention_mask", mask)
    ck.check_float("attention_mask", mask)
    b, hq, sq = q.shape[:3]
    want = (b, hq, sq, sk)
    if mask.ndim > 4 or any(m not in (1, w) for m, w in zip(mask.shape[::-1], want[::-1])):
        raise ValueError(f"attention_mask must broadcast to {want}, got {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return jnp.broadcast_to(mask, mask.shape[:2] + (sq, sk))  # B and H broadcast in-kernel


def _check_tq4_args(q, k_packed, k_norms, centroids, rotation, sm_scale):
    """Checks shared by the TQ4 attention ops; returns the normalized arguments and scale."""
    q = _check_q(q)
    d = q.shape[-1]
    k_packed, k_norms = _check_codes("k_packed", "k_norms", k_packed, k_norms, q)
    return (q, k_packed, k_norms, ck.check_centroids(centroids), ck.check_rotation(rotation, d),
            _check_scale(sm_scale, d))


def _rotate_q(q: jnp.ndarray, rotation: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """q [B, HQ, Sq, D] -> (q_rot even coords, odd coords) in q's dtype; ``q_rot = q @ Pi^T``."""
    q_rot = jnp.matmul(q.astype(jnp.float32), rotation.T, precision=lax.Precision.HIGHEST)
    return q_rot[..., 0::2].astype(q.dtype), q_rot[..., 1::2].astype(q.dtype)


def _post_rotate(o_even: jnp.ndarray, o_odd: jnp.ndarray, rotation: jnp.ndarray,
                 dtype: Any) -> jnp.ndarray:
    """Rotated-space halves [..., D/2] f32 -> original space ``out_rot @ Pi`` in ``dtype``."""
    hi = lax.Precision.HIGHEST
    out = (jnp.matmul(o_even, rotation[0::2], precision=hi)
           + jnp.matmul(o_odd, rotation[1::2], precision=hi))
    return out.astype(dtype)


def _empty_or_none(q: jnp.ndarray, sk: int) -> jnp.ndarray | None:
    if q.shape[2] == 0 or sk == 0 or q.shape[0] == 0:
        return jnp.zeros(q.shape, q.dtype)
    return None


def flash_attention(q: Any, k: Any, v: Any, sm_scale: float | None = None,
                    is_causal: bool = False, attention_mask: Any = None, *,
                    impl: str = "auto") -> jnp.ndarray:
    """FlashAttention-2 forward on dense fp16/bf16 K/V with GQA, causal and additive masks.

    q [B, HQ, Sq, D]; k, v [B, HKV, Sk, D] (HQ % HKV == 0, K/V never repeated in memory);
    attention_mask: additive float mask broadcastable to [B, HQ, Sq, Sk]. Returns q's shape
    and dtype.
    """
    q = _check_q(q)
    k = _check_dense_kv("k", k, q)
    v = _check_dense_kv("v", v, q, k.shape[2], k.shape[1])
    d, sk = q.shape[-1], k.shape[2]
    scale = _check_scale(sm_scale, d)
    mask = _check_mask(attention_mask, q, sk)
    empty = _empty_or_none(q, sk)
    if empty is not None:
        return empty
    if resolve_impl(impl) == "reference":
        return attention_reference(q, k, v, scale, bool(is_causal), mask).astype(q.dtype)
    (out,) = _run((q,), (k,), (v,), mask, k_tq4=False, v_tq4=False, causal=bool(is_causal),
                  scale=scale, d=d)
    return out.astype(q.dtype)


def flash_attention_tq4(q: Any, k_packed: Any, k_norms: Any, v: Any, centroids: Any,
                        rotation: Any, sm_scale: float | None = None, is_causal: bool = False,
                        *, impl: str = "auto") -> jnp.ndarray:
    """Attention with TQ4-compressed K (decoded in the kernel) and dense fp16/bf16 V.

    k_packed [B, HKV, Sk, D/2] uint8, k_norms [B, HKV, Sk] f32, v [B, HKV, Sk, D],
    centroids [2**bits] f32, rotation Pi [D, D]. Returns q's shape and dtype.
    """
    q, k_packed, k_norms, centroids, rotation, scale = _check_tq4_args(
        q, k_packed, k_norms, centroids, rotation, sm_scale)
    d, sk = q.shape[-1], k_packed.shape[2]
    v = _check_dense_kv("v", v, q, sk, k_packed.shape[1])
    empty = _empty_or_none(q, sk)
    if empty is not None:
        return empty
    if resolve_impl(impl) == "reference":
        k = dequantize_reference(k_packed, k_norms, centroids, rotation, jnp.float32)
        return attention_reference(q, k, v, scale, bool(is_causal)).astype(q.dtype)
    k_parts = (k_packed, k_norms, pair_table(pad_codebook(centroids), q.dtype))
    (out,) = _run(_rotate_q(q, rotation), k_parts, (v,),
                  None, k_tq4=True, v_tq4=False, causal=bool(is_causal), scale=scale, d=d)
    return out.astype(q.dtype)


def flash_attention_tq4_kv(q: Any, k_packed: Any, k_norms: Any, v_packed: Any, v_norms: Any,
                           centroids: Any, rotation: Any, sm_scale: float | None = None,
                           is_causal: bool = False, v_centroids: Any = None, *,
                           impl: str = "auto") -> jnp.ndarray:
    """Attention with TQ4-compressed K and V, both decoded in the kernel.

    Codes [B, HKV, Sk, D/2] uint8, norms [B, HKV, Sk] f32; ``v_centroids`` is V's codebook when
    it differs from K's (e.g. K 4-bit, V 3-bit). Returns q's shape and dtype.
    """
    q, k_packed, k_norms, centroids, rotation, scale = _check_tq4_args(
        q, k_packed, k_norms, centroids, rotation, sm_scale)
    d, sk = q.shape[-1], k_packed.shape[2]
    v_packed, v_norms = _check_codes("v_packed", "v_norms", v_packed, v_norms, q, sk)
    if v_packed.shape != k_packed.shape:
        raise ValueError(f"v_packed must have k_packed's shape {tuple(k_packed.shape)}, "
                         f"got {tuple(v_packed.shape)}")
    v_centroids = centroids if v_centroids is None else ck.check_centroids(v_centroids,
                                                                           "v_centroids")
    empty = _empty_or_none(q, sk)
    if empty is not None:
        return empty
    if resolve_impl(impl) == "reference":
        k = dequantize_reference(k_packed, k_norms, centroids, rotation, jnp.float32)
        v = dequantize_reference(v_packed, v_norms, v_centroids, rotation, jnp.float32)
        return attention_reference(q, k, v, scale, bool(is_causal)).astype(q.dtype)
    k_parts = (k_packed, k_norms, pair_table(pad_codebook(centroids), q.dtype))
    v_parts = (v_packed, v_norms, pair_table(pad_codebook(v_centroids), q.dtype))
    o_even, o_odd = _run(_rotate_q(q, rotation), k_parts, v_parts, None, k_tq4=True,
                         v_tq4=True, causal=bool(is_causal), scale=scale, d=d)
    return _post_rotate(o_even, o_odd, rotation, q.dtype)
