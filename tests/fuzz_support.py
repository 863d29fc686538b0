"""Shared parts of the differential fuzz tests (tests/test_fuzz_*.py): hypothesis settings,
drawn-size limits, tolerances and float64 oracles.

Differential fuzzing (hypothesis): every kernel op (``impl="pallas"``, interpret mode on a
CPU) against its pure-jnp reference (``impl="reference"``) and a float64 numpy oracle, on drawn
shapes (batch, GQA ratio, head_dim, lengths incl. 0 and tile tails), dtypes, codebooks (2-4
bits, asymmetric K/V), masks, ragged lengths and paged caches (permuted blocks, garbage in the
unused table entries and cache rows).

* Examples: a few per test by default (the file takes about 3-4 minutes on a 2-core CPU);
  ``TQ4JAX_FUZZ_EXAMPLES=N`` runs N per test (and per parametrization) for long runs. On a GPU
  the drawn shapes grow (longer sequences, more blocks, real KV splits).
* Determinism: generation is seeded from ``TQ4JAX_TEST_SEED`` (``conftest.BASE_SEED``), no
  example database. Every array of an example comes from ``np.random.default_rng(case["seed"])``,
  so the ``case`` dict hypothesis prints for a failure (shrunk) is a complete reproducer.

Tolerances (each with its reason where it is used):
* kernels vs the float64 oracle: relative L2 error per sequence / batch row below 1e-2 (fp16)
  and 2e-2 (bf16), as tests/test_attention.py and tests/test_paged.py; the int8 Q @ K^T path
  of paged_prefill twice that (as test_paged); vLLM decode vs its reference rel. Linf 2e-3 /
  2e-2 (as test_vllm).
* reference paths vs the oracle: float32 math rounded once to the output dtype.
* quantizers: codes equal except next to a boundary (``assert_codes_match``), norms rtol 1e-6.
"""
from __future__ import annotations

import contextlib
import os

import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

import tq4jax as tq  # noqa: E402
from tq4jax.pallas_triton import tuning  # noqa: E402
from conftest import BASE_SEED, ON_GPU  # noqa: E402
from helpers import assert_codes_match, rel_l2, rel_linf  # noqa: E402

# ----------------------------------------------------------------------------------------------
# budget and sizes
# ----------------------------------------------------------------------------------------------

_ENV_EXAMPLES = os.environ.get("TQ4JAX_FUZZ_EXAMPLES", "").strip()
if _ENV_EXAMPLES and not (_ENV_EXAMPLES.isdigit() and int(_ENV_EXAMPLES) > 0):
    raise pytest.UsageError(f"TQ4JAX_FUZZ_EXAMPLES must be a positive int, got {_ENV_EXAMPLES!r}")


def fuzz(default_examples: int):
    """hypothesis settings of this file: ``default_examples`` (or TQ4JAX_FUZZ_EXAMPLES) examples,
    no deadline (each new shape compiles), no database, seeded from TQ4JAX_TEST_SEED."""
    n = int(_ENV_EXAMPLES) if _ENV_EXAMPLES else default_examples

    def deco(test):
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        print_blob=False, suppress_health_check=list(HealthCheck))(test)
        return hypothesis_seed(BASE_SEED)(test)

    return deco


#: Upper bounds of drawn sizes: small in interpret mode (every new shape compiles and the
#: kernels run element by element), long sequences and many blocks on a GPU.
LIM = (dict(batch=4, sq=300, sk=2100, rows=600, heads=4, seqs=4, blocks=70) if ON_GPU else
       dict(batch=4, sq=24, sk=160, rows=70, heads=2, seqs=4, blocks=4))
DIMS = [64, 96, 128, 256]
GROUPS = [1, 2, 4, 8]
BLOCK_SIZES = [8, 16, 32]
FLOATS = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
ROTATIONS = ["haar", "hadamard", "hadamard_signs"]  # Hadamard only at power-of-two D
SEEDS = st.integers(0, 2**32 - 1)
#: Kernel (or fp16/bf16-output) vs float64 oracle, relative L2 (test_attention's TOL).
TOL = {"float16": 1e-2, "bfloat16": 2e-2}
#: Reference path vs float64 oracle: float32 math (relative error ~1e-6) rounded once to the
#: output dtype (relative error <= 2^-11 fp16, 2^-8 bf16 per element), so relative L2 below
#: twice that.
REF_TOL = {"float16": 2**-10, "bfloat16": 2**-7}
#: Half a unit in the last place (relative) of each output dtype.
HALF_ULP = {"float32": 2**-24, "float16": 2**-11, "bfloat16": 2**-8}


