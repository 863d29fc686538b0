"""Where one decode step of the example model (bench/generate.py's 16-layer config) spends its
device time, kernel by kernel: dense fp16 cache with cuDNN/XLA attention or the TQ4 cache.

    PYTHONPATH=. python3 bench/step_profile.py tq4 1 32768 [layers]

It times 10 donated-cache steps (wall time per step, no profiler), then records 3 steps with
``jax.profiler.trace(..., create_perfetto_trace=True)`` and prints the device time per kernel
name from the trace, per step. The sum of kernel times against the wall time shows the
launch gaps. GPU only: a CPU trace has no device stream tracks (the table is empty).
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_times  # noqa: E402

TRACED_STEPS = 3


def table(per: dict[str, list[float]], steps: int = 1, top: int = 25) -> str:
    """Markdown table of :func:`device_times`, divided by ``steps``, largest first."""
    total = sum(t for _, t in per.values()) / steps
    lines = [f"{sum(n for n, _ in per.values()) / steps:.0f} kernels, {total:.1f} us of kernel "
             "time per step", "", "| us | share | calls | kernel |", "|---|---|---|---|"]
    for k, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {t / steps:.1f} | {t / steps / total:.1%} | {n / steps:g} | `{k}` |")
    return "\n".join(lines)


def run(kind: str, batch: int, ctx: int, layers: int = 16) -> None:
    """Time ``kind`` ("tq4", "cudnn" or "xla") steps at ``batch`` x ``ctx``, then trace
    :data:`TRACED_STEPS` steps and print the per-kernel table."""
    import jax

    import generate as g

    cfg = g.bench_config(layers)
    params = g.random_params(cfg)
    dense = kind != "tq4"
    cache = g.filled_cache(cfg, "dense" if dense else "tq4", batch, ctx, 30,
                           kind if dense else None)
    ms, step, tok, cache = g.timed_steps(params, cfg, cache, batch, 10)
    print(f"{kind} B={batch} ctx={ctx} layers={layers}: {ms:.3f} ms per step", flush=True)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(TRACED_STEPS):
                logits, cache = step(params, tok, cache)
            jax.block_until_ready(logits)
        path = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        print(table(device_times(path), TRACED_STEPS), flush=True)


def main() -> None:
    args = sys.argv[1:]
    if len(args) in (3, 4) and args[0] in ("tq4", "cudnn", "xla"):
        run(args[0], *(int(a) for a in args[1:]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
