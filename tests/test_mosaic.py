"""The Mosaic GPU backend (``impl="mosaic"``): contiguous, paged and vLLM-layout decode against
float64 math, the reference and the Triton-lowered kernels in GPU interpret mode on a CPU,
lowering for sm_90 without a GPU, compiled on a Hopper GPU; the shapes it refuses; the split
rule and where ``impl="auto"`` takes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import rel_l2, rel_linf
from test_attention import deq, oracle
from tq4jax.pallas_mosaic import MosaicConfig
from tq4jax.testing import lower_for_gpu

D = 128


def _decode_case(rng, b, hq, hkv, sk, v_bits=4):
    rot = tq.haar_rotation(D, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(D, 4)
    vc, vb = tq.lloyd_max(D, v_bits)
    q = jnp.asarray(rng.standard_normal((b, hq, 1, D)), jnp.float16)
    k = rng.standard_normal((b, hkv, sk, D)) * rng.uniform(0.5, 3)
    v = rng.standard_normal((b, hkv, sk, D))
    kp, kn = tq.compress(jnp.asarray(k, jnp.float32), rot, bnd, impl="reference")
    vp, vn = tq.compress(jnp.asarray(v, jnp.float32), rot, vb, impl="reference")
    return q, kp, kn, vp, vn, cent, vc, rot


def _want(q, kp, kn, vp, vn, cent, vc, rot, lens):
    """float64 attention over the dequantized K/V, keys [0, lens[b]) of each row."""
    k_hat, v_hat = deq(kp, kn, cent, rot), deq(vp, vn, vc, rot)
    sk = kp.shape[2]
    mask = np.where(np.arange(sk)[None, :] < np.asarray(lens)[:, None], 0.0, -np.inf)
    return oracle(q, k_hat, v_hat, D ** -0.5, False, mask[:, None, None, :])


@pytest.mark.parametrize("cfg", [MosaicConfig(2, 2), MosaicConfig(3, 3),
                                 MosaicConfig(2, 2, auto_barriers=False)], ids=str)
def test_decode_matches_oracle(rng, cfg):
    """Lengths 0, 1, a tile boundary and a ragged tail; 4 and 8 query heads per KV head;
    fp16 kernel against float64 math: relative L2 < 1e-2 (measured ~3e-4)."""
    b, hq, hkv, sk = 4, 8, 2, 200
    q, kp, kn, vp, vn, cent, vc, rot = _decode_case(rng, b, hq, hkv, sk)
    lens = np.array([0, 1, 64, 173], np.int32)
    got = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens, config=cfg,
                                    impl="mosaic")
    assert got.shape == q.shape and got.dtype == q.dtype
    want = _want(q, kp, kn, vp, vn, cent, cent, rot, lens)
    np.testing.assert_array_equal(np.asarray(got)[0], 0.0)
    assert rel_l2(np.asarray(got)[1:], want[1:]) < 1e-2
    same = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens,
                                     impl="triton")
    assert rel_l2(np.asarray(got)[1:], np.asarray(same)[1:]) < 1e-2


def test_decode_asymmetric_codebooks_and_full_length(rng):
    """A 3-bit V codebook beside a 4-bit K one (two tables), no kv_lengths (every key), a
    group of 3 query heads (padded to the kernel's 16 columns)."""
    q, kp, kn, vp, vn, cent, vc, rot = _decode_case(rng, 2, 3, 1, 72, v_bits=3)
    got = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, v_centroids=vc,
                                    config=MosaicConfig(2, 2), impl="mosaic")
    want = _want(q, kp, kn, vp, vn, cent, vc, rot, [72, 72])
    assert rel_l2(got, want) < 1e-2


