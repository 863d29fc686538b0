"""Timing helpers for the benchmarks: enqueue many calls, block once, take the median."""

from __future__ import annotations

import statistics
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


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device copy rate (bytes read + written per second, GB/s) of an XLA elementwise op."""
    x = jnp.arange(nbytes // 4, dtype=jnp.uint32)
    f = jax.jit(lambda a: a + jnp.uint32(1))
    ms = time_ms(f, x)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_line() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