def mosaic_paged_runs(d: int, group: int, bs: int, row_width: int) -> bool:
    """The Mosaic GPU paged decode serves this cache here (interpret mode on a CPU; an sm_90+
    GPU)."""
    if ON_GPU and (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        return False
    return tq.pallas_mosaic.paged_supported(d, group, bs, row_width)


def rotation(kind: str, d: int, seed: int) -> np.ndarray:
    if kind.startswith("hadamard") and d & (d - 1) == 0:
        return tq.hadamard_rotation(d, seed=seed if kind == "hadamard_signs" else None)
    return tq.haar_rotation(d, seed=seed)


def padded(centroids) -> np.ndarray:
    """float64 codebook padded to 16 entries (the ops decode a garbage code to 0)."""
    c = np.zeros(16)
    c[:len(centroids)] = np.asarray(centroids, np.float64)
    return c


def pack_codes(idx: np.ndarray) -> np.ndarray:
    """int codes [..., D] -> family A nibbles (high nibble = even coordinate)."""
    return (idx[..., 0::2] * 16 + idx[..., 1::2]).astype(np.uint8)


def linf(a, b) -> float:
    """helpers.rel_linf, 0 for empty arrays."""
    return rel_linf(a, b) if np.size(b) else 0.0


def codes_of(packed) -> np.ndarray:
    """family A nibbles [..., D/2] -> int codes [..., D] (also for empty arrays)."""
    p = np.asarray(packed).astype(np.int32)
    return np.stack([p >> 4, p & 15], -1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def codes_match(packed, idx, y, boundaries) -> None:
    """helpers.assert_codes_match (codes equal except within 1e-5 of a boundary, where float32
    vs float64 rounding may pick either neighbour) against oracle codes ``idx``."""
    if np.size(packed):
        assert_codes_match(packed, pack_codes(idx), y, boundaries)


@contextlib.contextmanager
def split_keys(n: int | None):
    """Optionally lower the tuning's MIN_SPLIT_KEYS so short sequences on a CPU are split
    over KV programs too (the log-sum-exp merge, empty splits)."""
    with pytest.MonkeyPatch.context() as mp:
        if n is not None:
            mp.setattr(tuning, "MIN_SPLIT_KEYS", n)
        yield


def attend(q, k, v, scale, visible, mask=None) -> np.ndarray:
    """float64 attention with GQA: q [B, HQ, Sq, D], k/v [B, HKV, Sk, D], ``visible`` bool
    broadcastable to [B, HQ, Sq, Sk], optional additive mask; a row that sees no key (or only
    -inf) gives zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if mask is not None:
        s = s + np.asarray(mask, np.float64)
    s = np.where(visible, s, -np.inf)
    if s.shape[-1] == 0:
        return np.zeros(q.shape)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    den = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p / np.where(den > 0, den, 1.0), v)


def check_rows(got, want: np.ndarray, tol: float, what: str, segments=None) -> None:
    """Output vectors that are exactly zero in ``want`` (no visible key) must be exactly zero
    in ``got``; every segment (default: each leading index, i.e. batch row or sequence; a
    list of slices of the leading axis otherwise) within relative L2 ``tol`` of ``want``."""
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    empty = ~np.any(want != 0, axis=-1)
    bad = np.argwhere(empty & np.any(got != 0, axis=-1))
    assert not bad.size, f"{what}: outputs that see no key are not zero at {bad[:5].tolist()}"
    for seg in segments or range(want.shape[0]):
        if not np.any(want[seg] != 0):
            continue
        err = rel_l2(got[seg], want[seg])
        assert err < tol, f"{what}: {seg} relative L2 error {err:.3g} >= {tol}"


# paged tables: lengths at the edges, garbage in unused entries

#: Sequence-length kinds relative to the block size and the table's capacity; "over" (decode
#: only) is past the capacity (clipped to it).
LEN_KINDS = ["0", "1", "bs-1", "bs", "bs+1", "cap-1", "cap"]
GARBAGE = ["huge", "in_range", "negative", "int32_extremes"]


def resolve_len(kind: str, bs: int, cap: int) -> int:
    if kind == "over":
        return cap + bs + 3
    return {"0": 0, "1": 1, "bs-1": bs - 1, "bs": bs, "bs+1": bs + 1, "cap-1": cap - 1,
            "cap": cap}[kind]


def draw_lengths(draw, n_seqs: int, cap: int, bs: int, over: bool) -> list:
    """``n_seqs`` lengths, mostly edge kinds (LEN_KINDS), some uniform in [0, cap]."""
    kinds = LEN_KINDS + (["over"] if over else []) + ["random"] * 2
    out = []
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=n_seqs, max_size=n_seqs)):
        if kind == "random":
            out.append(draw(st.integers(0, cap)))
        else:
            n = resolve_len(kind, bs, cap)
            out.append(n if kind == "over" else min(n, cap))
    return out


def garbage_table(rng, kind: str, shape: tuple, n_blocks: int) -> np.ndarray:
    """Block-table entries a sequence does not own, of one garbage ``kind`` (GARBAGE)."""
    if kind == "huge":
        return rng.integers(-(1 << 20), 1 << 20, shape)
    if kind == "in_range":  # valid block ids of other sequences: must not be read
        return rng.integers(0, n_blocks, shape)
    if kind == "negative":
        return -rng.integers(1, 3, shape)
    return rng.choice(np.array([-2**31, 2**31 - 1, n_blocks, -1]), shape)


def paged_table(rng, case) -> tuple[np.ndarray, list, int, list]:
    """(block table int32 [S, max_blocks], tokens written per sequence (its length clipped to
    the capacity), number of cache blocks, slots [n] per sequence): every sequence owns
    distinct blocks of a random permutation, ``case["extra_blocks"]`` blocks belong to no
    one, the entries past a sequence's blocks are ``case["garbage"]``."""
    bs, mb = case["bs"], case["max_blocks"]
    written = [min(n, mb * bs) for n in case["lens"]]
    used = [-(-n // bs) for n in written]
    n_blocks = max(1, sum(used) + case["extra_blocks"])
    perm = rng.permutation(n_blocks)
    table = garbage_table(rng, case["garbage"], (len(written), mb), n_blocks).astype(np.int32)
    first = np.cumsum([0] + used)
    slots = []
    for s, n in enumerate(written):
        table[s, :used[s]] = perm[first[s]:first[s + 1]]
        t = np.arange(n)
        slots.append(table[s, t // bs].astype(np.int64) * bs + t % bs)
    return table, written, n_blocks, slots
