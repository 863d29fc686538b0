"""Differential fuzz (see tests/fuzz_support.py): the paged TQ4 cache (family A):
paged_write, then paged_decode / paged_prefill, kernel vs reference vs an oracle that decodes
the bytes written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import tq4jax as tq  # noqa: E402
from fuzz_support import (  # noqa: E402
    BLOCK_SIZES, DIMS, FLOATS, GARBAGE, GROUPS, LIM, REF_TOL, ROTATIONS, SEEDS, TOL, attend,
    check_rows, codes_match, codes_of, draw_lengths, fuzz, mosaic_paged_runs, paged_table,
    pack_codes, padded, rotation, split_keys
)
from helpers import oracle_compress  # noqa: E402

# ----------------------------------------------------------------------------------------------
# paged cache (family A): paged_write, then paged_decode / paged_prefill
# ----------------------------------------------------------------------------------------------

@st.composite
def paged_cases(draw, prefill: bool):
    bs = draw(st.sampled_from(BLOCK_SIZES))
    max_blocks = draw(st.integers(1, LIM["blocks"]))
    cap = max_blocks * bs
    n_seqs = draw(st.integers(1, LIM["seqs"]))
    lens = draw_lengths(draw, n_seqs, cap, bs, over=not prefill)
    case = dict(
        bs=bs, max_blocks=max_blocks, lens=lens, d=draw(st.sampled_from(DIMS)),
        hkv=draw(st.integers(1, LIM["heads"])), group=draw(st.sampled_from(GROUPS)),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])),
        k_bits=draw(st.integers(2, 4)), v_bits=draw(st.sampled_from([None, 2, 3, 4])),
        garbage=draw(st.sampled_from(GARBAGE)), extra_blocks=draw(st.integers(0, 4)),
        skipped_tokens=draw(st.integers(0, 3)),
        sm_scale=draw(st.sampled_from([None, 0.5, 1.5])),
        rotation=draw(st.sampled_from(ROTATIONS)),
        traced_codebook=draw(st.booleans()),
        split_keys=draw(st.sampled_from([None, 16])))
    if prefill:  # new tokens per sequence: none, one, all, or some
        case["new"] = [min(n, draw(st.one_of(st.sampled_from([0, 1, n]), st.integers(0, n))))
                       for n in lens]
        case["pad_tokens"] = draw(st.integers(0, 3))
    case["seed"] = draw(SEEDS)
    return case


def _paged_setup(case):
    """A garbage cache, a block table (permuted blocks, garbage past each sequence), the
    tokens of every sequence and their slots (shuffled, plus skipped tokens with slot -1 that
    hold huge values and a NaN)."""
    rng = np.random.default_rng(case["seed"])
    bs, d, hkv = case["bs"], case["d"], case["hkv"]
    lens = case["lens"]
    table, written, n_blocks, slots = paged_table(rng, case)
    lay = tq.paged_layout(hkv, d)
    cache = jnp.asarray(rng.integers(0, 256, (n_blocks, bs, lay.row_bytes)), jnp.uint8)
    keys, vals = [], []
    for n in written:
        keys.append(rng.standard_normal((n, hkv, d)) * rng.uniform(0.5, 3))
        vals.append(rng.standard_normal((n, hkv, d)))
    n_skip = case["skipped_tokens"]
    junk = np.clip(rng.standard_normal((n_skip, hkv, d)) * 3e4, -6e4, 6e4)
    if n_skip:
        junk[0, 0, :2] = [np.nan, np.inf]
    key, val = np.concatenate(keys + [junk]), np.concatenate(vals + [junk])
    slot = np.concatenate(slots + [np.full(n_skip, -1)]).astype(np.int32)
    order = rng.permutation(len(slot))
    dt = FLOATS[case["dtype"]]
    rot = rotation(case["rotation"], d, int(rng.integers(1 << 30)))
    cent, kb = tq.lloyd_max(d, case["k_bits"])
    vc, vb = (cent, kb) if case["v_bits"] is None else tq.lloyd_max(d, case["v_bits"])
    return dict(rng=rng, lay=lay, cache=cache, table=table, lens=lens, written=written,
                key=jnp.asarray(key[order], dt), val=jnp.asarray(val[order], dt),
                slot=slot[order], rot=rot, cent=cent, kb=kb, vc=vc, vb=vb,
                v_cent=None if case["v_bits"] is None else vc,
                v_bnd=None if case["v_bits"] is None else vb,
                kw=dict(num_kv_heads=hkv, head_dim=d, block_size=bs))


def _row_fields(cache, rows, lay, hkv, d):
    """(K codes [n, H, D], K norms [n, H], V codes, V norms) of flat cache rows ``rows``."""
    flat = np.asarray(cache).reshape(-1, cache.shape[-1])[rows]

    def part(c_at, n_at):
        codes = codes_of(flat[:, c_at:c_at + hkv * d // 2].reshape(-1, hkv, d // 2))
        norms = np.ascontiguousarray(flat[:, n_at:n_at + 4 * hkv]).view("<f4")
        return codes, norms.reshape(-1, hkv).astype(np.float64)

    return (*part(lay.k_codes, lay.k_norms), *part(lay.v_codes, lay.v_norms))


def _write_and_check(case, t):
    """paged_write kernel and reference; both vs the oracle row by row. Returns the kernel's
    cache."""
    hkv, d = case["hkv"], case["d"]
    args = (t["key"], t["val"], t["slot"], t["rot"], t["kb"], t["v_bnd"])
    caches = {impl: tq.paged_write(t["cache"], *args, impl=impl)
              for impl in ("pallas", "reference")}
    before = np.asarray(t["cache"]).reshape(-1, t["lay"].row_bytes)
    live = t["slot"] >= 0
    rows = t["slot"][live]
    untouched = np.setdiff1d(np.arange(before.shape[0]), rows)
    k_idx, k_norm, k_y = oracle_compress(np.asarray(t["key"].astype(jnp.float32))[live],
                                         t["rot"], t["kb"])
    v_idx, v_norm, v_y = oracle_compress(np.asarray(t["val"].astype(jnp.float32))[live],
                                         t["rot"], t["vb"])
    for impl, cache in caches.items():
        assert cache.shape == t["cache"].shape and cache.dtype == jnp.uint8
        after = np.asarray(cache).reshape(before.shape)
        np.testing.assert_array_equal(after[untouched], before[untouched],
                                      err_msg=f"{impl}: rows outside slot_mapping changed")
        kc, kn, vc, vn = _row_fields(cache, rows, t["lay"], hkv, d)
        for codes, idx, y, bnd in ((kc, k_idx, k_y, t["kb"]), (vc, v_idx, v_y, t["vb"])):
            codes_match(pack_codes(codes), idx, y, bnd)
        np.testing.assert_allclose(kn, k_norm, rtol=1e-6, err_msg=impl)
        np.testing.assert_allclose(vn, v_norm, rtol=1e-6, err_msg=impl)
    return caches["pallas"]


def _paged_kv(cache, t, case):
    """float64 K, V [n, H, D] of every sequence decoded from the cache's bytes."""
    bs, hkv, d = case["bs"], case["hkv"], case["d"]
    rot = t["rot"].astype(np.float64)
    out = []
    for s, n in enumerate(t["written"]):
        pos = np.arange(n)
        rows = t["table"][s, pos // bs].astype(np.int64) * bs + pos % bs
        kc, kn, vc, vn = _row_fields(cache, rows, t["lay"], hkv, d)
        out.append(((padded(t["cent"])[kc] * kn[..., None]) @ rot,
                    (padded(t["vc"])[vc] * vn[..., None]) @ rot))
    return out


def _codebook_call(fn, traced: bool, cent, v_cent):
    """fn(centroids, v_centroids), under jit with traced codebooks when ``traced``."""
    if traced:
        return jax.jit(fn)(jnp.asarray(cent), None if v_cent is None else jnp.asarray(v_cent))
    return fn(cent, v_cent)


@fuzz(8)
@given(case=paged_cases(prefill=False))
def test_paged_write_decode(case):
    """paged_write (kernel vs reference vs oracle, byte by byte) then paged_decode, kernel and
    reference (and the Mosaic GPU kernel where it serves the drawn cache), vs float64 attention
    over the K/V decoded from the written bytes."""
    t = _paged_setup(case)
    cache = _write_and_check(case, t)
    d, hq, dt = case["d"], case["hkv"] * case["group"], case["dtype"]
    q = jnp.asarray(t["rng"].standard_normal((len(t["lens"]), hq, d)), FLOATS[dt])
    scale = 1 / np.sqrt(d) * (case["sm_scale"] or 1.0)
    sm = None if case["sm_scale"] is None else float(scale)
    want = np.zeros(q.shape)
    for s, (k, v) in enumerate(_paged_kv(cache, t, case)):
        qs = np.asarray(q[s], np.float64)[None, :, None]
        want[s] = attend(qs, np.swapaxes(k, 0, 1)[None], np.swapaxes(v, 0, 1)[None], scale,
                         True)[0, :, 0]
    table, lens = jnp.asarray(t["table"]), jnp.asarray(t["lens"], jnp.int32)
    impls = ["pallas", "reference"]
    if mosaic_paged_runs(d, case["group"], case["bs"], t["lay"].row_bytes):
        impls.append("mosaic")
    with split_keys(case["split_keys"]):
        for impl in impls:
            o = _codebook_call(lambda c, vcb: tq.paged_decode(
                q, cache, table, lens, c, t["rot"], **t["kw"], sm_scale=sm, v_centroids=vcb,
                impl=impl), case["traced_codebook"] and impl != "reference", t["cent"],
                t["v_cent"])
            assert o.shape == q.shape and o.dtype == q.dtype, impl
            check_rows(o, want, REF_TOL[dt] if impl == "reference" else TOL[dt],
                       f"paged_decode {impl}")


@pytest.mark.parametrize("int8", [False, True], ids=["fp_qk", "int8_qk"])
@fuzz(4)
@given(case=paged_cases(prefill=True))
def test_paged_write_prefill(case, int8):
    """paged_write then paged_prefill (chunked causal prefill of many sequences, padding
    tokens past the last sequence), kernel with use_int8_qk off/on and reference, vs float64
    attention over the K/V decoded from the written bytes."""
    t = _paged_setup(case)
    cache = _write_and_check(case, t)
    d, hq, dt = case["d"], case["hkv"] * case["group"], case["dtype"]
    new = case["new"]
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    n_tok = int(qsl[-1])
    q = jnp.asarray(t["rng"].standard_normal((n_tok + case["pad_tokens"], hq, d)), FLOATS[dt])
    scale = 1 / np.sqrt(d) * (case["sm_scale"] or 1.0)
    sm = None if case["sm_scale"] is None else float(scale)
    want = np.zeros(q.shape)
    for s, (k, v) in enumerate(_paged_kv(cache, t, case)):
        n, m = t["written"][s], new[s]
        if m == 0:
            continue
        pos = n - m + np.arange(m)
        visible = np.arange(n)[None, :] <= pos[:, None]  # [m, n]
        qs = np.swapaxes(np.asarray(q[qsl[s]:qsl[s + 1]], np.float64), 0, 1)[None]
        o = attend(qs, np.swapaxes(k, 0, 1)[None], np.swapaxes(v, 0, 1)[None], scale,
                   visible[None, None])
        want[qsl[s]:qsl[s + 1]] = np.swapaxes(o[0], 0, 1)
    # per sequence (its new tokens), and the padding tokens (zeros)
    segments = [slice(int(qsl[s]), int(qsl[s + 1])) for s in range(len(new)) if new[s]]
    table, lens = jnp.asarray(t["table"]), jnp.asarray(t["lens"], jnp.int32)
    # int8 Q @ K^T: q quantized per row to int8 and K to its codebook's int8 levels, about 1%
    # relative L2 error (README): twice the fp16/bf16 bound, as tests/test_paged.py
    tol = TOL[dt] * (2 if int8 else 1)
    with split_keys(case["split_keys"]):
        for impl in ("pallas", "reference"):
            o = _codebook_call(lambda c, vcb: tq.paged_prefill(
                q, cache, table, lens, jnp.asarray(qsl), c, t["rot"], **t["kw"], sm_scale=sm,
                use_int8_qk=int8, v_centroids=vcb, impl=impl),
                case["traced_codebook"] and impl == "pallas", t["cent"], t["v_cent"])
            assert o.shape == q.shape and o.dtype == q.dtype, impl
            # per token: padding tokens and tokens of sequences with no keys give zeros
            check_rows(o, want, tol if impl == "pallas" else REF_TOL[dt],
                       f"paged_prefill {impl}", segments)
