"""Paged TQ4 cache (turboquant-vllm layout), 32/8 heads, D=128, block 16.

* decode: B in {1, 8, 32} x context 1K/8K/32K beside torch SDPA fp16 on dense K/V (when torch
  is importable), jax cuDNN on dense K/V, and the original ``fused_paged_tq4_decode`` on the
  same cache bytes (when turboquant-vllm is installed). Prints GB/s on the compressed bytes
  read and the ratio to the copy bandwidth measured in the same run.
* prefill: 4 sequences x 2K new tokens on 6K context, fp16 and int8 Q @ K^T, beside SDPA /
  cuDNN causal (lower right) on the same dense shapes and the original
  ``fused_paged_tq4_int8_prefill`` (one call per sequence: it takes one sequence).

    PYTHONPATH=. python3 bench/paged.py [--quick]
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
from _timing import copy_bandwidth_gbs, device_line, device_ms, time_ms  # noqa: E402
from attention import torch_ms  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
#: Column of paged_decode's GPU kernel time per call (no host dispatch; see _timing.device_ms).
KERNEL = "tq4jax paged_decode kernel"


def make_case(b: int, ctx: int):
    """A cache holding b sequences of ctx tokens in shuffled blocks, written by paged_write."""
    key = jax.random.PRNGKey(b * 100003 + ctx)
    kq, kk, kv, kp = jax.random.split(key, 4)
    per_seq = ctx // BS
    n_blocks = b * per_seq
    table = jax.random.permutation(kp, n_blocks).astype(jnp.int32).reshape(b, per_seq)
    k = jax.random.normal(kk, (b * ctx, HKV, D), jnp.float16)
    v = jax.random.normal(kv, (b * ctx, HKV, D), jnp.float16)
    t = jnp.arange(ctx)
    slots = (table[:, t // BS] * BS + t % BS).reshape(-1)
    rot = tq.haar_rotation(D)
    cent, bnd = tq.lloyd_max(D, 4)
    lay = tq.paged_layout(HKV, D)
    cache = jnp.zeros((n_blocks, BS, lay.row_bytes), jnp.uint8)
    cache = jax.jit(lambda c, k, v, s: tq.paged_write(c, k, v, s, rot, bnd))(cache, k, v, slots)
    q = jax.random.normal(kq, (b, HQ, D), jnp.float16)
    lens = jnp.full((b,), ctx, jnp.int32)
    dense = lambda x: x.reshape(b, ctx, HKV, D)  # noqa: E731  BTNH
    return q, cache, table, lens, cent, rot, dense(k), dense(v)


def _cudnn(res: dict, q, k, v, **kw) -> None:
    """Time jax cuDNN attention (BTNH) into res["jax cudnn fp16"]; report a failure."""
    try:
        res["jax cudnn fp16"] = time_ms(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", **kw)), q, k, v)
    except Exception as e:  # noqa: BLE001
        print(f"  jax cudnn failed: {type(e).__name__}: {str(e)[:100]}")


def sdpa_decode(res: dict, q, k, v) -> bool:
    """Time torch SDPA fp16 decode (q [B, HQ, D], k/v BTNH) into res["torch SDPA fp16"];
    False when torch is missing."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return False
    t = lambda a: torch.from_numpy(np.array(a)).cuda()  # noqa: E731
    tq_, tk, tv = t(q)[:, :, None], t(k).transpose(1, 2), t(v).transpose(1, 2)
    res["torch SDPA fp16"] = torch_ms(lambda: F.scaled_dot_product_attention(
        tq_, tk, tv, enable_gqa=True))
    return True


def run(b: int, ctx: int) -> dict[str, float]:
    q, cache, table, lens, cent, rot, k, v = make_case(b, ctx)
    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    fn = jax.jit(lambda q, c, t, n: tq.paged_decode(q, c, t, n, cent, rot, **kw))
    res = {"tq4jax paged_decode": time_ms(fn, q, cache, table, lens),
           KERNEL: device_ms(fn, q, cache, table, lens)}
    _cudnn(res, q[:, None], k, v)
    if not sdpa_decode(res, q, k, v):
        return res
    import torch
    t = lambda a: torch.from_numpy(np.array(a)).cuda()  # noqa: E731
    try:
        from turboquant_vllm.triton.fused_paged_tq4_attention import fused_paged_tq4_decode
    except ImportError:
        return res
    args = (t(q), t(cache), t(table), t(lens), t(cent), t(rot))
    res["original fused_paged_tq4_decode"] = torch_ms(lambda: fused_paged_tq4_decode(
        *args, HKV, D, BS))
    return res


