"""Sliding windows, logit soft-capping and attention sinks in the attention kernels and the
reference, against a float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2, rel_linf
from test_attention import deq
from tq4jax.pallas_triton.tuning import Config
from tq4jax.testing import lower_to_triton

IMPLS = ["reference", "pallas"]


def oracle(q, k, v, scale, causal, lens=None, window=None, cap=None, sinks=None):
    """float64 attention, GQA; query i of row b at position off_b + i (off = len - Sq), keys
    [0, len_b); window (left, right); soft cap; per-head sink logits; empty rows give 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, sq, d = q.shape
    g, sk = hq // k.shape[1], k.shape[2]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if cap is not None:
        s = cap * np.tanh(s / cap)
    lens = np.full(b, sk) if lens is None else np.asarray(lens)
    keys = np.arange(sk)[None, None, None, :]
    pos = (lens - sq)[:, None, None, None] + np.arange(sq)[None, None, :, None]
    vis = keys < lens[:, None, None, None]
    if causal:
        vis = vis & (keys <= pos)
    if window is not None:
        vis = vis & (keys >= pos - window[0]) & (keys <= pos + window[1])
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
        sink = np.asarray(sinks, np.float64)[None, :, None, None]
        m = np.where(np.isfinite(m), np.maximum(m, sink), m)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    den = p.sum(-1, keepdims=True)
    if sinks is not None:
        den = den + np.where(den > 0, np.exp(sink - np.where(np.isfinite(m), m, 0)), 0)
    return np.einsum("bhqk,bhkd->bhqd", p / np.where(den > 0, den, 1), v)


def _data(rng, b, hq, hkv, sq, sk, d=64):
    q = jnp.asarray(rng.standard_normal((b, hq, sq, d)), jnp.float16)
    k = jnp.asarray(rng.standard_normal((b, hkv, sk, d)) * 1.5, jnp.float16)
    v = jnp.asarray(rng.standard_normal((b, hkv, sk, d)), jnp.float16)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    kp, kn = tq.compress(k, rot, bnd, impl="reference")
    vp, vn = tq.compress(v, rot, bnd, impl="reference")
    return q, k, v, kp, kn, vp, vn, cent, rot


CASES = {  # name -> op kwargs
    "window causal": dict(is_causal=True, local_window_size=(5, 0)),
    "window both sides": dict(local_window_size=(3, 2)),
    "soft cap": dict(is_causal=True, logit_soft_cap=2.0),
    "sinks": dict(sinks="draw"),
    "all three": dict(is_causal=True, local_window_size=7, logit_soft_cap=3.0, sinks="draw"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sq", [1, 6])
def test_extras_vs_oracle(rng, impl, case, sq):
    """Dense, TQ4-K and TQ4-K/V ops with per-row lengths against the float64 oracle (fp16
    kernels: relative L2 < 1e-2; the compressed ops against attention over the dequantized
    K/V)."""
    b, hq, hkv, sk = 2, 4, 2, 40
    q, k, v, kp, kn, vp, vn, cent, rot = _data(rng, b, hq, hkv, sq, sk)
    kw = dict(CASES[case])
    if kw.get("sinks") == "draw":
        kw["sinks"] = jnp.asarray(rng.standard_normal(hq), jnp.float32)
    lens = np.array([sk, int(rng.integers(sq + 8, sk))], np.int32)
    window = kw.get("local_window_size")
    window = (window, window) if isinstance(window, int) else window
    args = dict(causal=kw.get("is_causal", False), lens=lens, window=window,
                cap=kw.get("logit_soft_cap"), sinks=kw.get("sinks"))
    scale = 64 ** -0.5
    k_hat, v_hat = deq(kp, kn, cent, rot), deq(vp, vn, cent, rot)
    runs = {
        "flash": (tq.flash_attention(q, k, v, kv_lengths=lens, **kw, impl=impl),
                  oracle(q, k, v, scale, **args)),
        "tq4": (tq.flash_attention_tq4(q, kp, kn, v, cent, rot, kv_lengths=lens, **kw,
                                       impl=impl), oracle(q, k_hat, v, scale, **args)),
        "tq4_kv": (tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens,
                                             **kw, impl=impl),
                   oracle(q, k_hat, v_hat, scale, **args)),
    }
    for name, (got, want) in runs.items():
        assert got.shape == q.shape and got.dtype == q.dtype
        assert rel_l2(got, want) < 1e-2, (name, rel_l2(got, want))


@pytest.mark.parametrize("splits", [1, 3])
def test_sinks_and_window_with_splits(rng, splits):
    """Decode split over keys: each split's log-sum-exp carries the sink correction through
    the merge; the window skips whole tiles left of it."""
    q, k, v, kp, kn, vp, vn, cent, rot = _data(rng, 2, 8, 2, 1, 200)
    sinks = jnp.asarray(rng.standard_normal(8) + 2.0, jnp.float32)
    cfg = Config(16, 32, 4, 2, splits)
    got = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, sinks=sinks,
                                    local_window_size=(100, 0), is_causal=True, config=cfg,
                                    impl="pallas")
    want = oracle(q, deq(kp, kn, cent, rot), deq(vp, vn, cent, rot), 64 ** -0.5, True,
                  window=(100, 0), sinks=sinks)
    assert rel_l2(got, want) < 1e-2


def test_extras_lower_to_triton():
    s = jax.ShapeDtypeStruct
    text = lower_to_triton(lambda q, k, v, sk: tq.flash_attention(
        q, k, v, None, True, local_window_size=(64, 0), logit_soft_cap=30.0, sinks=sk,
        impl="pallas"), s((1, 8, 256, 128), jnp.float16), s((1, 2, 256, 128), jnp.float16),
        s((1, 2, 256, 128), jnp.float16), s((8,), jnp.float32))
    assert "__gpu$xla.gpu.triton" in text