def test_refused_shapes_and_configs(rng):
    q, kp, kn, vp, vn, cent, vc, rot = _decode_case(rng, 1, 4, 2, 16)
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):  # two queries: not decode
        tq.flash_attention_tq4_kv(jnp.concatenate([q, q], 2), kp, kn, vp, vn, cent, rot,
                                  impl="mosaic")
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):  # a mask
        tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, impl="mosaic",
                                  attention_mask=jnp.zeros((1, 4, 1, 16)))
    with pytest.raises(TypeError, match="config must be a"):
        tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, impl="mosaic",
                                  config=tq.pallas_triton.tuning.Config(16, 64, 4, 2))
    q, kp, kn, vp, vn, cent, vc, rot = _decode_case(rng, 1, 4, 2, 70)
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):  # 70 keys: TMA tiling of 8
        tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, impl="mosaic")


@pytest.mark.parametrize("static", [True, False], ids=["prmt", "select"])
def test_decode_lowers_for_sm90(static):
    """The compiled kernel lowers to a Mosaic GPU module on a CPU (layouts, wgmma shapes, TMA
    boxes and shared memory are checked there): prmt lookups for a concrete codebook, select
    trees for a traced one."""
    rot = tq.haar_rotation(D)
    cent = tq.lloyd_max(D, 4)[0]
    s = jax.ShapeDtypeStruct
    args = (s((8, 32, 1, D), jnp.float16), s((8, 8, 1024, D // 2), jnp.uint8),
            s((8, 8, 1024), jnp.float32), s((8, 8, 1024, D // 2), jnp.uint8),
            s((8, 8, 1024), jnp.float32), s((16,), jnp.float32))
    text = lower_for_gpu(lambda q, kp, kn, vp, vn, c: tq.flash_attention_tq4_kv(
        q, kp, kn, vp, vn, cent if static else c, rot, impl="mosaic"), *args)
    assert "mosaic_gpu" in text
    assert ("prmt.b32" in text) == static


@pytest.mark.gpu
def test_decode_compiled_on_hopper(rng):
    if (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    q, kp, kn, vp, vn, cent, vc, rot = _decode_case(rng, 3, 32, 8, 1000)
    lens = np.array([0, 37, 1000], np.int32)
    got = tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, kv_lengths=lens,
                                    impl="mosaic")
    np.testing.assert_array_equal(np.asarray(got)[0], 0.0)
    assert rel_l2(np.asarray(got)[1:], _want(q, kp, kn, vp, vn, cent, cent, rot, lens)[1:]) < 1e-2


def test_model_decode_step_on_each_backend(rng):
    """The example model's decode step over a TQ4 cache with ``implementation="mosaic"``
    (TQ4Cache.attend drops the moot causal mask of a one-token step, so the decode-only
    kernel serves it): logits within 1e-2 relative L2 of the Triton-lowered kernels' and of
    the reference path's (all fp16 kernels; measured ~1e-3), on a ragged batch."""
    from tq4jax import model as llama
    cfg = llama.LlamaConfig(head_dim=D, dim=256, n_heads=4, n_kv_heads=1, n_layers=1)
    params = llama.init_params(cfg, int(rng.integers(1 << 16)))
    b, t = 3, 11
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    lens = jnp.asarray([11, 4, 7], jnp.int32)
    cache = llama.make_cache(cfg, b, 24)
    _, cache = llama.forward(params, prompt, cache, cfg, lens, implementation="xla")
    tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 1)), jnp.int32)
    out = {i: llama.forward(params, tok, cache, cfg, implementation=i)
           for i in ("mosaic", "triton", "xla")}
    got = np.asarray(out["mosaic"][0])
    for other in ("triton", "xla"):
        assert rel_l2(got, np.asarray(out[other][0])) < 1e-2, other
    np.testing.assert_array_equal(np.asarray(out["mosaic"][1].lengths[0]), [12, 5, 8])
    with pytest.raises(ValueError, match="implementation"):
        llama.forward(params, tok, cache, cfg, implementation="cudnn")


@pytest.mark.parametrize("bs,cfg,hkv", [(8, MosaicConfig(2, 2), 2), (16, MosaicConfig(3, 3), 4),
                                        (32, MosaicConfig(1, 2), 2), (16, MosaicConfig(2, 2), 8),
                                        (32, MosaicConfig(1, 2, True), 2),
                                        (16, MosaicConfig(2, 2, auto_barriers=False), 8)],
                         ids=str)
def test_paged_decode_matches_reference(rng, bs, cfg, hkv):
    """paged_decode on the Mosaic backend against the reference path and the Triton-lowered
    kernel (relative L2 < 1e-2; fp16 kernels): lengths 0, 1, a block boundary, a tile tail and
    several tiles over shuffled blocks with holes, garbage entries past each sequence's blocks
    (never followed: interpret mode raises on a read past the cache), a 3-bit V codebook, 4
    query heads per KV head; 2 KV heads (V codes off the 16-byte TMA grid: wider boxes), 4
    (K code tiles swizzled by 32 bytes, V plain) and 8 (K by 64, V by 32); block ids read as
    the copies start, or one tile ahead (``prefetch``: one split of 4 tiles)."""
    from test_paged import _setup
    lens = [0, 1, bs, 64 + 7, 3 * 64 + bs + 3]
    t = _setup(rng, lens, 4 * hkv, hkv, D, bs, jnp.float16, v_bits=3)
    cache = tq.paged_write_reference(t["cache"], t["key"], t["val"], t["slot"], t["rot"],
                                     t["bnd"], t["vb"])
    args = (t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"])
    kw = dict(t["kw"], v_centroids=t["vc"])
    got = np.asarray(tq.paged_decode(*args, **kw, config=cfg, impl="mosaic"), np.float32)
    assert got.dtype == np.float32 and got.shape == t["q"].shape
    np.testing.assert_array_equal(got[0], 0.0)
    for impl in ("reference", "triton"):
        want = np.asarray(tq.paged_decode(*args, **kw, impl=impl), np.float32)
        for s in range(1, len(lens)):
            assert rel_l2(got[s], want[s]) < 1e-2, (impl, s)


def test_paged_refusals(rng):
    """Mosaic paged decode refuses what it does not serve, naming the backend."""
    from test_paged import _setup
    t = _setup(rng, [5], 4, 1, 64, 16, jnp.float16)  # D=64
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.paged_decode(t["q"], t["cache"], t["table"], t["lens"], t["cent"], t["rot"],
                        **t["kw"], impl="mosaic")
    t = _setup(rng, [5], 4, 1, D, 4, jnp.float16)  # block size 4
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.paged_decode(t["q"], t["cache"], t["table"], t["lens"], t["cent"], t["rot"],
                        **t["kw"], impl="mosaic")
    t = _setup(rng, [5], 4, 1, D, 16, jnp.float16)  # sinks
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.paged_decode(t["q"], t["cache"], t["table"], t["lens"], t["cent"], t["rot"],
                        **t["kw"], sinks=jnp.zeros(4), impl="mosaic")
    t = _setup(rng, [5], 3, 3, D, 16, jnp.float16)  # 408-byte rows: TMA strides are x16
    with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
        tq.paged_decode(t["q"], t["cache"], t["table"], t["lens"], t["cent"], t["rot"],
                        **t["kw"], impl="mosaic")


@pytest.mark.parametrize("hkv", [1, 2, 3, 4, 8, 12, 16, 32])
def test_tma_boxes_start_at_aligned_columns(hkv):
    """Every TMA box the paged and vLLM kernels copy starts at a multiple of 16 bytes, stays
    inside the row and holds its field, for every KV head of every layout they accept (a
    misaligned box compiles, passes interpret mode, and faults on the GPU with
    CUDA_ERROR_ILLEGAL_INSTRUCTION: found on an H200 at norm windows ending at the head's
    norm); swizzled code boxes start at a multiple of their swizzle (else the GPU reads the
    wrong bytes: found on an H200 at the V codes of 8 KV heads, byte 544)."""
    from tq4jax.layout import NORM_BYTES
    from tq4jax.pallas_mosaic import paged as mp, vllm as mv
    lay = tq.paged_layout(hkv, D)
    for row in (lay.row_bytes, lay.row_bytes + 16):
        if not mp.supported(D, 1, 16, row):
            assert row % 16
            continue
        vw = mp.DB if mp.v_aligned(lay) else mp.box_width(mp.DB)
        swz = mp.ring_swizzles(lay, row)
        for h in range(hkv):
            kc, kn, kf, vc, vo, vn, vf = mp.tma_columns(lay, h, row)
            for col, sw in zip((kc, vc), swz):  # swizzled sources are read in whole tiles
                assert sw is None or (col % sw == 0 and row % sw == 0), (h, row, col, sw)
            assert kc % 16 == kn % 16 == vc % 16 == vn % 16 == 0, (h, row)
            assert vc + vo == lay.v_codes + h * mp.DB and vo + mp.DB <= vw and vc + vw <= row
            assert kn + 4 * kf == lay.k_norms + NORM_BYTES * h and kn + mp.WINDOW <= row
            assert vn + 4 * vf == lay.v_norms + NORM_BYTES * h and vn + mp.WINDOW <= row
    for name in tq.vllm.PRESETS:
        pr = tq.vllm.preset(name, D)
        sl = tq.vllm.vllm_slot(D, pr.mse_bits, pr.value_quant_bits, None, pr.key_fp8)
        row = hkv * sl.slot_bytes
        if not mv.supported(sl, 1, 16, hkv):
            assert row % 16, (name, hkv)
            continue
        kw, vw = mv.box_width(sl.key_bytes), mv.box_width(sl.value_bytes + 4)
        for h in range(hkv):
            kc, ko, vc, vo = mv.boxes(sl, h, row)
            assert kc % 16 == vc % 16 == 0 and kc + kw <= row and vc + vw <= row, (name, h)
            assert kc + ko == h * sl.slot_bytes and ko + sl.key_bytes <= kw
            assert vc + vo == h * sl.slot_bytes + sl.value_at
            assert vo + sl.value_bytes + 4 <= vw


@pytest.mark.parametrize("static,hkv", [(True, 8), (False, 8), (True, 4), (True, 2)],
                         ids=["prmt", "select", "prmt-544-byte-rows", "prmt-272-byte-rows"])
def test_paged_decode_lowers_for_sm90(static, hkv):
    """The paged kernel lowers to a Mosaic GPU module on a CPU (block-table scalar loads, TMA
    page boxes, the aliased norm windows read at the head's column; rows of 1088 bytes take
    swizzled code tiles, rows of 544 bytes (4 KV heads) plain ones, rows of 272 bytes (2 KV
    heads: V codes at byte 136, off the 16-byte TMA grid) V codes in wider boxes)."""
    rot = tq.haar_rotation(D)
    cent = tq.lloyd_max(D, 4)[0]
    row = tq.paged_layout(hkv, D).row_bytes
    s = jax.ShapeDtypeStruct
    args = (s((8, 4 * hkv, D), jnp.float16), s((600, 16, row), jnp.uint8),
            s((8, 64), jnp.int32), s((8,), jnp.int32), s((16,), jnp.float32))
    text = lower_for_gpu(lambda q, c, bt, n, cb: tq.paged_decode(
        q, c, bt, n, cent if static else cb, rot, num_kv_heads=hkv, head_dim=D, block_size=16,
        impl="mosaic"), *args)
    assert "mosaic_gpu" in text
    assert ("prmt.b32" in text) == static


@pytest.mark.gpu
def test_paged_decode_compiled_on_hopper(rng):
    if (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    from test_paged import _setup
    lens = [0, 37, 1000, 16]
    t = _setup(rng, lens, 32, 8, D, 16, jnp.float16)
    cache = tq.paged_write(t["cache"], t["key"], t["val"], t["slot"], t["rot"], t["bnd"])
    args = (t["q"], cache, t["table"], t["lens"], t["cent"], t["rot"])
    got = np.asarray(tq.paged_decode(*args, **t["kw"], impl="mosaic"), np.float32)
    want = np.asarray(tq.paged_decode(*args, **t["kw"], impl="reference"), np.float32)
    np.testing.assert_array_equal(got[0], 0.0)
    assert rel_l2(got[1:], want[1:]) < 1e-2



@pytest.mark.parametrize("name,bs,cfg,nc", [
    ("turboquant_4bit_nc", 16, MosaicConfig(2, 2), True),
    ("turboquant_4bit_nc", 8, MosaicConfig(3, 3), True),
    ("turboquant_4bit_nc", 32, MosaicConfig(1, 2), False),
    ("turboquant_k8v4", 16, MosaicConfig(2, 2), False),
    ("turboquant_4bit_nc", 16, MosaicConfig(1, 2, True), True),
    ("turboquant_k3v4_nc", 16, MosaicConfig(2, 2), True),
    ("turboquant_3bit_nc", 8, MosaicConfig(3, 3), True),
    ("turboquant_3bit_nc", 32, MosaicConfig(1, 2), False),
    ("turboquant_3bit_nc", 16, MosaicConfig(2, 2, auto_barriers=False), True),
    ("turboquant_k8v4", 16, MosaicConfig(2, 2, auto_barriers=False), False)], ids=str)
def test_vllm_decode_matches_reference(rng, name, bs, cfg, nc):
    """tq.vllm.turboquant_decode (every preset: 3-bit, 4-bit or fp8 keys, 3- or 4-bit values;
    8 KV heads: rows of 816-1568 bytes) on the Mosaic backend against the reference path
    (relative Linf < 2e-3, as the Triton kernel's test) and the Triton-lowered kernel:
    lengths 0, 1, a block boundary, a tile tail and several tiles (one split of 5 with
    ``prefetch``), garbage past each sequence's blocks, norm correction on and off."""
    from test_vllm import write_sequences
    pr = tq.vllm.preset(name, D)
    c, _ = tq.lloyd_max(D, pr.mse_bits)
    pi = tq.hadamard_rotation(D, seed=int(rng.integers(1000)))
    lens = [0, 1, bs, 64 + 7, (4 if cfg.prefetch else 2) * 64 + bs + 3]
    cache, bt, _, _ = write_sequences(rng, pr, lens, 8, D, bs, pi, c, "reference")
    for i, n in enumerate(lens):
        bt[i, -(-n // bs):] = rng.integers(1 << 20, 1 << 30)  # never followed
    q = jnp.asarray(rng.standard_normal((len(lens), 32, D)) * 2, jnp.float16)
    args = (q, cache, bt, np.asarray(lens, np.int32), pi, c, D ** -0.5)
    kw = dict(pr.decode_kwargs(), norm_correction=nc)
    got = np.asarray(tq.vllm.turboquant_decode(*args, **kw, config=cfg, impl="mosaic"),
                     np.float32)
    assert got.shape == q.shape
    np.testing.assert_array_equal(got[0], 0.0)
    ref = np.asarray(tq.vllm.turboquant_decode(*args, **kw, impl="reference"), np.float32)
    assert rel_linf(got[1:], ref[1:]) < 2e-3
    tri = np.asarray(tq.vllm.turboquant_decode(*args, **kw, impl="triton"), np.float32)
    assert rel_linf(got[1:], tri[1:]) < 2e-3


def test_vllm_refusals(rng):
    """What the vLLM-layout Mosaic decode does not serve raises, naming the backend: 2 KV
    heads (a 268-byte row: TMA strides are multiples of 16), bf16 queries, 3-bit codes at 4
    KV heads (a 408-byte row)."""
    from test_vllm import write_sequences
    c, _ = tq.lloyd_max(D, 4)
    pi = tq.hadamard_rotation(D, seed=3)
    for name, hk, dtype in (("turboquant_4bit_nc", 2, jnp.float16),
                            ("turboquant_4bit_nc", 8, jnp.bfloat16),
                            ("turboquant_3bit_nc", 4, jnp.float16)):
        pr = tq.vllm.preset(name, D)
        cb, _ = tq.lloyd_max(D, pr.mse_bits)
        cache, bt, _, _ = write_sequences(rng, pr, [5], hk, D, 16, pi, cb, "reference")
        q = jnp.zeros((1, 4 * hk, D), dtype)
        with pytest.raises(ValueError, match="no Mosaic GPU kernel"):
            tq.vllm.turboquant_decode(q, cache, bt, np.array([5], np.int32), pi, cb, 0.1,
                                      **pr.decode_kwargs(), impl="mosaic")


@pytest.mark.parametrize("name,nc", [("turboquant_4bit_nc", True), ("turboquant_4bit_nc", False),
                                     ("turboquant_k8v4", False), ("turboquant_k3v4_nc", True),
                                     ("turboquant_3bit_nc", True)])
def test_vllm_decode_lowers_for_sm90(name, nc):
    """The vLLM-layout kernel lowers to a Mosaic GPU module on a CPU (fp16 field windows,
    the norm correction's row reduction, the hi/lo query products, fp8 key conversion, the
    3-bit codes re-packed as nibbles through shared memory)."""
    pr = tq.vllm.preset(name, D)
    pi = tq.hadamard_rotation(D, seed=1)
    c = tq.lloyd_max(D, pr.mse_bits)[0]
    s = jax.ShapeDtypeStruct
    args = (s((8, 32, D), jnp.float16), s(pr.cache_shape(600, 16, 8), jnp.uint8),
            s((8, 64), jnp.int32), s((8,), jnp.int32))
    kw = dict(pr.decode_kwargs(), norm_correction=nc)
    text = lower_for_gpu(lambda q, cache, bt, n: tq.vllm.turboquant_decode(
        q, cache, bt, n, pi, c, D ** -0.5, **kw, impl="mosaic"), *args)
    assert "mosaic_gpu" in text and "prmt.b32" in text


@pytest.mark.parametrize("op", ["contiguous", "dense_v", "paged", "vllm_3bit"])
def test_kernels_lower_without_auto_barriers(op):
    """``MosaicConfig(auto_barriers=False)`` (the kernels' own barriers instead of one around
    each shared-memory store) lowers for sm_90 for every kernel, the 3-bit unpack included."""
    cfg = MosaicConfig(2, 2, auto_barriers=False)
    rot, cent = tq.haar_rotation(D), tq.lloyd_max(D, 4)[0]
    s = jax.ShapeDtypeStruct
    q4, u8, f32 = s((2, 8, 1, D), jnp.float16), s((2, 2, 256, D // 2), jnp.uint8), s(
        (2, 2, 256), jnp.float32)
    if op in ("contiguous", "dense_v"):
        v = (u8, f32) if op == "contiguous" else (s((2, 2, 256, D), jnp.float16),)
        fn = tq.flash_attention_tq4_kv if op == "contiguous" else tq.flash_attention_tq4
        text = lower_for_gpu(lambda q, kp, kn, *v: fn(q, kp, kn, *v, cent, rot, config=cfg,
                                                      impl="mosaic"), q4, u8, f32, *v)
    elif op == "paged":
        row = tq.paged_layout(8, D).row_bytes
        text = lower_for_gpu(lambda q, c, bt, n: tq.paged_decode(
            q, c, bt, n, cent, rot, num_kv_heads=8, head_dim=D, block_size=16, config=cfg,
            impl="mosaic"), s((2, 32, D), jnp.float16), s((64, 16, row), jnp.uint8),
            s((2, 16), jnp.int32), s((2,), jnp.int32))
    else:
        pr = tq.vllm.preset("turboquant_3bit_nc", D)
        text = lower_for_gpu(lambda q, c, bt, n: tq.vllm.turboquant_decode(
            q, c, bt, n, tq.hadamard_rotation(D, seed=1), tq.lloyd_max(D, 3)[0], D ** -0.5,
            **pr.decode_kwargs(), config=cfg, impl="mosaic"), s((2, 32, D), jnp.float16),
            s(pr.cache_shape(64, 16, 8), jnp.uint8), s((2, 16), jnp.int32), s((2,), jnp.int32))
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(tq.vllm.PRESETS))
def test_vllm_decode_compiled_on_hopper(rng, name):
    if (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    from test_vllm import write_sequences
    pr = tq.vllm.preset(name, D)
    c, _ = tq.lloyd_max(D, pr.mse_bits)
    pi = tq.hadamard_rotation(D, seed=2)
    lens = [0, 37, 1000, 16]
    cache, bt, _, _ = write_sequences(rng, pr, lens, 8, D, 16, pi, c, "pallas")
    q = jnp.asarray(rng.standard_normal((4, 32, D)) * 2, jnp.float16)
    args = (q, cache, bt, np.asarray(lens, np.int32), pi, c, D ** -0.5)
    got = np.asarray(tq.vllm.turboquant_decode(*args, **pr.decode_kwargs(), impl="mosaic"),
                     np.float32)
    ref = np.asarray(tq.vllm.turboquant_decode(*args, **pr.decode_kwargs(), impl="reference"),
                     np.float32)
    np.testing.assert_array_equal(got[0], 0.0)
    assert rel_linf(got[1:], ref[1:]) < 2e-3


@pytest.mark.parametrize("layout", ["tq4", "turboquant_4bit_nc", "turboquant_k8v4"])
def test_serving_cache_decodes_on_mosaic(rng, layout):
    """The serving manager (PagedKVCache) decodes through the Mosaic backend with
    ``impl="mosaic"``: 8 KV heads at D=128 (a layout every Mosaic kernel serves), two ragged
    sequences appended token by token, vs the manager's reference decode (fp16 kernels:
    relative L2 < 1e-2)."""
    from tq4jax.serving import BlockAllocator, PagedKVCache
    hkv, bs = 8, 16
    cache = PagedKVCache.create(8, 2, 4, num_kv_heads=hkv, head_dim=D, block_size=bs,
                                layout=layout)
    alloc = BlockAllocator.for_cache(cache)
    a, b = alloc.add(), alloc.add()
    ids = np.array([a] * 21 + [b] * 5, np.int32)
    cache, ids = alloc.prepare(cache, ids)
    k = jnp.asarray(rng.standard_normal((len(ids), hkv, D)), jnp.float16)
    v = jnp.asarray(rng.standard_normal((len(ids), hkv, D)), jnp.float16)
    cache = cache.append(k, v, ids, impl="reference")
    q = jnp.asarray(rng.standard_normal((2, 2 * hkv, D)), jnp.float16)
    got = cache.decode(q, impl="mosaic")
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_l2(got, cache.decode(q, impl="reference")) < 1e-2


def test_split_rule_and_auto_rule():
    """The Mosaic split rule gives the split counts measured best on an H200 (bench/RESULTS.md:
    B=1 32K -> 64, B=8 -> 16, B=32 8K -> 4; >= 512 keys per split; at least 1), and ``auto``
    prefers only the vLLM decode from B=8 over >= 8K-key tables."""
    from tq4jax.pallas_mosaic import tuning
    want = {(1, 8, 32768): 64, (8, 8, 32768): 16, (8, 8, 8192): 16, (32, 8, 8192): 4,
            (8, 8, 1024): 2, (1, 1, 100): 1, (512, 8, 32768): 1}
    for (b, h, keys), splits in want.items():
        assert tuning.choose_config(b, h, keys) == MosaicConfig(splits, 2), (b, h, keys)
    assert tuning.prefer("vllm_decode", 8, 8192) and tuning.prefer("vllm_decode", 32, 32768)
    assert not tuning.prefer("vllm_decode", 4, 32768)
    assert not tuning.prefer("vllm_decode", 8, 4096)
    assert not tuning.prefer("paged_decode", 32, 32768)
    assert not tuning.prefer("vllm_decode_3bit", 32, 32768)


def test_auto_dispatches_vllm_decode_to_mosaic_on_hopper(monkeypatch):
    """With an sm_90 GPU (simulated), ``impl="auto"`` routes turboquant_decode to the Mosaic
    kernel at B=8 over a 8K-key table, and to the Triton-lowered one at B=4, on an sm_80 GPU,
    with a Triton DecodeConfig, or for 3-bit codes (served by the Mosaic kernel, not yet
    timed: only ``impl="mosaic"`` takes it there) (traced with jax.eval_shape: no kernel
    runs)."""
    from tq4jax import backend
    from tq4jax.pallas_triton.tuning import DecodeConfig

    class Chosen(Exception):
        pass

    def fake_decode(*args, **kwargs):
        raise Chosen

    cc = [(9, 0)]
    monkeypatch.setattr(backend, "on_gpu", lambda: True)
    monkeypatch.setattr(backend, "compute_capability", lambda: cc[0])
    monkeypatch.setattr(tq.pallas_mosaic.vllm, "decode", fake_decode)
    pi = tq.hadamard_rotation(D, seed=1)
    s = jax.ShapeDtypeStruct

    def run(name, b, blocks, **kw):
        pr = tq.vllm.preset(name, D)
        cb = tq.lloyd_max(D, pr.mse_bits)[0]
        return jax.eval_shape(lambda q, cache, bt, n: tq.vllm.turboquant_decode(
            q, cache, bt, n, pi, cb, D ** -0.5, **pr.decode_kwargs(), **kw),
            s((b, 32, D), jnp.float16), s(pr.cache_shape(64, 16, 8), jnp.uint8),
            s((b, blocks), jnp.int32), s((b,), jnp.int32))

    for name in ("turboquant_4bit_nc", "turboquant_k8v4"):
        with pytest.raises(Chosen):
            run(name, 8, 512)
    assert run("turboquant_4bit_nc", 4, 512).shape == (4, 32, D)
    assert run("turboquant_4bit_nc", 8, 256).shape == (8, 32, D)
    assert run("turboquant_4bit_nc", 8, 512, config=DecodeConfig()).shape == (8, 32, D)
    assert run("turboquant_k3v4_nc", 8, 512).shape == (8, 32, D)
    assert run("turboquant_3bit_nc", 8, 512).shape == (8, 32, D)
    cc[0] = (8, 0)
    assert run("turboquant_4bit_nc", 8, 512).shape == (8, 32, D)


@pytest.mark.gpu
def test_auto_runs_the_mosaic_vllm_decode_on_hopper(rng):
    """On an sm_90+ GPU, ``impl="auto"`` at B=8 over an 8K-key table is the Mosaic kernel
    (bitwise equal to ``impl="mosaic"``) and matches the reference (ragged lengths 0..8192)."""
    if (tq.backend.compute_capability() or (0, 0)) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    from test_vllm import write_sequences
    pr = tq.vllm.preset("turboquant_k8v4", D)
    c, _ = tq.lloyd_max(D, 4)
    pi = tq.hadamard_rotation(D, seed=4)
    lens = [0, 1, 300, 8192, 17, 64, 1000, 2049]
    cache, bt, _, _ = write_sequences(rng, pr, lens, 8, D, 16, pi, c, "pallas")
    assert bt.shape[1] * 16 >= 8192
    q = jnp.asarray(rng.standard_normal((8, 32, D)), jnp.float16)
    args = (q, cache, bt, np.asarray(lens, np.int32), pi, c, D ** -0.5)
    got = {impl: np.asarray(tq.vllm.turboquant_decode(*args, **pr.decode_kwargs(), impl=impl),
                            np.float32) for impl in ("auto", "mosaic", "reference")}
    np.testing.assert_array_equal(got["auto"], got["mosaic"])
    np.testing.assert_array_equal(got["auto"][0], 0.0)
    assert rel_l2(got["auto"][1:], got["reference"][1:]) < 1e-2
