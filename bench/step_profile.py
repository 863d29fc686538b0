"""Where one decode step of the example model (bench/generate.py's 16-layer config) spends its
GPU time, kernel by kernel: dense fp16 cache with cuDNN/XLA attention or the TQ4 cache.

The step runs between cudaProfilerStart/Stop, so Nsight Compute profiles exactly one step:

    PYTHONPATH=. ncu --profile-from-start off --clock-control none \\
        --metrics gpu__time_duration.sum --csv --print-units base \\
        python3 bench/step_profile.py run tq4 1 32768 > tq4.csv
    python3 bench/step_profile.py summarize tq4.csv

``run`` also prints the wall time per step (no profiler: mean of 10 donated-cache steps), so
the sum of kernel times can be compared with it (the rest is launch gaps).
"""

from __future__ import annotations

import collections
import csv
import ctypes
import glob
import os
import site
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime library (from the NVIDIA wheels jax uses, or a system CUDA)."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    pats = [os.path.join(r, "nvidia", "*", "lib", "libcudart.so*") for r in roots]
    pats += ["/usr/local/cuda*/lib64/libcudart.so*", "/usr/lib/x86_64-linux-gnu/libcudart.so*"]
    for pat in pats:
        for path in sorted(glob.glob(pat)):
            return ctypes.CDLL(path)
    raise OSError("libcudart not found")


def run(kind: str, batch: int, ctx: int, layers: int = 16) -> None:
    """Time ``kind`` ("tq4", "cudnn" or "xla") steps at ``batch`` x ``ctx``, then run one step
    inside a profiler window."""
    import jax

    import generate as g

    cfg = g.bench_config(layers)
    params = g.random_params(cfg)
    dense = kind != "tq4"
    cache = g.filled_cache(cfg, "dense" if dense else "tq4", batch, ctx, 30,
                           kind if dense else None)
    ms, step, tok, cache = g.timed_steps(params, cfg, cache, batch, 10)
    print(f"{kind} B={batch} ctx={ctx}: {ms:.3f} ms per step", flush=True)
    rt = _cudart()
    rt.cudaProfilerStart()
    logits, cache = step(params, tok, cache)
    jax.block_until_ready(logits)
    rt.cudaProfilerStop()


def summarize(path: str, top: int = 25) -> None:
    """Kernel time per kernel name from an ``ncu --csv`` file of gpu__time_duration.sum."""
    with open(path) as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if r[:1] == ["ID"])
    cols = rows[head]
    name, metric, value = (cols.index(c) for c in ("Kernel Name", "Metric Name", "Metric Value"))
    per = collections.defaultdict(lambda: [0, 0.0])
    for r in rows[head + 1:]:
        if len(r) > value and r[metric] == "gpu__time_duration.sum":
            us = float(r[value].replace(",", "")) / 1e3
            per[r[name][:80]][0] += 1
            per[r[name][:80]][1] += us
    total = sum(t for _, t in per.values())
    print(f"{sum(n for n, _ in per.values())} kernels, {total:.1f} us of kernel time\n")
    print("| us | share | calls | kernel |\n|---|---|---|---|")
    for k, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {t:.1f} | {t / total:.1%} | {n} | `{k}` |")


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["run"] and len(args) in (4, 5):
        run(args[1], int(args[2]), int(args[3]), *(int(a) for a in args[4:]))
    elif args[:1] == ["summarize"] and len(args) == 2:
        summarize(args[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
