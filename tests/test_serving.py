"""Serving cache manager (tq4jax.serving): slot mapping, overflow rule, block reuse, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from tq4jax.serving import (BlockAllocator, CacheOverflowError, CacheSpec, OutOfBlocksError,
                            PagedKVCache)

from helpers import rel_l2

LAYOUTS = ["tq4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4"]
H_Q, H_KV, D, BS = 4, 2, 64, 4


def _new(layout, num_blocks=12, max_seqs=4, max_blocks=4, **kw):
    cache = PagedKVCache.create(num_blocks, max_seqs, max_blocks, num_kv_heads=H_KV, head_dim=D,
                                block_size=BS, layout=layout, **kw)
    return cache, BlockAllocator.for_cache(cache)


def _tokens(rng, n, dtype=jnp.float16):
    k = rng.standard_normal((n, H_KV, D)) * rng.uniform(0.5, 3, (n, 1, 1))
    return jnp.asarray(k, dtype), jnp.asarray(rng.standard_normal((n, H_KV, D)), dtype)


def _ref_write(spec, kv, k, v, slots):
    """The ops' reference store with a host-made slot mapping."""
    if spec.is_vllm:
        return tq.vllm.turboquant_store_reference(kv, k, v, slots, spec.rotation,
                                                  spec.codebook("k")[0],
                                                  **spec.preset.store_kwargs())
    return tq.paged_write_reference(kv, k, v, slots, spec.rotation, spec.codebook("k")[1],
                                    spec.codebook("v")[1])


def _ref_decode(spec, q, kv, bt, lens):
    if spec.is_vllm:
        return tq.vllm.turboquant_decode_reference(q, kv, bt, lens, spec.rotation,
                                                   spec.codebook("k")[0], 1 / np.sqrt(D),
                                                   **spec.preset.decode_kwargs())
    return tq.paged_decode_reference(q, kv, bt, lens, spec.codebook("k")[0], spec.rotation,
                                     num_kv_heads=H_KV, head_dim=D, block_size=BS,
                                     v_centroids=spec.codebook("v")[0])


def _host_slots(table, lengths, ids):
    """Slot mapping computed on the host by the documented rule (all tokens fit)."""
    pos, slots = lengths.copy(), []
    for s in ids:
        if s < 0:
            slots.append(-1)
            continue
        slots.append(table[s, pos[s] // BS] * BS + pos[s] % BS)
        pos[s] += 1
    return np.asarray(slots, np.int32)


def _fill(rng, layout, rounds=3, impl="reference"):
    """Several interleaved appends (tokens of different sequences mixed, padding) through the
    manager, mirrored by direct reference-op writes. Returns (cache, alloc, ref kv_cache)."""
    cache, alloc = _new(layout)
    seqs = [alloc.add() for _ in range(3)]
    ref = cache.kv_cache
    for _ in range(rounds):
        ids = rng.choice(seqs + [-1], size=int(rng.integers(3, 9))).astype(np.int32)
        lens_before = alloc.lengths.copy()
        cache, ids = alloc.prepare(cache, ids)
        slots = _host_slots(alloc.block_table, lens_before, ids)
        k, v = _tokens(rng, len(ids))
        cache = cache.append(k, v, ids, impl=impl)
        ref = _ref_write(cache.spec, ref, k, v, slots)
    alloc.verify(cache)
    return cache, alloc, ref


@pytest.mark.parametrize("layout", LAYOUTS)
def test_append_matches_reference_store(rng, layout):
    cache, alloc, ref = _fill(rng, layout)
    np.testing.assert_array_equal(np.asarray(cache.kv_cache), np.asarray(ref))
    assert (np.asarray(cache.seq_lens) == alloc.lengths).all() and alloc.lengths.sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_and_prefill_match_ops(rng, layout):
    cache, alloc, ref = _fill(rng, layout, rounds=4)
    spec = cache.spec
    q = jnp.asarray(rng.standard_normal((cache.max_seqs, H_Q, D)), jnp.float16)
    bt, lens = np.maximum(alloc.block_table, 0), alloc.lengths.astype(np.int32)
    want = _ref_decode(spec, q, ref, bt, lens)
    got = cache.decode(q, impl="reference")
    assert rel_l2(got, want) < 2e-3
    # seq_ids order, padding rows give zeros
    ids = np.array([2, -1, 0], np.int32)
    sub = np.asarray(cache.decode(q[jnp.array([2, 1, 0])], ids, impl="reference"), np.float32)
    np.testing.assert_array_equal(sub[1], 0.0)
    np.testing.assert_allclose(sub[[0, 2]], np.asarray(got, np.float32)[[2, 0]], atol=1e-3)
    # prefill: each sequence's last min(len, 3) tokens; one token per sequence == decode
    new = np.minimum(alloc.lengths[:3], 3)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(new)]), jnp.int32)
    qp = jnp.asarray(rng.standard_normal((int(qsl[-1]) + 2, H_Q, D)), jnp.float16)
    got = np.asarray(cache.prefill(qp, qsl, np.arange(3, dtype=np.int32), impl="reference"),
                     np.float32)
    np.testing.assert_array_equal(got[int(qsl[-1]):], 0.0)
    if not spec.is_vllm:
        want = tq.paged_prefill_reference(qp, ref, bt[:3], lens[:3], qsl, spec.codebook("k")[0],
                                          spec.rotation, num_kv_heads=H_KV, head_dim=D,
                                          block_size=BS, v_centroids=spec.codebook("v")[0])
        assert rel_l2(got, want) < 2e-3
    one = jnp.arange(cache.max_seqs + 1, dtype=jnp.int32)
    pf = cache.prefill(q, one, impl="reference")
    assert rel_l2(pf, cache.decode(q, impl="reference")) < 2e-3
    # the last query of each sequence sees all keys; earlier ones fewer (causal): vs decode
    # of a cache truncated to that position
    s, j = int(np.flatnonzero(new)[0]), 0  # its first prefill query: position len - new
    short = jnp.asarray(np.where(np.arange(cache.max_seqs) == s, lens - new[s] + 1 + j, 0),
                        jnp.int32)
    trunc = PagedKVCache(cache.kv_cache, cache.block_table, short, cache.overflow, spec)
    qd = jnp.zeros_like(q).at[s].set(qp[int(qsl[s]) + j])
    assert rel_l2(got[int(qsl[s]) + j], trunc.decode(qd, impl="reference")[s]) < 2e-3


