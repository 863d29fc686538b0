"""tq4jax.interop: DLPack round trips with torch tensors (zero copy both ways), the layout
checks on the way in, TQ4Cache <-> CompressedDynamicCache, paged and vLLM caches, and that
``import tq4jax`` does not import torch. The torch tests skip without torch (CI stays green);
tests/test_originals.py compares with the originals' kernels on a GPU."""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tq4jax as tq
from conftest import ON_GPU
from helpers import assert_codes_match, oracle_compress, rel_l2

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
if torch is not None:
    from tq4jax import interop

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
#: Device of the torch tensors handed to tq4jax ops: JAX's (a DLPack array stays on its
#: tensor's device, and a GPU machine runs the ops' kernels on the GPU).
DEV = "cuda" if ON_GPU and torch is not None and torch.cuda.is_available() else "cpu"


def npy(t):
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# generic DLPack conversion
# ----------------------------------------------------------------------------------------------

@needs_torch
def test_from_to_torch_zero_copy_both_ways():
    t = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    a = interop.from_torch(t)
    assert a.shape == (2, 3, 4) and a.dtype == jnp.uint8
    assert a.unsafe_buffer_pointer() == t.data_ptr()  # one buffer
    t[0, 0, 0] = 99  # visible through the alias (why JAX users must copy before writing)
    assert int(a[0, 0, 0]) == 99
    back = interop.to_torch(a)
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
    f = torch.randn(3, 5)
    assert interop.from_torch(f).unsafe_buffer_pointer() == f.data_ptr()
    x = jnp.arange(6, dtype=jnp.float32)
    assert interop.to_torch(x).data_ptr() == x.unsafe_buffer_pointer()


@needs_torch
def test_from_torch_refuses_copies_unless_asked():
    wide = torch.arange(48, dtype=torch.uint8).reshape(4, 12)
    view = wide[:, :8]
    with pytest.raises(ValueError, match="cache.*C-contiguous.*copy=True"):
        interop.from_torch(view, "cache")
    a = interop.from_torch(view, "cache", copy=True)
    np.testing.assert_array_equal(np.asarray(a), view.numpy())
    assert a.unsafe_buffer_pointer() != wide.data_ptr()
    odd = torch.arange(80, dtype=torch.uint8)[1:65]  # 1-byte offset: JAX may copy it
    adopts = jax.dlpack.from_dlpack(odd).unsafe_buffer_pointer() == odd.data_ptr()
    if adopts:
        assert interop.from_torch(odd, "odd").unsafe_buffer_pointer() == odd.data_ptr()
    else:
        with pytest.raises(ValueError, match="odd: JAX copied"):
            interop.from_torch(odd, "odd")
    np.testing.assert_array_equal(interop.from_torch(odd, copy=True), odd.numpy())
    grad = torch.ones(3, requires_grad=True)
    np.testing.assert_array_equal(interop.from_torch(grad), 1.0)  # detached, no error


@needs_torch
def test_conversion_type_errors():
    with pytest.raises(TypeError, match="thing must be a torch.Tensor"):
        interop.from_torch(np.zeros(3), "thing")
    with pytest.raises(TypeError, match="arr must be a concrete jax.Array"):
        interop.to_torch(np.zeros(3), "arr")
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda x: interop.to_torch(x) and x)(jnp.zeros(3))


# ----------------------------------------------------------------------------------------------
# family A, contiguous: TQ4Cache <-> torch tensors / CompressedDynamicCache
# ----------------------------------------------------------------------------------------------

def torch_layers(rng, n_layers, b, h, s, d, bits=4, packed=True):
    cent, bnd = tq.lloyd_max(d, bits)
    rot = tq.haar_rotation(d, seed=int(rng.integers(1 << 30)))
    out = []
    for _ in range(n_layers):
        layer = []
        for _ in "kv":
            x = rng.standard_normal((b, h, s, d)).astype(np.float32)
            codes, norm, _ = oracle_compress(x, rot, bnd)
            codes = codes.astype(np.uint8)
            if packed:
                codes = (codes[..., 0::2] << 4) | codes[..., 1::2]
            # copied into torch's allocator: 64-byte aligned, which JAX's CPU client needs to
            # adopt a buffer (numpy's 16-byte alignment would make it copy)
            layer += [torch.from_numpy(codes).to(DEV, copy=True),
                      torch.from_numpy(norm.astype(np.float32))[..., None].to(DEV, copy=True)]
        out.append(tuple(layer))
    return out, rot, (cent, bnd)


