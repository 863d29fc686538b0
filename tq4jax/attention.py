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
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _checks as ck
from ._config import kernel_mode, next_pow2, pallas_call, resolve_impl
from ._tiles import decode_pair, load_rows, load_tile, store_rows, store_tile, tile_index
from .codec import dequantize_reference, padded_dims
from .layout import pad_codebook

LOG2E = math.log2(math.e)
MASKED = -jnp.inf
M_INIT = -1e30  # finite running max: a fully masked block gives p = 0, never NaN


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------

def _split_refs(refs, k_tq4: bool, v_tq4: bool, has_mask: bool):
    """Kernel refs -> (q refs, k refs, v refs, mask ref or None, output refs)."""
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]  # noqa: E731
    q_refs = take(2 if k_tq4 else 1)
    k_refs = take(3 if k_tq4 else 1)
    v_refs = take(3 if v_tq4 else 1)
    mask_ref = take(1)[0] if has_mask else None
    return q_refs, k_refs, v_refs, mask_ref, refs


def _attend(q_refs, k_refs, v_refs, mask_ref, q_rows, q_ok, q_pos, k_start, k_end, n_blocks, *,
            k_tq4: bool, v_tq4: bool, causal: bool, scale_log2: float, block_n: int, sq: int,
            sk: int, d: int):
    """Online softmax of the query rows ``q_rows`` (positions ``q_pos``) over keys
    ``[k_start, k_end)``, ``n_blocks`` tiles of ``block_n``. Returns (accs, m, l) unnormalized,
    in log2 units; accs is (acc,) or (acc_even, acc_odd) when V is compressed."""
    dp, hp = padded_dims(d)
    cols, c_ok = tile_index(0, dp, d)
    hcols, h_ok = tile_index(0, hp, d // 2)
    if k_tq4:
        q_even, q_odd = (load_tile(r, q_rows, q_ok, hcols, h_ok) for r in q_refs)
        dt = q_even.dtype
    else:
        q = load_tile(q_refs[0], q_rows, q_ok, cols, c_ok)
        dt = q.dtype
    dot = partial(jnp.dot, preferred_element_type=jnp.float32)

    def body(j, carry):
        accs, m_prev, l_prev = carry
        k_pos, k_ok = tile_index(k_start + j * block_n, block_n, k_end)
        if k_tq4:
            kp_ref, kn_ref, kc_ref = k_refs
            c_even, c_odd = decode_pair(kc_ref, load_tile(kp_ref, k_pos, k_ok, hcols, h_ok))
            s = dot(q_even, c_even.astype(dt).T) + dot(q_odd, c_odd.astype(dt).T)
            s = s * (load_rows(kn_ref, k_pos, k_ok) * scale_log2)[None, :]
        else:
            k = load_tile(k_refs[0], k_pos, k_ok, cols, c_ok)
            s = dot(q, k.T) * scale_log2
        if mask_ref is not None:
            s = s + load_tile(mask_ref, q_pos, q_ok, k_pos, k_ok).astype(jnp.float32) * LOG2E
        visible = k_ok[None, :]
        if causal:
            visible = visible & (k_pos[None, :] <= q_pos[:, None] + (sk - sq))
        s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        if v_tq4:
            vp_ref, vn_ref, vc_ref = v_refs
            pv = (p * load_rows(vn_ref, k_pos, k_ok)[None, :]).astype(dt)
            v_even, v_odd = decode_pair(vc_ref, load_tile(vp_ref, k_pos, k_ok, hcols, h_ok))
            accs = (accs[0] * alpha[:, None] + dot(pv, v_even.astype(dt)),
                    accs[1] * alpha[:, None] + dot(pv, v_odd.astype(dt)))
        else:
            v = load_tile(v_refs[0], k_pos, k_ok, cols, c_ok)
            accs = (accs[0] * alpha[:, None] + dot(p.astype(v.dtype), v),)
        return accs, m_new, l_new

    rows = q_rows.shape[0]
    width = hp if v_tq4 else dp
    accs = tuple(jnp.zeros((rows, width), jnp.float32) for _ in range(2 if v_tq4 else 1))
    m0 = jnp.full((rows,), M_INIT, jnp.float32)
    return lax.fori_loop(0, n_blocks, body, (accs, m0, jnp.zeros_like(m0)))


def _attn_kernel(*refs, k_tq4: bool, v_tq4: bool, has_mask: bool, causal: bool,
                 scale_log2: float, block_m: int, block_n: int, sq: int, sk: int, d: int):
    """Prefill: one program per (query block, batch * query head)."""
    q_refs, k_refs, v_refs, mask_ref, o_refs = _split_refs(refs, k_tq4, v_tq4, has_mask)
    qi = pl.program_id(0)
    q_pos, q_ok = tile_index(qi * block_m, block_m, sq)
    n_blocks = pl.cdiv(sk, block_n)
    if causal:  # keys past the last query row of this block are never visible
        last = jnp.minimum((qi + 1) * block_m, sq) + (sk - sq)
        n_blocks = jnp.clip(pl.cdiv(last, block_n), 0, n_blocks)
    accs, _, l_fin = _attend(q_refs, k_refs, v_refs, mask_ref, q_pos, q_ok, q_pos, 0, sk,
                             n_blocks, k_tq4=k_tq4, v_tq4=v_tq4, causal=causal,
                             scale_log2=scale_log2, block_n=block_n, sq=sq, sk=sk, d=d)
    inv_l = 1.0 / jnp.where(l_fin > 0, l_fin, 1.0)
    dp, hp = padded_dims(d)
    o_cols, o_ok = tile_index(0, hp, d // 2) if v_tq4 else tile_index(0, dp, d)
    for o_ref, acc in zip(o_refs, accs):
        store_tile(o_ref, q_pos, q_ok, o_cols, o_ok, acc * inv_l[:, None])


def _decode_kernel(*refs, k_tq4: bool, v_tq4: bool, causal: bool, scale_log2: float,
                   rows: int, block_n: int, split_len: int, sq: int, sk: int, d: int):
    """Split-KV decode: one program per (batch * KV head, split) serving all ``group * sq``
    query rows of the KV head, so each K/V tile is loaded and decoded once per group.
    Writes unnormalized (acc, m, l) per split; the wrapper merges splits (log-sum-exp)."""
    q_refs, k_refs, v_refs, _, o_refs = _split_refs(refs, k_tq4, v_tq4, False)
    *acc_refs, m_ref, l_ref = o_refs
    n_rows = q_refs[0].shape[0]  # group * sq
    q_rows, q_ok = tile_index(0, rows, n_rows)
    q_pos = q_rows % sq
    k_start = pl.program_id(1) * split_len
    k_end = jnp.minimum(k_start + split_len, sk)
    n_blocks = pl.cdiv(jnp.maximum(k_end - k_start, 0), block_n)
    accs, m, l_fin = _attend(q_refs, k_refs, v_refs, None, q_rows, q_ok, q_pos, k_start, k_end,
                             n_blocks, k_tq4=k_tq4, v_tq4=v_tq4, causal=causal,
                             scale_log2=scale_log2, block_n=block_n, sq=sq, sk=sk, d=d)
    width = accs[0].shape[1]
    cols, c_ok = tile_index(0, width, width)
    for o_ref, acc in zip(acc_refs, accs):
        store_tile(o_ref, q_rows, q_ok, cols, c_ok, acc)
    store_rows(m_ref, q_rows, q_ok, m)
    store_rows(l_ref, q_rows, q_ok, l_fin)


def _block_sizes(sq: int, d: int) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps) for a query length and head dim."""
    block_m = min(64, max(16, next_pow2(sq)))
    block_n = 32 if d > 128 else 64
    return block_m, block_n, 4


@partial(jax.jit, static_argnames=("k_tq4", "v_tq4", "causal", "scale", "d", "mode"))
def _attn_pallas(q_parts, k_parts, v_parts, mask, *, k_tq4, v_tq4, causal, scale, d, mode):
    """q_parts: (q,) or (q_even, q_odd) [B, HQ, Sq, *]; k/v parts: (x,) or (codes, norms,
    codebook16). mask: None or [Bm, Hm, Sq, Sk]. Returns a tuple of outputs [B, HQ, Sq, *]."""
    b, hq, sq, _ = q_parts[0].shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    group = hq // hkv
    block_m, block_n, num_warps = _block_sizes(sq, d)

    def per_q(bh):  # grid axis 1 = b * HQ + h
        return bh // hq, bh % hq

    def spec4(x, kv: bool):
        def index(i, bh):
            bi, hi = per_q(bh)
            return bi, (hi // group if kv else hi), 0, 0
        return pl.BlockSpec((None, None) + x.shape[2:], index)

    def spec3(x):  # norms [B, HKV, Sk]
        return pl.BlockSpec((None, None, x.shape[2]), lambda i, bh: (
            per_q(bh)[0], per_q(bh)[1] // group, 0))

    def spec_kv(parts):
        if len(parts) == 1:
            return [spec4(parts[0], True)]
        return [spec4(parts[0], True), spec3(parts[1]), pl.BlockSpec(parts[2].shape, lambda i, bh: (0,))]

    args = list(q_parts) + list(k_parts) + list(v_parts)
    in_specs = [spec4(x, False) for x in q_parts] + spec_kv(k_parts) + spec_kv(v_parts)
    if mask is not None:
        bm, hm = mask.shape[0], mask.shape[1]
        in_specs.append(pl.BlockSpec((None, None, sq, sk), lambda i, bh: (
            per_q(bh)[0] if bm > 1 else 0, per_q(bh)[1] if hm > 1 else 0, 0, 0)))
        args.append(mask)
    if v_tq4:
        out_shape = tuple(jax.ShapeDtypeStruct((b, hq, sq, d // 2), jnp.float32) for _ in range(2))
    else:
        out_shape = (jax.ShapeDtypeStruct((b, hq, sq, d), q_parts[0].dtype),)
    out_specs = tuple(spec4(o, False) for o in out_shape)
    kernel = partial(_attn_kernel, k_tq4=k_tq4, v_tq4=v_tq4, has_mask=mask is not None,
                     causal=causal, scale_log2=scale * LOG2E, block_m=block_m,
                     block_n=block_n, sq=sq, sk=sk, d=d)
    return pallas_call(kernel, mode=mode, grid=(pl.cdiv(sq, block_m), b * hq),
                       out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
                       num_warps=num_warps, num_stages=2)(*args)


#: Query lengths up to this use the split-KV decode kernel (rows of a KV group share a tile).
DECODE_MAX_SQ = 16
#: Streaming multiprocessors to fill (H100/H200: 132); splits aim at 2 programs per SM.
NUM_SMS = 132
MIN_SPLIT_KEYS = 256


def num_splits(b: int, hkv: int, sk: int) -> int:
    """KV splits for decode: enough programs for 2 per SM, at least MIN_SPLIT_KEYS keys each."""
    want = pl.cdiv(2 * NUM_SMS, max(1, b * hkv))
    return int(max(1, min(want, pl.cdiv(sk, MIN_SPLIT_KEYS))))


@partial(jax.jit, static_argnames=("k_tq4", "v_tq4", "causal", "scale", "d", "splits", "mode"))
def _decode_pallas(q_parts, k_parts, v_parts, *, k_tq4, v_tq4, causal, scale, d, splits, mode):
    """Split-KV decode. Same parts as :func:`_attn_pallas`; returns outputs [B, HQ, Sq, *] f32
    (width D, or D/2 halves for compressed V), merged over splits with log-sum-exp."""
    b, hq, sq, _ = q_parts[0].shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    g = hq // hkv
    n_rows = g * sq
    rows = max(16, next_pow2(n_rows))
    dp, hp = padded_dims(d)
    _, block_n, num_warps = _block_sizes(1, d)
    split_len = pl.cdiv(pl.cdiv(sk, splits), block_n) * block_n
    q_view = [x.reshape(b, hkv, n_rows, x.shape[-1]) for x in q_parts]  # row = g * Sq + s

    def head(bh):
        return bh // hkv, bh % hkv

    spec4 = lambda x: pl.BlockSpec((None, None) + x.shape[2:],  # noqa: E731
                                   lambda bh, sp: (*head(bh), 0, 0))

    def spec_kv(parts):
        if len(parts) == 1:
            return [spec4(parts[0])]
        return [spec4(parts[0]), pl.BlockSpec((None, None, sk), lambda bh, sp: (*head(bh), 0)),
                pl.BlockSpec(parts[2].shape, lambda bh, sp: (0,))]

    width = hp if v_tq4 else dp
    n_acc = 2 if v_tq4 else 1
    out_shape = tuple(jax.ShapeDtypeStruct((b, hkv, splits, n_rows, width), jnp.float32)
                      for _ in range(n_acc))
    out_shape += tuple(jax.ShapeDtypeStruct((b, hkv, splits, n_rows), jnp.float32)
                       for _ in range(2))
    out_specs = tuple(pl.BlockSpec((None, None, None, n_rows, width),
                                   lambda bh, sp: (*head(bh), sp, 0, 0)) for _ in range(n_acc))
    out_specs += tuple(pl.BlockSpec((None, None, None, n_rows), lambda bh, sp: (*head(bh), sp, 0))
                       for _ in range(2))
    kernel = partial(_decode_kernel, k_tq4=k_tq4, v_tq4=v_tq4, causal=causal,
                     scale_log2=scale * LOG2E, rows=rows, block_n=block_n,
                     split_len=split_len, sq=sq, sk=sk, d=d)
    *accs, m, l = pallas_call(
        kernel, mode=mode, grid=(b * hkv, splits), out_shape=out_shape,
        in_specs=[spec4(x) for x in q_view] + spec_kv(k_parts) + spec_kv(v_parts),
        out_specs=out_specs, num_warps=num_warps, num_stages=2,
    )(*q_view, *k_parts, *v_parts)
    w = jnp.exp2(m - jnp.max(m, axis=2, keepdims=True))     # [B, HKV, S, rows]
    l_tot = jnp.sum(w * l, axis=2)
    inv = 1.0 / jnp.where(l_tot > 0, l_tot, 1.0)
    out_w = d // 2 if v_tq4 else d
    return tuple((jnp.sum(w[..., None] * a, axis=2) * inv[..., None])[..., :out_w]
                 .reshape(b, hq, sq, out_w) for a in accs)


def _run(q_parts, k_parts, v_parts, mask, *, k_tq4, v_tq4, causal, scale, d):
    """Pick the decode (split-KV, grouped heads) or the prefill kernel."""
    b, _, sq, _ = q_parts[0].shape
    hkv, sk = k_parts[0].shape[1], k_parts[0].shape[2]
    if sq <= DECODE_MAX_SQ and mask is None:
        return _decode_pallas(q_parts, k_parts, v_parts, k_tq4=k_tq4, v_tq4=v_tq4,
                              causal=causal, scale=scale, d=d, splits=num_splits(b, hkv, sk),
                              mode=kernel_mode())
    return _attn_pallas(q_parts, k_parts, v_parts, mask, k_tq4=k_tq4, v_tq4=v_tq4,
                        causal=causal, scale=scale, d=d, mode=kernel_mode())


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
    (out,) = _run(_rotate_q(q, rotation), (k_packed, k_norms, pad_codebook(centroids)), (v,),
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
    o_even, o_odd = _run(
        _rotate_q(q, rotation), (k_packed, k_norms, pad_codebook(centroids)),
        (v_packed, v_norms, pad_codebook(v_centroids)), None, k_tq4=True, v_tq4=True,
        causal=bool(is_causal), scale=scale, d=d)
    return _post_rotate(o_even, o_odd, rotation, q.dtype)
