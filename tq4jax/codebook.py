"""Lloyd-Max codebooks and random rotations (numpy only; built once on the host).

Conventions (LAYOUTS.md, family A): forward rotation is ``y = x @ Pi^T``, inverse ``x = y @ Pi``.
"""

from __future__ import annotations

import math

import numpy as np

MAX_ITERS = 200
TOL = 1e-10
TRUNC_SIGMAS = 3.0


def _check_dim(dim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if dim < 2:
        raise ValueError(f"{name} must be >= 2, got {dim}")
    return int(dim)


def _normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in z]))


def lloyd_max(dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max scalar quantizer for one coordinate of a rotated unit vector.

    The coordinate is modelled as N(0, 1/dim) truncated to +-3 sigma (turboquant-vllm's solver).
    ``bits`` in 1..4: every op stores a code in one nibble (D/2 bytes per vector whatever the
    bits), so fewer bits trade accuracy, not memory.
    Returns ``(centroids float32 [2**bits], boundaries float32 [2**bits - 1])``, sorted;
    boundaries are midpoints of neighbouring centroids, symmetric, the middle one exactly 0.
    """
    dim = _check_dim(dim)
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 4:
        raise ValueError(f"bits must be an int in [1, 4] (codes are stored as 4-bit nibbles), "
                         f"got {bits!r}")
    n = 1 << int(bits)
    sigma = 1.0 / math.sqrt(dim)
    lo, hi = -TRUNC_SIGMAS * sigma, TRUNC_SIGMAS * sigma
    c = lo + (hi - lo) * (np.arange(n, dtype=np.float64) + 0.5) / n
    for _ in range(MAX_ITERS):
        b = 0.5 * (c[:-1] + c[1:])
        edges = np.concatenate([[lo], b, [hi]]) / sigma  # standardized interval ends
        pdf, cdf = _normal_pdf(edges), _normal_cdf(edges)
        mass = np.maximum(cdf[1:] - cdf[:-1], 1e-300)
        new_c = sigma * (pdf[:-1] - pdf[1:]) / mass  # E[X | a < X < b] for N(0, sigma^2)
        moved = np.max(np.abs(new_c - c))
        c = new_c
        if moved < TOL:
            break
    c = 0.5 * (c - c[::-1])  # exact symmetry: the middle boundary is exactly 0.0
    b = 0.5 * (c[:-1] + c[1:])
    return c.astype(np.float32), b.astype(np.float32)


def haar_rotation(dim: int, seed: int = 42) -> np.ndarray:
    """Haar-random orthogonal ``Pi`` float32 [dim, dim]: QR of a seeded Gaussian, sign-fixed.

    Uses numpy's PCG64 stream, so it is not torch's seed-42 matrix: interop passes ``Pi`` as data.
    """
    dim = _check_dim(dim)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int (a None seed would give another rotation in every "
                        f"process, so stored codes could not be read back), got {seed!r}")
    g = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))[None, :]
    return q.astype(np.float32)


def hadamard_rotation(dim: int, seed: int | None = None) -> np.ndarray:
    """``Pi = H diag(s) / sqrt(dim)`` float32 [dim, dim], H the Sylvester Hadamard matrix.

    ``seed=None``: s = 1; otherwise s are seeded random signs. ``dim`` must be a power of two.
    """
    dim = _check_dim(dim)
    if dim & (dim - 1):
        raise ValueError(f"hadamard_rotation needs a power-of-two dim, got {dim}")
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    s = np.ones(dim) if seed is None else np.random.default_rng(seed).choice([-1.0, 1.0], dim)
    return (h * s[None, :] / math.sqrt(dim)).astype(np.float32)


#: vLLM's solver (``vllm/model_executor/layers/quantization/turboquant/centroids.py``):
#: initial centroids uniform over +-VLLM_INIT_SIGMAS sigma, integration edges at 3x that,
#: trapezoidal conditional means with VLLM_TRAPZ_POINTS intervals.
VLLM_INIT_SIGMAS = 3.5
VLLM_EDGE_FACTOR = 3.0
VLLM_TRAPZ_POINTS = 200


def vllm_codebook(head_dim: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream vLLM TurboQuant's Lloyd-Max codebook (LAYOUTS.md family B), as vLLM computes it.

    Lloyd-Max for N(0, 1/head_dim), not truncated (unlike :func:`lloyd_max`, family A):
    ``2**bits`` centroids start uniform over +-3.5 sigma; each step takes the midpoints as
    boundaries, integrates over ``[-10.5 sigma, b_0], ..., [b_last, +10.5 sigma]`` with the
    trapezoidal rule (200 intervals, summed left to right as vLLM's ``_trapz``) and sets each
    centroid to its cell's conditional mean (kept when the cell's mass is <= 1e-15); it stops
    after 200 steps or, as vLLM does, keeps the previous centroids once no centroid moves by
    1e-10 or more.

    Args:
      head_dim: the head dimension D (an int >= 2): the variance is 1/D.
      bits: centroid bits, an int in [1, 4] (vLLM's presets use 3 and 4).
    Returns:
      ``(centroids float32 [2**bits], boundaries float32 [2**bits - 1])``, ascending.
      ``boundaries`` are the float32 midpoints of the float32 centroids, which is what
      vLLM's store compares against (``(c[:-1] + c[1:]) / 2`` on the float32 tensor), so
      they may differ by an ulp from its ``solve_lloyd_max``'s second output (float64
      midpoints). ``tq4jax.vllm`` ops take the centroids and derive the same midpoints.
    """
    d = _check_dim(head_dim, "head_dim")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 4:
        raise ValueError(f"bits must be an int in [1, 4], got {bits!r}")
    n = 1 << int(bits)
    sigma2 = 1.0 / d
    sigma = math.sqrt(sigma2)
    lo, hi = -VLLM_INIT_SIGMAS * sigma, VLLM_INIT_SIGMAS * sigma
    c = lo + (hi - lo) * (np.arange(n, dtype=np.float64) + 0.5) / n
    coef = 1.0 / math.sqrt(2 * math.pi * sigma2)
    steps = np.arange(1, VLLM_TRAPZ_POINTS, dtype=np.float64)
    for _ in range(MAX_ITERS):
        edges = np.concatenate([[lo * VLLM_EDGE_FACTOR], (c[:-1] + c[1:]) / 2.0,
                                [hi * VLLM_EDGE_FACTOR]])
        a, b = edges[:-1, None], edges[1:, None]
        h = (b - a) / VLLM_TRAPZ_POINTS
        # columns: both ends (weight 1/2 each, added first), then the interior points in order
        x = np.concatenate([a, b, a + steps * h], axis=1)
        pdf = coef * np.exp(-x * x / (2 * sigma2))
        terms = {"den": pdf, "num": x * pdf}
        sums = {}
        for key, f in terms.items():
            seq = np.concatenate([0.5 * (f[:, :1] + f[:, 1:2]), f[:, 2:]], axis=1)
            sums[key] = np.cumsum(seq, axis=1)[:, -1] * h[:, 0]  # sequential, as vLLM
        den = sums["den"]
        new_c = np.where(den > 1e-15, sums["num"] / np.where(den > 1e-15, den, 1.0), c)
        if np.max(np.abs(new_c - c)) < TOL:
            break
        c = new_c
    c32 = c.astype(np.float32)
    return c32, ((c32[:-1] + c32[1:]) / np.float32(2)).astype(np.float32)