@pytest.mark.parametrize("layout", ["tq4", "turboquant_4bit_nc"])
def test_pallas_matches_reference(rng, layout):
    """impl="pallas" (interpret mode on a CPU) through the manager vs the reference paths."""
    cache, alloc = _new(layout, num_blocks=6, max_seqs=2, max_blocks=3)
    a, b = alloc.add(), alloc.add()
    ids = np.array([a] * 6 + [b] * 3, np.int32)
    cache, ids = alloc.prepare(cache, ids)
    k, v = _tokens(rng, len(ids))
    got = cache.append(k, v, ids, impl="pallas")
    want = cache.append(k, v, ids, impl="reference")
    diff = np.asarray(got.kv_cache) != np.asarray(want.kv_cache)
    assert diff.mean() < 2e-2  # float32 norm rounding / code ties only
    q = jnp.asarray(rng.standard_normal((2, H_Q, D)), jnp.float16)
    assert rel_l2(got.decode(q, impl="pallas"), want.decode(q, impl="reference")) < 2e-2
    qsl = jnp.asarray([0, 6, 9], jnp.int32)
    qp = jnp.asarray(rng.standard_normal((9, H_Q, D)), jnp.float16)
    kw = dict(use_int8_qk=False) if layout == "tq4" else {}
    assert rel_l2(got.prefill(qp, qsl, impl="pallas", **kw),
                  want.prefill(qp, qsl, impl="reference")) < 2e-2


def test_slot_mapping_rule(rng):
    cache, alloc = _new("tq4", num_blocks=8, max_seqs=3, max_blocks=3)
    a, b = alloc.add(5), alloc.add(2)  # a: 2 blocks (8 tokens), b: 1 block (4 tokens)
    cache = alloc.sync(cache)
    ids = jnp.asarray([a, b, -1, a, 7, b, b, a, b, b], jnp.int32)  # 7: out of range = padding
    slots, written, dropped = jax.jit(lambda c, i: c.slot_mapping(i))(cache, ids)
    t = alloc.block_table
    want = [t[a, 0] * BS, t[b, 0] * BS, -1, t[a, 0] * BS + 1, -1, t[b, 0] * BS + 1,
            t[b, 0] * BS + 2, t[a, 0] * BS + 2, t[b, 0] * BS + 3, -1]  # b's 5th token: dropped
    np.testing.assert_array_equal(slots, want)
    np.testing.assert_array_equal(written, [3, 4, 0])
    np.testing.assert_array_equal(dropped, [0, 1, 0])


