"""tq.dot_product_attention accepts what jax.nn.dot_product_attention accepts and gives its
results: on the dequantized K/V within fp16 rounding, and jax.nn's conventions for padded
query rows (zeros) and rows that see no key (the mean of every value)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2

B, T, S, N, K, H = 2, 5, 24, 4, 2, 64


def _qkv(rng, dtype=jnp.float16):
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
    return q, k, v


def _round_trip(x):
    """x BTNH through the drop-in's own codec (the K/V jax.nn must see to agree)."""
    spec = tq.TQ4Spec(H)
    p, nrm = tq.compress(jnp.swapaxes(x, 1, 2), spec.rotation, spec.codebook("k")[1],
                         impl="reference")
    return jnp.swapaxes(tq.dequantize(p, nrm, spec.codebook("k")[0], spec.rotation,
                                      jnp.float32, impl="reference"), 1, 2)


@pytest.mark.parametrize("kw", [dict(is_causal=True, local_window_size=(3, 0)),
                                dict(local_window_size=2),
                                dict(is_causal=True, key_value_seq_lengths="lens"),
                                dict(is_causal=True, scale=0.3)],
                         ids=["window-causal", "window-int", "kv-lengths", "scale"])
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_matches_jax_nn_on_dequantized_kv(rng, kw, implementation):
    q, k, v = _qkv(rng)
    kw = dict(kw)
    if kw.get("key_value_seq_lengths") == "lens":
        kw["key_value_seq_lengths"] = jnp.asarray([S, 9], jnp.int32)
    got = tq.dot_product_attention(q, k, v, implementation=implementation, **kw)
    want = jax.nn.dot_product_attention(q.astype(jnp.float32), _round_trip(k), _round_trip(v),
                                        **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_l2(got, want) < 1e-2


def test_unbatched_float32_and_traced_scale(rng):
    """3-D TNH inputs, float32 in and out (the kernels run in float16), a traced scale
    (folded into the query: relative L2 within fp16 rounding of q)."""
    q, k, v = _qkv(rng, jnp.float32)
    got = tq.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    want = jax.nn.dot_product_attention(q[0], _round_trip(k)[0], _round_trip(v)[0],
                                        is_causal=True)
    assert got.shape == (T, N, H) and got.dtype == jnp.float32
    assert rel_l2(got, want) < 1e-2
    f = jax.jit(lambda q, k, v, s: tq.dot_product_attention(q, k, v, scale=s))
    got = f(q, k, v, jnp.float32(0.2))
    want = jax.nn.dot_product_attention(q, _round_trip(k), _round_trip(v), scale=0.2)
    assert rel_l2(got, want) < 1e-2


def test_empty_rows_follow_jax_nn(rng):
    """A row with key_value_seq_lengths 0 or a fully False mask gets the mean of all values
    (jax.nn's softmax over uniformly large negative logits); padded query rows get zeros."""
    q, k, v = _qkv(rng)
    mask = np.ones((B, 1, T, S), bool)
    mask[1, :, 2] = False
    kw = dict(key_value_seq_lengths=jnp.asarray([0, S], jnp.int32), mask=jnp.asarray(mask),
              query_seq_lengths=jnp.asarray([T, 4], jnp.int32))
    got = np.asarray(tq.dot_product_attention(q, k, v, **kw), np.float32)
    want = np.asarray(jax.nn.dot_product_attention(q.astype(jnp.float32),
                                                   k.astype(jnp.float32),
                                                   v.astype(jnp.float32), **kw))
    np.testing.assert_allclose(got[0], want[0], atol=2e-3)       # no key: mean of values
    np.testing.assert_allclose(got[1, 2], want[1, 2], atol=2e-3)  # masked-out row
    np.testing.assert_array_equal(got[1, 4], 0.0)                 # padded query row
    np.testing.assert_array_equal(want[1, 4], 0.0)


def test_extras_and_cache(rng):
    """Soft cap and sinks pass through (also with a cache); a windowed cache decode equals the
    windowed reference."""
    q, k, v = _qkv(rng)
    sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
    a = tq.dot_product_attention(q, k, v, is_causal=True, logit_soft_cap=5.0, sinks=sinks)
    b = tq.dot_product_attention(q, k, v, is_causal=True, logit_soft_cap=5.0, sinks=sinks,
                                 implementation="xla")
    assert rel_l2(a, b) < 1e-2
    cache = tq.TQ4Cache.create(1, B, K, 32, H)
    outs = {}
    for impl in (None, "xla"):
        c = cache
        o, c = tq.dot_product_attention(q, k[:, :T], v[:, :T], is_causal=True, cache=c,
                                        layer=0, local_window_size=(2, 0), sinks=sinks,
                                        implementation=impl)
        outs[impl] = o
    assert rel_l2(outs[None], outs["xla"]) < 1e-2


def test_refused():
    q = jnp.ones((1, 2, 4, 64), jnp.float16)
    with pytest.raises(ValueError, match="implementation must be"):
        tq.dot_product_attention(q, q, q, implementation="cudnn")
    with pytest.raises(ValueError, match="return_residual"):
        tq.dot_product_attention(q, q, q, return_residual=True)
    with pytest.raises(ValueError, match="DenseCache attends with jax.nn"):
        tq.dot_product_attention(q, q, q, cache=tq.DenseCache.create(1, 1, 4, 8, 64),
                                 layer=0, logit_soft_cap=2.0)
