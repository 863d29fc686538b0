"""Contiguous attention: prefill (causal, B=1, 32/8 heads, D=128) and decode (Sq=1, B=8)
beside torch SDPA fp16 (when torch is importable), jax.nn.dot_product_attention (cuDNN, XLA)
and the original turboquant-vllm ``triton_flash_attention_tq4_kv`` (when installed), all on
the same data. ``--sweep`` times kernel configurations instead (tile sizes, warps, stages,
splits) and checks each against the default configuration's output.

    PYTHONPATH=. python3 bench/attention.py [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from tq4jax.pallas_triton.tuning import Config, choose_config  # noqa: E402
from _timing import device_line, device_ms, time_ms  # noqa: E402

HQ, HKV, D = 32, 8, 128
CASES = [("prefill causal B=1 2K", 1, 2048, 2048, True),
         ("prefill causal B=1 8K", 1, 8192, 8192, True),
         ("decode B=8 1K", 8, 1, 1024, False),
         ("decode B=8 8K", 8, 1, 8192, False),
         ("decode B=8 32K", 8, 1, 32768, False)]


def torch_ms(f, calls: int = 20) -> float:
    """Median time per call of a torch CUDA callable (CUDA events over 5 replays of a CUDA
    graph holding ``calls`` calls: device time without host dispatch, as :func:`device_ms`
    measures tq4jax; falls back to eager calls when capture fails)."""
    import torch
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    run = None
    try:
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    f()
        torch.cuda.synchronize()
        run = graph.replay
    except Exception:  # noqa: BLE001  (e.g. an op that syncs with the host)
        def run():
            for _ in range(calls):
                f()
    run()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        st.record()
        run()
        en.record()
        torch.cuda.synchronize()
        ts.append(st.elapsed_time(en) / calls)
    return float(np.median(ts))


def torch_results(q, k, v, kp, kn, vp, vn, cent, rot, causal) -> dict[str, float]:
    """torch SDPA fp16 and the original fused TQ4 kernel, when importable."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    t = lambda a: torch.from_numpy(np.asarray(a)).cuda()  # noqa: E731
    tq_, tk, tv = t(q), t(k), t(v)
    res = {"torch SDPA fp16": torch_ms(lambda: F.scaled_dot_product_attention(
        tq_, tk, tv, is_causal=causal, enable_gqa=True))}
    try:
        from turboquant_vllm.triton.flash_attention_tq4_kv import triton_flash_attention_tq4_kv
    except ImportError:
        return res
    args = (t(kp), t(kn), t(vp), t(vn), t(cent), t(rot))
    res["original tq4_kv"] = torch_ms(lambda: triton_flash_attention_tq4_kv(
        tq_, *args, None, causal))
    return res


def make_data(b, sq, sk):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(sk), 3)
    q = jax.random.normal(kq, (b, HQ, sq, D), jnp.float16)
    k = jax.random.normal(kk, (b, HKV, sk, D), jnp.float16)
    v = jax.random.normal(kv, (b, HKV, sk, D), jnp.float16)
    rot = jnp.asarray(tq.haar_rotation(D))
    cent, bnd = tq.lloyd_max(D, 4)
    kp, kn = tq.compress(k, rot, bnd)
    vp, vn = tq.compress(v, rot, bnd)
    return q, k, v, kp, kn, vp, vn, jnp.asarray(cent), rot


def run_case(name, b, sq, sk, causal, rows):
    q, k, v, kp, kn, vp, vn, cent, rot = make_data(b, sq, sk)
    res = {}
    res["tq4jax flash fp16"] = time_ms(jax.jit(
        lambda q, k, v: tq.flash_attention(q, k, v, None, causal)), q, k, v)
    cent_np = np.asarray(cent)  # concrete codebook: decoded in registers
    tq4_kv = jax.jit(lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(
        q, kp, kn, vp, vn, cent_np, rot, None, causal))
    res["tq4jax tq4_kv"] = time_ms(tq4_kv, q, kp, kn, vp, vn)
    res["tq4jax tq4_kv kernel"] = device_ms(tq4_kv, q, kp, kn, vp, vn)
    res["tq4jax tq4_kv traced codebook"] = time_ms(jax.jit(  # gathers from a 32-byte table
        lambda q, kp, kn, vp, vn, c: tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, c, rot, None,
                                                               causal)), q, kp, kn, vp, vn, cent)
    bt = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  BNHD -> BTNH
    for impl in ("cudnn", "xla"):
        try:
            res[f"jax {impl}"] = time_ms(jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                bt(q), bt(k), bt(v), is_causal=causal, implementation=impl)), q, k, v)
        except Exception as e:  # noqa: BLE001
            print(f"  jax {impl} failed: {type(e).__name__}: {str(e)[:100]}")
    res.update(torch_results(q, k, v, kp, kn, vp, vn, cent, rot, causal))
    rows.append((name, res))


