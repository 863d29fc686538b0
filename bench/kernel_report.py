"""Registers, spills and instruction mix of tq4jax's attention kernels, without a GPU.

Each kernel is lowered for an abstract CUDA device (as the lowering tests do), its Triton IR
is compiled for sm_90 by the ``triton`` package (pip; not a tq4jax dependency) with the
kernel's own num_warps / num_stages, and the PTX goes through the ``ptxas`` bundled with
Triton. The Triton version is the pip one, not the copy inside jaxlib, so numbers are close
to but not exactly what the GPU runs (tq4_kv decode: 220 registers here, 209 in Nsight
Compute on an H200 with jax 0.11.2). Use it to see spills before spending device time.

    PYTHONPATH=. python3 bench/kernel_report.py [NAME ...] [--cfg BM,BN,WARPS,STAGES[,SPLITS]]

``--cfg`` passes that tiling as ``config=`` to the family-A attention ops instead of the
default the op chooses.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.pallas.triton import lowering as triton_lowering

import tq4jax as tq
from tq4jax import vllm as V
from tq4jax.pallas_triton.tuning import Config
from tq4jax.testing import lower_to_triton

HQ, HKV, D = 32, 8, 128
OPS = ("mma.sync", "wgmma.mma_async", "ld.global", "cp.async.cg", "ld.shared", "st.shared",
       "ldmatrix", "prmt", "ex2.approx")


def _cases(cfg: Config | None) -> dict:
    """name -> (function, argument ShapeDtypeStructs): the bench shapes (32/8 heads, D=128);
    ``cfg``: the family-A attention tiling (None: the ops' defaults)."""
    s = lambda *shape, dt=jnp.float16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    u8, f32, i32 = jnp.uint8, jnp.float32, jnp.int32
    rot = tq.haar_rotation(D)
    cent = np.asarray(tq.lloyd_max(D, 4)[0])
    codes = lambda b, n: (s(b, HKV, n, D // 2, dt=u8), s(b, HKV, n, dt=f32))  # noqa: E731
    lay = tq.paged_layout(HKV, D)
    pkw = dict(num_kv_heads=HKV, head_dim=D, block_size=16, config=cfg, impl="pallas")
    akw = dict(config=cfg, impl="pallas")
    pr = V.preset("turboquant_4bit_nc", D)
    return {
        "flash_prefill_8k": (lambda q, k, v: tq.flash_attention(q, k, v, None, True, **akw),
                             (s(1, HQ, 8192, D), s(1, HKV, 8192, D), s(1, HKV, 8192, D))),
        "tq4_kv_prefill_8k": (lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(
            q, kp, kn, vp, vn, cent, rot, None, True, **akw),
            (s(1, HQ, 8192, D), *codes(1, 8192), *codes(1, 8192))),
        "tq4_kv_decode_32k": (lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(
            q, kp, kn, vp, vn, cent, rot, **akw),
            (s(8, HQ, 1, D), *codes(8, 32768), *codes(8, 32768))),
        "paged_decode_32k": (lambda q, c, t, n: tq.paged_decode(q, c, t, n, cent, rot, **pkw),
                             (s(8, HQ, D), s(8 * 2048, 16, lay.row_bytes, dt=u8),
                              s(8, 2048, dt=i32), s(8, dt=i32))),
        "paged_prefill_4x2k": (lambda q, c, t, n, l: tq.paged_prefill(
            q, c, t, n, l, cent, rot, **pkw, use_int8_qk=False),
            (s(4 * 2048, HQ, D), s(4 * 512, 16, lay.row_bytes, dt=u8), s(4, 512, dt=i32),
             s(4, dt=i32), s(5, dt=i32))),
        "paged_prefill_int8_4x2k": (lambda q, c, t, n, l: tq.paged_prefill(
            q, c, t, n, l, cent, rot, **pkw, use_int8_qk=True),
            (s(4 * 2048, HQ, D), s(4 * 512, 16, lay.row_bytes, dt=u8), s(4, 512, dt=i32),
             s(4, dt=i32), s(5, dt=i32))),
        "vllm_4bit_nc_store": (lambda c, k, v, m: V.turboquant_store(
            c, k, v, m, rot, cent, **pr.store_kwargs(), impl="pallas"),
            (s(*pr.cache_shape(64, 16, HKV), dt=u8), s(1024, HKV, D), s(1024, HKV, D),
             s(1024, dt=i32))),
        "compress_kv": (lambda k, v: tq.compress_kv(k, v, rot, tq.lloyd_max(D, 4)[1],
                                                    impl="pallas"),
                        (s(1024, HKV, D), s(1024, HKV, D))),
        "vllm_4bit_nc_decode_32k": (lambda q, c, t, n: V.turboquant_decode(
            q, c, t, n, rot, cent, D ** -0.5, **pr.decode_kwargs(), impl="pallas"),
            (s(8, HQ, D), s(*pr.cache_shape(8 * 2048, 16, HKV), dt=u8), s(8, 2048, dt=i32),
             s(8, dt=i32))),
    }


def capture(fn, args) -> list[tuple[str, int, int]]:
    """(Triton IR text, num_warps, num_stages) of every kernel ``fn`` launches: the IR from
    JAX's Pallas-to-Triton lowering, the launch parameters from the lowered module."""
    irs, lower = [], triton_lowering.lower_jaxpr_to_triton_module

    def lower_hook(*a, **k):
        out = lower(*a, **k)
        irs.append(out.module.operation.get_asm(enable_debug_info=False))
        return out

    triton_lowering.lower_jaxpr_to_triton_module = lower_hook
    try:
        text = lower_to_triton(fn, *args)
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
    params = [(int(w), int(st)) for st, w in re.findall(
        r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)]
    if len(irs) != len(params):
        raise RuntimeError(f"{len(irs)} kernels lowered but {len(params)} launches found")
    return [(ir, w, st) for ir, (w, st) in zip(irs, params)]


def compile_report(ir: str, num_warps: int, num_stages: int) -> dict:
    """Compile Triton IR for sm_90; ptxas registers / spills and PTX instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "k.ttir")
    with open(src, "w") as f:
        f.write(ir)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    with open(os.path.join(tmp, "k.ptx"), "w") as f:
        f.write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", os.path.join(tmp, "k.ptx"), "-o",
                          os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else -1  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), smem=k.metadata.shared,
                **{op: len(re.findall(re.escape(op), ptx)) for op in OPS})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="kernels (default: all)")
    ap.add_argument("--cfg", help="BM,BN,WARPS,STAGES[,SPLITS] passed as config=")
    a = ap.parse_args()
    cases = _cases(Config(*map(int, a.cfg.split(","))) if a.cfg else None)
    unknown = sorted(set(a.names) - set(cases))
    if unknown:
        ap.error(f"unknown kernel(s) {unknown}; choose from {sorted(cases)}")
    print(f"# kernel report: jax {jax.__version__}, sm_90 via pip triton; cfg "
          f"{a.cfg or 'default'}\n")
    print("| kernel | warps | stages | regs | spill st/ld B | smem KB | "
          + " | ".join(OPS) + " |")
    print("|---" * (len(OPS) + 6) + "|")
    for name in a.names or sorted(cases):
        for ir, w, st in capture(*cases[name]):
            r = compile_report(ir, w, st)
            print(f"| {name} | {w} | {st} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | "
                  f"{r['smem'] / 1024:.0f} | " + " | ".join(str(r[op]) for op in OPS) + " |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
