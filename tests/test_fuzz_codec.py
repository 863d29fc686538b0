"""Differential fuzz (see tests/fuzz_support.py): the codec ops (compress, compress_kv,
decompress, dequantize) and the contiguous attention ops, kernel vs reference vs float64
oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import tq4jax as tq  # noqa: E402
from fuzz_support import (  # noqa: E402
    DIMS, FLOATS, GROUPS, HALF_ULP, LIM, REF_TOL, ROTATIONS, SEEDS, TOL, attend, check_rows,
    codes_match, codes_of, fuzz, linf, padded, rotation, split_keys
)
from helpers import oracle_compress  # noqa: E402

# ----------------------------------------------------------------------------------------------
# codec: compress, compress_kv, decompress, dequantize
# ----------------------------------------------------------------------------------------------

@st.composite
def codec_cases(draw):
    return dict(
        d=draw(st.sampled_from(DIMS)), bits=draw(st.integers(2, 4)),
        lead=tuple(draw(st.lists(st.integers(0, 2 * LIM["rows"] // 3), min_size=1, max_size=2))),
        dtype=draw(st.sampled_from(list(FLOATS))),
        out_dtype=draw(st.sampled_from(list(FLOATS))),
        log_scale=draw(st.integers(-3, 3)),
        special_rows=draw(st.booleans()),
        norms_1=draw(st.booleans()),
        rotation=draw(st.sampled_from(ROTATIONS)),
        block_rows=draw(st.sampled_from([None, 16, 32])),
        seed=draw(SEEDS))


def _codec_input(rng, case, rot):
    lead, d = case["lead"], case["d"]
    x = rng.standard_normal(lead + (d,)) * 10.0 ** case["log_scale"]
    x *= rng.uniform(0.5, 2, lead + (1,))
    flat = x.reshape(-1, d)
    if case["special_rows"] and flat.shape[0]:
        j = int(rng.integers(d))
        specials = [np.zeros(d),  # y = 0: every coordinate on the middle boundary (ties go up)
                    np.eye(d)[j] * 10.0 ** case["log_scale"],  # one-hot
                    np.full(d, 10.0 ** case["log_scale"]),  # constant
                    rot[j].astype(np.float64) * 3.0]  # a rotation axis: y = e_j
        for i, row in enumerate(specials[:flat.shape[0]]):
            flat[-1 - i] = row
    return jnp.asarray(flat.reshape(x.shape), FLOATS[case["dtype"]])


def _codec_config(block_rows: int | None) -> dict:
    """``config=`` of a codec op with ``block_rows`` rows per program (None: the default)."""
    if block_rows is None:
        return {}
    try:
        from tq4jax.codec import CodecConfig
    except ImportError:  # older layout: block_rows= keyword
        return dict(block_rows=block_rows)
    return dict(config=CodecConfig(block_rows, 4))


@fuzz(8)
@given(case=codec_cases())
def test_codec(case):
    """compress (kernel, reference) vs the float64 oracle; decompress / dequantize (kernel,
    reference) of the kernel's codes and of random bytes vs float64 decoding."""
    d, bits, lead = case["d"], case["bits"], case["lead"]
    rng = np.random.default_rng(case["seed"])
    rot = rotation(case["rotation"], d, int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, bits)
    x = _codec_input(rng, case, rot)
    idx, norm, y = oracle_compress(np.asarray(x.astype(jnp.float32)), rot, bnd)
    comp = {impl: tq.compress(x, rot, bnd, impl=impl, **_codec_config(case["block_rows"]))
            for impl in ("pallas", "reference")}
    for impl, (p, n) in comp.items():
        assert p.shape == lead + (d // 2,) and p.dtype == jnp.uint8, impl
        assert n.shape == lead and n.dtype == jnp.float32, impl
        # codes: exact except where y lies within 1e-5 of a boundary (float32 vs float64
        # rounding may then pick either neighbour); norms: float32 sum of squares, rtol 1e-6
        codes_match(p, idx, y, bnd)
        np.testing.assert_allclose(np.asarray(n), norm, rtol=1e-6, err_msg=impl)
        assert codes_of(p).max(initial=0) < 2**bits, impl
    # decoding: the kernel's codes with its norms, and random bytes (garbage codes past the
    # codebook decode to 0) with random norms incl. 0
    pk, nk = comp["pallas"]
    rb = jnp.asarray(rng.integers(0, 256, lead + (d // 2,)), jnp.uint8)
    rn = rng.uniform(0, 2, lead) * 10.0 ** case["log_scale"] * np.sqrt(d)
    rn[rng.random(lead) < 0.2] = 0.0
    out = FLOATS[case["out_dtype"]]
    cfg = _codec_config(case["block_rows"])
    hu = HALF_ULP[case["out_dtype"]]
    for packed, norms in ((pk, nk), (rb, jnp.asarray(rn, jnp.float32))):
        want_y = padded(cent)[codes_of(packed)] * np.asarray(norms, np.float64)[..., None]
        want_x = want_y @ rot.astype(np.float64)
        arg_n = norms[..., None] if case["norms_1"] else norms
        # vs float64: one rounding to the output dtype plus the float32 math before it (one
        # product for decompress; a D-term dot product, with Pi split into fp16 hi/lo halves
        # in the kernel, for dequantize: 1e-5 as tests/test_codec.py). Kernel vs reference:
        # both round nearly the same float32 value, so they differ by at most one ulp.
        for name, fn, want, f32_err in (
                ("decompress", lambda impl: tq.decompress(packed, arg_n, cent, out, impl=impl,
                                                          **cfg), want_y, 2**-23),
                ("dequantize", lambda impl: tq.dequantize(packed, arg_n, cent, rot, out,
                                                          impl=impl, **cfg), want_x, 1e-5)):
            got = {impl: fn(impl) for impl in ("pallas", "reference")}
            for impl, g in got.items():
                assert g.shape == lead + (d,) and g.dtype == out, (name, impl)
                err = linf(np.asarray(g, np.float32), want)
                assert err <= hu + f32_err, (name, impl, err)
            err = linf(np.asarray(got["pallas"], np.float32),
                       np.asarray(got["reference"], np.float32))
            assert err <= 2 * (hu + f32_err), (name, "kernel vs reference", err)


@st.composite
def compress_kv_cases(draw):
    return dict(
        d=draw(st.sampled_from(DIMS)), k_bits=draw(st.integers(2, 4)),
        v_bits=draw(st.sampled_from([None, 2, 3, 4])),  # None: V takes K's boundaries
        n=draw(st.integers(0, 2 * LIM["rows"])), h=draw(st.sampled_from([1, 2, 4])),
        k_dtype=draw(st.sampled_from(list(FLOATS))), v_dtype=draw(st.sampled_from(list(FLOATS))),
        k_log_scale=draw(st.integers(-2, 2)), v_log_scale=draw(st.integers(-2, 2)),
        rotation=draw(st.sampled_from(ROTATIONS)), seed=draw(SEEDS))


@fuzz(5)
@given(case=compress_kv_cases())
def test_compress_kv(case):
    """compress_kv (one launch, row-split or column-split path by row count) vs the oracle of
    each stream, kernel and reference."""
    d, n, h = case["d"], case["n"], case["h"]
    rng = np.random.default_rng(case["seed"])
    rot = rotation(case["rotation"], d, int(rng.integers(1 << 30)))
    _, kb = tq.lloyd_max(d, case["k_bits"])
    vb = None if case["v_bits"] is None else tq.lloyd_max(d, case["v_bits"])[1]
    k = jnp.asarray(rng.standard_normal((n, h, d)) * 10.0 ** case["k_log_scale"],
                    FLOATS[case["k_dtype"]])
    v = jnp.asarray(rng.standard_normal((n, h, d)) * 10.0 ** case["v_log_scale"],
                    FLOATS[case["v_dtype"]])
    for impl in ("pallas", "reference"):
        out = tq.compress_kv(k, v, rot, kb, vb, impl=impl)
        assert len(out) == 4
        for (p, nrm), x, bnd in ((out[:2], k, kb), (out[2:], v, kb if vb is None else vb)):
            assert p.shape == (n, h, d // 2) and p.dtype == jnp.uint8 and nrm.shape == (n, h)
            idx, norm, y = oracle_compress(np.asarray(x.astype(jnp.float32)), rot, bnd)
            codes_match(p, idx, y, bnd)  # ties aside
            np.testing.assert_allclose(np.asarray(nrm), norm, rtol=1e-6, err_msg=impl)


# ----------------------------------------------------------------------------------------------
# contiguous attention: flash_attention, flash_attention_tq4, flash_attention_tq4_kv
# ----------------------------------------------------------------------------------------------

MASK_SHAPES = [None, "b1qk", "1hqk", "qk", "bhqk"]


@st.composite
def attention_cases(draw):
    b = draw(st.integers(1, LIM["batch"]))
    sq = draw(st.integers(0, LIM["sq"]))
    sk = draw(st.integers(0, LIM["sk"]))
    lengths = draw(st.sampled_from([None, "kv", "kv+offsets"]))
    kv_lengths = q_offsets = None
    if lengths:
        kv_lengths = draw(st.lists(st.integers(0, sk), min_size=b, max_size=b))
        if lengths == "kv+offsets":
            q_offsets = draw(st.lists(st.integers(-sq, sk), min_size=b, max_size=b))
    return dict(
        b=b, sq=sq, sk=sk, d=draw(st.sampled_from(DIMS)),
        hkv=draw(st.integers(1, LIM["heads"])), group=draw(st.sampled_from(GROUPS)),
        dtype=draw(st.sampled_from(["float16", "bfloat16"])), causal=draw(st.booleans()),
        kv_lengths=kv_lengths, q_offsets=q_offsets,
        mask=draw(st.sampled_from(MASK_SHAPES)),
        mask_dtype=draw(st.sampled_from(list(FLOATS))),
        k_bits=draw(st.integers(2, 4)), v_bits=draw(st.sampled_from([None, 2, 3, 4])),
        norms_1=draw(st.booleans()),
        sm_scale=draw(st.sampled_from([None, 0.5, 1.5])),  # x 1/sqrt(D)
        q_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
        rotation=draw(st.sampled_from(ROTATIONS)),
        traced_codebook=draw(st.booleans()),
        split_keys=draw(st.sampled_from([None, 16])),
        seed=draw(SEEDS))


def _mask(rng, case, hq):
    b, sq, sk = case["b"], case["sq"], case["sk"]
    shape = {"b1qk": (b, 1, sq, sk), "1hqk": (1, hq, sq, sk), "qk": (sq, sk),
             "bhqk": (b, hq, sq, sk)}[case["mask"]]
    m = rng.standard_normal(shape)
    m[rng.random(shape) < 0.25] = -np.inf
    if sq > 1:
        m[..., sq // 2, :] = -np.inf  # a query row that sees no key at all: zeros
    return jnp.asarray(m, FLOATS[case["mask_dtype"]])


@fuzz(10)
@given(case=attention_cases())
def test_contiguous_attention(case):
    """All three contiguous ops, kernel and reference, vs a float64 oracle on the same
    (dequantized) K/V: causal or not, GQA, ragged kv_lengths / q_offsets, additive masks,
    asymmetric K/V codebooks, a traced codebook, KV splits."""
    b, sq, sk, d, hkv = case["b"], case["sq"], case["sk"], case["d"], case["hkv"]
    hq, dt = hkv * case["group"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    q = jnp.asarray(rng.standard_normal((b, hq, sq, d)) * case["q_scale"], FLOATS[dt])
    k = jnp.asarray(rng.standard_normal((b, hkv, sk, d)) * 1.5, FLOATS[dt])
    v = jnp.asarray(rng.standard_normal((b, hkv, sk, d)), FLOATS[dt])
    scale = 1 / np.sqrt(d) * (case["sm_scale"] or 1.0)
    sm = None if case["sm_scale"] is None else float(scale)
    rot = rotation(case["rotation"], d, int(rng.integers(1 << 30)))
    cent, kb = tq.lloyd_max(d, case["k_bits"])
    vc, vb = (cent, kb) if case["v_bits"] is None else tq.lloyd_max(d, case["v_bits"])
    kp, kn = tq.compress(k, rot, kb, impl="reference")
    vp, vn = tq.compress(v, rot, vb, impl="reference")
    deq = lambda p, n, c: (padded(c)[codes_of(p)] * np.asarray(n, np.float64)[..., None]  # noqa
                           @ rot.astype(np.float64))
    k_hat, v_hat = deq(kp, kn, cent), deq(vp, vn, vc)
    if case["norms_1"]:
        kn, vn = kn[..., None], vn[..., None]
    mask = None if case["mask"] is None else _mask(rng, case, hq)
    lens = {}
    if case["kv_lengths"] is not None:
        lens["kv_lengths"] = jnp.asarray(case["kv_lengths"], jnp.int32)
    if case["q_offsets"] is not None:
        lens["q_offsets"] = jnp.asarray(case["q_offsets"], jnp.int32)

    # which keys each query row sees: [B, 1, Sq, Sk]
    keys, rows = np.arange(sk)[None, None, None, :], np.arange(sq)[None, None, :, None]
    kv_len = np.full(b, sk) if case["kv_lengths"] is None else np.asarray(case["kv_lengths"])
    if case["kv_lengths"] is None:
        off = np.full(b, sk - sq)
    else:
        off = kv_len - sq if case["q_offsets"] is None else np.asarray(case["q_offsets"])
    visible = keys < kv_len[:, None, None, None]
    if case["causal"]:
        visible = visible & (keys <= off[:, None, None, None] + rows)
    want_mask = None if mask is None else np.asarray(mask.astype(jnp.float32))

    v_cent = None if case["v_bits"] is None else vc
    ops = {
        "flash_attention": (lambda impl, c, vcb: tq.flash_attention(
            q, k, v, sm, case["causal"], mask, **lens, impl=impl), k, v),
        "flash_attention_tq4": (lambda impl, c, vcb: tq.flash_attention_tq4(
            q, kp, kn, v, c, rot, sm, case["causal"], attention_mask=mask, **lens,
            impl=impl), k_hat, v),
        "flash_attention_tq4_kv": (lambda impl, c, vcb: tq.flash_attention_tq4_kv(
            q, kp, kn, vp, vn, c, rot, sm, case["causal"], vcb, attention_mask=mask, **lens,
            impl=impl), k_hat, v_hat),
    }
    with split_keys(case["split_keys"]):
        for name, (fn, kk, vv) in ops.items():
            want = attend(q, kk, vv, scale, visible, want_mask)
            for impl in ("pallas", "reference"):
                if case["traced_codebook"] and impl == "pallas":
                    o = jax.jit(lambda c, vcb: fn(impl, c, vcb))(
                        jnp.asarray(cent), None if v_cent is None else jnp.asarray(v_cent))
                else:
                    o = fn(impl, cent, v_cent)
                assert o.shape == q.shape and o.dtype == q.dtype, (name, impl)
                tol = TOL[dt] if impl == "pallas" else REF_TOL[dt]
                check_rows(o, want, tol, f"{name} {impl}")
