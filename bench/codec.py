"""Codec throughput (compress / decompress / dequantize) vs copy bandwidth, and the MSE
distortion of unit vectors at 1-4 bits.

    PYTHONPATH=. python3 bench/codec.py [--rows 4194304] [--dim 128]

Effective GB/s counts bytes read + written once (x fp16 in, codes + norms out, or back).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from tq4jax.backend import resolve_impl  # noqa: E402
from tq4jax.codec import CodecConfig  # noqa: E402
from _timing import copy_bandwidth_gbs, device_line, time_ms  # noqa: E402


def distortion(dim: int, n: int, impl: str) -> list[tuple[int, float]]:
    """E ||x - x_hat||^2 for random unit vectors x (TurboQuant paper: .36/.117/.03/.009)."""
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (n, dim), jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    rot = tq.haar_rotation(dim, seed=3)
    out = []
    for bits in (1, 2, 3, 4):
        c, b = tq.lloyd_max(dim, bits)
        p, nr = tq.compress(x, rot, b, impl=impl)
        xh = tq.dequantize(p, nr, c, rot, jnp.float32, impl=impl)
        out.append((bits, float(jnp.mean(jnp.sum((x - xh) ** 2, -1)))))
    return out


def main() -> None:
    gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=(1 << 22) if gpu else 1 << 12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--sweep", action="store_true", help="also sweep rows per program / warps")
    a = ap.parse_args()
    impl = "pallas" if resolve_impl(a.impl) != "reference" else "reference"
    n, d = a.rows, a.dim
    print(f"# codec bench: {device_line()}, impl={impl}, {n} vectors x D={d}, fp16")
    copy = copy_bandwidth_gbs((1 << 30) if gpu else (1 << 24))
    print(f"copy bandwidth (read+write): {copy:.0f} GB/s")

    rot = jnp.asarray(tq.haar_rotation(d))
    cent, bnd = tq.lloyd_max(d, 4)
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float16)
    b_x, b_p = n * d * 2, n * (d // 2 + 4)

    rows = []

    def run(name, fn, args, nbytes):
        ms = time_ms(jax.jit(fn), *args)
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append((name, ms, gbs, gbs / copy))

    cfgs = [None]
    if a.sweep:
        cfgs = [CodecConfig(br, nw) for br in (64, 128, 256) for nw in (4, 8)]
    for cfg in cfgs:
        kw = dict(impl=impl, config=cfg)
        tag = (f"[{impl} {'default' if cfg is None else f'br={cfg[0]} nw={cfg[1]}'}]"
               if impl == "pallas" else f"[{impl}]")
        run(f"compress {tag}", lambda x: tq.compress(x, rot, bnd, **kw), (x,), b_x + b_p)
        p, nr = jax.jit(lambda x: tq.compress(x, rot, bnd, **kw))(x)
        run(f"decompress fp16 {tag}", lambda p, r: tq.decompress(p, r, cent, **kw), (p, nr),
            b_x + b_p)
        run(f"dequantize fp16 {tag}", lambda p, r: tq.dequantize(p, r, cent, rot, **kw),
            (p, nr), b_x + b_p)
    if impl == "pallas":  # the XLA reference path on the same data, and byte-exactness
        run("compress [reference/XLA]", lambda x: tq.compress(x, rot, bnd, impl="reference"),
            (x,), b_x + b_p)
        run("decompress fp16 [reference/XLA]",
            lambda p, r: tq.decompress(p, r, cent, impl="reference"), (p, nr), b_x + b_p)
        pk, nk = jax.jit(lambda x: tq.compress(x, rot, bnd, impl="pallas"))(x)
        pr, nrr = jax.jit(lambda x: tq.compress(x, rot, bnd, impl="reference"))(x)
        diff = int(jnp.sum(pk != pr))
        print(f"pallas vs reference: {diff} of {pk.size} code bytes differ "
              f"({diff / pk.size:.2e}; ties within float32 rounding), max norm rel diff "
              f"{float(jnp.max(jnp.abs(nk - nrr) / jnp.maximum(nrr, 1e-30))):.1e}")

    print("\n| op | ms | GB/s (read+write) | of copy bw |\n|---|---|---|---|")
    for name, ms, gbs, frac in rows:
        print(f"| {name} | {ms:.3f} | {gbs:.0f} | {frac:.0%} |")
    print("\n| bits | MSE of unit vectors (D=%d) | paper |\n|---|---|---|" % d)
    paper = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
    for bits, mse in distortion(d, 65536 if gpu else 4096, impl):
        print(f"| {bits} | {mse:.4f} | {paper[bits]} |")


if __name__ == "__main__":
    main()