@needs_torch
def test_tq4_cache_round_trip_is_zero_copy(rng):
    layers, rot, cb = torch_layers(rng, 2, 2, 2, 7, 64)
    spec = interop.TQ4DataSpec.of(torch.from_numpy(rot), cb)
    cache = interop.tq4_cache_from_torch(layers, spec)
    assert cache.capacity == 7 and cache.num_layers == 2 and cache.spec == spec
    np.testing.assert_array_equal(cache.lengths[1], [7, 7])
    np.testing.assert_array_equal(cache.spec.rotation, rot)
    for i, (kp, kn, vp, vn) in enumerate(layers):
        assert cache.k_codes[i].unsafe_buffer_pointer() == kp.data_ptr()
        assert cache.k_norms[i].unsafe_buffer_pointer() == kn.data_ptr()
        assert cache.v_codes[i].shape == (2, 2, 7, 32) and cache.v_norms[i].shape == (2, 2, 7)
        np.testing.assert_array_equal(cache.v_norms[i], npy(vn[..., 0]))
    back = interop.tq4_cache_to_torch(cache)
    for mine, orig in zip(back, layers):
        for x, y in zip(mine, orig):
            assert x.data_ptr() == y.data_ptr() and x.shape == y.shape and torch.equal(x, y)


@needs_torch
def test_tq4_cache_from_torch_attends_with_the_given_tables(rng):
    layers, rot, cb = torch_layers(rng, 1, 1, 2, 9, 64)
    cache = interop.tq4_cache_from_torch(layers, interop.TQ4DataSpec.of(rot, cb), capacity=12)
    assert cache.capacity == 12 and int(cache.lengths[0][0]) == 9
    q = jnp.asarray(rng.standard_normal((1, 1, 4, 64)), jnp.float16)  # BTNH, decode-like
    cache = cache.update(0, np.ones((1, 1, 2, 64), np.float16), np.ones((1, 1, 2, 64)))
    out = jax.jit(lambda c, q: c.attend(0, q, is_causal=False))(cache, q)  # spec is static
    kp, kn, vp, vn = (jnp.asarray(npy(x)) for x in layers[0])
    op, on = tq.compress(jnp.ones((1, 2, 1, 64)), rot, cb[1])  # the token update() stored
    cat = lambda a, b: jnp.concatenate([a, b], 2)  # noqa: E731
    want = tq.flash_attention_tq4_kv(jnp.swapaxes(q, 1, 2), cat(kp, op), cat(kn[..., 0], on),
                                     cat(vp, op), cat(vn[..., 0], on), cb[0], rot)
    assert rel_l2(out, jnp.swapaxes(want, 1, 2)) < 1e-2  # fp16 kernel tolerance on a GPU


@needs_torch
def test_tq4_cache_unpacked_codes_need_copy(rng):
    layers, rot, cb = torch_layers(rng, 1, 1, 2, 5, 64, bits=3, packed=False)
    spec = interop.TQ4DataSpec.of(rot, cb)
    assert spec.k_bits == 3 and spec.codebook("k")[0].shape == (8,)
    with pytest.raises(ValueError, match=r"layers\[0\].k_packed holds one code per byte"):
        interop.tq4_cache_from_torch(layers, spec)
    cache = interop.tq4_cache_from_torch(layers, spec, copy=True)
    c = npy(layers[0][0])
    np.testing.assert_array_equal(cache.k_codes[0], (c[..., 0::2] << 4) | c[..., 1::2])


