"""``flash_attention_tq4`` (compressed K, dense fp16 V) decode on the Mosaic GPU backend: against
float64 math and the Triton-lowered kernel in GPU interpret mode on a CPU, lowering for sm_90
without a GPU, compiled on a Hopper GPU; and what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2
from test_attention import deq, oracle
from tq4jax.pallas_mosaic import MosaicConfig
from tq4jax.testing import lower_for_gpu

D = 128


def _case(rng, b, hq, hkv, sk, lens, garbage=np.inf):
    """q, K codes/norms, dense fp16 V whose rows past each sequence's length hold ``garbage``
    (never read as a value: zeroed in shared memory before P@V), codebook, rotation."""
    rot = tq.haar_rotation(D, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(D, 4)
    q = jnp.asarray(rng.standard_normal((b, hq, 1, D)), jnp.float16)
    k = rng.standard_normal((b, hkv, sk, D)) * rng.uniform(0.5, 3)
    kp, kn = tq.compress(jnp.asarray(k, jnp.float32), rot, bnd, impl="reference")
    v = rng.standard_normal((b, hkv, sk, D))
    v = np.where(np.arange(sk)[None, None, :, None] < np.asarray(lens)[:, None, None, None],
                 v, garbage)
    return q, kp, kn, jnp.asarray(v, jnp.float16), cent, rot


def _want(q, kp, kn, v, cent, rot, lens):
    sk = kp.shape[2]
    mask = np.where(np.arange(sk)[None, :] < np.asarray(lens)[:, None], 0.0, -np.inf)
    v = np.where(np.isfinite(np.asarray(v, np.float64)), np.asarray(v, np.float64), 0.0)
    return oracle(q, deq(kp, kn, cent, rot), v, D ** -0.5, False, mask[:, None, None, :])


@pytest.mark.parametrize("cfg", [MosaicConfig(2, 2), MosaicConfig(3, 3),
                                 MosaicConfig(2, 2, auto_barriers=False)], ids=str)
@pytest.mark.parametrize("garbage", [np.inf, np.nan], ids=["inf", "nan"])
def test_dense_v_matches_oracle(rng, cfg, garbage):
    """Lengths 0, 1, a tile boundary and a ragged tail over 200 keys (the last tile's box hangs
    past the cache), V rows past each length Inf or NaN; 4 query heads per KV head: fp16
    kernel vs float64 math and vs the Triton-lowered kernel, relative L2 < 1e-2."""
    lens = np.array([0, 1, 64, 173], np.int32)
    q, kp, kn, v, cent, rot = _case(rng, 4, 8, 2, 200, lens, garbage)
    got = tq.flash_attention_tq4(q, kp, kn, v, cent, rot, kv_lengths=lens, config=cfg,
                                 impl="mosaic")
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got, np.float32)
    np.testing.assert_array_equal(got[0], 0.0)
    assert np.isfinite(got).all()
    assert rel_l2(got[1:], _want(q, kp, kn, v, cent, rot, lens)[1:]) < 1e-2
    clean = jnp.where(jnp.isfinite(v), v, 0)  # the Triton-lowered kernel on finite V
    same = tq.flash_attention_tq4(q, kp, kn, clean, cent, rot, kv_lengths=lens, impl="triton")
    assert rel_l2(got[1:], np.asarray(same, np.float32)[1:]) < 1e-2


def test_dense_v_full_length_and_refusals(rng):
    """No kv_lengths (every key, 72: a partial last tile), a group of 3 query heads; bf16
    queries (so bf16 V) and a mask are refused by name."""
    q, kp, kn, v, cent, rot = _case(rng, 2, 3, 1, 72, [72, 72])
    got = tq.flash_attention_tq4(q, kp, kn, v, cent, rot, config=MosaicConfig(2, 2),
                                 impl="mosaic")
    assert rel_l2(got, _want(q, kp, kn, v, cent, rot, [72, 72])) < 1e-2
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.flash_attention_tq4(q.astype(jnp.bfloat16), kp, kn, v.astype(jnp.bfloat16), cent,
                               rot, impl="mosaic")
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.flash_attention_tq4(q, kp, kn, v, cent, rot, impl="mosaic",
                               attention_mask=jnp.zeros((1, 3, 1, 72)))


def test_dense_v_lowers_for_sm90():
    """The dense-V kernel lowers to a Mosaic GPU module on a CPU (fp16 V tiles by TMA into
    the layout P@V reads, the zeroed tail rows)."""
    rot = tq.haar_rotation(D)
    cent = tq.lloyd_max(D, 4)[0]
    s = jax.ShapeDtypeStruct
    args = (s((8, 32, 1, D), jnp.float16), s((8, 8, 1024, D // 2), jnp.uint8),
            s((8, 8, 1024), jnp.float32), s((8, 8, 1024, D), jnp.float16))
    text = lower_for_gpu(lambda q, kp, kn, v: tq.flash_attention_tq4(
        q, kp, kn, v, cent, rot, impl="mosaic"), *args)
    assert "mosaic_gpu" in text and "prmt.b32" in text


@pytest.mark.gpu
def test_dense_v_compiled_on_hopper(rng):
    if (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    lens = np.array([0, 37, 1000], np.int32)
    q, kp, kn, v, cent, rot = _case(rng, 3, 32, 8, 1000, lens)
    got = np.asarray(tq.flash_attention_tq4(q, kp, kn, v, cent, rot, kv_lengths=lens,
                                            impl="mosaic"), np.float32)
    np.testing.assert_array_equal(got[0], 0.0)
    assert rel_l2(got[1:], _want(q, kp, kn, v, cent, rot, lens)[1:]) < 1e-2