@pytest.mark.parametrize("layout", ["tq4", "turboquant_3bit_nc"])
def test_overflow_is_an_error_eagerly(rng, layout):
    """Where the overflow can be known before the call (eager append, the allocator) it
    raises and nothing changes."""
    cache, alloc = _new(layout, num_blocks=3, max_seqs=2, max_blocks=2)
    a = alloc.add(3)  # one block
    cache = alloc.sync(cache)
    k, v = _tokens(rng, 5)
    with pytest.raises(CacheOverflowError, match=r"sequences \[0\]"):
        cache.append(k, v, np.full(5, a, np.int32))
    with pytest.raises(ValueError, match="max_seqs"):
        cache.append(k, v, np.array([a, a, 2, -1, -1], np.int32))
    ok = cache.append(k[:4], v[:4], np.full(4, a, np.int32), impl="reference")  # fits
    assert int(ok.seq_lens[a]) == 4 and not np.asarray(ok.overflow).any()
    with pytest.raises(CacheOverflowError):
        alloc.prepare_append(np.full(5, a), grow=False)
    with pytest.raises(CacheOverflowError, match="block-table row"):
        alloc.prepare_append(np.full(9, a))  # 9 tokens > 2 blocks x 4
    with pytest.raises(CacheOverflowError, match="block-table row"):
        alloc.reserve(a, 9)
    with pytest.raises(CacheOverflowError):
        alloc.add(9)
    assert alloc.lengths[a] == 0 and alloc.n_blocks[a] == 1 and alloc.live.sum() == 1
    b = alloc.add(8)  # the last 2 blocks
    with pytest.raises(OutOfBlocksError, match="blocks"):
        alloc.reserve(a, 5)
    with pytest.raises(OutOfBlocksError, match="rows"):
        alloc.add()
    with pytest.raises(ValueError, match="not live"):
        alloc.prepare_append([a, 5])
    alloc.free(b)
    alloc.reserve(a, 8)
    assert alloc.num_free_blocks == 1 and alloc.capacity(a) == 8


def test_pool_exhaustion_is_atomic():
    alloc = BlockAllocator(num_blocks=3, max_seqs=3, max_blocks_per_seq=4, block_size=BS)
    a, b = alloc.add(4), alloc.add(4)
    table = alloc.block_table.copy()
    with pytest.raises(OutOfBlocksError):
        alloc.prepare_append([a] * 5 + [b] * 5)  # needs 2 more blocks, 1 free
    np.testing.assert_array_equal(alloc.block_table, table)
    assert alloc.lengths.tolist() == [0, 0, 0] and alloc.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        alloc.add(8)
    assert alloc.live.tolist() == [True, True, False]


@pytest.mark.parametrize("layout", ["tq4", "turboquant_k3v4_nc"])
def test_overflow_under_jit_is_skipped_and_recorded(rng, layout):
    """Tokens past a sequence's blocks are never written (not into anyone's block) and are
    counted in ``overflow``; the fitting prefix is written."""
    cache, alloc = _new(layout, num_blocks=6, max_seqs=3, max_blocks=3)
    a, b, c = alloc.add(), alloc.add(), alloc.add()
    cache, ids = alloc.prepare(cache, [a] * 3 + [b] * 6)  # a: 1 block, b: 2 blocks
    k, v = _tokens(rng, 9)
    append = jax.jit(lambda cc, k, v, i: cc.append(k, v, i, impl="reference"))
    cache = append(cache, k, v, ids)
    before = np.asarray(cache.kv_cache).copy()
    k2, v2 = _tokens(rng, 8)
    ids2 = jnp.asarray([a] * 3 + [c] * 2 + [b] * 3, jnp.int32)  # a: 1 fits, c: no blocks
    cache2 = append(cache, k2, v2, ids2)
    np.testing.assert_array_equal(cache2.seq_lens, [4, 8, 0])
    np.testing.assert_array_equal(cache2.overflow, [2, 1, 2])
    after = np.asarray(cache2.kv_cache).reshape(-1, cache.spec.token_bytes)
    flat_before = before.reshape(-1, cache.spec.token_bytes)
    changed = np.flatnonzero((after != flat_before).any(1))
    t = alloc.block_table
    allowed = {t[a, 0] * BS + 3, t[b, 1] * BS + 2, t[b, 1] * BS + 3}
    assert set(changed.tolist()) <= allowed and len(changed) == 3
    with pytest.raises(CacheOverflowError, match=r"\[0, 1, 2\]"):
        cache2.check_overflow()
    with pytest.raises(CacheOverflowError):
        alloc.verify(cache2)
    # freeing the sequences resets their rows' counters at sync
    for s in (a, b, c):
        alloc.free(s)
    cache3 = alloc.sync(cache2)
    assert not np.asarray(cache3.overflow).any() and not np.asarray(cache3.seq_lens).any()
    assert (np.asarray(cache3.block_table) == -1).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reused_blocks_never_leak(rng, layout):
    """A finished sequence's blocks go to a new one (same block ids, stale bytes left in
    them): the new sequence's outputs equal those of a fresh cache holding only its tokens."""
    cache, alloc = _new(layout, num_blocks=4, max_seqs=2, max_blocks=4)
    old = alloc.add(14)  # blocks 0..3, 14 tokens
    cache, ids = alloc.prepare(cache, [old] * 14)
    cache = cache.append(*_tokens(rng, 14), ids, impl="reference")
    old_blocks = alloc.block_table[old].copy()
    alloc.free(old)
    new = alloc.add()
    assert new == old
    k, v = _tokens(rng, 6)
    cache, ids = alloc.prepare(cache, [new] * 6)
    assert sorted(alloc.block_table[new, :2]) == sorted(old_blocks[:2])  # reused, LIFO
    assert int(cache.seq_lens[new]) == 0
    cache = cache.append(k, v, ids, impl="reference")
    alloc.verify(cache)
    fresh, falloc = _new(layout, num_blocks=4, max_seqs=2, max_blocks=4)
    fresh, fids = falloc.prepare(fresh, [falloc.add()] * 6)
    fresh = fresh.append(k, v, fids, impl="reference")
    q = jnp.asarray(rng.standard_normal((1, H_Q, D)), jnp.float16)
    got = cache.decode(q, np.array([new], np.int32), impl="reference")
    want = fresh.decode(q, np.array([0], np.int32), impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-3, atol=1e-3)
    qp = jnp.asarray(rng.standard_normal((6, H_Q, D)), jnp.float16)
    qsl = jnp.asarray([0, 6], jnp.int32)
    got = cache.prefill(qp, qsl, np.array([new], np.int32), impl="reference")
    want = fresh.prefill(qp, qsl, np.array([0], np.int32), impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-3, atol=1e-3)
    # the stale rows are still there (blocks are not zeroed): the masking is what protects
    rows = np.asarray(cache.kv_cache).reshape(-1, cache.spec.token_bytes)
    stale = alloc.block_table[new, 1] * BS + 3  # position 7 of the new sequence: not written
    assert rows[stale].any()


