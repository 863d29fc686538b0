"""The fused decode epilogue (tq4jax.pallas_triton.epilogue: split merge + post-rotation + cast
in one kernel) against the XLA ops it replaces, alone and inside the decode ops
(``Config(..., epilogue=True)``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2
from test_attention import _case
from test_paged import _setup
from tq4jax.backend import kernel_mode
from tq4jax.core import merge_splits, post_rotate, rotation_parts
from tq4jax.layout import to_dtype
from tq4jax.pallas_triton.epilogue import merge_rotate
from tq4jax.pallas_triton.tuning import Config
from tq4jax.testing import lower_to_triton

#: Fused vs XLA: the merge is float32 math in another order (online over the splits instead
#: of max-then-sum), the rotation a dot of 16-bit halves (2^-21 relative) instead of float32
#: HIGHEST: outputs differ by at most one rounding of the output dtype (2^-10 fp16, 2^-7 bf16
#: relative to the row's largest value).
ULP = {jnp.float16: 2.0 ** -10, jnp.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("post", [True, False], ids=["rotated", "merge_only"])
def test_merge_rotate_matches_xla(rng, dtype, post):
    """Groups x 5 splits x 37 rows (a ragged row block), D=128, with a row no split saw
    (zeros), an unwritten split (lse -inf, garbage NaN outputs: ignored) and a NaN lse (the
    row is NaN, as merge_splits)."""
    g, s, r, d = 3, 5, 37, 128
    o = rng.standard_normal((g, s, r, d)).astype(np.float32)
    lse = (rng.standard_normal((g, s, r)) * 3).astype(np.float32)
    lse[0, :, 0] = -np.inf
    lse[1, 2, :], o[1, 2] = -np.inf, np.nan
    lse[2, 1, 3] = np.nan
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    merged = merge_splits(jnp.asarray(o), jnp.asarray(lse), 1)
    want = np.asarray(to_dtype(post_rotate(merged, rot) if post else merged, dtype), np.float32)
    got = np.asarray(merge_rotate(jnp.asarray(o), jnp.asarray(lse),
                                  rotation_parts(rot, dtype).post if post else None,
                                  dtype=dtype, mode=kernel_mode()), np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[2, 3]).all() and (got[0, 0] == 0).all()
    scale = np.abs(np.nan_to_num(want)).max(axis=-1, keepdims=True)
    diff = np.nan_to_num(np.abs(got - want))
    assert (diff <= ULP[dtype] * scale).all(), diff.max()


def test_contiguous_decode_with_fused_epilogue(rng):
    """flash_attention_tq4_kv / flash_attention decode over 4 KV splits (lengths 0, 1, ragged):
    the fused epilogue gives the XLA epilogue's result to one output rounding, and the
    reference's within the kernels' tolerance."""
    q, k, v = _case(rng, 3, 8, 2, 1, 300, 128, jnp.float16)
    rot = tq.haar_rotation(128, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(128, 4)
    kp, kn = tq.compress(k, rot, bnd, impl="reference")
    vp, vn = tq.compress(v, rot, bnd, impl="reference")
    lens = np.array([0, 1, 257], np.int32)
    cfg = Config(16, 32, 4, 2, 4)
    packed = {e: tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens,
                                           config=cfg._replace(epilogue=e), impl="pallas")
              for e in (False, True)}
    want = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens,
                                     impl="reference")
    fused, xla = (np.asarray(packed[e], np.float32) for e in (True, False))
    np.testing.assert_array_equal(fused[0], 0.0)
    np.testing.assert_allclose(fused, xla, rtol=0, atol=2.0 ** -10 * np.abs(xla).max())
    assert rel_l2(fused[1:], np.asarray(want, np.float32)[1:]) < 1e-2
    dense = {e: np.asarray(tq.flash_attention(q, k, v, kv_lengths=lens,
                                              config=cfg._replace(epilogue=e), impl="pallas"),
                           np.float32) for e in (False, True)}
    np.testing.assert_allclose(dense[True], dense[False], rtol=0,
                               atol=2.0 ** -10 * np.abs(dense[False]).max())
    assert rel_l2(dense[True][1:], np.asarray(tq.flash_attention(
        q, k, v, kv_lengths=lens, impl="reference"), np.float32)[1:]) < 1e-2


def test_paged_decode_with_fused_epilogue(rng):
    """paged_decode over 3 KV splits with a sequence of length 0 and split-less ones."""
    t = _setup(rng, [150, 0, 64, 17], 8, 2, 128, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    args = (t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"])
    cfg = Config(16, 32, 4, 3, 3)
    fused, xla = (np.asarray(tq.paged_decode(*args, **t["kw"], config=cfg._replace(epilogue=e),
                                             impl="pallas"), np.float32) for e in (True, False))
    want = np.asarray(tq.paged_decode(*args, **t["kw"], impl="reference"), np.float32)
    np.testing.assert_array_equal(fused[1], 0.0)
    np.testing.assert_allclose(fused, xla, rtol=0, atol=2.0 ** -10 * np.abs(xla).max())
    assert rel_l2(fused, want) < 1e-2


@pytest.mark.parametrize("epilogue", [False, True])
def test_paged_decode_lowers_to_triton_with_epilogue(epilogue):
    """With splits, the fused epilogue is a second Triton kernel in the lowered module (and
    the XLA merge's exp/reduce ops leave it)."""
    s = jax.ShapeDtypeStruct
    args = (s((3, 8, 128), jnp.float16), s((40, 16, 2 * 136), jnp.uint8),
            s((3, 64), jnp.int32), s((3,), jnp.int32))
    cent, rot = tq.lloyd_max(128, 4)[0], tq.haar_rotation(128)
    kw = dict(num_kv_heads=2, head_dim=128, block_size=16, impl="pallas",
              config=Config(16, 32, 4, 3, 4, epilogue))
    text = lower_to_triton(lambda q, c, b, n: tq.paged_decode(q, c, b, n, cent, rot, **kw),
                           *args)
    calls = text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call")
    assert calls == (2 if epilogue else 1), calls
    assert ("stablehlo.exponential" in text) != epilogue
