"""Registers, shared memory and SASS instruction mix of the Mosaic GPU decode kernels (GPU).

Mosaic GPU compiles a kernel when its jitted op first runs; with ``MOSAIC_GPU_DUMP_PTXAS``,
``MOSAIC_GPU_DUMP_SASS`` and ``MOSAIC_GPU_DUMP_TO`` set (jaxlib reads them at compile time) it
writes ptxas's resource report and the SASS per kernel. This script sets them, runs each
Mosaic decode op once (B=8, 8K keys, 32/8 heads, D=128, block 16, its default config) and
prints, per dump file: registers, spills, shared memory and the count of the opcodes that
bound a decode tile (tensor-core HGMMA, PRMT lookups, shared loads/stores, exp2, barriers).
Use it to see what a tile costs before and after a kernel change: one device call, ~1 min.

    PYTHONPATH=. python3 bench/mosaic_report.py [--dump DIR] [--top 12] [--ops NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import glob
import re
import shutil
import sys
import tempfile

OPCODES = ("HGMMA", "PRMT", "LDS", "STS", "LDSM", "STSM", "MUFU.EX2", "BAR", "SYNCS", "UTMALDG",
           "LDG", "SHFL", "F2FP", "HFMA2", "HMUL2", "FMUL", "FFMA", "FMNMX", "LOP3", "SHF")


def sass_mix(text: str) -> collections.Counter:
    """Opcode counts of a SASS listing (``/*addr*/ OPCODE.MODS operands ;`` lines)."""
    counts: collections.Counter = collections.Counter()
    for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text):
        op = m.group(1)
        counts[op] += 1
        base = op.split(".")[0]
        if base != op:
            counts[base + "*"] += 1
    return counts


def resources(text: str) -> str:
    """ptxas's 'Used N registers ... smem' lines and spill counts, joined."""
    lines = [ln.strip() for ln in text.splitlines()
             if re.search(r"Used \d+ registers|spill|smem", ln)]
    return " | ".join(lines[:4])


OPS = ("contiguous tq4_kv", "paged_decode", "vllm 4bit_nc", "vllm k8v4", "vllm k3v4_nc",
       "vllm 3bit_nc")


def find_nvdisasm() -> None:
    """Put a CUDA toolkit's bin folder on PATH when ``nvdisasm`` (which jaxlib runs for the
    SASS dump) is not on it (the H200 machine: installed, not on PATH)."""
    if shutil.which("nvdisasm"):
        return
    for pattern in ("/usr/local/cuda*/bin/nvdisasm", "/opt/nvidia/*/bin/nvdisasm",
                    "/usr/lib/nvidia-cuda-toolkit/bin/nvdisasm"):
        for path in sorted(glob.glob(pattern)):
            os.environ["PATH"] = os.path.dirname(path) + os.pathsep + os.environ["PATH"]
            return
    print("# nvdisasm not found: no SASS opcode mix (registers and shared memory only)")


def run_ops(ops=OPS) -> None:
    import jax
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode import cases  # noqa: E402 (bench/decode.py: the decode bench's inputs)
    c = cases(8, 8192)  # every case's inputs, built once
    for name in ops:
        make, args, _ = c[name]
        jax.block_until_ready(make("mosaic")(*args))
        print(f"ran {name}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", default=None, help="dump folder (default: a temporary one)")
    ap.add_argument("--top", type=int, default=12, help="most frequent opcodes to list")
    ap.add_argument("--ops", nargs="+", default=list(OPS), help="ops of bench/decode.py")
    a = ap.parse_args()
    dump = a.dump or tempfile.mkdtemp(prefix="mosaic_dump_")
    os.makedirs(dump, exist_ok=True)
    for var in ("MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_SASS", "MOSAIC_GPU_DUMP_PTX"):
        os.environ[var] = "1"
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump
    find_nvdisasm()
    run_ops(a.ops)
    files = sorted(f for f in os.listdir(dump) if not f.endswith(".log"))  # not the IR passes
    print(f"\n# {len(files)} dump files in {dump}")
    for f in files:
        with open(os.path.join(dump, f), errors="replace") as fh:
            text = fh.read()
        print(f"\n## {f} ({len(text)} chars)")
        res = resources(text)
        if res:
            print("resources:", res)
        mix = sass_mix(text)
        if mix:
            print("| opcode | count |\n|---|---|")
            for op in OPCODES:
                n = mix.get(op, 0) or mix.get(op + "*", 0)
                if n:
                    print(f"| {op} | {n} |")
            print("top:", ", ".join(f"{op} {n}" for op, n in mix.most_common(a.top)))


if __name__ == "__main__":
    main()
