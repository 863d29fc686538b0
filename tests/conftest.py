"""Shared test setup: deterministic seeds, poisoned kernel outputs, the shared vectors, the
GPU-only marker.

Seeds. Every test that draws random inputs takes the ``rng`` fixture: a numpy Generator
seeded from the test's id and a base seed, so a run is reproducible by default.

* ``TQ4JAX_TEST_SEED=<int>`` sets the base seed (default 0); ``TQ4JAX_TEST_SEED=random`` draws
  one (printed in the header and with every failure).
* ``TQ4JAX_TEST_REPEAT=<n>`` runs every ``rng`` test with n seeds (widens the search).

A failing ``rng`` test prints the command that replays it.
"""

import os
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

# Every Pallas kernel output starts as garbage (NaN / 0xAB): an unwritten element fails a test.
os.environ["TQ4JAX_POISON"] = "1"

VECTORS = Path(os.environ.get("TQ4JAX_VECTORS",
                              Path(__file__).resolve().parents[2] / "shared" / "vectors"))
ON_GPU = jax.default_backend() == "gpu"
SEED_ENV, REPEAT_ENV = "TQ4JAX_TEST_SEED", "TQ4JAX_TEST_REPEAT"


def _env_int(name: str, default: int, allow_random: bool = False) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if allow_random and raw == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an int{' or random' if allow_random else ''}, "
                                f"got {raw!r}") from None
    if value < 0:
        raise pytest.UsageError(f"{name} must be >= 0, got {value}")
    return value


#: Base seed of this session (fixed for the whole run, also with ``random``).
BASE_SEED = _env_int(SEED_ENV, 0, allow_random=True)
REPEAT = max(1, _env_int(REPEAT_ENV, 1))


def pytest_report_header(config):
    return f"tq4jax: {SEED_ENV}={BASE_SEED} {REPEAT_ENV}={REPEAT}, jax {jax.__version__} " \
           f"on {jax.default_backend()}"


#: Modules whose tests run longest on a GPU (each fuzz example and each original compiles new
#: kernels). pytest-xdist hands each worker a first batch of consecutive tests (at least 2;
#: exactly 2 with ``--maxschedchunk 1``, as bench/gpu_run.sh runs it), so these are collected
#: first and interleaved one-to-one with the others: every worker starts on one slow test
#: instead of queueing several (an H200, seed 4: four fuzz tests ran one after another on one
#: worker and the last was still running when the 570 s call ended).
SLOW_FIRST = ("test_fuzz_", "test_originals")


def slow_first(items: list) -> list:
    """``items`` reordered: slow and other tests alternating while both last, then the rest."""
    slow = [item for item in items if item.path.name.startswith(SLOW_FIRST)]
    rest = [item for item in items if not item.path.name.startswith(SLOW_FIRST)]
    paired = [x for pair in zip(slow, rest) for x in pair]
    n = min(len(slow), len(rest))
    return paired + slow[n:] + rest[n:]


def pytest_collection_modifyitems(config, items):
    items[:] = slow_first(items)
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if REPEAT > 1 and "rng" in metafunc.fixturenames:
        metafunc.parametrize("seed_round", range(REPEAT), ids=lambda r: f"seed{r}")


@pytest.fixture
def seed_round() -> int:
    """Which of the ``TQ4JAX_TEST_REPEAT`` seeds this test run uses (0 without repeats)."""
    return 0


def test_seed(nodeid: str, round_: int = 0, base: int = BASE_SEED) -> int:
    """The seed of test ``nodeid`` (without its seed-round suffix) in round ``round_``."""
    return zlib.crc32(f"{base}:{nodeid}:{round_}".encode())


test_seed.__test__ = False  # not a test


def _plain_nodeid(item) -> str:
    """Node id without the ``seedN`` parametrization, so seeds do not depend on REPEAT."""
    nodeid = item.nodeid
    if REPEAT > 1 and "[" in nodeid:
        base, params = nodeid[:-1].split("[", 1)
        parts = [p for p in params.split("-") if not (p.startswith("seed") and p[4:].isdigit())]
        nodeid = base + (f"[{'-'.join(parts)}]" if parts else "")
    return nodeid


@pytest.fixture
def rng(request, seed_round) -> np.random.Generator:
    """A numpy Generator seeded from the test id, the base seed and the seed round."""
    seed = test_seed(_plain_nodeid(request.node), seed_round)
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "rng" in getattr(item, "fixturenames", ()):
        seeds = [v for k, v in item.user_properties if k == "seed"]
        report.sections.append((
            "tq4jax replay",
            f"rng seed {seeds[-1] if seeds else '?'}; replay with:\n"
            f"  {SEED_ENV}={BASE_SEED} {REPEAT_ENV}={REPEAT} python -m pytest -q "
            f"'{item.nodeid}'"))


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
