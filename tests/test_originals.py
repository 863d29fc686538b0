"""GPU only: the PyTorch/Triton originals (turboquant-vllm's kernels) against tq4jax's ports on
the same inputs, and caches handed across both ways. Skipped with a reason without a CUDA GPU,
torch, triton or turboquant-vllm (``../shared/tools/gpu_wheels.sh`` fetches the wheels)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from helpers import assert_codes_match, oracle_compress, rel_l2
from tq4jax import verify

try:
    from tq4jax import interop
except ImportError:  # pragma: no cover
    interop = None

# ----------------------------------------------------------------------------------------------
# GPU only: the originals (turboquant-vllm's Triton kernels) against tq4jax on the same inputs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def orig():
    try:
        o = verify.load_originals()
    except ImportError as e:
        pytest.skip(f"the originals are not importable: {e} (shared/tools/gpu_wheels.sh)")
    if not o.torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return o


def cu(o, x):
    """numpy/JAX -> torch CUDA (a copy: the inputs stay independent)."""
    return o.torch.from_numpy(np.array(x)).cuda()


def np32(x):
    return x.float().cpu().numpy() if hasattr(x, "cpu") else np.asarray(x, np.float32)


def split_rotation(o, rot):
    """tq4_compress's rotation arguments: even / odd columns of rotation^T."""
    rt = cu(o, rot).T
    return rt[:, 0::2].contiguous(), rt[:, 1::2].contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_compress_vs_original(orig, rng, d, bits):
    x = rng.standard_normal((37, 4, d)).astype(np.float16)
    x[0, 0] = 0  # zero vector: every coordinate on the middle boundary (both round up)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    _, bnd = tq.lloyd_max(d, bits)
    pk, nk = orig.tq4_compress(cu(orig, x), *split_rotation(orig, rot), cu(orig, bnd))
    mine, norms = tq.compress(x, rot, bnd)
    _, _, rotated = oracle_compress(x.astype(np.float32), rot, bnd)
    # bytes identical except where the rotated value is within 1e-5 of a boundary (fp32
    # reduction order differs); norms agree to float32 rounding of the sums (1e-6 relative)
    assert_codes_match(np.asarray(mine), pk.cpu().numpy(), rotated, bnd)
    np.testing.assert_allclose(np.asarray(norms), np32(nk)[..., 0], rtol=1e-6)
    # and what tq4jax wrote, the original's decompress reads back (rotated space, fp16)
    cent, _ = tq.lloyd_max(d, bits)
    theirs = orig.tq4_decompress(cu(orig, mine), cu(orig, norms)[..., None], cu(orig, cent))
    ours = tq.decompress(mine, norms, cent, jnp.float16)
    np.testing.assert_allclose(np32(theirs), np.asarray(ours, np.float32), rtol=1e-3, atol=1e-3)


ATTN = [  # b, hq, hkv, sq, sk, d, causal (causal needs sq == sk: the originals align the
          # causal mask top-left, tq4jax bottom-right; they agree when the lengths match)
    (1, 4, 4, 64, 64, 64, True), (2, 8, 2, 37, 37, 96, True), (1, 8, 2, 1, 300, 128, False),
    (2, 4, 1, 19, 130, 128, False), (1, 32, 8, 256, 256, 128, True)]


def attn_inputs(rng, b, hq, hkv, sq, sk, d):
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float16)
    k = (rng.standard_normal((b, hkv, sk, d)) * 1.5).astype(np.float16)
    v = rng.standard_normal((b, hkv, sk, d)).astype(np.float16)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    kp, kn = tq.compress(k, rot, bnd)
    vp, vn = tq.compress(v, rot, bnd)
    return q, k, v, rot, cent, kp, kn, vp, vn


