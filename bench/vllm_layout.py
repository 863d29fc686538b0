"""Upstream vLLM TurboQuant layout (family B): decode at B=8, 32/8 heads, D=128, block 16,
8K and 32K context, for the four presets, beside torch SDPA fp16 on dense K/V (when torch is
importable) and tq4jax's paged_decode on the turboquant-vllm layout (family A) of the same
tokens. Also: the GPU time of a decode (kernels only, from a profiler trace), the store
and full_dequant_kv.

    PYTHONPATH=. python3 bench/vllm_layout.py [--quick] [--sweep [PRESET]]

``--sweep [PRESET]`` times decode configurations (splits x block_n x warps x stages) of a
preset (default turboquant_4bit_nc) at 32K instead and prints them best first.
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
from tq4jax import vllm as V  # noqa: E402
from _timing import copy_bandwidth_gbs, device_line, device_ms, time_ms  # noqa: E402
from paged import sdpa_decode  # noqa: E402

B, HQ, HKV, D, BS = 8, 32, 8, 128, 16


def make_tokens(ctx: int):
    """Dense fp16 K/V [B, ctx, HKV, D] (BTNH), queries, a shuffled block table, slots."""
    kq, kk, kv, kp = jax.random.split(jax.random.PRNGKey(ctx), 4)
    per_seq = ctx // BS
    table = jax.random.permutation(kp, B * per_seq).astype(jnp.int32).reshape(B, per_seq)
    k = jax.random.normal(kk, (B, ctx, HKV, D), jnp.float16)
    v = jax.random.normal(kv, (B, ctx, HKV, D), jnp.float16)
    t = jnp.arange(ctx)
    slots = (table[:, t // BS] * BS + t % BS).reshape(-1)
    q = jax.random.normal(kq, (B, HQ, D), jnp.float16)
    return q, k, v, table, slots, jnp.full((B,), ctx, jnp.int32)


def store_case(pr: V.TurboQuantPreset, k, v, slots, pi, cent):
    cache = jnp.zeros(pr.cache_shape(slots.shape[0] // BS, BS, HKV), jnp.uint8)
    store = jax.jit(lambda c, k, v, s: V.turboquant_store(c, k, v, s, pi, cent,
                                                          **pr.store_kwargs()),
                    donate_argnums=0)
    kk, vv = k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)
    cache = store(cache, kk, vv, slots)
    store_ms = time_ms(lambda: store(jnp.zeros_like(cache), kk, vv, slots), iters=3, reps=3)
    return cache, store_ms


def decode_fn(pr, pi, cent, splits=32, cfg=None):
    return jax.jit(lambda q, c, t, n: V.turboquant_decode(
        q, c, t, n, pi, cent, D ** -0.5, **pr.decode_kwargs(), max_num_kv_splits=splits,
        config=cfg))


def baselines(ctx: int, q, k, v, table, slots, lens) -> dict[str, float]:
    res = {}
    rot = tq.haar_rotation(D)
    cent, bnd = tq.lloyd_max(D, 4)
    lay = tq.paged_layout(HKV, D)
    cache = jnp.zeros((B * ctx // BS, BS, lay.row_bytes), jnp.uint8)
    cache = jax.jit(lambda c, k, v, s: tq.paged_write(c, k, v, s, rot, bnd))(
        cache, k.reshape(-1, HKV, D), v.reshape(-1, HKV, D), slots)
    kw = dict(num_kv_heads=HKV, head_dim=D, block_size=BS)
    res["family A paged_decode"] = time_ms(jax.jit(
        lambda q, c, t, n: tq.paged_decode(q, c, t, n, cent, rot, **kw)), q, cache, table, lens)
    sdpa_decode(res, q, k, v)
    return res


def sweep(q, k, v, table, slots, lens, name: str = "turboquant_4bit_nc") -> None:
    pr = V.preset(name, D)
    pi = tq.hadamard_rotation(D, seed=1)
    cent, _ = tq.lloyd_max(D, pr.mse_bits)
    cache, _ = store_case(pr, k, v, slots, pi, cent)
    rows = []
    for splits in (8, 32):
        for bn, nw, st, pre in itertools.product((64, 128), (4, 8), (2, 3), (False, True)):
            cfg = V.DecodeConfig(bn, nw, st, pre)
            try:
                ms = time_ms(decode_fn(pr, pi, cent, splits, cfg), q, cache, table, lens)
            except Exception as e:  # noqa: BLE001
                print(f"  splits {splits} {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append((ms, splits, cfg))
    print(f"\n# sweep: {name} decode, B=8, 32K\n\n| ms | splits | block_n | warps "
          "| stages | scalar prefetch |\n|---|---|---|---|---|---|")
    for ms, splits, cfg in sorted(rows, key=lambda r: r[0]):
        print(f"| {ms:.4f} | {splits} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} "
              f"| {cfg.prefetch} |")


def precision(q, k, v, table, slots, lens, ctx: int) -> None:
    """The score modes (DecodeConfig.scores: float32-accurate "split", query-only "split_q",
    single 16-bit dots): GPU time and relative L2 / Linf difference from the reference, per
    preset, fp16 and bf16 queries (3x the bench's queries: larger logits)."""
    modes = V.SCORE_MODES
    print(f"\n# score modes: B={B}, {ctx} context; GPU ms (rel L2 / rel Linf vs reference)\n\n"
          "| preset | q dtype | " + " | ".join(modes) + " |\n|---|---|" + "---|" * len(modes))
    for name in V.PRESETS:
        pr = V.preset(name, D)
        if pr.key_fp8:
            continue  # fp8 keys: the raw query times exact fp8 values, nothing to split
        pi = tq.hadamard_rotation(D, seed=1)
        cent, _ = tq.lloyd_max(D, pr.mse_bits)
        cache, _ = store_case(pr, k, v, slots, pi, cent)
        for dt in (jnp.float16, jnp.bfloat16):
            qd = (q * 3).astype(dt)
            ref = jax.jit(lambda q, c, t, n, pr=pr, pi=pi, cent=cent: V.turboquant_decode(
                q, c, t, n, pi, cent, D ** -0.5, **pr.decode_kwargs(), impl="reference"))(
                qd, cache, table, lens).astype(jnp.float32)
            cells = []
            for mode in modes:
                fn = decode_fn(pr, pi, cent, cfg=V.DecodeConfig(scores=mode))
                out = fn(qd, cache, table, lens).astype(jnp.float32)
                l2 = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                linf = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
                cells.append(f"{device_ms(fn, qd, cache, table, lens):.4f} ({l2:.1e} / "
                             f"{linf:.1e})")
            print(f"| {name} | {jnp.dtype(dt).name} | " + " | ".join(cells) + " |", flush=True)
        del cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", nargs="?", const="turboquant_4bit_nc", metavar="PRESET")
    ap.add_argument("--precision", action="store_true",
                    help="only the score-mode table (32K; --quick: 8K)")
    a = ap.parse_args()
    if a.sweep:
        print(f"# vLLM-layout decode sweep: {device_line()}")
        sweep(*make_tokens(32768), a.sweep)
        return
    if a.precision:
        ctx = 8192 if a.quick else 32768
        print(f"# vLLM-layout decode score precision: {device_line()}")
        precision(*make_tokens(ctx), ctx)
        return
    copy = copy_bandwidth_gbs()
    print(f"# vLLM-layout decode bench: {device_line()}; B={B}, {HQ}/{HKV} heads, D={D}, "
          f"block {BS}; copy bandwidth {copy:.0f} GB/s")
    rows = []
    for ctx in ((8192,) if a.quick else (8192, 32768)):
        q, k, v, table, slots, lens = make_tokens(ctx)
        base = baselines(ctx, q, k, v, table, slots, lens)
        for name in V.PRESETS:
            pr = V.preset(name, D)
            pi = tq.hadamard_rotation(D, seed=1)
            cent, _ = tq.lloyd_max(D, pr.mse_bits)
            cache, store_ms = store_case(pr, k, v, slots, pi, cent)
            ms = time_ms(decode_fn(pr, pi, cent), q, cache, table, lens)
            s1 = device_ms(decode_fn(pr, pi, cent), q, cache, table, lens)
            deq = jax.jit(lambda c, t, n, pr=pr, cent=cent: V.full_dequant_kv(
                c, t, n, cent, **pr.dequant_kwargs()))
            deq_ms = time_ms(deq, cache, table, lens, iters=5, reps=3)
            rows.append((name, ctx, pr.slot_bytes, ms, s1, store_ms, deq_ms, base))
            del cache
    print("\n| preset | context | slot B | decode ms | GPU ms | GB/s | of copy | "
          "SDPA fp16 ms | SDPA / tq4jax | ceiling | family A ms | store ms | dequant ms |")
    print("|---" * 13 + "|")
    for name, ctx, sb, ms, s1, st, dq, base in rows:
        gbs = B * HKV * ctx * sb / (ms * 1e-3) / 1e9
        sd = base.get("torch SDPA fp16", float("nan"))
        print(f"| {name} | {ctx} | {sb} | {ms:.3f} | {s1:.3f} | {gbs:.0f} | {gbs / copy:.0%} | "
              f"{sd:.3f} | {sd / ms:.2f}x | {2 * 2 * D / sb:.2f}x | "
              f"{base['family A paged_decode']:.3f} | {st:.2f} | {dq:.2f} |")
    print(f"\nms, median. GB/s counts the slot bytes read once; ceiling = 512 / slot bytes (a "
          f"perfect kernel vs a perfect fp16 one). store: {B}x context tokens x {HKV} heads; "
          f"dequant: the whole context to fp16 K/V.")


if __name__ == "__main__":
    main()
