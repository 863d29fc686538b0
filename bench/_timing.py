"""Timing helpers for the benchmarks: enqueue many calls, block once, take the median."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def time_ms(fn: Callable, *args: Any, iters: int = 20, reps: int = 5) -> float:
    """Median over ``reps`` of the mean time of ``iters`` back-to-back calls (ms)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(times)


def device_times(trace_path: str) -> dict[str, list[float]]:
    """{kernel name: [calls, microseconds]} over the GPU stream tracks (threads named
    "Stream ..." of processes named "/device:...") of a perfetto/Chrome JSON trace."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    meta = [e for e in events if e.get("ph") == "M"]
    devices = {e["pid"] for e in meta if e.get("name") == "process_name"
               and "/device:" in str(e.get("args", {}).get("name", ""))}
    streams = {(e["pid"], e["tid"]) for e in meta if e.get("name") == "thread_name"
               and e.get("pid") in devices and "Stream" in str(e.get("args", {}).get("name", ""))}
    per: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:  # the "XLA Ops"/"XLA Modules" lines would count each kernel twice
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e:
            per[e["name"][:80]][0] += 1
            per[e["name"][:80]][1] += float(e["dur"])
    return dict(per)


def device_ms(fn: Callable, *args: Any, calls: int = 20) -> float:
    """GPU kernel time per call (ms): the device time of every kernel that ``calls``
    back-to-back calls of ``fn`` launch, from a ``jax.profiler`` trace, divided by ``calls``.
    Unlike :func:`time_ms` it leaves out host dispatch and launch gaps, which dominate ops of a
    few tens of microseconds (decode at batch 1). GPU only (a CPU trace has no device
    streams): returns NaN when the trace holds no device kernel."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        total_us = sum(t for _, t in device_times(paths[0]).values()) if paths else 0.0
    return total_us / calls / 1e3 if total_us > 0 else float("nan")


def gpu_or_wall(f, *args) -> float:
    """GPU time per call (ms) on a GPU, wall time elsewhere (a CPU profiler trace of
    interpreted kernels would be huge)."""
    if jax.default_backend() == "gpu":
        return device_ms(f, *args)
    return time_ms(f, *args, iters=1, reps=1)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device copy rate (bytes read + written per second, GB/s) of an XLA elementwise op."""
    x = jnp.arange(nbytes // 4, dtype=jnp.uint32)
    f = jax.jit(lambda a: a + jnp.uint32(1))
    ms = time_ms(f, x)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_line() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