# Tolerance of the attention comparisons: both sides run fp16 tensor-core dots with float32
# accumulation and online softmax; each is within ~0.3% (relative L2) of float64 attention on
# the same decoded K/V, so they differ by well under 1e-2 (the repo's fp16 kernel tolerance).
ATTN_TOL = 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ATTN, ids=lambda s: "x".join(map(str, s)))
def test_flash_attention_variants_vs_original(orig, rng, shape):
    b, hq, hkv, sq, sk, d, causal = shape
    q, k, v, rot, cent, kp, kn, vp, vn = attn_inputs(rng, b, hq, hkv, sq, sk, d)
    scale = 0.9 / np.sqrt(d)
    c = lambda x: cu(orig, x)  # noqa: E731
    pairs = {
        "flash_attention": (orig.triton_flash_attention(c(q), c(k), c(v), scale, causal),
                            tq.flash_attention(q, k, v, scale, causal)),
        # the original's argument order: (q, k_packed, k_norms, centroids, rotation, v)
        "flash_attention_tq4": (
            orig.triton_flash_attention_tq4(c(q), c(kp), c(kn), c(cent), c(rot), c(v), scale,
                                            causal),
            tq.flash_attention_tq4(q, kp, kn, v, cent, rot, scale, causal)),
        "flash_attention_tq4_kv": (
            orig.triton_flash_attention_tq4_kv(c(q), c(kp), c(kn)[..., None], c(vp), c(vn),
                                               c(cent), c(rot), scale, causal),
            tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot, scale, causal)),
    }
    for name, (theirs, ours) in pairs.items():
        assert rel_l2(ours, np32(theirs)) < ATTN_TOL, name
    if not causal:  # additive mask [B, 1, Sq, Sk] (the original's mask path)
        mask = np.where(rng.random((b, 1, sq, sk)) < 0.2, -1e4, 0.0).astype(np.float16)
        theirs = orig.triton_flash_attention(c(q), c(k), c(v), scale, False, c(mask))
        ours = tq.flash_attention(q, k, v, scale, False, attention_mask=mask)
        assert rel_l2(ours, np32(theirs)) < ATTN_TOL


