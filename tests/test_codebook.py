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
