"""Decode kernels with a free codebook lookup: a lower bound for issues 4 and 5 (GPU only).

Each compressed decode path runs twice in one process: as shipped, and with the in-register
codebook lookup (``_tiles.split_lut_asm``, 18 integer instructions per 8 coordinates for a
Lloyd-Max codebook) swapped for a 2-instruction stand-in that moves each code byte into an
fp16 without a table. The stand-in's values are wrong, but the loads, block-table reads,
dots, softmax, layouts and split merge are the shipped ones. So its time bounds from below
what any exact lookup can reach in this kernel. The table sets it beside torch SDPA fp16 on
the same dense K/V and the issues' targets (B=8: 3x faster than SDPA, issues 4 and 5; B=1:
2x, issue 4).

    python3 bench/decode_floor.py
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from tq4jax import _tiles, vllm  # noqa: E402
from _timing import device_line, device_ms  # noqa: E402
import attention as bench_attention  # noqa: E402
import paged as bench_paged  # noqa: E402
import vllm_layout as bench_vllm  # noqa: E402

CTX = 32768
SHIPPED_LUT = _tiles.split_lut_asm


def stand_in_lut(odd: bool, low_first: bool = False, planes=None) -> str:
    """2 prmt per 4 code bytes: byte -> low byte of an fp16 (high byte 0x3C/0x3D)."""
    hi = 0x3D3D3D3D if odd else 0x3C3C3C3C
    return "\n".join(["{", f"prmt.b32 $0, $2, {hi:#x}, 0x4140;",
                      f"prmt.b32 $1, $2, {hi:#x}, 0x4342;", "}"])


def cases(b: int, dense: list):
    """(name, builder of a fresh jitted fn, its args) at batch b; appends the paged case's
    dense (q, K, V) to ``dense`` (the SDPA baseline, same shapes for every case)."""
    q, cache, table, lens, cent, rot, k, v = bench_paged.make_case(b, CTX)
    dense.extend((q, k, v))
    kw = dict(num_kv_heads=bench_paged.HKV, head_dim=bench_paged.D, block_size=bench_paged.BS)
    c = np.asarray(cent)
    yield ("paged_decode", lambda: jax.jit(lambda q, ca, t, n: tq.paged_decode(
        q, ca, t, n, c, rot, **kw)), (q, cache, table, lens))
    q4, _, _, kp, kn, vp, vn, c4, r4 = bench_attention.make_data(b, 1, CTX)
    c4 = np.asarray(c4)
    yield ("flash_attention_tq4_kv", lambda: jax.jit(
        lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(q, kp, kn, vp, vn, c4, r4, None,
                                                            False)), (q4, kp, kn, vp, vn))
    if b == bench_vllm.B:
        vq, vk, vv, vtable, slots, vlens = bench_vllm.make_tokens(CTX)  # B=8 32K, as above
        pr = vllm.preset("turboquant_4bit_nc", bench_vllm.D)
        pi = tq.hadamard_rotation(bench_vllm.D, seed=1)
        vc, _ = tq.lloyd_max(bench_vllm.D, pr.mse_bits)
        vcache, _ = bench_vllm.store_case(pr, vk, vv, slots, pi, vc)
        yield ("vllm turboquant_4bit_nc", lambda: bench_vllm.decode_fn(pr, pi, vc),
               (vq, vcache, vtable, vlens))


def main() -> None:
    print(f"# decode floor: {device_line()}; 32/8 heads, D=128, context {CTX}, block 16")
    print("\n| kernel | B | shipped ms | lookup stand-in ms | torch SDPA fp16 ms | "
          "SDPA / shipped | SDPA / stand-in | target | target ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in (8, 1):
        dense: list = []
        sdpa = None
        for name, build, args in cases(b, dense):
            ms = {}
            for lut in (SHIPPED_LUT, stand_in_lut):
                jax.clear_caches()
                _tiles.split_lut_asm = lut
                try:
                    ms[lut] = device_ms(build(), *args)
                finally:
                    _tiles.split_lut_asm = SHIPPED_LUT
            if sdpa is None:  # once per batch: every case has the paged case's shapes
                res: dict[str, float] = {}
                sdpa = res["torch SDPA fp16"] if bench_paged.sdpa_decode(res, *dense) else False
            cols = [f"{ms[SHIPPED_LUT]:.4f}", f"{ms[stand_in_lut]:.4f}"]
            speedup = 3 if b == 8 else 2
            cols += ["-"] * 5 if not sdpa else [
                f"{sdpa:.4f}", f"{sdpa / ms[SHIPPED_LUT]:.2f}x",
                f"{sdpa / ms[stand_in_lut]:.2f}x", f"{speedup}x", f"{sdpa / speedup:.4f}"]
            print(f"| {name} | {b} | " + " | ".join(cols) + " |", flush=True)
    print("\nms: GPU kernel time per call from a profiler trace (split merge and rotations "
          "included); torch: CUDA-graph replays.")


if __name__ == "__main__":
    main()