@needs_torch
def test_tq4_cache_layout_checks(rng):
    layers, rot, cb = torch_layers(rng, 2, 2, 2, 5, 64)
    spec = interop.TQ4DataSpec.of(rot, cb)
    kp, kn, vp, vn = layers[0]
    bad = {
        "dtype": ([(kp.to(torch.int8), kn, vp, vn)], TypeError, r"layers\[0\].k_packed.*uint8"),
        "norm dtype": ([(kp, kn.double(), vp, vn)], TypeError, r"k_norms.*float32"),
        "head_dim": ([(kp[..., :16], kn, vp, vn)], ValueError, r"k_packed.*head_dim 64"),
        "rank": ([(kp[0], kn, vp, vn)], ValueError, r"k_packed must be \[batch"),
        "norm shape": ([(kp, kn[:, :, :4], vp, vn)], ValueError, r"k_norms must have shape"),
        "layers differ": ([layers[0], (kp[:, :1], kn[:, :1], vp[:, :1], vn[:, :1])],
                          ValueError, r"layers\[1\].k_packed must have shape"),
        "not a tuple": ([None], ValueError, r"layers\[0\] must be"),
        "empty": ([], ValueError, "at least one layer"),
        "non-contiguous": ([(kp.transpose(2, 3).contiguous().transpose(2, 3)[..., :32], kn, vp,
                             vn)], ValueError, "C-contiguous"),
    }
    for name, (arg, err, msg) in bad.items():
        with pytest.raises(err, match=msg):
            interop.tq4_cache_from_torch(arg, spec)
    with pytest.raises(ValueError, match="capacity"):
        interop.tq4_cache_from_torch(layers, spec, capacity=4)
    with pytest.raises(TypeError, match="spec"):
        interop.tq4_cache_from_torch(layers, None)
    with pytest.raises(ValueError, match="rotation"):
        interop.TQ4DataSpec.of(rot[:, :5], cb)
    with pytest.raises(ValueError, match="k_codebook"):
        interop.TQ4DataSpec.of(rot, (cb[0], cb[1][:3]))
    cache = interop.tq4_cache_from_torch(layers, spec, capacity=8)
    cache = cache.update(0, np.ones((2, 1, 2, 64), np.float16), np.ones((2, 1, 2, 64)),
                         new_lengths=np.array([1, 1], np.int32))
    assert interop.tq4_cache_to_torch(cache)[0][0].shape == (2, 2, 6, 32)  # one length per layer
    cache = dataclasses.replace(cache, lengths=(jnp.array([3, 4], jnp.int32),) * 2)
    with pytest.raises(ValueError, match="different lengths"):
        interop.tq4_cache_to_torch(cache)


@dataclasses.dataclass
class _CompressedLayer:  # turboquant-vllm's per-layer record (kv_cache._CompressedLayer)
    indices: object
    norms: object
    packed: bool


def fake_compressed(layers, rot, cb, bits=4):
    """An object with the attributes interop reads from a CompressedDynamicCache."""
    book = types.SimpleNamespace(centroids=torch.from_numpy(cb[0]),
                                 boundaries=torch.from_numpy(cb[1]))
    comp = types.SimpleNamespace(quantizer=types.SimpleNamespace(codebook=book))
    return types.SimpleNamespace(
        head_dim=rot.shape[0], k_bits=bits, v_bits=bits, rotation=torch.from_numpy(rot),
        key_compressor=comp, value_compressor=comp, fused_mode=True, _seed=42,
        _compressed_keys=[_CompressedLayer(k, kn, bits == 4) for k, kn, _, _ in layers],
        _compressed_values=[_CompressedLayer(v, vn, bits == 4) for _, _, v, vn in layers])


@needs_torch
def test_compressed_dynamic_cache_round_trip(rng):
    layers, rot, cb = torch_layers(rng, 2, 1, 2, 6, 64)
    src = fake_compressed(layers, rot, cb)
    cache = interop.tq4_cache_from_compressed(src)
    assert cache.k_codes[1].unsafe_buffer_pointer() == layers[1][0].data_ptr()
    cache = interop.tq4_cache_from_compressed(src, capacity=9)
    x = rng.standard_normal((1, 3, 2, 64)).astype(np.float16)
    cache = cache.update(0, x, x).update(1, x, x)
    interop.load_into_compressed(cache, src)
    got = src._compressed_keys[0]
    assert isinstance(got, _CompressedLayer) and got.packed and got.indices.shape == (1, 2, 9, 32)
    assert torch.equal(got.indices[:, :, :6], layers[0][0]) and got.norms.shape == (1, 2, 9, 1)
    new, norm, y = oracle_compress(x.astype(np.float32).swapaxes(1, 2), rot, cb[1])
    assert_codes_match(npy(got.indices[:, :, 6:]), (new[..., 0::2] << 4) | new[..., 1::2], y,
                       cb[1])
    other = fake_compressed(layers, tq.haar_rotation(64, seed=1), cb)
    with pytest.raises(ValueError, match="another rotation"):
        interop.load_into_compressed(cache, other)
    src._compressed_keys[1] = None
    with pytest.raises(ValueError, match="layer 1 has no compressed data"):
        interop.tq4_cache_from_compressed(src)
    with pytest.raises(TypeError, match="CompressedDynamicCache"):
        interop.tq4_cache_from_compressed(object())


