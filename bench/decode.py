"""Decode kernels, one table: contiguous ``flash_attention_tq4_kv`` and ``flash_attention_tq4``
(dense V), ``paged_decode`` (family A) and ``tq.vllm.turboquant_decode`` (4bit_nc, k8v4) per
kernel backend, the original paged decode
through jax-triton (when installed), beside torch SDPA fp16 on dense K/V (CUDA-graph replays,
when torch is importable) and jax cuDNN attention on dense K/V; 32/8 heads, D=128, block 16.

GPU time per call comes from a profiler trace (``_timing.device_ms``: kernels only), wall time
from enqueued jit calls (host dispatch included). GB/s counts the compressed bytes read once;
"% copy" is that rate over the device's copy rate (an XLA elementwise op, bytes read +
written) measured at the start of the same run.

    PYTHONPATH=. python3 bench/decode.py [--batch 1 8 32] [--ctx 1024 8192 32768 131072]
        [--impl triton mosaic]
    PYTHONPATH=. python3 bench/decode.py --mosaic-sweep --batch 8 --ctx 32768   # every layout
        [--ops paged_decode --splits 16 32 64 --stages 2 3 --prefetch 0 1 --auto-barriers 1 0]
    PYTHONPATH=. python3 bench/decode.py --epilogue --batch 1 8 --ctx 32768
    ncu --clock-control none --kernel-name regex:mosaic_gpu --section SpeedOfLight \
        --section WarpStateStats --section InstructionStats python3 bench/decode.py --once \
        --batch 8 --ctx 32768 --impl mosaic --ops paged_decode   # each op launched once
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from _timing import copy_bandwidth_gbs, device_line, gpu_or_wall, time_ms  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


def sdpa_ms(b: int, ctx: int) -> float:
    """torch SDPA fp16 decode on dense K/V of the same shape (NaN without torch/CUDA)."""
    try:
        import torch
        import torch.nn.functional as F
        from attention import torch_ms
    except ImportError:
        return float("nan")
    if not torch.cuda.is_available():
        return float("nan")
    q = torch.randn(b, HQ, 1, D, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(b, HKV, ctx, D, dtype=torch.float16, device="cuda") for _ in range(2))
    return torch_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def jax_dense_ms(b: int, sq: int, ctx: int, causal: bool, impl: str) -> float:
    """jax.nn.dot_product_attention on dense fp16 K/V (``impl`` xla or cudnn; NaN if it
    cannot run here)."""
    key = jax.random.split(jax.random.PRNGKey(ctx), 3)
    q = jax.random.normal(key[0], (b, sq, HQ, D), jnp.float16)
    k, v = (jax.random.normal(kk, (b, ctx, HKV, D), jnp.float16) for kk in key[1:])
    try:
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                 implementation=impl))
        return gpu_or_wall(f, q, k, v)
    except Exception:  # noqa: BLE001 (cuDNN needs a GPU; XLA may not fit)
        return float("nan")


def cases(b: int, ctx: int):
    """name -> (function of impl (contiguous and paged: and config=) returning a jitted op,
    its args, compressed bytes read)."""
    key = jax.random.PRNGKey(ctx + b)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, HQ, D), jnp.float16)
    k = jax.random.normal(kk, (b * ctx, HKV, D), jnp.float16)
    v = jax.random.normal(kv, (b * ctx, HKV, D), jnp.float16)
    rot = tq.haar_rotation(D)
    cent, bnd = tq.lloyd_max(D, 4)
    table = jnp.arange(b * ctx // BS, dtype=jnp.int32).reshape(b, ctx // BS)
    table = jax.random.permutation(kk, table.reshape(-1)).reshape(b, -1)
    t = jnp.arange(ctx)
    slots = (table[:, t // BS] * BS + t % BS).reshape(-1)
    lens = jnp.full((b,), ctx, jnp.int32)
    lay = tq.paged_layout(HKV, D)
    cache = tq.paged_write(jnp.zeros((b * ctx // BS, BS, lay.row_bytes), jnp.uint8), k, v,
                           slots, rot, bnd)
    kp, kn, vp, vn = tq.compress_kv(k.reshape(b, ctx, HKV, D).swapaxes(1, 2),
                                    v.reshape(b, ctx, HKV, D).swapaxes(1, 2), rot, bnd)
    pi = tq.hadamard_rotation(D, seed=1)

    def vllm_case(name: str):
        """(maker, args, bytes) of tq.vllm.turboquant_decode on a cache of preset ``name``."""
        pr = tq.vllm.preset(name, D)
        cb = tq.lloyd_max(D, pr.mse_bits)[0]
        vcache = tq.vllm.turboquant_store(jnp.zeros(pr.cache_shape(b * ctx // BS, BS, HKV),
                                                    jnp.uint8), k, v, slots, pi, cb,
                                          **pr.store_kwargs())
        return (lambda impl, config=None: jax.jit(lambda q, c, t, l: tq.vllm.turboquant_decode(
            q, c, t, l, pi, cb, D ** -0.5, **pr.decode_kwargs(), config=config, impl=impl)),
            (q, vcache, table, lens), n * pr.slot_bytes)

    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    n = b * HKV * ctx
    return {
        "contiguous tq4_kv": (lambda impl, config=None: jax.jit(lambda q, kp, kn, vp, vn: (
            tq.flash_attention_tq4_kv(q[:, :, None], kp, kn, vp, vn, cent, rot, config=config,
                                      impl=impl)[:, :, 0])), (q, kp, kn, vp, vn), n * 136),
        "contiguous tq4 (dense V)": (lambda impl, config=None: jax.jit(
            lambda q, kp, kn, vd: tq.flash_attention_tq4(q[:, :, None], kp, kn, vd, cent, rot,
                                                         config=config, impl=impl)[:, :, 0]),
            (q, kp, kn, v.reshape(b, ctx, HKV, D).swapaxes(1, 2)), n * (68 + 2 * D)),
        "paged_decode": (lambda impl, config=None: jax.jit(lambda q, c, t, l: tq.paged_decode(
            q, c, t, l, cent, rot, **kw, config=config, impl=impl)),
            (q, cache, table, lens), n * 136),
        "vllm 4bit_nc": vllm_case("turboquant_4bit_nc"),
        "vllm k8v4": vllm_case("turboquant_k8v4"),
        "vllm k3v4_nc": vllm_case("turboquant_k3v4_nc"),
        "vllm 3bit_nc": vllm_case("turboquant_3bit_nc"),
        "original paged (jax-triton)": (original_paged, (q, cache, table, lens, cent, rot),
                                        n * 136),
    }


def original_paged(impl: str):
    """turboquant-vllm's fused_paged_tq4_decode through jax-triton, for impl "triton" only
    (ValueError otherwise or when it cannot run here)."""
    from tq4jax import triton_originals
    why = triton_originals.available()
    if impl != "triton" or why is not None:
        raise ValueError(why or "the original is one kernel (listed under triton)")
    return jax.jit(lambda q, c, t, l, cent, rot: triton_originals.paged_decode(
        q, c, t, l, cent, rot, HKV, D, BS))


SWEEP_OPS = ("contiguous tq4_kv", "paged_decode", "vllm 4bit_nc", "vllm k8v4")


def mosaic_sweep(b: int, ctx: int, ops=SWEEP_OPS, splits_list=(4, 8, 16, 32),
                 stages_list=(2, 3, 4), prefetch_list=(0,), barriers_list=(1,)) -> None:
    """Contiguous, paged and vLLM-layout decode on the Mosaic backend per MosaicConfig (KV
    splits x TMA ring depth x block-id prefetch x automatic barriers), beside the
    Triton-lowered kernel's default in the same run."""
    from tq4jax.pallas_mosaic import MosaicConfig
    c = cases(b, ctx)
    for name in ops:
        run, args, nbytes = c[name]
        base = gpu_or_wall(run("triton"), *args)
        print(f"\nMosaic sweep, {name} B={b} ctx={ctx}: triton default {base:.4f} ms\n")
        print("| splits | stages | prefetch | auto barriers | GPU ms | GB/s | triton / mosaic |")
        print("|---|---|---|---|---|---|---|")
        for splits, stages, pre, bar in itertools.product(splits_list, stages_list,
                                                          prefetch_list, barriers_list):
            row = f"| {splits} | {stages} | {pre} | {bar} |"
            try:
                cfg = MosaicConfig(splits, stages, bool(pre), bool(bar))
                ms = gpu_or_wall(run("mosaic", cfg), *args)
            except Exception as e:  # noqa: BLE001 (a config that does not compile or fit)
                print(f"{row} - | - | {type(e).__name__}: {str(e)[:60]} |")
                continue
            print(f"{row} {ms:.4f} | {nbytes / (ms * 1e-3) / 1e9:.0f} | {base / ms:.2f}x |",
                  flush=True)


