"""Codec ops against the shared vectors, the float64 oracle, and each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import assert_codes_match, oracle_compress, rel_linf, unpack
from tq4jax.testing import lower_to_triton

IMPLS = ["reference", "pallas"]
COMPRESS_FILES = ["compress_d64_b3", "compress_d64_b4", "compress_d128_b3", "compress_d128_b4"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", COMPRESS_FILES)
def test_compress_matches_vectors(vectors, name, impl):
    v = vectors(name)
    packed, norms = tq.compress(v["x"], v["rotation"], v["boundaries"], impl=impl)
    assert packed.dtype == jnp.uint8 and packed.shape == v["packed"].shape
    assert norms.dtype == jnp.float32 and norms.shape == v["norms"].shape
    assert_codes_match(packed, v["packed"], v["rotated"], v["boundaries"])
    np.testing.assert_allclose(np.asarray(norms), v["norms"], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", COMPRESS_FILES)
def test_decompress_dequantize_match_vectors(vectors, name, impl):
    v = vectors(name)
    y = tq.decompress(v["packed"], v["norms"], v["centroids"], jnp.float32, impl=impl)
    assert y.shape == v["decompressed"].shape and y.dtype == jnp.float32
    assert rel_linf(y, v["decompressed"]) < 1e-5
    x = tq.dequantize(v["packed"], v["norms"], v["centroids"], v["rotation"], jnp.float32,
                      impl=impl)
    assert rel_linf(x, v["dequantized"]) < 1e-5
    # [..., 1] norms are accepted too
    y1 = tq.decompress(v["packed"], v["norms"][..., None], v["centroids"], jnp.float32, impl=impl)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y))


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pallas_vs_reference_random(rng, dim, bits):
    lead = (int(rng.integers(1, 4)), int(rng.integers(1, 70)))
    dtype = [jnp.float16, jnp.bfloat16, jnp.float32][int(rng.integers(0, 3))]
    x = jnp.asarray(rng.standard_normal(lead + (dim,)) * rng.uniform(0.1, 10), dtype)
    rot = tq.haar_rotation(dim, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(dim, bits)
    pk, nk = tq.compress(x, rot, bnd, impl="pallas")
    pr, nr = tq.compress(x, rot, bnd, impl="reference")
    assert pk.shape == lead + (dim // 2,) and nk.shape == lead
    idx, norm, y = oracle_compress(np.asarray(x.astype(jnp.float32)), rot, bnd)
    assert_codes_match(pk, pr, y, bnd)
    assert_codes_match(pk, idx.astype(np.uint8).reshape(*lead, -1, 2) @ np.array([16, 1])
                       .astype(np.uint8), y, bnd)
    np.testing.assert_allclose(np.asarray(nk), norm, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nr), norm, rtol=1e-6)
    assert unpack(pk).max() < 2 ** bits
    for out_dtype in (jnp.float32, jnp.bfloat16):
        yk = tq.decompress(pk, nk, cent, out_dtype, impl="pallas")
        yr = tq.decompress(pk, nk, cent, out_dtype, impl="reference")
        assert yk.dtype == out_dtype and yk.shape == lead + (dim,)
        tol = 1e-6 if out_dtype == jnp.float32 else 1e-2
        assert rel_linf(yk.astype(jnp.float32), yr.astype(jnp.float32)) < tol
        xk = tq.dequantize(pk, nk, cent, rot, out_dtype, impl="pallas")
        xr = tq.dequantize(pk, nk, cent, rot, out_dtype, impl="reference")
        assert rel_linf(xk.astype(jnp.float32), xr.astype(jnp.float32)) < max(tol, 1e-5)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("n", [1, 8, 64, 150])
def test_compress_kv_one_launch(rng, dim, n):
    """compress_kv: the bytes of two compress calls (K 4-bit, V 3-bit codebook), from one
    kernel launch; few rows take the column-split path, many rows the full-width one."""
    dtype = [jnp.float16, jnp.bfloat16, jnp.float32][int(rng.integers(0, 3))]
    lead = (n, 2)
    k = jnp.asarray(rng.standard_normal(lead + (dim,)) * rng.uniform(0.1, 10), dtype)
    v = jnp.asarray(rng.standard_normal(lead + (dim,)) * rng.uniform(0.1, 10), dtype)
    rot = tq.haar_rotation(dim, seed=int(rng.integers(1 << 30)))
    _, kb = tq.lloyd_max(dim, 4)
    _, vb = tq.lloyd_max(dim, 3)
    out = tq.compress_kv(k, v, rot, kb, vb, impl="pallas")
    for (p, nrm), x, bnd in zip((out[:2], out[2:]), (k, v), (kb, vb)):
        assert p.shape == lead + (dim // 2,) and p.dtype == jnp.uint8 and nrm.shape == lead
        ps, ns = tq.compress(x, rot, bnd, impl="pallas")
        idx, norm, y = oracle_compress(np.asarray(x.astype(jnp.float32)), rot, bnd)
        assert_codes_match(p, ps, y, bnd)  # another kernel: float rounding may differ
        np.testing.assert_allclose(np.asarray(nrm), np.asarray(ns), rtol=1e-6)
        assert_codes_match(p, (idx[..., 0::2] * 16 + idx[..., 1::2]).astype(np.uint8), y, bnd)
        np.testing.assert_allclose(np.asarray(nrm), norm, rtol=1e-6)
    ref = tq.compress_kv(k, v, rot, kb, impl="reference")  # V defaults to K's codebook
    _, _, y = oracle_compress(np.asarray(v.astype(jnp.float32)), rot, kb)
    assert_codes_match(ref[2], tq.compress(v, rot, kb, impl="reference")[0], y, kb)
    text = lower_to_triton(lambda a, b: tq.compress_kv(a, b, rot, kb, vb, impl="pallas"), k, v)
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_compress_kv_bad_input(rng):
    rot = tq.haar_rotation(64)
    _, bnd = tq.lloyd_max(64, 4)
    x = jnp.ones((4, 64), jnp.float16)
    with pytest.raises(ValueError, match="value must have key's shape"):
        tq.compress_kv(x, jnp.ones((5, 64), jnp.float16), rot, bnd)
    v = rng.standard_normal((4, 64)).astype(np.float32)
    out = tq.compress_kv(x, jnp.asarray(v), rot, bnd, impl="pallas")  # streams keep dtypes
    assert out[0].shape == out[2].shape == (4, 32)
    for (p, nrm), a in ((out[:2], np.asarray(x, np.float32)), (out[2:], v)):
        idx, norm, y = oracle_compress(a, rot, bnd)
        assert_codes_match(p, (idx[..., 0::2] * 16 + idx[..., 1::2]).astype(np.uint8), y, bnd)
        np.testing.assert_allclose(np.asarray(nrm), norm, rtol=1e-6)
    with pytest.raises(TypeError, match="key"):
        tq.compress_kv(x.astype(jnp.int32), x, rot, bnd)
    with pytest.raises(ValueError, match="v_boundaries"):
        tq.compress_kv(x, x, rot, bnd, np.zeros(14, np.float32))


def test_edge_rows(rng):
    dim, bits = 128, 4
    rot = tq.haar_rotation(dim, seed=5)
    cent, bnd = tq.lloyd_max(dim, bits)
    x = rng.standard_normal((6, dim)).astype(np.float32)
    x[0] = 0.0                                   # zero vector
    x[1] *= 1e-6                                 # tiny vector
    x[2, 7] = 1e4                                # outlier channel
    x[3, :4] = -3e3                              # several outliers
    x[4] = 0.0
    x[4, 0] = 1.0                                # one-hot
    for impl in IMPLS:
        p, n = tq.compress(jnp.asarray(x), rot, bnd, impl=impl)
        codes = unpack(p)
        np.testing.assert_array_equal(codes[0], 2 ** (bits - 1))  # ties go up at 0
        assert float(n[0]) == 0.0
        idx, norm, y = oracle_compress(x, rot, bnd)
        assert_codes_match(p, (idx[..., 0::2] * 16 + idx[..., 1::2]).astype(np.uint8), y, bnd)
        np.testing.assert_allclose(np.asarray(n), norm, rtol=1e-6)
        xh = tq.dequantize(p, n, cent, rot, jnp.float32, impl=impl)
        assert np.all(np.isfinite(np.asarray(xh)))
        np.testing.assert_array_equal(np.asarray(xh[0]), 0.0)
        cos = np.sum(np.asarray(xh)[1:] * x[1:], -1) / (
            np.linalg.norm(np.asarray(xh)[1:], axis=-1) * np.linalg.norm(x[1:], axis=-1))
        assert np.all(cos > 0.95), cos


def test_jit_and_vmap(rng):
    dim = 64
    rot = jnp.asarray(tq.haar_rotation(dim))
    cent, bnd = tq.lloyd_max(dim, 4)
    x = jnp.asarray(rng.standard_normal((3, 5, dim)), jnp.float16)
    f = jax.jit(lambda x: tq.compress(x, rot, bnd, impl="pallas"))
    p, n = f(x)
    pv, nv = jax.vmap(lambda x: tq.compress(x, rot, bnd, impl="pallas"))(x)
    pr, nr = tq.compress(x, rot, bnd, impl="reference")
    _, _, y = oracle_compress(np.asarray(x, np.float32), rot, bnd)
    assert_codes_match(p, pr, y, bnd)
    assert_codes_match(pv, pr, y, bnd)
    np.testing.assert_allclose(np.asarray(nv), np.asarray(nr), rtol=1e-6)


def test_empty_input():
    rot = tq.haar_rotation(64)
    _, bnd = tq.lloyd_max(64, 4)
    p, n = tq.compress(jnp.zeros((0, 64), jnp.float16), rot, bnd, impl="pallas")
    assert p.shape == (0, 32) and n.shape == (0,)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_kernels_lower_to_triton(dim):
    f32, u8 = jnp.float32, jnp.uint8
    s = jax.ShapeDtypeStruct
    x, rot, bnd = s((300, dim), jnp.bfloat16), s((dim, dim), f32), s((15,), f32)
    pk, nm, cent = s((300, dim // 2), u8), s((300,), f32), s((8,), f32)
    cases = {
        "compress": (lambda x, r, b: tq.compress(x, r, b, impl="pallas"), (x, rot, bnd)),
        "decompress": (lambda p, n, c: tq.decompress(p, n, c, impl="pallas"), (pk, nm, cent)),
        "dequantize": (lambda p, n, c, r: tq.dequantize(p, n, c, r, jnp.bfloat16, impl="pallas"),
                       (pk, nm, cent, rot)),
    }
    for name, (fn, args) in cases.items():
        text = lower_to_triton(fn, *args)
        assert "__gpu$xla.gpu.triton" in text, name


def test_bad_input():
    rot = tq.haar_rotation(64)
    cent, bnd = tq.lloyd_max(64, 4)
    x = jnp.ones((4, 64), jnp.float16)
    with pytest.raises(TypeError, match="x must have dtype"):
        tq.compress(jnp.ones((4, 64), jnp.int32), rot, bnd)
    with pytest.raises(ValueError, match="x: head_dim must be even"):
        tq.compress(jnp.ones((4, 63), jnp.float16), rot, bnd)
    with pytest.raises(ValueError, match=r"rotation must have shape \(64, 64\)"):
        tq.compress(x, tq.haar_rotation(128), bnd)
    with pytest.raises(ValueError, match="boundaries must be 1-D"):
        tq.compress(x, rot, np.zeros(14, np.float32))
    with pytest.raises(ValueError, match="impl must be"):
        tq.compress(x, rot, bnd, impl="cuda")
    p, n = tq.compress(x, rot, bnd)
    with pytest.raises(TypeError, match="packed must have dtype"):
        tq.decompress(p.astype(jnp.int8), n, cent)
    with pytest.raises(ValueError, match="norms must have shape"):
        tq.decompress(p, n[:3], cent)
    with pytest.raises(ValueError, match="centroids must be 1-D"):
        tq.decompress(p, n, np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="dtype must be"):
        tq.decompress(p, n, cent, jnp.int8)
    with pytest.raises(ValueError, match=r"rotation must have shape \(64, 64\)"):
        tq.dequantize(p, n, cent, tq.haar_rotation(96))