def paged_inputs(rng, lens, hq, hkv, d, bs, padded=False):
    """A paged cache written by tq.paged_write (shuffled blocks) + queries and tables."""
    nbs = [-(-n // bs) for n in lens]
    n_blocks = sum(nbs) + 3
    row = tq.paged_layout(hkv, d).row_bytes
    width = hkv * 2 ** math.ceil(math.log2(d + 8)) if padded else row
    perm = rng.permutation(n_blocks)
    table = np.zeros((len(lens), max(nbs)), np.int32)
    keys, slots, used = [], [], 0
    for s, (n, nb) in enumerate(zip(lens, nbs)):
        table[s, :nb] = perm[used:used + nb]
        used += nb
        t = np.arange(n)
        slots.append(table[s, t // bs] * bs + t % bs)
        keys.append(rng.standard_normal((n, hkv, d)))
    k = np.concatenate(keys).astype(np.float16)
    v = rng.standard_normal(k.shape).astype(np.float16)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    cent, bnd = tq.lloyd_max(d, 4)
    cache = jnp.zeros((n_blocks, bs, width), jnp.uint8)
    tb = dict(total_bytes=width) if padded else {}
    cache = tq.paged_write(cache, k, v, np.concatenate(slots).astype(np.int32), rot, bnd, **tb)
    return dict(k=k, v=v, slots=np.concatenate(slots), table=table, cent=cent, bnd=bnd, rot=rot,
                lens=np.asarray(lens, np.int32), cache=cache, tb=tb,
                kw=dict(num_kv_heads=hkv, head_dim=d, block_size=bs, **tb))


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_paged_decode_vs_original(orig, rng, d, padded):
    hq, hkv, bs = 8, 2, 16
    p = paged_inputs(rng, [100, 1, 33, 257], hq, hkv, d, bs, padded)
    q = rng.standard_normal((4, hq, d)).astype(np.float16)
    c = lambda x: cu(orig, x)  # noqa: E731
    theirs = orig.fused_paged_tq4_decode(c(q), interop.paged_cache_to_torch(p["cache"], hkv, d),
                                         c(p["table"]), c(p["lens"]), c(p["cent"]), c(p["rot"]),
                                         hkv, d, bs)
    ours = tq.paged_decode(q, p["cache"], p["table"], p["lens"], p["cent"], p["rot"], **p["kw"])
    assert rel_l2(ours, np32(theirs)) < ATTN_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 200])
def test_paged_int8_prefill_vs_original(orig, rng, n):
    # the original prefill takes one sequence whose new tokens are all of it (its causal mask
    # puts query i at position i), so: one sequence, query_start_loc [0, n], seq_lens [n].
    # Tolerance: both quantize Q and K to int8 for Q @ K^T. The original scales per 64-row Q
    # tile and per K tile by absmax and rounds with (x / s + 0.5).to(int8), which truncates
    # toward zero (negative values biased by half a step): a numpy emulation of it is 2.2-2.5%
    # (relative L2) from exact attention at these shapes; tq4jax (per query row, K by the
    # codebook's int8 levels, round to nearest) is 0.6%. Hence 4e-2 against the original and
    # against exact for it, 1.5e-2 for tq4jax against exact.
    hq, hkv, d, bs = 8, 2, 128, 16
    p = paged_inputs(rng, [n], hq, hkv, d, bs)
    q = rng.standard_normal((n, hq, d)).astype(np.float16)
    c = lambda x: cu(orig, x)  # noqa: E731
    theirs = orig.fused_paged_tq4_int8_prefill(
        c(q), interop.paged_cache_to_torch(p["cache"], hkv, d), c(p["table"]), c(p["lens"]),
        c(p["cent"]), c(p["rot"]), hkv, d, bs)
    qsl = np.array([0, n], np.int32)
    args = (q, p["cache"], p["table"], p["lens"], qsl, p["cent"], p["rot"])
    ours = tq.paged_prefill(*args, **p["kw"], use_int8_qk=True)
    exact = tq.paged_prefill(*args, **p["kw"], impl="reference")
    assert rel_l2(ours, np32(theirs)) < 4e-2
    assert rel_l2(np32(theirs), exact) < 4e-2 and rel_l2(ours, exact) < 1.5e-2


@pytest.mark.gpu
def test_paged_cache_written_by_original_read_by_tq4jax_and_back(orig, rng):
    """The original's store path (TQ4AttentionImpl._compress_and_store: tq4_compress, then
    [K codes | K norms | V codes | V norms] rows scattered by slot_mapping into a padded
    cache) -> tq4jax decodes it; tq4jax's paged_write -> the original decodes it."""
    torch = orig.torch
    hq, hkv, d, bs = 8, 2, 128, 16
    p = paged_inputs(rng, [70, 5, 129], hq, hkv, d, bs, padded=True)
    width, n = p["cache"].shape[-1], p["k"].shape[0]
    even, odd = split_rotation(orig, p["rot"])
    kp, kn = orig.tq4_compress(cu(orig, p["k"]), even, odd, cu(orig, p["bnd"]))
    vp, vn = orig.tq4_compress(cu(orig, p["v"]), even, odd, cu(orig, p["bnd"]))
    rows = torch.cat([kp.reshape(n, -1), kn.reshape(n, hkv).contiguous().view(torch.uint8),
                      vp.reshape(n, -1), vn.reshape(n, hkv).contiguous().view(torch.uint8)], 1)
    theirs = torch.zeros(p["cache"].shape, dtype=torch.uint8, device="cuda")
    theirs.view(-1, width)[cu(orig, p["slots"]).long(), :rows.shape[1]] = rows
    cache = interop.paged_cache_from_torch(theirs, hkv, d, block_size=bs)  # zero-copy
    assert cache.unsafe_buffer_pointer() == theirs.data_ptr()
    lay = tq.paged_layout(hkv, d)
    got, want = np.asarray(cache), np.asarray(p["cache"])
    np.testing.assert_array_equal(got[..., lay.row_bytes:], 0)  # padding untouched
    np.testing.assert_allclose(got[..., lay.k_norms:lay.v_codes].copy().view(np.float32),
                               want[..., lay.k_norms:lay.v_codes].copy().view(np.float32),
                               rtol=1e-6)
    q = rng.standard_normal((3, hq, d)).astype(np.float16)
    args = (p["table"], p["lens"], p["cent"], p["rot"])
    ours_on_theirs = tq.paged_decode(q, cache, *args, **p["kw"])
    ours_on_ours = tq.paged_decode(q, p["cache"], *args, **p["kw"])
    assert rel_l2(ours_on_theirs, ours_on_ours) < 1e-3  # codes differ only at boundary ties
    theirs_on_ours = orig.fused_paged_tq4_decode(
        cu(orig, q), interop.paged_cache_to_torch(p["cache"], hkv, d), cu(orig, p["table"]),
        cu(orig, p["lens"]), cu(orig, p["cent"]), cu(orig, p["rot"]), hkv, d, bs)
    assert rel_l2(ours_on_ours, np32(theirs_on_ours)) < ATTN_TOL


@pytest.mark.gpu
def test_contiguous_cache_written_by_original_read_by_tq4jax(orig, rng):
    """Codes/norms from the original's tq4_compress in the [B, H, S, D/2] layout its fused
    attention reads -> a TQ4Cache (zero-copy) -> tq4jax attention equals the original's."""
    torch = orig.torch
    b, hq, hkv, s, d = 2, 8, 2, 48, 128
    q, k, v, rot, cent, *_ = attn_inputs(rng, b, hq, hkv, s, s, d)
    _, bnd = tq.lloyd_max(d, 4)
    even, odd = split_rotation(orig, rot)
    packed = []
    for x in (k, v):  # [B, H, S, D] -> tq4_compress takes [N, H, D]
        p, n = orig.tq4_compress(cu(orig, x).transpose(1, 2).reshape(b * s, hkv, d), even, odd,
                                 cu(orig, bnd))
        packed += [p.reshape(b, s, hkv, -1).transpose(1, 2).contiguous(),
                   n.reshape(b, s, hkv, 1).transpose(1, 2).contiguous()]
    spec = interop.TQ4DataSpec.of(rot, tq.lloyd_max(d, 4))
    cache = interop.tq4_cache_from_torch([tuple(packed)], spec)
    ours = cache.attend(0, jnp.swapaxes(q, 1, 2))  # BTNH, causal, queries = all positions
    theirs = orig.triton_flash_attention_tq4_kv(cu(orig, q), *packed, cu(orig, cent),
                                                cu(orig, rot), None, True)
    assert rel_l2(jnp.swapaxes(ours, 1, 2), np32(theirs)) < ATTN_TOL
    back = interop.tq4_cache_to_torch(cache)[0]
    assert all(x.data_ptr() == y.data_ptr() for x, y in zip(back, packed))
    assert torch.equal(back[0], packed[0])


# ----------------------------------------------------------------------------------------------
# GPU only: the originals' own @triton.jit kernels on JAX arrays (jax-triton), in one jax.jit
# with tq4jax's kernels (tq4jax.triton_originals; no torch tensors on that path)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jt():
    from tq4jax import triton_originals
    reason = triton_originals.available()
    if reason is not None:
        pytest.skip(f"the originals cannot run through jax-triton here: {reason}")
    return triton_originals


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 96, 128])
def test_jax_triton_compress_in_one_jit(jt, rng, d):
    x = rng.standard_normal((37, 4, d)).astype(np.float16)
    x[0, 0] = 0
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    _, bnd = tq.lloyd_max(d, 4)
    both = jax.jit(lambda x: (tq.compress(x, rot, bnd), jt.compress(x, rot, bnd)))
    (mine, mn), (theirs, tn) = both(jnp.asarray(x))
    _, _, rotated = oracle_compress(x.astype(np.float32), rot, bnd)
    # as test_compress_vs_original: bytes equal except at boundary ties, norms to 1e-6
    assert_codes_match(np.asarray(mine), np.asarray(theirs), rotated, bnd)
    np.testing.assert_allclose(np.asarray(mn), np.asarray(tn), rtol=1e-6)
    # jax-triton's import blanks TRITON_CACHE_DIR, which breaks torch-launched triton kernels
    # in the same process; tq4jax.triton_originals puts the caller's setting back
    assert os.environ.get("TRITON_CACHE_DIR") != ""


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_jax_triton_paged_decode_in_one_jit(jt, orig, rng, padded):
    hq, hkv, d, bs = 8, 2, 128, 16
    p = paged_inputs(rng, [100, 1, 33, 257], hq, hkv, d, bs, padded)
    q = jnp.asarray(rng.standard_normal((4, hq, d)), jnp.float16)
    args = (p["table"], p["lens"], p["cent"], p["rot"])
    both = jax.jit(lambda q, c: (tq.paged_decode(q, c, *args, **p["kw"]),
                                 jt.paged_decode(q, c, *args, hkv, d, bs)))
    ours, theirs = both(q, p["cache"])
    assert rel_l2(ours, np.asarray(theirs, np.float32)) < ATTN_TOL
    # the same kernel launched by torch: its autotuner may pick another warp count than
    # jax-triton's, and the original reduces q . k in fp16 (tl.sum of fp16 products), so the
    # two launches need not agree bit for bit; each is within ATTN_TOL of tq4jax, so within
    # twice that of each other
    c = lambda x: cu(orig, x)  # noqa: E731
    torch_run = orig.fused_paged_tq4_decode(c(q), interop.paged_cache_to_torch(p["cache"], hkv, d),
                                            c(p["table"]), c(p["lens"]), c(p["cent"]),
                                            c(p["rot"]), hkv, d, bs)
    assert rel_l2(ours, np32(torch_run)) < ATTN_TOL
    assert rel_l2(theirs, np32(torch_run)) < 2 * ATTN_TOL
