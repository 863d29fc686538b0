"""Defined behaviour at the edges: forward-only ops, non-finite and near-overflow inputs, and
bad input that used to give silent garbage (sorted codebooks, exact cache widths, bits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from tq4jax import demo

IMPLS = ["reference", "pallas"]
D = 64


def _codec(rng):
    cent, bnd = tq.lloyd_max(D, 4)
    return tq.haar_rotation(D, seed=int(rng.integers(1 << 30))), cent, bnd


# ----------------------------------------------------------------------------------------------
# forward-only
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_ops_are_forward_only_on_every_backend(rng, impl):
    """jax.grad through any op raises one clear TypeError (the kernel path used to fail with a
    bare AssertionError while the reference path differentiated); stop_gradient around the
    op's inputs lets the rest of a program differentiate."""
    rot, cent, bnd = _codec(rng)
    x = jnp.asarray(rng.standard_normal((2, 4, 9, D)), jnp.float16)
    packed, norms = tq.compress(x[:, :2], rot, bnd, impl=impl)
    losses = {
        "compress": lambda a: jnp.sum(tq.compress(a, rot, bnd, impl=impl)[1]),
        "dequantize": lambda a: jnp.sum(tq.dequantize(packed, norms * a[0, 0, 0, 0], cent, rot,
                                                      jnp.float32, impl=impl)),
        "flash_attention_tq4_kv": lambda a: jnp.sum(tq.flash_attention_tq4_kv(
            a, packed, norms, packed, norms, cent, rot, impl=impl).astype(jnp.float32)),
        "flash_attention": lambda a: jnp.sum(tq.flash_attention(
            a, a[:, :2], a[:, :2], impl=impl).astype(jnp.float32)),
    }
    for name, loss in losses.items():
        with pytest.raises(TypeError, match="forward-only"):
            jax.grad(loss)(x)
    around = lambda a: jnp.sum(a.astype(jnp.float32) ** 2) + losses["compress"](  # noqa: E731
        jax.lax.stop_gradient(a))
    np.testing.assert_allclose(np.asarray(jax.grad(around)(x.astype(jnp.float32))),
                               2 * np.asarray(x, np.float32), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# non-finite and near-overflow inputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_non_finite_vectors_store_nan_norm_on_both_paths(rng, dtype):
    """A vector with an Inf or NaN coordinate is stored as norm NaN and codes 0 by both paths
    (the kernel used to store Inf where the reference gave NaN); it decodes to NaN."""
    rot, cent, bnd = _codec(rng)
    x = rng.standard_normal((5, D)).astype(np.float32)
    x[0, 3], x[1, 5], x[2, 0] = np.inf, np.nan, -np.inf
    out = {impl: tq.compress(jnp.asarray(x, dtype), rot, bnd, impl=impl) for impl in IMPLS}
    for impl, (p, n) in out.items():
        n = np.asarray(n)
        assert np.isnan(n[:3]).all() and np.isfinite(n[3:]).all(), (impl, n)
        np.testing.assert_array_equal(np.asarray(p)[:3], 0)
        y = np.asarray(tq.dequantize(p, n, cent, rot, jnp.float16, impl=impl), np.float32)
        assert np.isnan(y[:3]).all() and np.isfinite(y[3:]).all(), impl
    np.testing.assert_array_equal(np.asarray(out["pallas"][0]), np.asarray(out["reference"][0]))


def test_near_fp16_limit_saturates_on_both_paths(rng):
    """fp16 inputs near 65504 round-trip to finite values: 16-bit outputs saturate at the
    largest finite value (they used to overflow to inf), identically on both paths."""
    rot, cent, bnd = _codec(rng)
    x = np.full((3, D), 60000.0, np.float32)
    x[1] *= np.sign(rng.standard_normal(D))
    x[2] = np.clip(rng.standard_normal(D) * 30000, -65000, 65000)
    p, n = tq.compress(jnp.asarray(x, jnp.float16), rot, bnd)
    for fn in (lambda i: tq.dequantize(p, n, cent, rot, jnp.float16, impl=i),
               lambda i: tq.decompress(p, n, cent, jnp.float16, impl=i)):
        ref, ker = (np.asarray(fn(i), np.float32) for i in IMPLS)
        assert np.isfinite(ref).all() and np.isfinite(ker).all()
        assert np.abs(ker).max() <= 65504 and (np.abs(ker) == 65504).any()
        np.testing.assert_allclose(ker, ref, rtol=2e-3, atol=0)


def test_fp16_subnormal_outputs_agree_on_both_paths(rng):
    """Outputs below fp16's smallest normal (6.1e-5) keep their subnormal value on the XLA
    side as in the kernels (reduce_precision alone used to flush them to zero)."""
    from tq4jax.layout import to_dtype
    x = (rng.standard_normal(4096) * 3e-5).astype(np.float32)
    x[:3] = [-1.85e-5, 2.9e-8, 6.1e-5]
    want = x.astype(np.float16)
    for fn in (jax.jit(lambda a: to_dtype(a, jnp.float16)), lambda a: to_dtype(a, jnp.float16)):
        got = np.asarray(fn(jnp.asarray(x)))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    rot, cent, _ = _codec(rng)
    codes = jnp.asarray(rng.integers(0, 256, (8, D // 2)), jnp.uint8)
    norms = jnp.asarray(rng.uniform(1e-4, 1e-3, (8, 1)), jnp.float32)
    ref, ker = (np.asarray(tq.dequantize(codes, norms, cent, rot, jnp.float16, impl=i),
                           np.float32) for i in IMPLS)
    exact = np.asarray(tq.dequantize(codes, norms, cent, rot, jnp.float32, impl="reference"))
    # subnormal outputs survive: nonzero wherever the float32 value rounds to a nonzero fp16
    # (|x| above half the smallest subnormal 2^-24; smaller ones round to zero, as in numpy)
    assert (np.abs(ref) < 6.1e-5).sum() > 10
    assert (ref[np.abs(exact) > 2.0 ** -25] != 0).all()
    np.testing.assert_array_equal(ref, exact.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(ker, ref, rtol=0, atol=2.0 ** -24)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_value_poisons_its_kv_head_group_only(rng, impl):
    """Attention over a token whose V had an Inf coordinate gives NaN in every output row of
    that KV head's query heads and nowhere else, on both paths (documented rule)."""
    rot, cent, bnd = _codec(rng)
    b, hq, hkv, s = 1, 4, 2, 40
    k = rng.standard_normal((b, hkv, s, D)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, D)).astype(np.float32)
    v[0, 1, 7, 3] = np.inf
    kp, kn = tq.compress(jnp.asarray(k), rot, bnd)
    vp, vn = tq.compress(jnp.asarray(v), rot, bnd)
    q = jnp.asarray(rng.standard_normal((b, hq, 3, D)), jnp.float16)
    out = np.asarray(tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, impl=impl),
                     np.float32)
    assert np.isfinite(out[:, :2]).all()      # query heads of KV head 0
    assert np.isnan(out[:, 2:]).all()         # query heads of KV head 1


# ----------------------------------------------------------------------------------------------
# vLLM layout: one store rule (saturate finite, NaN for non-finite)
# ----------------------------------------------------------------------------------------------

def _vllm_store(rng, name, k, v, impl):
    p = tq.vllm.preset(name, D)
    cache = jnp.zeros(p.cache_shape(2, 4, k.shape[1]), jnp.uint8)
    pi = tq.hadamard_rotation(D, seed=1)
    cent = tq.lloyd_max(D, p.mse_bits)[0]
    slots = jnp.arange(k.shape[0], dtype=jnp.int32)
    cache = tq.vllm.turboquant_store(cache, jnp.asarray(k), jnp.asarray(v), slots, pi, cent,
                                     **p.store_kwargs(), impl=impl)
    table, lens = jnp.asarray([[0, 1]], jnp.int32), jnp.asarray([k.shape[0]], jnp.int32)
    kd, vd = tq.vllm.full_dequant_kv(cache, table, lens, cent, **p.dequant_kwargs(), impl=impl)
    q = jnp.asarray(rng.standard_normal((1, 2 * k.shape[1], D)), jnp.float16)
    out = tq.vllm.turboquant_decode(q, cache, table, lens, pi, cent, 0.125, **p.decode_kwargs(),
                                    impl=impl)
    return cache, np.asarray(kd, np.float32), np.asarray(vd, np.float32), np.asarray(out,
                                                                                     np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_vllm_store_rule(rng, impl):
    """A key norm above 65504 is stored as 65504 (it used to become fp16 inf and turn the whole
    decode output to NaN); a non-finite key or value coordinate stores NaN fields, so only the
    KV head holding it reads NaN. fp8 keys saturate at +-448 and store NaN for Inf/NaN."""
    k = rng.standard_normal((6, 2, D)).astype(np.float32)
    v = rng.standard_normal((6, 2, D)).astype(np.float32)
    k[2, 0] *= 30000.0        # norm ~ 2.4e5 > 65504
    _, kd, vd, out = _vllm_store(rng, "turboquant_4bit_nc", k, v, impl)
    np.testing.assert_allclose(np.linalg.norm(kd[0, 0, 2]), 65504, rtol=1e-3)
    assert np.isfinite(out).all() and np.isfinite(kd).all() and np.isfinite(vd).all()
    k[4, 1, 0] = np.inf
    v[3, 0, 5] = np.nan
    for name in ("turboquant_4bit_nc", "turboquant_k8v4"):
        _, kd, vd, out = _vllm_store(rng, name, k, v, impl)
        assert np.isnan(kd[0, 1, 4]).any() and np.isnan(vd[0, 0, 3]).all()
        assert np.isfinite(np.delete(vd[0, 0], 3, axis=0)).all()
        assert np.isnan(out[0]).all()  # both KV heads hold a poisoned token
    k8 = k.copy()
    k8[4, 1, 0], v[3, 0, 5] = 1e4, 1.0
    _, kd, _, out = _vllm_store(rng, "turboquant_k8v4", k8, v, impl)
    assert kd[0, 1, 4, 0] == 448.0 and np.isfinite(out).all()


def test_vllm_store_rule_same_bytes_on_both_paths(rng):
    k = rng.standard_normal((6, 2, D)).astype(np.float32)
    v = rng.standard_normal((6, 2, D)).astype(np.float32)
    k[2, 0] *= 30000.0
    k[4, 1, 0], v[3, 0, 5], v[1, 1, 2] = np.inf, np.nan, -np.inf
    for name in ("turboquant_4bit_nc", "turboquant_k8v4"):
        ker, ref = (np.asarray(_vllm_store(rng, name, k, v, i)[0]) for i in ("pallas",
                                                                             "reference"))
        np.testing.assert_array_equal(ker, ref)


def test_vllm_slot_width_must_match_the_preset():
    p = tq.vllm.preset("turboquant_4bit_nc", D)
    q = jnp.ones((1, 4, D), jnp.float16)
    cache = jnp.zeros((2, 4, 2, p.slot_bytes + 2), jnp.uint8)
    table, lens = jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32)
    cent = tq.lloyd_max(D, 4)[0]
    with pytest.raises(ValueError, match=f"slot of {p.slot_bytes} bytes"):
        tq.vllm.turboquant_decode(q, cache, table, lens, tq.hadamard_rotation(D), cent, 0.1,
                                  **p.decode_kwargs())
    with pytest.raises(ValueError, match="centroids must be sorted"):
        tq.vllm.turboquant_decode(q, cache[..., :p.slot_bytes], table, lens,
                                  tq.hadamard_rotation(D), cent[::-1], 0.1, **p.decode_kwargs())


# ----------------------------------------------------------------------------------------------
# codebooks and bits
# ----------------------------------------------------------------------------------------------

def test_unsorted_or_non_finite_codebooks_are_refused(rng):
    rot, cent, bnd = _codec(rng)
    x = jnp.asarray(rng.standard_normal((4, D)), jnp.float16)
    p, n = tq.compress(x, rot, bnd)
    with pytest.raises(ValueError, match="boundaries must be sorted"):
        tq.compress(x, rot, bnd[::-1])
    with pytest.raises(ValueError, match="centroids must be sorted"):
        tq.decompress(p, n, cent[::-1])
    swapped = cent.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    with pytest.raises(ValueError, match="centroids must be sorted"):
        tq.dequantize(p, n, swapped, rot)
    bad = cent.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="centroids must be finite"):
        tq.decompress(p, n, bad)
    q = jnp.ones((1, 2, 3, D), jnp.float16)
    codes, norms = p[None, None, :3], n[None, None, :3]
    with pytest.raises(ValueError, match="v_centroids must be sorted"):
        tq.flash_attention_tq4_kv(q, codes, norms, codes, norms, cent, rot,
                                  v_centroids=cent[::-1])
    # traced codebooks cannot be checked: they are taken on trust (documented)
    jax.jit(lambda c: tq.decompress(p, n, c))(jnp.asarray(cent[::-1]))


def test_demo_bits(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--bits", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err
    demo.main(["--bits", "3", "--layers", "1", "--tokens", "64", "--gen-tokens", "0"])
    text = capsys.readouterr().out
    assert "a 3-bit codebook still stores 4-bit nibbles" in text
    assert "TQ4" in text and "TQ3" not in text