@needs_torch
def test_real_compressed_dynamic_cache(rng):
    """With turboquant-vllm importable (its pure-torch path runs on a CPU): codes written by
    the original are read by tq4jax and tq4jax's codes are read back by it. CPU tensors, so
    the tq4jax side runs the reference path (JAX arrays stay on their tensor's device)."""
    kv_cache = pytest.importorskip("turboquant_vllm.kv_cache",
                                   reason="turboquant-vllm (and scipy) not importable")

    class Layer:  # the HF DynamicLayer API the wrapper touches
        is_initialized = False

        def lazy_initialization(self, k, v):
            self.is_initialized = True

    class Dynamic:  # minimal transformers.DynamicCache stand-in
        layer_class_to_replicate = Layer

        def __init__(self):
            self.layers = []

        def update(self, k, v, i, kw=None):
            return k, v

        def get_seq_length(self, i=0):
            return 0

    for bits in (4, 3):
        dyn = Dynamic()
        cdc = kv_cache.CompressedDynamicCache(dyn, head_dim=64, bits=bits)
        x = torch.from_numpy(rng.standard_normal((2, 2, 5, 64)).astype(np.float16))
        for layer in range(2):
            dyn.update(x, x * 2, layer)  # original compresses (torch quantizer)
        cache = interop.tq4_cache_from_compressed(cdc, capacity=7, copy=bits != 4)
        np.testing.assert_array_equal(cache.spec.rotation, cdc.rotation.numpy())
        cb = cache.spec.codebook("k")
        hat = tq.dequantize(cache.k_codes[1], cache.k_norms[1], cb[0], cache.spec.rotation,
                            jnp.float32, impl="reference")[:, :, :5]
        assert rel_l2(hat, cdc._decompressed_k[1].float().numpy()) < 1e-3  # fp16-stored there
        y = rng.standard_normal((2, 2, 2, 64)).astype(np.float16)  # BTNH
        cache = cache.update(0, y, y, impl="reference").update(1, y, y, impl="reference")
        interop.load_into_compressed(cache, cdc)
        assert cdc.get_compressed(0)[0].shape[2] == 7 and cdc._decompressed_k[0].shape[2] == 7
        theirs = cdc._compress_tensor(cdc.key_compressor, torch.from_numpy(y).transpose(1, 2),
                                      nibble_packed=bits == 4)
        mine = cdc._compressed_keys[0].indices[:, :, 5:].numpy()
        want = theirs.indices.numpy()
        _, _, rotated = oracle_compress(y.astype(np.float32).swapaxes(1, 2), cache.spec.rotation,
                                        cb[1])
        if bits != 4:  # one code per byte there; compare as nibbles
            mine, want = ((a[..., 0::2] << 4) | a[..., 1::2] for a in (mine, want))
        assert_codes_match(mine, want, rotated, cb[1])  # ties: original down, kernel up


# ----------------------------------------------------------------------------------------------
# paged caches
# ----------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("padded", [False, True])
def test_paged_cache_round_trip(rng, padded):
    h, d, bs = 2, 64, 4
    row = tq.paged_layout(h, d).row_bytes
    width = h * 2 ** math.ceil(math.log2(d + 8)) if padded else row  # vLLM backend padding
    t = torch.zeros(6, bs, width, dtype=torch.uint8, device=DEV)
    cache = interop.paged_cache_from_torch(t, h, d, block_size=bs)
    assert cache.unsafe_buffer_pointer() == t.data_ptr() and cache.shape == (6, bs, width)
    rot, (cent, bnd) = tq.haar_rotation(d, seed=5), tq.lloyd_max(d, 4)
    k = jnp.asarray(rng.standard_normal((8, h, d)), jnp.float16)
    tb = dict(total_bytes=width) if padded else {}
    cache = tq.paged_write(cache, k, k, jnp.arange(8, dtype=jnp.int32) + 4, rot, bnd, **tb)
    out = interop.paged_cache_to_torch(cache, h, d)
    assert out.shape == (6, bs, width)
    q = jnp.asarray(rng.standard_normal((1, 4, d)), jnp.float16)
    table, lens = jnp.array([[1, 2, 0]], jnp.int32), jnp.array([8], jnp.int32)
    kw = dict(num_kv_heads=h, head_dim=d, block_size=bs, impl="reference", **tb)
    again = interop.paged_cache_from_torch(out, h, d)
    np.testing.assert_array_equal(tq.paged_decode(q, again, table, lens, cent, rot, **kw),
                                  tq.paged_decode(q, cache, table, lens, cent, rot, **kw))


