"""Every original turboquant-vllm Triton kernel beside its tq4jax port, on the same inputs, in
one table: time per call, ratio, and the largest difference of the outputs.

Originals (torch tensors that share the JAX arrays' buffers, ``tq4jax.interop.to_torch``):
``tq4_compress``, ``tq4_decompress``, ``triton_flash_attention`` / ``_tq4`` / ``_tq4_kv``
(prefill, causal), ``fused_paged_tq4_decode``, ``fused_paged_tq4_int8_prefill`` (one sequence:
the kernel takes one). Their legacy ``fused_qk_scores`` (scores only, superseded upstream) has
no port and is left out. 32/8 heads, D=128, fp16, 4-bit codebook, block 16.

Times (ms, median): original = CUDA-graph replays (device time, ``bench/attention.torch_ms``);
tq4jax kernel = GPU kernel time per call from a profiler trace (``_timing.device_ms``, XLA glue
such as the decode's q rotation included); tq4jax jit = enqueued jit calls, host dispatch
included. ratio = original / tq4jax kernel (> 1: tq4jax faster). Differences: codes = fraction
of code bytes that differ (boundary ties; the compress kernels round the same way), else
max |tq4jax - original| and the relative L2 difference.

    PYTHONPATH=. python3 bench/originals.py [--quick]

GPU only: on a machine without a CUDA GPU it says so and exits 0; on a GPU without the
originals (``../shared/tools/gpu_wheels.sh``) it says what is missing and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from tq4jax.backend import on_gpu  # noqa: E402
from _timing import device_line, device_ms, time_ms  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


def diff(ours, theirs) -> tuple[float, float]:
    a = np.asarray(jnp.asarray(ours, jnp.float32), np.float64)
    b = np.asarray(theirs.float().cpu().numpy(), np.float64)
    return float(np.max(np.abs(a - b))), float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cases(o, quick: bool):
    """Yield (kernel, shape, original callable, tq4jax jit-ed fn, its args, compare)."""
    from tq4jax.interop import paged_cache_to_torch, to_torch

    torch = o.torch
    rng = np.random.default_rng(0)
    rot = tq.haar_rotation(D, seed=42)  # numpy: concrete tables are compiled in
    cent, bnd = tq.lloyd_max(D, 4)
    t = lambda x: to_torch(jnp.asarray(x))  # noqa: E731  (zero-copy on the GPU)
    trot, tcent, tbnd = t(rot), t(cent), t(bnd)
    even, odd = trot.T[:, 0::2].contiguous(), trot.T[:, 1::2].contiguous()

    n = 1024 if quick else 8192  # compress / decompress tokens
    x = jnp.asarray(rng.standard_normal((n, HKV, D)), jnp.float16)
    tx = t(x)
    compress = jax.jit(lambda x: tq.compress(x, rot, bnd))
    kp, kn = compress(x)

    def codes(ours, theirs):
        return float(np.mean(np.asarray(ours[0]) != theirs[0].cpu().numpy())), \
            diff(ours[1], theirs[1][..., 0])[1]

    yield ("tq4_compress", f"{n}x{HKV}x{D}", lambda: o.tq4_compress(tx, even, odd, tbnd),
           compress, (x,), codes)
    tkp, tkn = t(kp), t(kn)[..., None]
    yield ("tq4_decompress", f"{n}x{HKV}x{D}",
           lambda: o.tq4_decompress(tkp, tkn, tcent, torch.float16),
           jax.jit(lambda p, m: tq.decompress(p, m, cent, jnp.float16)), (kp, kn), None)

    s = 1024 if quick else 4096  # prefill, causal, B=1 (Sq == Sk: both align causal alike)
    q = jnp.asarray(rng.standard_normal((1, HQ, s, D)), jnp.float16)
    k = jnp.asarray(rng.standard_normal((1, HKV, s, D)), jnp.float16)
    v = jnp.asarray(rng.standard_normal((1, HKV, s, D)), jnp.float16)
    (kp, kn), (vp, vn) = compress(k), compress(v)
    tq_, tk, tv, tkp, tkn, tvp, tvn = map(t, (q, k, v, kp, kn, vp, vn))
    shape = f"B=1 {HQ}/{HKV}x{s}x{D} causal"
    yield ("triton_flash_attention", shape,
           lambda: o.triton_flash_attention(tq_, tk, tv, None, True),
           jax.jit(lambda q, k, v: tq.flash_attention(q, k, v, None, True)), (q, k, v), None)
    yield ("triton_flash_attention_tq4", shape,
           lambda: o.triton_flash_attention_tq4(tq_, tkp, tkn, tcent, trot, tv, None, True),
           jax.jit(lambda q, kp, kn, v: tq.flash_attention_tq4(q, kp, kn, v, cent, rot, None,
                                                               True)), (q, kp, kn, v), None)
    yield ("triton_flash_attention_tq4_kv", shape,
           lambda: o.triton_flash_attention_tq4_kv(tq_, tkp, tkn, tvp, tvn, tcent, trot, None,
                                                   True),
           jax.jit(lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(
               q, kp, kn, vp, vn, cent, rot, None, True)), (q, kp, kn, vp, vn), None)

    b, ctx = (8, 2048) if quick else (8, 8192)  # paged decode: shuffled blocks
    nb = ctx // BS
    table = jnp.asarray(rng.permutation(b * nb).reshape(b, nb), jnp.int32)
    lens = jnp.full((b,), ctx, jnp.int32)
    cache = jnp.zeros((b * nb, BS, tq.paged_layout(HKV, D).row_bytes), jnp.uint8)
    kk = jnp.asarray(rng.standard_normal((b * ctx, HKV, D)), jnp.float16)
    vv = jnp.asarray(rng.standard_normal((b * ctx, HKV, D)), jnp.float16)
    slots = (table[:, :, None] * BS + jnp.arange(BS)).reshape(-1)
    cache = jax.jit(lambda c, k, v, s: tq.paged_write(c, k, v, s, rot, bnd))(cache, kk, vv, slots)
    qd = jnp.asarray(rng.standard_normal((b, HQ, D)), jnp.float16)
    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    tc, tqd, ttab, tlen = paged_cache_to_torch(cache, HKV, D), t(qd), t(table), t(lens)
    yield ("fused_paged_tq4_decode", f"B={b} ctx {ctx}",
           lambda: o.fused_paged_tq4_decode(tqd, tc, ttab, tlen, tcent, trot, HKV, D, BS),
           jax.jit(lambda q, c, bt, ln: tq.paged_decode(q, c, bt, ln, cent, rot, **kw)),
           (qd, cache, table, lens), None)

    m = 1024 if quick else 2048  # one sequence, all of it new (the original's causal rule)
    qp = jnp.asarray(rng.standard_normal((m, HQ, D)), jnp.float16)
    tab1, len1 = table[:1, :m // BS], jnp.array([m], jnp.int32)
    qsl = jnp.array([0, m], jnp.int32)
    tqp, ttab1, tlen1 = t(qp), t(tab1), t(len1)
    yield ("fused_paged_tq4_int8_prefill", f"1 seq x {m} tokens, int8 QK",
           lambda: o.fused_paged_tq4_int8_prefill(tqp, tc, ttab1, tlen1, tcent, trot, HKV, D, BS),
           jax.jit(lambda q, c, bt, ln, ql: tq.paged_prefill(q, c, bt, ln, ql, cent, rot, **kw,
                                                             use_int8_qk=True)),
           (qp, cache, tab1, len1, qsl), None)


def main() -> int:
    ap = argparse.ArgumentParser(description="the originals beside their tq4jax ports")
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    a = ap.parse_args()
    if not on_gpu():
        print(f"bench/originals.py times CUDA kernels: JAX sees no GPU (backend "
              f"{jax.default_backend()}); nothing to do.")
        return 0
    from tq4jax.verify import load_originals
    try:
        o = load_originals()
    except ImportError as e:
        print(f"bench/originals.py needs turboquant-vllm, torch and triton on the GPU machine "
              f"(../shared/tools/gpu_wheels.sh): {e}")
        return 1
    from attention import torch_ms

    print(f"# originals vs tq4jax: {device_line()}, torch {o.torch.__version__}; {HQ}/{HKV} "
          f"heads, D={D}, fp16, 4-bit, block {BS}\n")
    print("| original kernel | shape | original ms | tq4jax kernel ms | tq4jax jit ms | ratio "
          "| difference |\n|---|---|---|---|---|---|---|")
    for name, shape, original, ours, args, compare in cases(o, a.quick):
        try:
            theirs = original()
            mine = jax.block_until_ready(ours(*args))
            if compare is not None:
                frac, rel = compare(mine, theirs)
                what = f"codes {frac:.1e} differ, norms rel. L2 {rel:.1e}"
            else:
                mx, rel = diff(mine, theirs)
                what = f"max {mx:.2e}, rel. L2 {rel:.1e}"
            t_orig, t_kern = torch_ms(original), device_ms(ours, *args)
            t_jit = time_ms(ours, *args)
            print(f"| {name} | {shape} | {t_orig:.3f} | {t_kern:.3f} | {t_jit:.3f} | "
                  f"{t_orig / t_kern:.2f}x | {what} |", flush=True)
        except Exception as e:  # noqa: BLE001  (one failing kernel must not hide the rest)
            print(f"| {name} | {shape} | failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:100] if str(e) else ''} | | | | |", flush=True)
    print("\nms, median. original: CUDA-graph replays; tq4jax kernel: GPU time per call from a "
          "profiler trace; jit: 5 x 20 enqueued calls. ratio = original / tq4jax kernel.")
    jax_triton_table(a.quick)
    return 0


def jax_triton_table(quick: bool) -> None:
    """The originals' kernels launched by jax-triton on JAX arrays (tq4jax.triton_originals),
    each beside tq4jax's kernel in one jit-ed function: GPU times from one profiler trace
    each, and their difference."""
    from tq4jax import triton_originals as jto

    reason = jto.available()
    if reason is not None:
        print(f"\njax-triton: not run ({reason})")
        return
    rng = np.random.default_rng(1)
    rot = tq.haar_rotation(D, seed=42)
    cent, bnd = tq.lloyd_max(D, 4)
    n = 1024 if quick else 8192
    x = jnp.asarray(rng.standard_normal((n, HKV, D)), jnp.float16)
    b, ctx = (8, 2048) if quick else (8, 8192)
    nb = ctx // BS
    table = jnp.asarray(rng.permutation(b * nb).reshape(b, nb), jnp.int32)
    lens = jnp.full((b,), ctx, jnp.int32)
    kv = jnp.asarray(rng.standard_normal((2, b * ctx, HKV, D)), jnp.float16)
    cache = jnp.zeros((b * nb, BS, tq.paged_layout(HKV, D).row_bytes), jnp.uint8)
    slots = (table[:, :, None] * BS + jnp.arange(BS)).reshape(-1)
    cache = tq.paged_write(cache, kv[0], kv[1], slots, rot, bnd)
    q = jnp.asarray(rng.standard_normal((b, HQ, D)), jnp.float16)
    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    rows = [("tq4_compress", f"{n}x{HKV}x{D}", lambda x: jto.compress(x, rot, bnd),
             lambda x: tq.compress(x, rot, bnd), (x,)),
            ("fused_paged_tq4_decode", f"B={b} ctx {ctx}",
             lambda q, c: jto.paged_decode(q, c, table, lens, cent, rot, HKV, D, BS),
             lambda q, c: tq.paged_decode(q, c, table, lens, cent, rot, **kw), (q, cache))]
    print("\n# the originals' kernels through jax-triton, in one jax.jit with tq4jax's\n")
    print("| original kernel (jax-triton) | shape | original ms | tq4jax ms | ratio | "
          "difference |\n|---|---|---|---|---|---|")
    for name, shape, theirs, ours, args in rows:
        try:
            both = jax.jit(lambda *a: (theirs(*a), ours(*a)))
            t_out, o_out = jax.block_until_ready(both(*args))
            if name == "tq4_compress":
                frac = float(np.mean(np.asarray(t_out[0]) != np.asarray(o_out[0])))
                what = f"codes {frac:.1e} differ"
            else:
                t64, o64 = (np.asarray(z, np.float64) for z in (t_out, o_out))
                what = f"rel. L2 {np.linalg.norm(t64 - o64) / np.linalg.norm(t64):.1e}"
            t_t, t_o = device_ms(jax.jit(theirs), *args), device_ms(jax.jit(ours), *args)
            print(f"| {name} | {shape} | {t_t:.3f} | {t_o:.3f} | {t_t / t_o:.2f}x | {what} |",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"| {name} | {shape} | failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''} | | | |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
