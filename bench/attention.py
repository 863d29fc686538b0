"""Contiguous attention: prefill (causal, B=1, 32/8 heads, D=128) and decode (Sq=1, B=8)
beside torch SDPA fp16 (when torch is importable) and jax.nn.dot_product_attention.

    PYTHONPATH=. python3 bench/attention.py [--quick]
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
from _timing import device_line, time_ms  # noqa: E402

HQ, HKV, D = 32, 8, 128


def torch_sdpa_ms(q, k, v, causal):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    tq_, tk, tv = (torch.from_numpy(np.asarray(a)).cuda() for a in (q, k, v))
    f = lambda: F.scaled_dot_product_attention(tq_, tk, tv, is_causal=causal,  # noqa: E731
                                               enable_gqa=True)
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        st.record()
        for _ in range(20):
            f()
        en.record()
        torch.cuda.synchronize()
        ts.append(st.elapsed_time(en) / 20)
    return float(np.median(ts))


def run_case(name, b, sq, sk, causal, rows):
    key = jax.random.PRNGKey(sk)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, HQ, sq, D), jnp.float16)
    k = jax.random.normal(kk, (b, HKV, sk, D), jnp.float16)
    v = jax.random.normal(kv, (b, HKV, sk, D), jnp.float16)
    rot = jnp.asarray(tq.haar_rotation(D))
    cent, bnd = tq.lloyd_max(D, 4)
    kp, kn = tq.compress(k, rot, bnd)
    vp, vn = tq.compress(v, rot, bnd)
    res = {}
    res["tq4jax flash fp16"] = time_ms(jax.jit(
        lambda q, k, v: tq.flash_attention(q, k, v, None, causal)), q, k, v)
    res["tq4jax tq4_kv"] = time_ms(jax.jit(
        lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, cent, rot,
                                                            None, causal)), q, kp, kn, vp, vn)
    bt = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  BNHD -> BTNH
    for impl in ("cudnn", "xla"):
        try:
            res[f"jax {impl}"] = time_ms(jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                bt(q), bt(k), bt(v), is_causal=causal, implementation=impl)), q, k, v)
        except Exception as e:  # noqa: BLE001
            print(f"  jax {impl} failed: {type(e).__name__}: {str(e)[:100]}")
    t = torch_sdpa_ms(q, k, v, causal)
    if t is not None:
        res["torch SDPA fp16"] = t
    bytes_fp16 = 2 * b * HKV * sk * D * 2
    bytes_tq4 = 2 * b * HKV * sk * (D // 2 + 4)
    rows.append((name, res, bytes_fp16, bytes_tq4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(f"# attention bench: {device_line()}; {HQ}/{HKV} heads, D={D}, fp16")
    rows = []
    cases = [("prefill causal B=1 2K", 1, 2048, 2048, True),
             ("prefill causal B=1 8K", 1, 8192, 8192, True),
             ("decode B=8 1K", 8, 1, 1024, False),
             ("decode B=8 8K", 8, 1, 8192, False),
             ("decode B=8 32K", 8, 1, 32768, False)]
    for c in (cases[:1] + cases[2:3] if a.quick else cases):
        run_case(*c, rows)
    names = sorted({n for _, r, _, _ in rows for n in r})
    print("\n| case | " + " | ".join(names) + " | tq4_kv / SDPA |")
    print("|---" * (len(names) + 2) + "|")
    for case, r, bf, bq in rows:
        ratio = (r["tq4jax tq4_kv"] / r["torch SDPA fp16"]) if "torch SDPA fp16" in r else float("nan")
        print(f"| {case} | " + " | ".join(f"{r[n]:.3f}" if n in r else "-" for n in names)
              + f" | {ratio:.2f}x |")
    print("\nms, median; KV bytes read once: fp16 vs TQ4 = 3.76x less")


if __name__ == "__main__":
    main()