def sweep(name, b, sq, sk, causal):
    """Time kernel configurations on one case (dense flash, tq4_kv with a static codebook and
    with a traced one); check each against the default configuration's output."""
    q, k, v, kp, kn, vp, vn, cent, rot = make_data(b, sq, sk)
    flash = jax.jit(lambda q, k, v, cfg: tq.flash_attention(q, k, v, None, causal, config=cfg),
                    static_argnames="cfg")
    cent_np = np.asarray(cent)

    def tq4_kv(static):
        def run(q, kp, kn, vp, vn, c, cfg):
            return tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent_np if static else c, rot,
                                             None, causal, config=cfg)
        return jax.jit(run, static_argnames="cfg")

    ops = {"tq4_kv static": lambda cfg, f=tq4_kv(True): f(q, kp, kn, vp, vn, cent, cfg=cfg),
           "tq4_kv traced": lambda cfg, f=tq4_kv(False): f(q, kp, kn, vp, vn, cent, cfg=cfg)}
    default = choose_config(b, HKV, HQ // HKV * sq, sk, D, compressed=True)
    if sq * HQ // HKV <= 64:
        grid = [Config(default.block_m, bn, w, st, default.splits)
                for bn, (w, st) in itertools.product((32, 64, 128), ((4, 2), (4, 3), (8, 2)))]
    else:
        ops["flash"] = lambda cfg: flash(q, k, v, cfg=cfg)  # jitted once per cfg
        grid = [Config(*c) for c in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 3),
                                         (128, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3),
                                         (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2),
                                         (64, 64, 4, 2), (256, 64, 8, 3), (128, 128, 8, 3))]
    print(f"\n## sweep: {name} (default {tuple(default)})\n")
    print("| op | block_m | block_n | warps | stages | splits | ms | max err vs default |")
    print("|---|---|---|---|---|---|---|---|")
    for op, run in ops.items():
        want = np.asarray(run(default).astype(jnp.float32))
        for cfg in grid:
            try:
                got = np.asarray(run(cfg).astype(jnp.float32))
                ms = time_ms(lambda: run(cfg), iters=10, reps=3)
                err = float(np.max(np.abs(got - want)))
                print(f"| {op} | {' | '.join(map(str, cfg))} | {ms:.3f} | {err:.2e} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {op} | {' | '.join(map(str, cfg))} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]} | |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    print(f"# attention bench: {device_line()}; {HQ}/{HKV} heads, D={D}, fp16")
    if a.sweep:
        for c in ((CASES[4],) if a.quick else (CASES[4], CASES[1])):
            sweep(*c)
        return
    rows = []
    for c in (CASES[:1] + CASES[2:3] if a.quick else CASES):
        run_case(*c, rows)
    names = sorted({n for _, r in rows for n in r})
    print("\n| case | " + " | ".join(names) + " | tq4_kv / SDPA | tq4_kv kernel / SDPA | "
          "flash / min(SDPA, cuDNN) |")
    print("|---" * (len(names) + 4) + "|")
    for case, r in rows:
        sdpa = r.get("torch SDPA fp16", float("nan"))
        best = min(sdpa, r.get("jax cudnn", float("inf")))
        print(f"| {case} | " + " | ".join(f"{r[n]:.3f}" if n in r else "-" for n in names)
              + f" | {r['tq4jax tq4_kv'] / sdpa:.2f}x | {r['tq4jax tq4_kv kernel'] / sdpa:.2f}x"
              f" | {r['tq4jax flash fp16'] / best:.2f}x |")
    print("\nms, median: jax ops over 5 x 20 enqueued jit calls (host dispatch included); "
          "tq4_kv kernel: GPU kernel time per call from a profiler trace; torch: CUDA-graph "
          "replays (device time). KV bytes read once: fp16 vs TQ4 = 3.76x less")


if __name__ == "__main__":
    main()