@needs_torch
def test_paged_cache_checks():
    h, d = 2, 64
    row = tq.paged_layout(h, d).row_bytes
    ok = torch.zeros(3, 4, row, dtype=torch.uint8)
    with pytest.raises(TypeError, match="kv_cache must have dtype torch.uint8"):
        interop.paged_cache_from_torch(ok.to(torch.int8), h, d)
    with pytest.raises(ValueError, match=r"kv_cache must be \[num_blocks"):
        interop.paged_cache_from_torch(ok[0], h, d)
    with pytest.raises(ValueError, match=f"at least {2 * row} bytes.*num_kv_heads"):
        interop.paged_cache_from_torch(ok, 4, d)
    with pytest.raises(ValueError, match="block_size 8"):
        interop.paged_cache_from_torch(ok, h, d, block_size=8)
    with pytest.raises(ValueError, match="C-contiguous"):
        interop.paged_cache_from_torch(torch.zeros(3, 4, row + 16, dtype=torch.uint8)[..., :row],
                                       h, d)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        interop.paged_cache_from_torch(ok, 0, d)
    with pytest.raises(TypeError, match=r"kv_cache must have dtype uint8"):
        interop.paged_cache_to_torch(jnp.zeros((3, 4, row), jnp.int8), h, d)
    with pytest.raises(TypeError, match="torch.Tensor"):
        interop.paged_cache_from_torch(np.zeros((3, 4, row), np.uint8), h, d)


@needs_torch
@pytest.mark.parametrize("name", ["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4"])
def test_vllm_cache_round_trip(rng, name):
    d, hk, bs = 64, 2, 4
    pr = tq.vllm.preset(name, d)
    t = torch.zeros(pr.cache_shape(3, bs, hk), dtype=torch.uint8, device=DEV)
    for layout in (name, pr, tq.vllm.vllm_slot(d, pr.mse_bits, pr.value_quant_bits,
                                                pr.key_packed_size, pr.key_fp8)):
        a = interop.vllm_cache_from_torch(t, layout, d, num_kv_heads=hk, block_size=bs)
        assert a.unsafe_buffer_pointer() == t.data_ptr()
    cent, _ = tq.vllm.codebook(d, pr.mse_bits)
    pi = tq.hadamard_rotation(d, seed=1)
    k = rng.standard_normal((6, hk, d)).astype(np.float32)
    a = tq.vllm.turboquant_store(a, k, k, np.arange(6, dtype=np.int32), pi, cent,
                                 **pr.store_kwargs(), impl="reference")
    back = interop.vllm_cache_to_torch(a, pr)
    assert back.shape == t.shape and back.dtype == torch.uint8
    q = jnp.asarray(rng.standard_normal((1, 4, d)), jnp.float16)
    args = (np.array([[0, 1]], np.int32), np.array([6], np.int32), pi, cent, 1 / 8)
    again = interop.vllm_cache_from_torch(back, name, d)
    np.testing.assert_array_equal(
        tq.vllm.turboquant_decode(q, again, *args, **pr.decode_kwargs(), impl="reference"),
        tq.vllm.turboquant_decode(q, a, *args, **pr.decode_kwargs(), impl="reference"))


@needs_torch
def test_vllm_cache_checks():
    pr = tq.vllm.preset("turboquant_4bit_nc", 128)
    t = torch.zeros(pr.cache_shape(2, 16, 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"slots must be {pr.slot_bytes} bytes"):
        interop.vllm_cache_from_torch(t[..., :-2].contiguous(), pr)
    with pytest.raises(ValueError, match="num_kv_heads 8"):
        interop.vllm_cache_from_torch(t, pr, num_kv_heads=8)
    with pytest.raises(ValueError, match="head_dim is required"):
        interop.vllm_cache_from_torch(t, "turboquant_4bit_nc")
    with pytest.raises(ValueError, match="preset name"):
        interop.vllm_cache_from_torch(t, "turboquant_9bit", 128)
    with pytest.raises(ValueError, match="head_dim 64 differs"):
        interop.vllm_cache_from_torch(t, pr, 64)
    with pytest.raises(TypeError, match="layout must be"):
        interop.vllm_cache_from_torch(t, 4)
    with pytest.raises(TypeError, match="torch.uint8"):
        interop.vllm_cache_from_torch(t.float(), pr)
    with pytest.raises(ValueError, match=r"\[num_blocks, block_size, H_KV, slot\]"):
        interop.vllm_cache_from_torch(t[0], pr)
    with pytest.raises(ValueError, match="C-contiguous"):
        interop.vllm_cache_from_torch(t.transpose(1, 2), pr)


def test_import_tq4jax_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, tq4jax, tq4jax.interop, tq4jax.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