def run_prefill(n_seqs: int, new: int, ctx: int) -> dict[str, float]:
    """Chunked prefill: n_seqs sequences of ``ctx`` cached + ``new`` new tokens (all in the
    cache), causal with the new tokens as the last positions."""
    total = ctx + new
    _, cache, table, lens, cent, rot, k, v = make_case(n_seqs, total)
    q = jax.random.normal(jax.random.PRNGKey(7), (n_seqs * new, HQ, D), jnp.float16)
    qsl = jnp.arange(n_seqs + 1, dtype=jnp.int32) * new
    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    res = {}
    for name, int8 in (("tq4jax paged_prefill fp16", False), ("tq4jax paged_prefill int8", True)):
        res[name] = time_ms(jax.jit(lambda q, c, t, n, l, i=int8: tq.paged_prefill(
            q, c, t, n, l, cent, rot, **kw, use_int8_qk=i)), q, cache, table, lens, qsl)
    qb = q.reshape(n_seqs, new, HQ, D)  # BTNH
    visible = jnp.arange(total)[None, :] <= jnp.arange(new)[:, None] + ctx
    _cudnn(res, qb, k, v, mask=visible[None, None])
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:
        return res
    t = lambda a: torch.from_numpy(np.array(a)).cuda()  # noqa: E731
    tq_, tk, tv = (t(x).transpose(1, 2) for x in (qb, k, v))
    bias = causal_lower_right(new, total)
    try:
        res["torch SDPA fp16"] = torch_ms(lambda: F.scaled_dot_product_attention(
            tq_, tk, tv, attn_mask=bias, enable_gqa=True))
    except Exception as e:  # noqa: BLE001  (older torch: no GQA with a CausalBias)
        print(f"  SDPA with enable_gqa failed ({type(e).__name__}); K/V repeated before timing")
        tk, tv = (x.repeat_interleave(HQ // HKV, dim=1) for x in (tk, tv))
        res["torch SDPA fp16"] = torch_ms(lambda: F.scaled_dot_product_attention(
            tq_, tk, tv, attn_mask=bias))
    try:
        from turboquant_vllm.triton.fused_paged_tq4_int8_prefill import (
            fused_paged_tq4_int8_prefill)
    except ImportError:
        return res
    tc, tcent, trot = t(cache), t(cent), t(rot)
    per_seq = [(t(q[i * new:(i + 1) * new]), t(table[i:i + 1]), t(lens[i:i + 1]))
               for i in range(n_seqs)]

    def original():  # single-sequence kernel: one call per sequence
        for qi, bt, ln in per_seq:
            fused_paged_tq4_int8_prefill(qi, tc, bt, ln, tcent, trot, HKV, D, BS)

    res["original fused_paged_tq4_int8_prefill"] = torch_ms(original)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    copy = copy_bandwidth_gbs()
    print(f"# paged decode bench: {device_line()}; {HQ}/{HKV} heads, D={D}, block {BS}; "
          f"copy bandwidth {copy:.0f} GB/s")
    rows = []
    for b in ((8,) if a.quick else (1, 8, 32)):
        for ctx in ((1024, 8192) if a.quick else (1024, 8192, 32768)):
            rows.append((b, ctx, run(b, ctx)))
    names = sorted({n for _, _, r in rows for n in r})
    print("\n| B | context | " + " | ".join(names)
          + " | TQ4 GB/s | of copy | SDPA / tq4jax | SDPA / tq4jax kernel | original / tq4jax |")
    print("|---" * (len(names) + 7) + "|")
    for b, ctx, r in rows:
        ms, kern = r["tq4jax paged_decode"], r[KERNEL]
        gbs = 2 * b * HKV * ctx * tq.bytes_per_token_head(D) / (kern * 1e-3) / 1e9
        sd = r.get("torch SDPA fp16", float("nan"))
        orig = r.get("original fused_paged_tq4_decode", float("nan")) / ms
        print(f"| {b} | {ctx} | " + " | ".join(f"{r[n]:.3f}" if n in r else "-" for n in names)
              + f" | {gbs:.0f} | {gbs / copy:.0%} | {sd / ms:.2f}x | {sd / kern:.2f}x | "
              f"{orig:.1f}x |")
    print("\nms, median. tq4jax paged_decode: 5 x 20 enqueued jit calls (host dispatch "
          "included); kernel: GPU kernel time per call from a profiler trace (split merge "
          "included). torch: CUDA-graph replays (device time). TQ4 GB/s: compressed K/V bytes "
          "read once (136 per token per KV head) over the kernel time")
    n_seqs, new, ctx = (4, 2048, 6144)
    r = run_prefill(n_seqs, new, ctx)
    print(f"\n# paged prefill: {n_seqs} sequences x {new} new tokens on {ctx} context, causal\n")
    print("| path | ms | vs torch SDPA fp16 |\n|---|---|---|")
    sd = r.get("torch SDPA fp16", float("nan"))
    for name, ms in sorted(r.items(), key=lambda kv: kv[1]):
        print(f"| {name} | {ms:.3f} | {ms / sd:.2f}x |")


if __name__ == "__main__":
    main()