def test_jit_step_with_donation_and_no_retrace(rng):
    """append + decode under one jit with the cache donated, several steps, one trace;
    results equal the eager path."""
    traces = []

    def step(cache, k, v, ids, q):
        traces.append(1)
        cache = cache.append(k, v, ids, impl="reference")
        return cache, cache.decode(q, impl="reference")

    jstep = jax.jit(step, donate_argnums=0)
    cache, alloc = _new("tq4", num_blocks=10, max_seqs=3, max_blocks=4)
    eager, ealloc = _new("tq4", num_blocks=10, max_seqs=3, max_blocks=4)
    seqs = [alloc.add() for _ in range(3)]
    [ealloc.add() for _ in range(3)]
    for i in range(4):
        ids = np.array(seqs + [seqs[i % 3], -1], np.int32)
        k, v = _tokens(rng, len(ids))
        q = jnp.asarray(rng.standard_normal((3, H_Q, D)), jnp.float16)
        cache, ids = alloc.prepare(cache, ids)
        cache, out = jstep(cache, k, v, ids, q)
        eager, _ = ealloc.prepare(eager, ids)
        eager, want = step(eager, k, v, ids, q)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        if i == 1:  # a sequence finishes and a new one takes its row mid-run
            alloc.free(seqs[0])
            ealloc.free(seqs[0])
            assert alloc.add() == ealloc.add() == seqs[0]
    alloc.verify(cache)
    np.testing.assert_array_equal(np.asarray(cache.kv_cache), np.asarray(eager.kv_cache))
    assert len(traces) == 1 + 4  # one jit trace, four eager calls


def test_spec_and_create_errors(rng):
    with pytest.raises(ValueError, match="layout"):
        CacheSpec("tq5", 2, 64, 16)
    with pytest.raises(ValueError, match="power of two"):
        CacheSpec("turboquant_4bit_nc", 2, 96, 16)
    with pytest.raises(ValueError, match="centroids"):
        CacheSpec("turboquant_4bit_nc", 2, 64, 16, centroids=(0.0, 1.0))
    with pytest.raises(ValueError, match="int seed"):
        CacheSpec("tq4", 2, 64, 16, seed=None)  # numpy would draw an unseeded rotation
    c16 = tuple(np.sort(rng.standard_normal(16) * 0.1))
    assert CacheSpec("turboquant_4bit_nc", 2, 64, 16, centroids=c16).codebook("k")[0][0] \
        == np.float32(c16[0])
    spec = CacheSpec("turboquant_k3v4_nc", 2, 64, 16)
    assert (spec.k_bits, spec.v_bits) == (3, 4) and hash(spec) == hash(
        CacheSpec("turboquant_k3v4_nc", 2, 64, 16))
    c = PagedKVCache.create(3, 2, 2, num_kv_heads=2, head_dim=64, block_size=16)
    assert c.kv_cache.shape == (3, 16, tq.paged_layout(2, 64).row_bytes) and c.seq_capacity == 32
    with pytest.raises(ValueError, match="one row per sequence"):
        c.decode(jnp.zeros((3, 4, 64), jnp.float16))
