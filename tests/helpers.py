"""Comparison helpers for tests."""

import numpy as np


def rel_linf(a, b) -> float:
    """max|a - b| / max|b| in float64 (NaN in ``a`` gives inf)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64 (NaN in ``a`` gives inf)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def unpack(packed) -> np.ndarray:
    p = np.asarray(packed).astype(np.int32)
    return np.stack([p >> 4, p & 15], -1).reshape(*p.shape[:-1], -1)


def assert_codes_match(packed, expected, rotated, boundaries, tol=1e-5):
    """Codes equal, except where the rotated value lies within ``tol`` of a boundary: there
    either neighbouring index is accepted."""
    got, want = unpack(packed), unpack(expected)
    diff = got != want
    if not diff.any():
        return
    near = np.min(np.abs(np.asarray(rotated, np.float64)[..., None]
                         - np.asarray(boundaries, np.float64)), axis=-1) < tol
    bad = diff & ~(near & (np.abs(got - want) == 1))
    assert not bad.any(), (f"{bad.sum()} codes differ away from boundaries, "
                           f"e.g. at {np.argwhere(bad)[:5].tolist()}")


def oracle_compress(x, rotation, boundaries):
    """float64 numpy compress: (codes int [..., D], norms, rotated values)."""
    x = np.asarray(x, np.float64)
    norm = np.sqrt((x * x).sum(-1))
    y = (x / (norm[..., None] + 1e-10)) @ np.asarray(rotation, np.float64).T
    idx = (y[..., None] >= np.asarray(boundaries, np.float64)).sum(-1)
    return idx, norm, y
