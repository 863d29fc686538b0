"""The benchmark families in one run, with dense baselines measured in the same run:

* decode: ``flash_attention_tq4_kv`` (contiguous), ``paged_decode`` and vLLM-layout
  ``turboquant_decode`` per kernel backend, B in {1, 8, 32} x context, beside torch SDPA fp16
  (when torch is importable) and jax cuDNN/XLA attention on the dense cache;
* prefill: causal dense ``flash_attention`` and compressed ``flash_attention_tq4_kv`` beside
  the same dense baselines;
* memory: the longest context a KV-cache memory budget holds, dense fp16 vs TQ4 (computed).

Writes ``bench/results/<device>-<date>.md`` (tables with ratios to the dense baselines) and,
with matplotlib installed (``pip install -e ".[bench]"``), PNG plots beside it.

    PYTHONPATH=. python3 bench/run.py [--quick] [--families decode prefill memory]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tq4jax as tq  # noqa: E402
from _timing import device_line, gpu_or_wall  # noqa: E402
from decode import D, HKV, HQ, cases, jax_dense_ms, sdpa_ms  # noqa: E402


def progress(i: int, n: int, what: str, t0: float) -> None:
    """One line of progress: a bar, the step and the elapsed time."""
    done = int(30 * i / max(n, 1))
    print(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {what[:48]:48s} "
          f"{time.perf_counter() - t0:6.0f} s", end="", flush=True, file=sys.stderr)


def decode_family(batches, contexts, impls, t0) -> list[dict]:
    rows, steps = [], len(batches) * len(contexts)
    for i, (b, ctx) in enumerate((b, c) for b in batches for c in contexts):
        progress(i, steps, f"decode B={b} {ctx}", t0)
        base = {"SDPA fp16": sdpa_ms(b, ctx), "jax cuDNN": jax_dense_ms(b, 1, ctx, False, "cudnn"),
                "jax XLA": jax_dense_ms(b, 1, ctx, False, "xla")}
        for name, (make, args, nbytes) in cases(b, ctx).items():
            for impl in impls:
                try:
                    ms = gpu_or_wall(make(impl), *args)
                except (ValueError, NotImplementedError):
                    continue
                rows.append(dict(op=name, impl=impl, B=b, ctx=ctx, ms=ms, **base))
    progress(steps, steps, "decode done", t0)
    return rows


def prefill_family(contexts, t0) -> list[dict]:
    rows = []
    rot = tq.haar_rotation(D)
    cent, bnd = tq.lloyd_max(D, 4)
    for i, ctx in enumerate(contexts):
        progress(i, len(contexts), f"prefill {ctx}", t0)
        key = jax.random.split(jax.random.PRNGKey(ctx), 3)
        q = jax.random.normal(key[0], (1, HQ, ctx, D), jnp.float16)
        k, v = (jax.random.normal(kk, (1, HKV, ctx, D), jnp.float16) for kk in key[1:])
        kp, kn, vp, vn = tq.compress_kv(k, v, rot, bnd)
        base = {"SDPA fp16": float("nan"), "jax cuDNN": jax_dense_ms(1, ctx, ctx, True, "cudnn"),
                "jax XLA": jax_dense_ms(1, ctx, ctx, True, "xla")}
        dense = jax.jit(lambda q, k, v: tq.flash_attention(q, k, v, None, True))
        packed = jax.jit(lambda q, kp, kn, vp, vn: tq.flash_attention_tq4_kv(
            q, kp, kn, vp, vn, cent, rot, None, True))
        rows.append(dict(op="flash_attention (dense)", impl="triton", B=1, ctx=ctx,
                         ms=gpu_or_wall(dense, q, k, v), **base))
        rows.append(dict(op="flash_attention_tq4_kv", impl="triton", B=1, ctx=ctx,
                         ms=gpu_or_wall(packed, q, kp, kn, vp, vn), **base))
    progress(len(contexts), len(contexts), "prefill done", t0)
    return rows


def memory_family(budgets_gib=(16, 40, 80), layers: int = 32) -> list[dict]:
    """Longest context (tokens, batch 1) whose KV cache of ``layers`` layers x 8 KV heads x
    D=128 fits each budget: fp16 256 B per token, head and K/V; TQ4 68 B."""
    per_token = {"dense fp16": 2 * layers * HKV * 2 * D,
                 "TQ4": 2 * layers * HKV * tq.bytes_per_token_head(D)}
    return [dict(budget_gib=g, **{k: int(g * 2 ** 30 // v) for k, v in per_token.items()})
            for g in budgets_gib]


def markdown(rows: list[dict], mem: list[dict], header: str) -> str:
    out = [header, ""]
    for fam in ("decode", "prefill"):
        sel = [r for r in rows if r.get("family") == fam]
        if not sel:
            continue
        out += [f"## {fam}", "", "| op | backend | B | context | ms | SDPA fp16 | jax cuDNN | "
                "jax XLA | best dense / ms |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            dense = [x for x in (r["SDPA fp16"], r["jax cuDNN"], r["jax XLA"]) if x == x]
            ratio = f"{min(dense) / r['ms']:.2f}x" if dense else "-"
            out.append(f"| {r['op']} | {r['impl']} | {r['B']} | {r['ctx']} | {r['ms']:.4f} | "
                       f"{r['SDPA fp16']:.4f} | {r['jax cuDNN']:.4f} | {r['jax XLA']:.4f} | "
                       f"{ratio} |")
        out.append("")
    if mem:
        out += ["## memory: longest context per KV-cache budget (32 layers, 8 KV heads, D=128)",
                "", "| budget GiB | dense fp16 tokens | TQ4 tokens | ratio |", "|---|---|---|---|"]
        out += [f"| {m['budget_gib']} | {m['dense fp16']} | {m['TQ4']} | "
                f"{m['TQ4'] / m['dense fp16']:.2f}x |" for m in mem]
    return "\n".join(out) + "\n"


def plots(rows: list[dict], mem: list[dict], stem: str) -> list[str]:
    """PNG plots next to the markdown; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    dec = [r for r in rows if r.get("family") == "decode"]
    for b in sorted({r["B"] for r in dec}):
        fig, ax = plt.subplots(figsize=(6, 4))
        sel = [r for r in dec if r["B"] == b]
        for op, impl in sorted({(r["op"], r["impl"]) for r in sel}):
            pts = sorted((r["ctx"], r["ms"]) for r in sel if (r["op"], r["impl"]) == (op, impl))
            ax.plot(*zip(*pts), marker="o", label=f"{op} [{impl}]")
        for base in ("SDPA fp16", "jax cuDNN"):
            pts = sorted({(r["ctx"], r[base]) for r in sel if r[base] == r[base]})
            if pts:
                ax.plot(*zip(*pts), linestyle="--", marker="x", label=f"{base} (dense)")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per step",
               title=f"decode, batch {b}, {HQ}/{HKV} heads, D={D}")
        ax.legend(fontsize=7)
        paths.append(f"{stem}-decode-b{b}.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    pre = [r for r in rows if r.get("family") == "prefill"]
    if pre:
        fig, ax = plt.subplots(figsize=(6, 4))
        for op in sorted({r["op"] for r in pre}):
            ax.plot(*zip(*sorted((r["ctx"], r["ms"]) for r in pre if r["op"] == op)),
                    marker="o", label=op)
        pts = sorted((r["ctx"], r["jax cuDNN"]) for r in pre if r["jax cuDNN"] == r["jax cuDNN"])
        if pts:
            ax.plot(*zip(*pts), linestyle="--", marker="x", label="jax cuDNN (dense)")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title="causal prefill")
        ax.legend(fontsize=7)
        paths.append(f"{stem}-prefill.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if mem:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [m["budget_gib"] for m in mem]
        for key in ("dense fp16", "TQ4"):
            ax.bar([x + (0.4 if key == "TQ4" else -0.4) * 2 for x in xs],
                   [m[key] for m in mem], width=3, label=key)
        ax.set(xlabel="KV-cache budget (GiB)", ylabel="max context (tokens)",
               title="context per memory budget (32 layers, 8 KV heads, D=128)")
        ax.legend()
        paths.append(f"{stem}-memory.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def parse_markdown(path: str) -> tuple[list[dict], list[dict]]:
    """The rows and memory table of a results file this script wrote (for ``--replot``)."""
    rows, mem, fam = [], [], None
    with open(path) as f:
        for line in f:
            if line.startswith("## "):
                fam = line.split()[1].rstrip(":")
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or not cells[-1] or cells[0] in ("op", "budget GiB") \
                    or set(cells[0]) <= set("-"):
                continue
            if fam in ("decode", "prefill"):
                rows.append(dict(family=fam, op=cells[0], impl=cells[1], B=int(cells[2]),
                                 ctx=int(cells[3]), ms=float(cells[4]),
                                 **{k: float(v) for k, v in zip(
                                     ("SDPA fp16", "jax cuDNN", "jax XLA"), cells[5:8])}))
            elif fam == "memory":
                mem.append({"budget_gib": int(cells[0]), "dense fp16": int(cells[1]),
                            "TQ4": int(cells[2])})
    return rows, mem


def main(argv: list[str] | None = None) -> None:
    gpu = jax.default_backend() == "gpu"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B=8 only, two contexts")
    ap.add_argument("--families", nargs="+", default=["decode", "prefill", "memory"],
                    choices=["decode", "prefill", "memory"])
    ap.add_argument("--impl", nargs="+", default=["triton", "mosaic"],
                    help="kernel backends to time (unsupported ones are skipped)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--batch", type=int, nargs="+", help="decode batches (GPU default 1 8 32)")
    ap.add_argument("--ctx", type=int, nargs="+",
                    help="decode contexts (GPU default 1024 8192 32768 131072)")
    ap.add_argument("--replot", metavar="RESULTS_MD",
                    help="only redraw the plots of a results file (measured data, no runs)")
    a = ap.parse_args(argv)
    if a.replot:
        pngs = plots(*parse_markdown(a.replot), a.replot[:-len(".md")])
        print(f"wrote {len(pngs)} plots" if pngs else "no matplotlib: no plots")
        return
    if gpu:
        batches, contexts = ((8,), (8192, 32768)) if a.quick else ((1, 8, 32),
                                                                  (1024, 8192, 32768, 131072))
        prefill_ctx = (2048,) if a.quick else (2048, 8192, 16384)
    else:  # a CPU smoke run of the whole pipeline
        batches, contexts, prefill_ctx = (1,), (256,), (128,)
    batches, contexts = tuple(a.batch or batches), tuple(a.ctx or contexts)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if "decode" in a.families:
        rows += [dict(r, family="decode") for r in decode_family(batches, contexts, a.impl, t0)]
    if "prefill" in a.families:
        rows += [dict(r, family="prefill") for r in prefill_family(prefill_ctx, t0)]
    mem = memory_family() if "memory" in a.families else []
    print(file=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    dev = re.sub(r"[^A-Za-z0-9]+", "-", jax.devices()[0].device_kind).strip("-") or "cpu"
    stem = os.path.join(a.out, f"{dev}-{datetime.date.today().isoformat()}")
    header = (f"# tq4jax benchmarks: {device_line()}, {datetime.date.today().isoformat()}\n\n"
              f"`PYTHONPATH=. python3 bench/run.py {' '.join(argv or sys.argv[1:])}`; ms per "
              f"call: GPU time from a profiler trace on a GPU, wall time elsewhere.")
    text = markdown(rows, mem, header)
    pngs = plots(rows, mem, stem)
    text += "".join(f"\n![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in pngs)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {stem}.md" + (f" and {len(pngs)} plots" if pngs else " (no matplotlib: no "
                                                                       "plots)"))


if __name__ == "__main__":
    main()