def test_extras_bad_input(rng):
    q, k, v, *_ = _data(rng, 1, 4, 2, 3, 10)
    for bad in (-1, (1, -2), (1, 2, 3), 2.5, True):
        with pytest.raises(ValueError, match="local_window_size"):
            tq.flash_attention(q, k, v, local_window_size=bad)
    for bad in (0.0, -1.0, "x"):
        with pytest.raises(ValueError, match="logit_soft_cap"):
            tq.flash_attention(q, k, v, logit_soft_cap=bad)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        tq.flash_attention(q, k, v, sinks=jnp.zeros((2,)))


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_extras(rng, impl):
    """Paged decode and chunked prefill with a window, a soft cap and sinks: the kernel against
    the reference, and decode against the contiguous op on the same tokens (the window counts
    positions the same way)."""
    from test_paged import _prefill_inputs, _setup
    lens = [70, 33]
    t = _setup(rng, lens, 4, 2, 64, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    sinks = jnp.asarray(rng.standard_normal(4), jnp.float32)
    kw = dict(**t["kw"], local_window_size=(20, 0), logit_soft_cap=4.0, sinks=sinks)
    got = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **kw,
                          impl=impl)
    want = tq.paged_decode(t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"], **kw,
                           impl="reference")
    assert rel_l2(got, want) < 1e-2
    start = np.concatenate([[0], np.cumsum(lens)])
    for s, n in enumerate(lens):
        kp, kn = tq.compress(t["key"][start[s]:start[s + 1]], t["rot"], t["bnd"],
                             impl="reference")
        vp, vn = tq.compress(t["val"][start[s]:start[s + 1]], t["rot"], t["bnd"],
                             impl="reference")
        bhsd = lambda x: jnp.swapaxes(x, 0, 1)[None]  # noqa: E731
        contiguous = tq.flash_attention_tq4_kv(
            t["q"][s][None, :, None], *map(bhsd, (kp, kn, vp, vn)), t["cent"], t["rot"],
            is_causal=True, local_window_size=(20, 0), logit_soft_cap=4.0, sinks=sinks,
            impl="reference")
        assert rel_l2(np.asarray(want)[s], np.asarray(contiguous)[0, :, 0]) < 1e-2
    q, qsl = _prefill_inputs(rng, t, lens, [12, 5], 4, 64, jnp.float16)
    args = (q, cache, t["table"], t["lens"], qsl, t["cent"], t["rot"])
    got, want = (tq.paged_prefill(*args, **kw, use_int8_qk=False, impl=i)
                 for i in (impl, "reference"))
    assert rel_l2(got, want) < 1e-2


@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k8v4"])
def test_vllm_extras(rng, name):
    """vLLM-layout decode with a window, a soft cap and sinks: the kernel against the
    reference, and the reference against a float64 oracle on the dequantized cache (the last
    ``window + 1`` positions, ``cap * tanh(s / cap)``, the sink in the denominator)."""
    from test_vllm import write_sequences
    from tq4jax import vllm as V
    d, hk, hq, bs, window, cap = 64, 2, 4, 16, 20, 4.0
    pr = V.preset(name, d)
    c, _ = V.codebook(d, pr.mse_bits)
    pi = tq.haar_rotation(d, seed=int(rng.integers(1000)))
    lens = [70, 33, 9, 0]
    cache, bt, _, _ = write_sequences(rng, pr, lens, hk, d, bs, pi, c, "pallas")
    q = jnp.asarray(rng.standard_normal((len(lens), hq, d)) * 2, jnp.float16)
    seq = np.asarray(lens, np.int32)
    sinks = jnp.asarray(rng.standard_normal(hq), jnp.float32)
    kw = dict(**pr.decode_kwargs(), max_num_kv_splits=3, local_window_size=window,
              logit_soft_cap=cap, sinks=sinks)
    args = (q, cache, bt, seq, pi, c, d ** -0.5)
    got = V.turboquant_decode(*args, **kw, impl="pallas")
    want = V.turboquant_decode(*args, **kw, impl="reference")
    assert rel_linf(got, want) < 2e-3  # as test_vllm (fp16)
    kd, vd = (np.asarray(x, np.float64) for x in V.full_dequant_kv(
        cache, bt, seq, c, **pr.dequant_kwargs(), impl="reference"))
    qf = np.asarray(q, np.float64)
    if not pr.key_fp8:
        qf = qf @ np.asarray(pi, np.float64).T  # keys stay in rotated space
    for s, n in enumerate(lens):
        lo = max(0, n - 1 - window)
        for h in range(hq):
            logits = kd[s, h // (hq // hk), lo:n] @ qf[s, h] * d ** -0.5
            logits = cap * np.tanh(logits / cap)
            w = np.exp(logits - max(logits.max(initial=-np.inf), float(sinks[h])))
            w_sink = np.exp(float(sinks[h]) - max(logits.max(initial=-np.inf), float(sinks[h])))
            oracle = (w @ vd[s, h // (hq // hk), lo:n]) / (w.sum() + w_sink)
            np.testing.assert_allclose(np.asarray(want, np.float64)[s, h], oracle, rtol=2e-3,
                                       atol=2e-3)
    with pytest.raises(ValueError, match="sinks"):
        V.turboquant_decode(*args, **{**kw, "sinks": sinks[:2]})
    with pytest.raises(ValueError, match="local_window_size"):
        V.turboquant_decode(*args, **{**kw, "local_window_size": -1})
