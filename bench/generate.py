"""Decode step of the example Llama-style model (tq4jax.model): dense fp16 cache with jax cuDNN /
XLA attention vs the TQ4-compressed cache on each kernel backend (Triton-lowered; Mosaic GPU on
sm_90+), at 8K and 32K context; tokens/s; cache bytes; the longest context that fits a fixed
KV-cache memory budget each way.

    PYTHONPATH=. python3 bench/generate.py [--quick] [--layers 16] [--batch 1 8]
        [--backend triton mosaic]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_line  # noqa: E402
from tq4jax import backend as tq_backend  # noqa: E402
from tq4jax import model as llama  # noqa: E402
from tq4jax.cache import DenseCache, TQ4Cache  # noqa: E402


def random_params(cfg: llama.LlamaConfig, seed: int = 0) -> dict:
    """Random weights made on the device (the numpy init of tq4jax.model is slow at 2B+)."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (name, shape) in enumerate(llama.param_names(cfg).items()):
        if len(shape) == 1:
            out[name] = jnp.ones(shape, cfg.dtype)
        else:
            w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            out[name] = (w / shape[0] ** 0.5).astype(cfg.dtype)
    return out


def filled_cache(cfg, kind: str, batch: int, ctx: int, extra: int, impl=None):
    """A cache of capacity ctx + extra whose rows already hold ctx tokens (random content)."""
    key = jax.random.PRNGKey(1)
    cap = -(-(ctx + extra) // 64) * 64  # a multiple of 8: the Mosaic decode's TMA tiling
    cache = llama.make_cache(cfg, batch, cap, kind, implementation=impl)
    lens = tuple(jnp.full((batch,), ctx, jnp.int32) for _ in range(cfg.n_layers))
    if kind == "dense":
        rnd = lambda x, i: jax.random.normal(jax.random.fold_in(key, i), x.shape,  # noqa: E731
                                             x.dtype)
        return DenseCache(tuple(rnd(x, i) for i, x in enumerate(cache.k)),
                          tuple(rnd(x, 100 + i) for i, x in enumerate(cache.v)), lens, impl)
    codes = lambda x, i: jax.random.randint(jax.random.fold_in(key, i), x.shape, 0, 256,  # noqa: E731
                                            jnp.int32).astype(jnp.uint8)
    norms = lambda x, i: jax.random.uniform(jax.random.fold_in(key, i), x.shape,  # noqa: E731
                                            jnp.float32, 5.0, 15.0)
    return TQ4Cache(tuple(codes(x, i) for i, x in enumerate(cache.k_codes)),
                    tuple(norms(x, 50 + i) for i, x in enumerate(cache.k_norms)),
                    tuple(codes(x, 100 + i) for i, x in enumerate(cache.v_codes)),
                    tuple(norms(x, 150 + i) for i, x in enumerate(cache.v_norms)),
                    lens, cache.spec)


def bench_config(layers: int = 16) -> llama.LlamaConfig:
    """The benchmark model: Llama-style, dim 4096, 32/8 heads, D=128, fp16."""
    return llama.LlamaConfig(vocab_size=32000, dim=4096, n_layers=layers, n_heads=32,
                             n_kv_heads=8, head_dim=128, ffn_dim=8192, dtype="float16")


def timed_steps(params, cfg, cache, batch: int, steps: int, step=None, backend=None):
    """Mean ms of ``steps`` decode steps after 2 warm-up steps (cache donated); returns
    (ms, jitted step, token, cache after the steps). ``step``: a jitted step from an earlier
    call to reuse (no recompilation); ``backend``: the TQ4 kernels' backend ("triton",
    "mosaic"; None = auto)."""
    if step is None:
        step = jax.jit(lambda p, t, c: llama.forward(p, t, c, cfg, implementation=backend),
                       donate_argnums=2)
    tok = jnp.zeros((batch, 1), jnp.int32)
    for _ in range(2):
        logits, cache = step(params, tok, cache)
    jax.block_until_ready(logits)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = step(params, tok, cache)
    jax.block_until_ready(logits)
    return (time.perf_counter() - t0) / steps * 1e3, step, tok, cache


def max_context(cfg, kind: str, batch: int, budget: int) -> int:
    """Longest per-row capacity whose cache (shapes only, nothing allocated) fits ``budget``."""
    def nbytes(cap):
        shapes = jax.eval_shape(lambda: llama.make_cache(cfg, batch, cap, kind))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)
                   if x.dtype != jnp.int32)
    per_token = nbytes(2) - nbytes(1)
    cap = budget // per_token
    assert nbytes(cap) <= budget < nbytes(cap + 1)
    return int(cap)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--reps", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--backend", nargs="+", default=["triton", "mosaic"],
                    choices=["triton", "mosaic"], help="TQ4 kernel backends (mosaic: sm_90+)")
    a = ap.parse_args()
    cfg = bench_config(4 if a.quick else a.layers)
    params = random_params(cfg)
    n_params = sum(x.size for x in params.values())
    print(f"# generate bench: {device_line()}; Llama-style {cfg.n_layers} layers, dim "
          f"{cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads, D={cfg.head_dim}, "
          f"{n_params / 1e9:.2f}B params fp16; one decode step (all layers + lm head)\n")
    steps, reps = (5, 1) if a.quick else (20, a.reps)
    print(f"ms per step: median of {reps} rounds of {steps} steps; the rounds interleave the "
          "caches (run-to-run drift hits all alike); range = min-max over the rounds\n")
    hopper = (tq_backend.compute_capability() or (0, 0)) >= (9, 0)
    backends = [x for x in a.backend if x != "mosaic" or hopper]
    tq4_cols = " | ".join(f"TQ4 {x} ms | TQ4 {x} range" for x in backends)
    print(f"| batch | context | dense cuDNN ms | dense XLA ms | {tq4_cols} | TQ4 best tokens/s "
          "| dense best / TQ4 best | dense cache GiB | TQ4 cache GiB |")
    print("|---" * (8 + 2 * len(backends)) + "|")
    for b in a.batch:
        for ctx in ((8192,) if a.quick else (8192, 32768)):
            res, sizes, runs = {}, {}, {}
            for name, kind, impl in (("cudnn", "dense", "cudnn"), ("xla", "dense", "xla"),
                                     *((x, "tq4", x) for x in backends)):
                try:
                    cache = filled_cache(cfg, kind, b, ctx, reps * (steps + 2) + 4,
                                         impl if kind == "dense" else None)
                    sizes[kind] = cache.nbytes / 2**30
                    runs[name] = [cache, None, [], None if kind == "dense" else impl]
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} failed at B={b} ctx={ctx}: {type(e).__name__}: "
                          f"{str(e)[:120]}")
            for _ in range(reps):
                for name, run in list(runs.items()):
                    try:
                        ms, run[1], _, run[0] = timed_steps(params, cfg, run[0], b, steps, run[1],
                                                            run[3])
                        run[2].append(ms)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} failed at B={b} ctx={ctx}: {type(e).__name__}: "
                              f"{str(e)[:120]}")
                        del runs[name]
            res = {name: float(np.median(run[2])) for name, run in runs.items()}
            spread = {name: (min(run[2]), max(run[2])) for name, run in runs.items()}
            del runs
            dense = min(res.get("cudnn", float("inf")), res.get("xla", float("inf")))
            tq4 = min((res[x] for x in backends if x in res), default=float("nan"))
            fmt = lambda k: f"{res[k]:.3f}" if k in res else "-"  # noqa: E731
            rng = lambda k: "%.3f-%.3f" % spread[k] if k in spread else "-"  # noqa: E731
            cols = " | ".join(f"{fmt(x)} | {rng(x)}" for x in backends)
            print(f"| {b} | {ctx} | {fmt('cudnn')} | {fmt('xla')} | {cols} | "
                  f"{b / tq4 * 1e3:.1f} | {dense / tq4:.2f}x | {sizes.get('dense', 0):.2f} | "
                  f"{sizes.get('tq4', 0):.2f} |", flush=True)
    budget = int(a.budget_gib * 2**30)
    print(f"\nKV-cache budget {a.budget_gib:g} GiB, batch 1, {cfg.n_layers} layers:")
    dense_cap, tq4_cap = (max_context(cfg, k, 1, budget) for k in ("dense", "tq4"))
    print(f"| cache | longest context |\n|---|---|\n| dense fp16 | {dense_cap} |\n"
          f"| TQ4 | {tq4_cap} ({tq4_cap / dense_cap:.2f}x) |")


if __name__ == "__main__":
    main()