def epilogue_table(batches, contexts) -> None:
    """Contiguous and paged decode (Triton-lowered) with the split merge and post-rotation as
    XLA ops (the default) or as one fused kernel (``Config.epilogue``), GPU ms in one run."""
    from tq4jax.pallas_triton.tuning import choose_config
    print("\n| op | B | context | splits | XLA epilogue ms | fused epilogue ms | XLA / fused |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        for ctx in contexts:
            cfg = choose_config(b, HKV, HQ // HKV, ctx, D, compressed=True)
            c = cases(b, ctx)
            for name in ("contiguous tq4_kv", "paged_decode"):
                make, args, _ = c[name]
                xla, fused = (gpu_or_wall(make("triton", cfg._replace(epilogue=e)), *args)
                              for e in (False, True))
                print(f"| {name} | {b} | {ctx} | {cfg.splits} | {xla:.4f} | {fused:.4f} | "
                      f"{xla / fused:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    ap.add_argument("--impl", nargs="+", default=["triton", "mosaic"])
    ap.add_argument("--mosaic-sweep", action="store_true",
                    help="only sweep the Mosaic decode's configs at each --batch/--ctx")
    ap.add_argument("--ops", nargs="+", default=list(SWEEP_OPS),
                    help="ops of the sweep and of --once")
    ap.add_argument("--once", action="store_true",
                    help="run each op of --ops once per --impl, untimed (a profiler's target)")
    ap.add_argument("--splits", type=int, nargs="+", default=[4, 8, 16, 32],
                    help="KV splits of the sweep")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4],
                    help="TMA ring depths of the sweep")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0],
                    help="block ids one tile ahead in the sweep (0, 1: MosaicConfig.prefetch)")
    ap.add_argument("--auto-barriers", type=int, nargs="+", default=[1],
                    help="Pallas's barrier around each shared-memory store in the sweep (1, 0: "
                         "MosaicConfig.auto_barriers)")
    ap.add_argument("--epilogue", action="store_true",
                    help="only compare the XLA and the fused split-merge epilogue")
    a = ap.parse_args()
    if a.epilogue:
        print(f"# decode bench: {device_line()}; {HQ}/{HKV} heads, D={D}, block {BS}")
        epilogue_table(a.batch, a.ctx)
        return
    if a.once:
        for b, ctx in itertools.product(a.batch, a.ctx):
            c = cases(b, ctx)  # every case's inputs, built once
            for name, impl in itertools.product(a.ops, a.impl):
                make, args, _ = c[name]
                jax.block_until_ready(make(impl)(*args))
                print(f"ran {name} B={b} ctx={ctx} impl={impl}", flush=True)
        return
    if a.mosaic_sweep:
        print(f"# decode bench: {device_line()}; {HQ}/{HKV} heads, D={D}")
        for b in a.batch:
            for ctx in a.ctx:
                mosaic_sweep(b, ctx, a.ops, a.splits, a.stages, a.prefetch, a.auto_barriers)
        return
    on_gpu = jax.default_backend() == "gpu"
    copy = copy_bandwidth_gbs() if on_gpu else float("nan")
    print(f"# decode bench: {device_line()}; {HQ}/{HKV} heads, D={D}, block {BS}; copy rate "
          f"{copy:.0f} GB/s" + ("" if on_gpu else " (CPU: wall times of interpreted kernels)"))
    print("\n| op | B | context | impl | GPU ms | wall ms | GB/s | % copy | SDPA fp16 ms "
          "| jax cuDNN ms | SDPA / GPU | cuDNN / GPU |")
    print("|---" * 12 + "|")
    for b in a.batch:
        for ctx in a.ctx:
            sd, cu = sdpa_ms(b, ctx), jax_dense_ms(b, 1, ctx, False, "cudnn")
            for name, (make, args, nbytes) in cases(b, ctx).items():
                for impl in a.impl:
                    try:
                        f = make(impl)
                        gpu = gpu_or_wall(f, *args)
                        wall = time_ms(f, *args, **({} if on_gpu else dict(iters=1, reps=1)))
                    except (ValueError, NotImplementedError) as e:
                        if impl == a.impl[0]:  # once per op: why it has no row
                            print(f"| {name} | {b} | {ctx} | {impl} | - | - | - | - | {sd:.4f} "
                                  f"| {cu:.4f} | {str(e)[:60]} | |")
                        continue
                    gbs = nbytes / (gpu * 1e-3) / 1e9
                    print(f"| {name} | {b} | {ctx} | {impl} | {gpu:.4f} | {wall:.4f} | "
                          f"{gbs:.0f} | {100 * gbs / copy:.0f}% | {sd:.4f} | {cu:.4f} | "
                          f"{sd / gpu:.2f}x | {cu / gpu:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
