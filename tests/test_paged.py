"""Paged TQ4 cache: write -> decode round trips, the shared vectors, holes and garbage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from conftest import ON_GPU
from helpers import rel_l2
from test_attention import deq, oracle
from tq4jax.pallas_triton import tuning
from tq4jax.pallas_triton.tuning import Config
from tq4jax.testing import kernel_jaxpr, lower_to_triton

IMPLS = ["reference", "pallas"]


@pytest.mark.parametrize("impl", IMPLS + ["mosaic"])
def test_vectors(vectors, impl):
    """The original's paged decode output (3 sequences, D=128), on every backend (Mosaic GPU:
    interpreted on a CPU, compiled on a Hopper GPU)."""
    if impl == "mosaic" and ON_GPU and (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("the Mosaic GPU backend needs an sm_90+ GPU")
    v = vectors("paged_decode_0")
    kw = dict(num_kv_heads=int(v["num_kv_heads"]), head_dim=int(v["head_dim"]),
              block_size=int(v["block_size"]))
    o = tq.paged_decode(v["q"], v["kv_cache"], v["block_table"], v["seq_lens"], v["centroids"],
                        v["rotation"], **kw, impl=impl)
    assert o.shape == v["q"].shape and o.dtype == jnp.float16
    assert rel_l2(o, v["out"]) < 1e-2


def test_layout():
    lay = tq.paged_layout(2, 128)
    assert lay == (0, 128, 136, 264, 272) and lay.row_bytes == 2 * 2 * tq.bytes_per_token_head(128)
    assert tq.paged_layout(8, 96).row_bytes == 8 * (96 + 8)


def _setup(rng, lens, hq, hkv, d, bs, dtype, total_bytes=None, v_bits=4):
    """A garbage-filled cache with the tokens of ``lens`` sequences written through
    paged_write at shuffled blocks (holes between them); returns everything a test needs."""
    lay = tq.paged_layout(hkv, d)
    max_blocks = max(1, max(-(-n // bs) for n in lens) + 1)
    n_blocks = sum(-(-n // bs) for n in lens) + 5
    tb = total_bytes or lay.row_bytes
    cache = jnp.asarray(rng.integers(0, 256, (n_blocks, bs, tb)), jnp.uint8)
    perm = rng.permutation(n_blocks)
    table = rng.integers(-(1 << 20), 1 << 20, (len(lens), max_blocks)).astype(np.int32)  # garbage
    keys, vals, slots, used = [], [], [], 0
    for s, n in enumerate(lens):
        nb = -(-n // bs)
        table[s, :nb] = perm[used:used + nb]
        used += nb
        k = rng.standard_normal((n, hkv, d)) * rng.uniform(0.5, 3)
        keys.append(k)
        vals.append(rng.standard_normal((n, hkv, d)))
        t = np.arange(n)
        slots.append(table[s, t // bs] * bs + t % bs)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    vc, vb = tq.lloyd_max(d, v_bits)
    key = jnp.asarray(np.concatenate(keys), dtype)
    val = jnp.asarray(np.concatenate(vals), dtype)
    slot = np.concatenate(slots).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((len(lens), hq, d)), dtype)
    return dict(cache=cache, key=key, val=val, slot=slot, table=jnp.asarray(table),
                lens=jnp.asarray(lens, jnp.int32), q=q, rot=rot, cent=cent, bnd=bnd, vc=vc, vb=vb,
                kw=dict(num_kv_heads=hkv, head_dim=d, block_size=bs))


def _assert_rows_match(cache, ref_cache, slots, lay):
    """Kernel-written rows vs reference-written rows: codes equal except float32 ties (< 0.1%),
    norms equal to float32 rounding; every other byte identical."""
    a = np.asarray(cache).reshape(-1, cache.shape[-1])
    b = np.asarray(ref_cache).reshape(-1, cache.shape[-1])
    other = np.setdiff1d(np.arange(a.shape[0]), slots)
    np.testing.assert_array_equal(a[other], b[other])
    a, b = a[slots], b[slots]
    for codes, norms in ((slice(lay.k_codes, lay.k_norms), slice(lay.k_norms, lay.v_codes)),
                         (slice(lay.v_codes, lay.v_norms), slice(lay.v_norms, lay.row_bytes))):
        assert (a[:, codes] != b[:, codes]).mean() < 1e-3
        np.testing.assert_allclose(a[:, norms].copy().view(np.float32),
                                   b[:, norms].copy().view(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(a[:, lay.row_bytes:], b[:, lay.row_bytes:])


CASES = [  # lens, hq, hkv, d, block_size, dtype
    ([5, 0, 33, 16], 8, 2, 128, 16, jnp.float16),
    ([70, 1], 4, 1, 64, 32, jnp.bfloat16),
    ([19, 40], 7, 1, 96, 16, jnp.float16),
    ([9], 2, 2, 256, 16, jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}seq-d{c[3]}-bs{c[4]}")
def test_write_then_decode(rng, case):
    lens, hq, hkv, d, bs, dtype = case
    t = _setup(rng, lens, hq, hkv, d, bs, dtype, v_bits=3)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"],
                           t["vb"], impl="pallas")
    ref_cache = tq.paged_write_reference(t["cache"], t["key"], t["val"], t["slot"], t["rot"],
                                         t["bnd"], t["vb"])
    _assert_rows_match(cache, ref_cache, t["slot"], tq.paged_layout(hkv, d))
    scale = 1 / np.sqrt(d)
    start = np.concatenate([[0], np.cumsum(lens)])
    outs = {impl: np.asarray(tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"],
                                             t["rot"], **t["kw"], v_centroids=t["vc"],
                                             impl=impl), np.float32) for impl in IMPLS}
    for s, n in enumerate(lens):
        if n == 0:
            for o in outs.values():
                np.testing.assert_array_equal(o[s], 0.0)
            continue
        kp, kn = tq.compress(t["key"][start[s]:start[s + 1]], t["rot"], t["bnd"], impl="reference")
        vp, vn = tq.compress(t["val"][start[s]:start[s + 1]], t["rot"], t["vb"], impl="reference")
        to_bhsd = lambda x: jnp.swapaxes(x, 0, 1)[None]  # noqa: E731  [n, H, ...] -> [1, H, n, ...]
        kp, kn, vp, vn = map(to_bhsd, (kp, kn, vp, vn))
        want = oracle(t["q"][s][None, :, None], deq(kp, kn, t["cent"], t["rot"]),
                      deq(vp, vn, t["vc"], t["rot"]), scale, False)[0, :, 0]
        contiguous = tq.flash_attention_tq4_kv(t["q"][s][None, :, None], kp, kn, vp, vn, t["cent"],
                                               t["rot"], v_centroids=t["vc"], impl="pallas")
        tol = 1e-2 if dtype == jnp.float16 else 2e-2
        for impl, o in outs.items():
            assert rel_l2(o[s], want) < tol, (impl, s)
        assert rel_l2(outs["pallas"][s], np.asarray(contiguous, np.float32)[0, :, 0]) < tol


PREFILL_CASES = [  # lens, new tokens per sequence, hq, hkv, d, block_size, dtype, int8
    ([40, 0, 17, 64], [40, 0, 5, 1], 8, 2, 128, 16, jnp.float16, False),
    ([40, 0, 17, 64], [40, 0, 5, 1], 8, 2, 128, 16, jnp.float16, True),
    ([70, 33], [30, 33], 4, 1, 64, 32, jnp.bfloat16, True),
    ([19, 50, 9], [19, 7, 3], 7, 1, 96, 16, jnp.float16, False),
    ([23], [11], 2, 2, 256, 16, jnp.bfloat16, False),
]


def _prefill_inputs(rng, t, lens, new, hq, d, dtype, pad=0):
    """q [N + pad, hq, d] for the last ``new[s]`` positions of each sequence, and
    query_start_loc."""
    qsl = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(qsl[-1]) + pad, hq, d)), dtype)
    return q, jnp.asarray(qsl)


@pytest.mark.parametrize("case", PREFILL_CASES,
                         ids=lambda c: f"{len(c[0])}seq-d{c[4]}-bs{c[5]}{'-int8' * c[7]}")
def test_write_then_prefill(rng, case):
    """Chunked causal prefill of many sequences vs the float64 oracle and vs the contiguous
    kernel on the same tokens (causal, Sq < Sk), V 3-bit."""
    lens, new, hq, hkv, d, bs, dtype, int8 = case
    t = _setup(rng, lens, hq, hkv, d, bs, dtype, v_bits=3)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"], t["vb"])
    q, qsl = _prefill_inputs(rng, t, lens, new, hq, d, dtype, pad=3)
    args = (q, cache, t["table"], t["lens"], qsl, t["cent"], t["rot"])
    got = np.asarray(tq.paged_prefill(*args, **t["kw"], v_centroids=t["vc"], use_int8_qk=int8,
                                      impl="pallas"), np.float32)
    ref = np.asarray(tq.paged_prefill(*args, **t["kw"], v_centroids=t["vc"], impl="reference"),
                     np.float32)
    np.testing.assert_array_equal(got[int(qsl[-1]):], 0.0)  # padding tokens
    np.testing.assert_array_equal(ref[int(qsl[-1]):], 0.0)
    tol = (1e-2 if dtype == jnp.float16 else 2e-2) * (2 if int8 else 1)
    start = np.concatenate([[0], np.cumsum(lens)])
    for s, (n, m) in enumerate(zip(lens, new)):
        if m == 0:
            continue
        kp, kn = tq.compress(t["key"][start[s]:start[s + 1]], t["rot"], t["bnd"], impl="reference")
        vp, vn = tq.compress(t["val"][start[s]:start[s + 1]], t["rot"], t["vb"], impl="reference")
        to_bhsd = lambda x: jnp.swapaxes(x, 0, 1)[None]  # noqa: E731
        kp, kn, vp, vn = map(to_bhsd, (kp, kn, vp, vn))
        qs = jnp.swapaxes(q[qsl[s]:qsl[s + 1]], 0, 1)[None]  # [1, HQ, m, D]
        want = oracle(qs, deq(kp, kn, t["cent"], t["rot"]), deq(vp, vn, t["vc"], t["rot"]),
                      1 / np.sqrt(d), True)[0].swapaxes(0, 1)
        contiguous = tq.flash_attention_tq4_kv(qs, kp, kn, vp, vn, t["cent"], t["rot"],
                                               is_causal=True, v_centroids=t["vc"], impl="pallas")
        rows = slice(int(qsl[s]), int(qsl[s + 1]))
        assert rel_l2(ref[rows], want) < tol / (2 if int8 else 1), s
        assert rel_l2(got[rows], want) < tol, s
        assert rel_l2(got[rows], np.asarray(contiguous, np.float32)[0].swapaxes(0, 1)) < tol, s


@pytest.mark.parametrize("int8", [False, True])
def test_prefill_many_splits_and_decode_agree(rng, int8):
    """One new token per sequence: prefill == decode (split-KV, some splits empty)."""
    t = _setup(rng, [150, 3, 64], 4, 2, 64, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    qsl = jnp.arange(4, dtype=jnp.int32)
    got = tq.paged_prefill(t["q"], cache, t["table"], t["lens"], qsl, t["cent"], t["rot"],
                           **t["kw"], use_int8_qk=int8, config=Config(16, 64, 4, 3, 6),
                           impl="pallas")
    want = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                           impl="reference")
    assert rel_l2(got, want) < (2e-2 if int8 else 1e-2)


def test_prefill_garbage_query_start_loc_stays_in_bounds(rng):
    """Ranges past the token count or running backwards read and write nothing outside q."""
    t = _setup(rng, [20, 30], 4, 2, 64, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    q = jnp.asarray(rng.standard_normal((8, 4, 64)), jnp.float16)
    for qsl in ([0, 5, 40], [0, 6, 2], [3, 3, 8]):
        qsl = jnp.asarray(qsl, jnp.int32)
        args = (q, cache, t["table"], t["lens"], qsl, t["cent"], t["rot"])
        got = tq.paged_prefill(*args, **t["kw"], use_int8_qk=False, impl="pallas")
        want = tq.paged_prefill(*args, **t["kw"], impl="reference")
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        ok = np.arange(8) < min(int(qsl[-1]), 8)
        ok &= np.arange(8) >= int(qsl[0])
        if int(qsl[1]) >= int(qsl[0]) and int(qsl[2]) >= int(qsl[1]):  # well-formed ranges
            assert rel_l2(np.asarray(got)[ok], np.asarray(want)[ok]) < 1e-2


def test_write_keeps_padding_and_skips_negative_slots(rng):
    t = _setup(rng, [20], 4, 2, 64, 16, jnp.float16, total_bytes=256)
    lay = tq.paged_layout(2, 64)
    slot = t["slot"].copy()
    slot[3] = -1
    with pytest.raises(ValueError, match="pass total_bytes=256"):
        tq.paged_write(t["cache"], t["key"], t["val"], slot, t["rot"], t["bnd"])
    cache = np.asarray(tq.paged_write(t["cache"], t["key"], t["val"], slot, t["rot"], t["bnd"],
                                      total_bytes=256, impl="pallas"))
    before = np.asarray(t["cache"]).reshape(-1, 256)
    after = cache.reshape(-1, 256)
    np.testing.assert_array_equal(after[:, lay.row_bytes:], before[:, lay.row_bytes:])
    untouched = np.setdiff1d(np.arange(after.shape[0]), slot[slot >= 0])
    np.testing.assert_array_equal(after[untouched], before[untouched])
    kp, kn = tq.compress(t["key"], t["rot"], t["bnd"], impl="pallas")
    row = after[slot[5]]
    np.testing.assert_array_equal(row[lay.k_codes:lay.k_norms], np.asarray(kp[5]).ravel())
    np.testing.assert_array_equal(row[lay.k_norms:lay.v_codes].view(np.float32), np.asarray(kn[5]))


@pytest.mark.parametrize("extra", [4, 3], ids=["words", "bytes"])
def test_decode_prefill_padded_rows(rng, extra):
    """Padded cache rows: decode loads norms as float32 words (width % 4 == 0) or byte by
    byte (prefill: always bytes)."""
    tb = tq.paged_layout(2, 64).row_bytes + extra
    t = _setup(rng, [37, 20], 4, 2, 64, 16, jnp.float16, total_bytes=tb)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"],
                           total_bytes=tb)
    args = (t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"])
    got, want = (tq.paged_decode(*args, **t["kw"], total_bytes=tb, impl=impl)
                 for impl in IMPLS[::-1])
    assert rel_l2(got, want) < 1e-2
    q, qsl = _prefill_inputs(rng, t, [37, 20], [6, 20], 4, 64, jnp.float16)
    args = (q, cache, t["table"], t["lens"], qsl, t["cent"], t["rot"])
    got, want = (tq.paged_prefill(*args, **t["kw"], use_int8_qk=False, total_bytes=tb,
                                  impl=impl) for impl in IMPLS[::-1])
    assert rel_l2(got, want) < 1e-2


def test_decode_many_splits(rng, monkeypatch):
    """Long sequences split across programs (some splits empty), merged by log-sum-exp."""
    t = _setup(rng, [150, 3, 64], 4, 2, 64, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    monkeypatch.setattr(tuning, "MIN_SPLIT_KEYS", 16)
    monkeypatch.setattr(tuning, "NUM_SMS", 64)
    cfg = tuning.choose_config(3, 2, 2, t["table"].shape[1] * 16, 64, compressed=True)
    monkeypatch.undo()
    assert cfg.splits > 3
    got = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                          config=cfg, impl="pallas")
    want = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                           impl="reference")
    assert rel_l2(got, want) < 1e-2


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_many_key_tiles(rng, splits):
    """32-key tiles: each program walks several whole tiles and a masked tail, so the norms
    and cache rows prefetched a tile ahead are the ones used (the default 128-key tiles give
    the small test sequences a single tile)."""
    t = _setup(rng, [150, 3, 64, 97], 4, 2, 64, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    got = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                          config=Config(16, 32, 4, 3, splits), impl="pallas")
    want = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                           impl="reference")
    assert rel_l2(got, want) < 1e-2


def test_jit_and_donated_write(rng):
    t = _setup(rng, [7, 30], 4, 2, 64, 16, jnp.float16)
    write = jax.jit(lambda c, k, v, s: tq.paged_write(c, k, v, s, t["rot"], t["bnd"]),
                    donate_argnums=0)
    cache = write(jnp.array(t["cache"]), t["key"], t["val"], t["slot"])
    dec = jax.jit(lambda q, c, bt, ln: tq.paged_decode(q, c, bt, ln, t["cent"], t["rot"],
                                                       **t["kw"], impl="pallas"))
    want = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **t["kw"],
                           impl="reference")
    assert rel_l2(dec(t["q"], cache, t["table"], t["lens"]), want) < 1e-2


@pytest.mark.gpu
def test_donated_write_is_in_place(rng):
    t = _setup(rng, [7, 30], 4, 2, 64, 16, jnp.float16)
    write = jax.jit(lambda c, k, v, s: tq.paged_write(c, k, v, s, t["rot"], t["bnd"]),
                    donate_argnums=0)
    cache = jnp.array(t["cache"])
    ptr = cache.unsafe_buffer_pointer()
    assert write(cache, t["key"], t["val"], t["slot"]).unsafe_buffer_pointer() == ptr


@pytest.mark.parametrize("d", [128, 256])
def test_decode_lowers_to_triton(d):
    s = jax.ShapeDtypeStruct
    args = (s((3, 8, d), jnp.float16), s((40, 16, 2 * (d + 8)), jnp.uint8),
            s((3, 64), jnp.int32), s((3,), jnp.int32))
    cent, rot = tq.lloyd_max(d, 4)[0], tq.haar_rotation(d)
    kw = dict(num_kv_heads=2, head_dim=d, block_size=16, impl="pallas")
    text = lower_to_triton(lambda q, c, b, n: tq.paged_decode(q, c, b, n, cent, rot, **kw), *args)
    assert "__gpu$xla.gpu.triton" in text and "prmt.b32" in text
    text = lower_to_triton(lambda q, c, b, n, ce: tq.paged_decode(q, c, b, n, ce, rot, **kw),
                           *args, s((16,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("int8", [False, True])
def test_prefill_lowers_to_triton(int8):
    s = jax.ShapeDtypeStruct
    args = (s((300, 8, 128), jnp.float16), s((80, 16, 2 * 136), jnp.uint8),
            s((3, 64), jnp.int32), s((3,), jnp.int32), s((4,), jnp.int32))
    cent, rot = tq.lloyd_max(128, 4)[0], tq.haar_rotation(128)
    kw = dict(num_kv_heads=2, head_dim=128, block_size=16, use_int8_qk=int8, impl="pallas")
    text = lower_to_triton(lambda q, c, b, n, l: tq.paged_prefill(q, c, b, n, l, cent, rot, **kw),
                           *args)
    assert "__gpu$xla.gpu.triton" in text and "prmt.b32" in text
    dots = [ln for ln in kernel_jaxpr(lambda q, c, b, n, l: tq.paged_prefill(
        q, c, b, n, l, cent, rot, **kw), *args).splitlines() if "dot_general[" in ln]
    assert any(":i32[" in ln for ln in dots) == int8  # Q @ K^T on int8 -> int32
    text = lower_to_triton(lambda q, c, b, n, l, ce: tq.paged_prefill(q, c, b, n, l, ce, rot, **kw),
                           *args, s((16,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in text


def test_bad_input():
    q = jnp.ones((2, 4, 64), jnp.float16)
    cache = jnp.zeros((4, 16, 144), jnp.uint8)
    bt, ln = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    cent, bnd = tq.lloyd_max(64, 4)
    rot = tq.haar_rotation(64)
    kw = dict(num_kv_heads=2, head_dim=64, block_size=16)
    tq.paged_decode(q, cache, bt, ln, cent, rot, **kw, impl="reference")  # valid
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        tq.paged_decode(q, cache.astype(jnp.int8), bt, ln, cent, rot, **kw)
    with pytest.raises(ValueError, match="kv_cache rows must be 144 bytes wide for "
                                         "num_kv_heads=2 x head_dim=64"):
        tq.paged_decode(q, cache[..., :100], bt, ln, cent, rot, **kw)
    # a wrong num_kv_heads that still divides heads_q used to read garbage (2.76 rel. error)
    with pytest.raises(ValueError, match="kv_cache rows must be 72 bytes wide"):
        tq.paged_decode(q, cache, bt, ln, cent, rot, num_kv_heads=1, head_dim=64, block_size=16)
    with pytest.raises(ValueError, match="kv_cache rows must be 72 bytes wide"):
        tq.paged_prefill(q, cache, bt, ln, jnp.asarray([0, 1, 2], jnp.int32), cent, rot,
                         num_kv_heads=1, head_dim=64, block_size=16)
    with pytest.raises(ValueError, match="total_bytes must be an int >= 144"):
        tq.paged_decode(q, cache[..., :100], bt, ln, cent, rot, **kw, total_bytes=100)
    with pytest.raises(ValueError, match="kv_cache rows must be total_bytes=160 wide"):
        tq.paged_decode(q, cache, bt, ln, cent, rot, **kw, total_bytes=160)
    with pytest.raises(ValueError, match="centroids must be sorted"):
        tq.paged_decode(q, cache, bt, ln, cent[::-1], rot, **kw)
    with pytest.raises(ValueError, match="block_table must have shape"):
        tq.paged_decode(q, cache, bt[0], ln, cent, rot, **kw)
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        tq.paged_decode(q, cache, bt, ln.astype(jnp.float32), cent, rot, **kw)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tq.paged_decode(q, cache, bt, ln, cent, rot, num_kv_heads=3, head_dim=64, block_size=16)
    qsl = jnp.asarray([0, 1, 2], jnp.int32)
    tq.paged_prefill(q, cache, bt, ln, qsl, cent, rot, **kw, impl="reference")  # valid
    with pytest.raises(ValueError, match=r"query_start_loc must have shape \(3,\)"):
        tq.paged_prefill(q, cache, bt, ln, qsl[:2], cent, rot, **kw)
    with pytest.raises(TypeError, match="query_start_loc must have dtype"):
        tq.paged_prefill(q, cache, bt, ln, qsl.astype(jnp.float32), cent, rot, **kw)
    with pytest.raises(ValueError, match=r"block_table must have shape \[2, max_blocks\]"):
        tq.paged_prefill(q, cache, bt[:1], ln, qsl, cent, rot, **kw)
    with pytest.raises(ValueError, match="q must have"):
        tq.paged_prefill(q[..., :32], cache, bt, ln, qsl, cent, rot, **kw)
    k = jnp.ones((5, 2, 64), jnp.float16)
    with pytest.raises(ValueError, match="kv_cache rows must be 144 bytes wide"):
        tq.paged_write(cache[..., :100], k, k, jnp.arange(5, dtype=jnp.int32), rot, bnd)
    with pytest.raises(ValueError, match="kv_cache rows must be 72 bytes wide"):
        tq.paged_write(cache, k[:, :1], k[:, :1], jnp.arange(5, dtype=jnp.int32), rot, bnd)
    with pytest.raises(ValueError, match="k_boundaries must be sorted"):
        tq.paged_write(cache, k, k, jnp.arange(5, dtype=jnp.int32), rot, bnd[::-1])
    with pytest.raises(ValueError, match=r"slot_mapping must have shape \(5,\)"):
        tq.paged_write(cache, k, k, jnp.arange(4, dtype=jnp.int32), rot, bnd)


def test_cache_over_2gib_is_refused():
    """The kernel's offsets are int32: a larger cache must raise, not read wrong rows."""
    cent, _ = tq.lloyd_max(128, 4)
    rot = tq.haar_rotation(128)
    s = jax.ShapeDtypeStruct
    big = s((1 << 17, 16, 1088), jnp.uint8)  # 2.1 GiB, never allocated
    with pytest.raises(ValueError, match="32-bit offsets"):
        jax.eval_shape(lambda c: tq.paged_decode(
            jnp.ones((2, 32, 128), jnp.float16), c, jnp.zeros((2, 4), jnp.int32),
            jnp.ones((2,), jnp.int32), cent, rot, num_kv_heads=8, head_dim=128, block_size=16,
            impl="pallas"), big)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_bytes_outside_sequences_are_never_used(impl):
    """Row 0 (read by the reference for invalid positions) holds NaN norm bytes: outputs stay
    finite in decode and prefill."""
    d, bs = 64, 16
    lay = tq.paged_layout(1, d)
    cache = np.full((3, bs, lay.row_bytes), 7, np.uint8)
    nan = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    cache[0, :, lay.k_norms:lay.k_norms + 4] = nan
    cache[0, :, lay.v_norms:lay.v_norms + 4] = nan
    cent, rot = tq.lloyd_max(d, 4)[0], tq.haar_rotation(d)
    kw = dict(num_kv_heads=1, head_dim=d, block_size=bs, impl=impl)
    table, lens = jnp.asarray([[1, 2]], jnp.int32), jnp.asarray([5], jnp.int32)
    q = jnp.ones((1, 2, d), jnp.float16)
    out = tq.paged_decode(q, jnp.asarray(cache), table, lens, cent, rot, **kw)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    q = jnp.ones((4, 2, d), jnp.float16)
    out = tq.paged_prefill(q, jnp.asarray(cache), table, lens, jnp.asarray([0, 3], jnp.int32),
                           cent, rot, **kw)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(out)[3], 0.0)
