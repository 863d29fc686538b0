import math

import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_matches_vectors(vectors, dim, bits):
    ref = vectors("codebooks")
    c, b = tq.lloyd_max(dim, bits)
    assert c.dtype == np.float32 and b.dtype == np.float32
    assert c.shape == (2 ** bits,) and b.shape == (2 ** bits - 1,)
    np.testing.assert_allclose(c, ref[f"d{dim}_b{bits}_centroids"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, ref[f"d{dim}_b{bits}_boundaries"], rtol=0, atol=1e-6)


def test_lloyd_max_reference_values():
    c, b = tq.lloyd_max(128, 4)
    assert abs(c[0] - (-0.21853473782539368)) < 1e-7
    assert abs(c[7] - (-0.010850140824913979)) < 1e-7
    np.testing.assert_allclose(c, -c[::-1], atol=1e-7)  # symmetric
    assert b[7] == 0.0                                     # middle boundary exactly 0
    assert np.all(np.diff(c) > 0) and np.all(np.diff(b) > 0)
    np.testing.assert_allclose(b, 0.5 * (c[:-1] + c[1:]), rtol=1e-6)


@pytest.mark.parametrize("bad", [0, 5, 8, 9, 2.0, True])  # 5-8: no op stores them
def test_lloyd_max_bad_bits(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        tq.lloyd_max(128, bad)


@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_haar_rotation_orthogonal(dim):
    p = tq.haar_rotation(dim, seed=7)
    assert p.dtype == np.float32 and p.shape == (dim, dim)
    np.testing.assert_allclose(p @ p.T, np.eye(dim), atol=2e-6)
    assert not np.allclose(p, tq.haar_rotation(dim, seed=8))
    np.testing.assert_array_equal(p, tq.haar_rotation(dim, seed=7))


@pytest.mark.parametrize("seed", [None, 3])
def test_hadamard_rotation(seed):
    p = tq.hadamard_rotation(128, seed=seed)
    np.testing.assert_allclose(p @ p.T, np.eye(128), atol=1e-6)
    assert np.allclose(np.abs(p), 1 / np.sqrt(128))
    if seed is None:
        np.testing.assert_allclose(p, p.T, atol=0)  # H symmetric, s = 1
        assert np.all(p[0] > 0)
    else:  # columns carry the random signs: Pi = H diag(s) / sqrt(D)
        s = np.sign(p[0])
        np.testing.assert_allclose(p * s[None, :], tq.hadamard_rotation(128), atol=0)
        assert (s < 0).any()


def test_hadamard_rotation_needs_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        tq.hadamard_rotation(96)


def test_haar_rotation_needs_an_int_seed():
    """A None seed would draw another rotation in every process: stored codes could not be
    read back."""
    with pytest.raises(TypeError, match="seed must be an int"):
        tq.haar_rotation(8, None)
    np.testing.assert_array_equal(tq.haar_rotation(8, 3), tq.haar_rotation(8, np.int64(3)))


# ----------------------------------------------------------------------------------------------
# tq.vllm.codebook
# ----------------------------------------------------------------------------------------------

def vllm_solver(d, bits):
    """Scalar float64 oracle of LAYOUTS.md family B's codebook (independent of the vectorized
    library code): Lloyd-Max on N(0, 1/d), centroids start at the midpoints of 2**bits equal
    cells over +-3.5 sigma, cells end at +-10.5 sigma, trapezoid rule with 200 intervals
    summed left to right, at most 200 steps, stop (keeping the old centroids) once every move
    is below 1e-10."""
    var = 1.0 / d
    lo, hi = -3.5 * math.sqrt(var), 3.5 * math.sqrt(var)
    density = lambda x: math.exp(-x * x / (2 * var)) / math.sqrt(2 * math.pi * var)  # noqa: E731
    first_moment = lambda x: x * density(x)  # noqa: E731

    def integral(g, a, b):
        step = (b - a) / 200
        total = 0.5 * (g(a) + g(b))
        for i in range(1, 200):
            total += g(a + i * step)
        return total * step

    cells = 2 ** bits
    cent = [lo + (hi - lo) * (i + 0.5) / cells for i in range(cells)]
    for _ in range(200):
        cuts = [3 * lo] + [(x + y) / 2.0 for x, y in zip(cent, cent[1:])] + [3 * hi]
        moved = []
        for i, old in enumerate(cent):
            mass = integral(density, cuts[i], cuts[i + 1])
            moved.append(integral(first_moment, cuts[i], cuts[i + 1]) / mass
                         if mass > 1e-15 else old)
        if max(abs(x - y) for x, y in zip(moved, cent)) < 1e-10:
            break
        cent = moved
    return np.asarray(cent, np.float32)


@pytest.mark.parametrize("d,bits", [(64, 4), (128, 3), (128, 4), (256, 3)])
def test_vllm_codebook_matches_vllm_solver(d, bits):
    c, b = tq.vllm.codebook(d, bits)
    assert c.dtype == b.dtype == np.float32 and c.shape == (2 ** bits,) and b.shape == (c.size - 1,)
    np.testing.assert_array_equal(c, vllm_solver(d, bits))  # float32-exact
    np.testing.assert_array_equal(b, (c[:-1] + c[1:]) / np.float32(2))  # what vLLM's store uses


def test_vllm_codebook_values():
    # LAYOUTS.md family B, D=128 (5 decimals): positive halves, symmetric
    want = {3: [0.02165, 0.06679, 0.11872, 0.19007],
            4: [0.01135, 0.03431, 0.05806, 0.08330, 0.11104, 0.14300, 0.18283, 0.24138]}
    for bits, half in want.items():
        c, b = tq.vllm.codebook(128, bits)
        np.testing.assert_allclose(c[c.size // 2:], half, atol=6e-6)
        np.testing.assert_allclose(c, -c[::-1], atol=1e-7)
        assert np.all(np.diff(c) > 0) and np.all(np.diff(b) > 0)
        assert not np.allclose(c, tq.lloyd_max(128, bits)[0], atol=1e-4)  # not family A's


@pytest.mark.parametrize("bad", [0, 5, 2.0, True, "4"])
def test_vllm_codebook_bad_bits(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        tq.vllm.codebook(128, bad)


def test_vllm_codebook_bad_head_dim():
    with pytest.raises((ValueError, TypeError), match="head_dim"):
        tq.vllm.codebook(1, 4)
    with pytest.raises(TypeError, match="head_dim"):
        tq.vllm.codebook(128.0, 4)


def test_vllm_codebook_drives_the_vllm_ops(rng):
    pr = tq.vllm.preset("turboquant_4bit_nc", 64)
    cent, _ = tq.vllm.codebook(64, pr.mse_bits)
    pi = tq.hadamard_rotation(64, seed=3)
    key = rng.standard_normal((8, 2, 64)).astype(np.float32)
    cache = jnp.zeros(pr.cache_shape(2, 4, 2), jnp.uint8)
    cache = tq.vllm.turboquant_store(cache, key, key, np.arange(8, dtype=np.int32), pi, cent,
                                     **pr.store_kwargs(), impl="reference")
    k, _ = tq.vllm.full_dequant_kv(cache, np.array([[0, 1]], np.int32), np.array([8], np.int32),
                                   cent, **pr.dequant_kwargs(), impl="reference")
    k_rot = key @ pi.T  # stored keys are rotated
    got = np.asarray(k, np.float32)[0].swapaxes(0, 1)  # [8, 2, 64]
    cos = np.sum(got * k_rot, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(k_rot, axis=-1)
    assert cos.min() > 0.98
