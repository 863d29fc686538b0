"""Out-of-bounds safety of the paged, vLLM-layout and contiguous kernels at their edges.

Runs every kernel op that reads through a block table or a length on edge inputs - sequence
lengths 0, 1, block boundaries and the block table's full capacity; unused block-table entries
holding garbage (huge, negative, one past the last block); caches with no spare block - and
checks each result against the reference path. Meant to run under compute-sanitizer on the GPU,
with one device allocation per array so that a read past an array is caught:

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck \\
        --kernel-name kns=_kernel --error-exitcode 3 python3 bench/memcheck.py

(the filter instruments tq4jax's Pallas kernels only, all named ``*_kernel``; XLA's own kernels
run uninstrumented). ``memcheck.py --plant`` runs one kernel that reads out of bounds on
purpose: the same command must report it. Without the sanitizer it is a quick correctness
check of the same cases.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import tq4jax as tq

BS, MAX_BLOCKS = 16, 4
LENS = [0, 1, 15, 16, 17, BS * MAX_BLOCKS]  # 0, 1, around a block boundary, full capacity
GARBAGE = [1 << 30, -1, -(1 << 30)]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tables(rng, lens, n_blocks_used):
    """Block table [S, MAX_BLOCKS]: used entries a permutation of the used blocks, unused
    entries garbage (huge, negative, or one past the last block)."""
    perm = rng.permutation(n_blocks_used)
    table = np.zeros((len(lens), MAX_BLOCKS), np.int32)
    used = 0
    for s, n in enumerate(lens):
        nb = -(-n // BS)
        table[s, :nb] = perm[used:used + nb]
        used += nb
        for j in range(nb, MAX_BLOCKS):
            table[s, j] = [*GARBAGE, n_blocks_used][(s + j) % (len(GARBAGE) + 1)]
    return table


def slots_of(table, lens):
    return np.concatenate([table[s, np.arange(n) // BS] * BS + np.arange(n) % BS
                           for s, n in enumerate(lens)]).astype(np.int32)


def family_a(rng, report):
    hq, hkv, d = 8, 2, 128
    used = sum(-(-n // BS) for n in LENS)
    table = tables(rng, LENS, used)
    rot = tq.haar_rotation(d, seed=1)
    cent, bnd = tq.lloyd_max(d, 4)
    lay = tq.paged_layout(hkv, d)
    n_tok = sum(LENS)
    key = jnp.asarray(rng.standard_normal((n_tok, hkv, d)), jnp.float16)
    val = jnp.asarray(rng.standard_normal((n_tok, hkv, d)), jnp.float16)
    slots = slots_of(table, LENS)
    bad_slots = slots.copy()
    bad_slots[::7] = -1  # negative slots are skipped
    cache0 = jnp.asarray(rng.integers(0, 256, (used, BS, lay.row_bytes)), jnp.uint8)
    cache = tq.paged_write(cache0, key, val, slots, rot, bnd, impl="pallas")
    ref_cache = tq.paged_write(cache0, key, val, slots, rot, bnd, impl="reference")
    got, want = (np.asarray(c).reshape(-1, lay.row_bytes)[slots] for c in (cache, ref_cache))
    codes = np.r_[lay.k_codes:lay.k_norms, lay.v_codes:lay.v_norms]
    norms = np.r_[lay.k_norms:lay.v_codes, lay.v_norms:lay.row_bytes]
    report("paged_write codes (ties differ)", float(np.mean(got[:, codes] != want[:, codes])),
           1e-3)
    report("paged_write norms", rel_l2(got[:, norms].copy().view(np.float32),
                                       want[:, norms].copy().view(np.float32)), 1e-6)
    tq.paged_write(cache0, key, val, bad_slots, rot, bnd, impl="pallas").block_until_ready()
    kw = dict(num_kv_heads=hkv, head_dim=d, block_size=BS)
    lens = jnp.asarray(LENS, jnp.int32)
    for dtype in (jnp.float16, jnp.bfloat16):
        q = jnp.asarray(rng.standard_normal((len(LENS), hq, d)), dtype)
        got, want = (tq.paged_decode(q, cache, table, lens, cent, rot, **kw, impl=i)
                     for i in ("pallas", "reference"))
        report(f"paged_decode {jnp.dtype(dtype).name}", rel_l2(got, want), 2e-2)
    new = [min(n, 5) for n in LENS]
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(new)]), jnp.int32)
    q = jnp.asarray(rng.standard_normal((int(qsl[-1]), hq, d)), jnp.float16)
    for int8 in (False, True):
        got, want = (tq.paged_prefill(q, cache, table, lens, qsl, cent, rot, **kw,
                                      use_int8_qk=int8, impl=i) for i in ("pallas", "reference"))
        report(f"paged_prefill int8={int8}", rel_l2(got, want), 3e-2 if int8 else 1e-2)


def family_b(rng, report):
    h, d = 2, 128
    used = sum(-(-n // BS) for n in LENS)
    table = tables(rng, LENS, used)
    lens = jnp.asarray(LENS, jnp.int32)
    slots = slots_of(table, LENS)
    pi = tq.hadamard_rotation(d, seed=3)
    for name in sorted(tq.vllm.PRESETS):
        p = tq.vllm.preset(name, d)
        cent = tq.lloyd_max(d, p.mse_bits)[0]
        cache0 = jnp.asarray(rng.integers(0, 256, p.cache_shape(used, BS, h)), jnp.uint8)
        k = jnp.asarray(rng.standard_normal((len(slots), h, d)), jnp.float16)
        v = jnp.asarray(rng.standard_normal((len(slots), h, d)), jnp.float16)
        cache, ref = (tq.vllm.turboquant_store(cache0, k, v, slots, pi, cent, **p.store_kwargs(),
                                               impl=i) for i in ("pallas", "reference"))
        report(f"vllm store {name}", float(np.mean(np.asarray(cache) != np.asarray(ref))), 1e-3)
        q = jnp.asarray(rng.standard_normal((len(LENS), 4 * h, d)), jnp.float16)
        got, want = (tq.vllm.turboquant_decode(q, cache, table, lens, pi, cent, d ** -0.5,
                                               **p.decode_kwargs(), impl=i)
                     for i in ("pallas", "reference"))
        report(f"vllm decode {name}", rel_l2(got, want), 2e-2)
        got, want = (tq.vllm.full_dequant_kv(cache, table, lens, cent, **p.dequant_kwargs(),
                                             impl=i) for i in ("pallas", "reference"))
        report(f"vllm full_dequant {name}", max(rel_l2(got[0], want[0]),
                                                rel_l2(got[1], want[1])), 1e-3)


def contiguous(rng, report):
    b, hq, hkv, sk, d = len(LENS), 8, 2, BS * MAX_BLOCKS, 128
    rot = tq.haar_rotation(d, seed=2)
    cent, bnd = tq.lloyd_max(d, 4)
    x = jnp.asarray(rng.standard_normal((b, hkv, sk, d)), jnp.float16)
    kp, kn = tq.compress(x, rot, bnd, impl="pallas")
    for n in (1, 17):
        got, want = (tq.compress(x[0, 0, :n], rot, bnd, impl=i)[1] for i in ("pallas",
                                                                              "reference"))
        report(f"compress rows={n}", rel_l2(got, want), 1e-6)
        got, want = (tq.dequantize(kp[0, 0, :n], kn[0, 0, :n], cent, rot, impl=i)
                     for i in ("pallas", "reference"))
        report(f"dequantize rows={n}", rel_l2(got, want), 2e-3)
    lens = jnp.asarray(LENS, jnp.int32)
    for sq in (1, 5):
        q = jnp.asarray(rng.standard_normal((b, hq, sq, d)), jnp.float16)
        got, want = (tq.flash_attention_tq4_kv(q, kp, kn, kp, kn, cent, rot, is_causal=True,
                                               kv_lengths=lens, impl=i)
                     for i in ("pallas", "reference"))
        report(f"flash_attention_tq4_kv sq={sq} kv_lengths", rel_l2(got, want), 2e-2)


def planted(offset: int = 4096) -> None:
    """A Pallas kernel named ``*_kernel`` that reads 64 floats ``offset`` floats into a
    16-float array (default 16 KB past its end): under the sanitizer command above it must be
    reported (proves the filter instruments our kernels). A 16 KB overrun went unreported on
    the H200 (ninth session), perhaps landing in another live allocation; a far offset
    (``--plant 268435456``, 1 GiB) tells whether the sanitizer sees these kernels at all."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def _planted_oob_kernel(x_ref, o_ref):
        o_ref[...] = plgpu.load(x_ref.at[jnp.arange(64) + offset])

    out = pl.pallas_call(_planted_oob_kernel, out_shape=jax.ShapeDtypeStruct((64,), jnp.float32),
                         compiler_params=plgpu.CompilerParams(num_warps=1))(
        jnp.ones((16,), jnp.float32))
    print("planted out-of-bounds kernel ran:", float(out.sum()))


def main() -> int:
    if sys.argv[1:2] == ["--plant"]:
        planted(*(int(x) for x in sys.argv[2:3]))
        return 0
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"memcheck cases on {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"seq_lens {LENS}, block_size {BS}, table capacity {BS * MAX_BLOCKS}")
    bad = []

    def report(name, err, tol):
        ok = err <= tol
        print(f"  {'ok ' if ok else 'BAD'} {name:40s} {err:.2e} (tol {tol:.0e})", flush=True)
        if not ok:
            bad.append(name)

    t0 = time.perf_counter()
    for part in (family_a, family_b, contiguous):
        part(rng, report)
    print(f"{'FAILED: ' + ', '.join(bad) if bad else 'all cases match the reference'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
