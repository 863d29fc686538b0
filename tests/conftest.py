"""Shared test setup: poisoned kernel outputs, the shared vectors, GPU-only marker."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

# Every Pallas kernel output starts as garbage (NaN / 0xAB): an unwritten element fails a test.
os.environ["TQ4JAX_POISON"] = "1"

VECTORS = Path(os.environ.get("TQ4JAX_VECTORS",
                              Path(__file__).resolve().parents[2] / "shared" / "vectors"))
ON_GPU = jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vectors():
    """Loader for ../shared/vectors/<name>.npz (required in CI; skipped elsewhere if absent)."""
    if not VECTORS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared vectors not found at {VECTORS}")
        pytest.skip(f"shared vectors not found at {VECTORS} (set TQ4JAX_VECTORS)")

    def load(name: str) -> dict:
        with np.load(VECTORS / f"{name}.npz") as f:
            return {k: f[k] for k in f.files}

    return load


@pytest.fixture
def rng(request):
    """A fresh random generator per test (seeded from the wall clock; seed printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
