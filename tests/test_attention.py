"""Contiguous attention ops against the shared vectors, a float64 oracle, and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2
from tq4jax.pallas_triton import tuning
from tq4jax.testing import lower_to_triton

IMPLS = ["reference", "pallas"]
TOL = {jnp.float16: 1e-2, jnp.bfloat16: 2e-2}


def oracle(q, k, v, scale, causal, mask=None):
    """float64 numpy attention with GQA; fully masked rows give zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, sq, d = q.shape
    g = hq // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    sk = k.shape[2]
    if causal:
        vis = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
        s = np.where(vis, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p / np.where(l > 0, l, 1), v)


def deq(packed, norms, cent, rot):
    return np.asarray(tq.dequantize(packed, norms, cent, rot, jnp.float32, impl="reference"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_vectors(vectors, i, impl):
    v = vectors(f"attn_tq4_kv_{i}")
    c, sc = bool(v["is_causal"]), float(v["sm_scale"])
    o = tq.flash_attention_tq4_kv(v["q"], v["k_packed"], v["k_norms"], v["v_packed"],
                                  v["v_norms"], v["centroids"], v["rotation"], sc, c, impl=impl)
    assert o.shape == v["q"].shape and o.dtype == jnp.float16
    assert rel_l2(o, v["out"]) < 1e-2
    o = tq.flash_attention(v["q"], v["k"], v["v"], sc, c, impl=impl)
    assert rel_l2(o, v["out_uncompressed"]) < 1e-2
    k_hat = deq(v["k_packed"], v["k_norms"], v["centroids"], v["rotation"])
    o = tq.flash_attention_tq4(v["q"], v["k_packed"], v["k_norms"], v["v"], v["centroids"],
                               v["rotation"], sc, c, impl=impl)
    assert rel_l2(o, oracle(v["q"], k_hat, v["v"], sc, c)) < 1e-2


def _case(rng, b, hq, hkv, sq, sk, d, dtype):
    q = jnp.asarray(rng.standard_normal((b, hq, sq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, hkv, sk, d)) * 1.5, dtype)
    v = jnp.asarray(rng.standard_normal((b, hkv, sk, d)), dtype)
    return q, k, v


SHAPES = [  # b, hq, hkv, sq, sk, d, causal
    (1, 2, 2, 19, 19, 64, True),
    (2, 4, 1, 1, 83, 128, False),
    (1, 7, 1, 5, 37, 96, True),
    (1, 2, 1, 3, 70, 256, True),
    (1, 4, 4, 40, 16, 64, False),
    (1, 8, 2, 45, 141, 64, True),  # 180 rows per KV head: two 128-row blocks, unmasked prefix
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_vs_oracle(rng, shape):
    b, hq, hkv, sq, sk, d, causal = shape
    dtype = [jnp.float16, jnp.bfloat16][int(rng.integers(0, 2))]
    q, k, v = _case(rng, b, hq, hkv, sq, sk, d, dtype)
    scale = float(rng.uniform(0.5, 1.5)) / np.sqrt(d)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    c3, b3 = tq.lloyd_max(d, 3)
    kp, kn = tq.compress(k, rot, bnd, impl="reference")
    vp, vn = tq.compress(v, rot, b3, impl="reference")  # V 3-bit: asymmetric codebooks
    k_hat, v_hat = deq(kp, kn, cent, rot), deq(vp, vn, c3, rot)
    for impl in IMPLS:
        o = tq.flash_attention(q, k, v, scale, causal, impl=impl)
        assert o.dtype == dtype and o.shape == q.shape
        assert rel_l2(o, oracle(q, k, v, scale, causal)) < TOL[dtype], impl
        o = tq.flash_attention_tq4(q, kp, kn, v, cent, rot, scale, causal, impl=impl)
        assert rel_l2(o, oracle(q, k_hat, v, scale, causal)) < TOL[dtype], impl
        o = tq.flash_attention_tq4_kv(q, kp, kn[..., None], vp, vn, cent, rot, scale, causal,
                                      v_centroids=c3, impl=impl)
        assert rel_l2(o, oracle(q, k_hat, v_hat, scale, causal)) < TOL[dtype], impl


@pytest.mark.parametrize("mask_shape", [(2, 1, 6, 50), (1, 4, 6, 50), (6, 50)])
def test_additive_mask_and_fully_masked_rows(rng, mask_shape):
    q, k, v = _case(rng, 2, 4, 2, 6, 50, 64, jnp.float16)
    mask = np.where(rng.random(mask_shape) < 0.3, -np.inf, rng.standard_normal(mask_shape))
    mask = mask.astype(np.float32)
    mask[..., 1, :] = -np.inf  # query row 1 sees no key: output zeros, not NaN
    want = oracle(q, k, v, 0.125, False, np.broadcast_to(mask, (2, 4, 6, 50)))
    for impl in IMPLS:
        o = np.asarray(tq.flash_attention(q, k, v, 0.125, False, jnp.asarray(mask), impl=impl))
        assert np.all(np.isfinite(o))
        np.testing.assert_array_equal(o[:, :, 1], 0.0)
        assert rel_l2(o, want) < 1e-2


def test_jit_vmap_and_empty(rng):
    q, k, v = _case(rng, 1, 4, 2, 4, 33, 64, jnp.bfloat16)
    f = jax.jit(lambda q, k, v: tq.flash_attention(q, k, v, None, True, impl="pallas"))
    want = oracle(q, k, v, 1 / 8, True)
    assert rel_l2(f(q, k, v), want) < 2e-2
    vm = jax.vmap(lambda q, k, v: tq.flash_attention(q, k, v, None, True, impl="pallas"))
    assert rel_l2(vm(q[None], k[None], v[None])[0], want) < 2e-2
    o = tq.flash_attention(q, k[:, :, :0], v[:, :, :0], impl="pallas")
    assert o.shape == q.shape and not np.asarray(o).any()


@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_kernels_lower_to_triton(d):
    s = jax.ShapeDtypeStruct
    q, kv = s((1, 8, 33, d), jnp.float16), s((1, 2, 70, d), jnp.float16)
    q1 = s((2, 8, 1, d), jnp.bfloat16)  # decode over 1030 keys: 4 KV splits
    kp, kn = s((1, 2, 70, d // 2), jnp.uint8), s((1, 2, 70), jnp.float32)
    kp1, kn1 = s((2, 2, 1030, d // 2), jnp.uint8), s((2, 2, 1030), jnp.float32)
    c, r, mask = s((16,), jnp.float32), s((d, d), jnp.float32), s((1, 8, 33, 70), jnp.float32)
    cases = [
        (lambda q, k, v, m: tq.flash_attention(q, k, v, None, True, m, impl="pallas"),
         (q, kv, kv, mask)),
        (lambda q, k, v: tq.flash_attention(q, k, v, impl="pallas"),  # split-KV decode
         (q1, s((2, 2, 1030, d), jnp.bfloat16), s((2, 2, 1030, d), jnp.bfloat16))),
        (lambda q, kp, kn, v, c, r: tq.flash_attention_tq4(q, kp, kn, v, c, r, None, True,
                                                           impl="pallas"),
         (q, kp, kn, kv, c, r)),
        (lambda q, kp, kn, c, r: tq.flash_attention_tq4_kv(q, kp, kn, kp, kn, c, r,
                                                           impl="pallas"),
         (q1, kp1, kn1, c, r)),
    ]
    for i, (fn, args) in enumerate(cases):  # a traced codebook is decoded by prmt too
        text = lower_to_triton(fn, *args)
        assert "__gpu$xla.gpu.triton" in text and ("prmt.b32" in text) == (i >= 2)
    cent, rot = tq.lloyd_max(d, 4)[0], tq.haar_rotation(d)
    for qq, kk, nn in ((q, kp, kn), (q1, kp1, kn1)):
        text = lower_to_triton(lambda q, kp, kn: tq.flash_attention_tq4_kv(
            q, kp, kn, kp, kn, cent, rot, impl="pallas"), qq, kk, nn)
        assert "__gpu$xla.gpu.triton" in text and "prmt.b32" in text


def test_bad_input():
    q = jnp.ones((1, 4, 3, 64), jnp.float16)
    k = jnp.ones((1, 2, 5, 64), jnp.float16)
    kp, kn = jnp.zeros((1, 2, 5, 32), jnp.uint8), jnp.ones((1, 2, 5), jnp.float32)
    cent, _ = tq.lloyd_max(64, 4)
    rot = tq.haar_rotation(64)
    with pytest.raises(TypeError, match="q must have dtype"):
        tq.flash_attention(q.astype(jnp.float32), k, k)
    with pytest.raises(ValueError, match="q must be"):
        tq.flash_attention(q[0], k, k)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        tq.flash_attention(q, k.astype(jnp.bfloat16), k)
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        tq.flash_attention(q, jnp.ones((1, 3, 5, 64), jnp.float16), jnp.ones((1, 3, 5, 64),
                                                                             jnp.float16))
    with pytest.raises(ValueError, match="v must have heads_kv and seq_kv"):
        tq.flash_attention(q, k, jnp.ones((1, 2, 6, 64), jnp.float16))
    with pytest.raises(ValueError, match="attention_mask must broadcast"):
        tq.flash_attention(q, k, k, attention_mask=jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="k_packed must have shape"):
        tq.flash_attention_tq4_kv(q, kp[..., :16], kn, kp, kn, cent, rot)
    with pytest.raises(ValueError, match="k_norms must have shape"):
        tq.flash_attention_tq4_kv(q, kp, kn[..., :4], kp, kn, cent, rot)
    with pytest.raises(TypeError, match="v_packed must have dtype"):
        tq.flash_attention_tq4_kv(q, kp, kn, kp.astype(jnp.int8), kn, cent, rot)
    with pytest.raises(ValueError, match=r"rotation must have shape \(64, 64\)"):
        tq.flash_attention_tq4(q, kp, kn, k, cent, tq.haar_rotation(128))
    with pytest.raises(ValueError, match="v_centroids must be 1-D"):
        tq.flash_attention_tq4_kv(q, kp, kn, kp, kn, cent, rot, v_centroids=np.zeros(3))


def test_decode_many_splits_with_empty_ones(rng, monkeypatch):
    """Split-KV decode with 9 splits of which 6 are empty, merged by log-sum-exp (the config
    the split rule picks when there are SMs to fill, passed as ``config=``)."""
    monkeypatch.setattr(tuning, "MIN_SPLIT_KEYS", 16)
    monkeypatch.setattr(tuning, "NUM_SMS", 1000)
    dense = tuning.choose_config(1, 2, 8, 150, 64)
    packed = tuning.choose_config(1, 2, 8, 150, 64, compressed=True)
    assert dense.splits == 9 and packed.splits > 1
    monkeypatch.undo()
    q, k, v = _case(rng, 1, 8, 2, 2, 150, 64, jnp.float16)
    rot = tq.haar_rotation(64, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(64, 4)
    kp, kn = tq.compress(k, rot, bnd, impl="reference")
    vp, vn = tq.compress(v, rot, bnd, impl="reference")
    k_hat, v_hat = deq(kp, kn, cent, rot), deq(vp, vn, cent, rot)
    o = tq.flash_attention(q, k, v, None, True, config=dense, impl="pallas")
    assert rel_l2(o, oracle(q, k, v, 1 / 8, True)) < 1e-2
    mask = jnp.asarray(rng.standard_normal((1, 8, 2, 150)), jnp.float32)
    o = tq.flash_attention(q, k, v, None, False, mask, config=dense, impl="pallas")
    assert rel_l2(o, oracle(q, k, v, 1 / 8, False, mask)) < 1e-2
    o = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, None, True, config=packed,
                                  impl="pallas")
    assert rel_l2(o, oracle(q, k_hat, v_hat, 1 / 8, True)) < 1e-2


def test_traced_codebook_matches_static(rng):
    """A codebook passed as a traced jit argument (gather decode) gives the same result as a
    concrete one (register decode on the GPU)."""
    q, k, v = _case(rng, 1, 4, 2, 3, 90, 64, jnp.bfloat16)
    rot = tq.haar_rotation(64, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(64, 4)
    kp, kn = tq.compress(k, rot, bnd, impl="reference")
    vp, vn = tq.compress(v, rot, bnd, impl="reference")
    f = jax.jit(lambda c: tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, c, rot, impl="pallas"))
    traced = f(jnp.asarray(cent))
    static = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, impl="pallas")
    assert rel_l2(traced, static) < 1e-3
    want = oracle(q, deq(kp, kn, cent, rot), deq(vp, vn, cent, rot), 1 / 8, False)
    assert rel_l2(traced, want) < 2e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq", [1, 5])
def test_kv_lengths_and_offsets(rng, causal, sq):
    """Per-row key counts (0, partial, full) and query offsets: every op vs a float64 oracle on
    each row's valid keys."""
    b, hq, hkv, sk, d = 4, 8, 2, 300, 64
    q, k, v = _case(rng, b, hq, hkv, sq, sk, d, jnp.float16)
    lens = np.array([0, 1, int(rng.integers(2, sk)), sk], np.int32)
    offs = np.array([0, 0, int(rng.integers(0, lens[2])), sk - sq], np.int32)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    to_bhsd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    kp, kn = tq.compress(to_bhsd(k), rot, bnd, impl="reference")
    vp, vn = tq.compress(to_bhsd(v), rot, bnd, impl="reference")
    kp, kn, vp, vn = (jnp.swapaxes(x, 1, 2) for x in (kp, kn, vp, vn))
    k_hat, v_hat = deq(kp, kn, cent, rot), deq(vp, vn, cent, rot)
    kw = dict(kv_lengths=jnp.asarray(lens), q_offsets=jnp.asarray(offs))
    for impl in IMPLS:
        outs = {
            "flash": (tq.flash_attention(q, k, v, None, causal, **kw, impl=impl), k, v),
            "tq4": (tq.flash_attention_tq4(q, kp, kn, v, cent, rot, None, causal, **kw,
                                           impl=impl), k_hat, v),
            "tq4_kv": (tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, None, causal,
                                                 **kw, impl=impl), k_hat, v_hat),
        }
        for name, (o, kk, vv) in outs.items():
            o = np.asarray(o, np.float32)
            for r in range(b):
                n = lens[r]
                if n == 0:
                    np.testing.assert_array_equal(o[r], 0.0)
                    continue
                mask = None
                if causal:
                    vis = np.arange(n)[None, :] <= np.arange(sq)[:, None] + offs[r]
                    mask = np.where(vis, 0.0, -np.inf)[None, None]
                want = oracle(q[r:r + 1], np.asarray(kk)[r:r + 1, :, :n],
                              np.asarray(vv)[r:r + 1, :, :n], 1 / np.sqrt(d), False, mask)[0]
                assert rel_l2(o[r], want) < 1e-2, (impl, name, r)
