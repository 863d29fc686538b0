"""Serving soak: sequences arrive, grow by prefill chunks and decode steps, finish, and their
blocks (or batch rows) go to new sequences - for thousands of steps, checked every step.

Every step, on the cache under test (``--layout``: ``tq4`` / ``vllm:<preset>`` paged caches
through :mod:`tq4jax.serving`, or ``contiguous``: ``tq.TQ4Cache``):

* outputs: a sample of the step's decode and prefill sequences is recomputed with
  ``impl="reference"`` on the same cache (max error vs reference), and again on a scratch cache
  rebuilt from nothing but those sequences' host shadows ("isolation": a sequence that saw
  another's bytes, or stale ones, differs there);
* bytes: a host shadow holds the bytes every live sequence should hold (the rows the store op
  writes for its tokens, encoded into a scratch cache by the same ``impl`` at the same batch
  shape: the reference compress's float32 norms depend on the number of rows in the call);
  every live sequence's cached bytes are compared with it (must be 0 mismatches), and the
  device lengths, overflow counters and block ownership with the host's;
* overflow (paged): every ``--overflow-every`` steps one sequence (idle or decoding) is sent
  more tokens than its blocks hold, bypassing the host check; the fitting ones must land in its
  own block, the rest must be dropped and counted in ``cache.overflow``; the sequence is then
  retired.

``contiguous``: ``TQ4Cache`` has no way to free a row, so a finished sequence's row is reset
by setting its length to 0 (the codes stay: a leak would show); under jit ``update`` clamps
tokens past capacity (or fails a checkify check with ``checked=True``) and reports nothing in
the cache, so no overflow is injected there.

    PYTHONPATH=. python3 bench/soak.py [--steps N] [--layout tq4|vllm:<preset>|contiguous]
        [--impl auto|pallas|reference] [--seed S] [--size tiny|gpu] [--max-seconds T]

Exit status 1 on any byte/state/isolation mismatch, an undetected overflow, or an output error
above ``--tol``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import tq4jax as tq
from tq4jax.serving import BlockAllocator, PagedKVCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak_base import SIZES, Soak, rel_l2  # noqa: E402
from soak_contiguous import ContiguousSoak  # noqa: E402


class PagedSoak(Soak):
    """tq4 / vllm:<preset> through PagedKVCache + BlockAllocator."""

    def __init__(self, args, layout: str):
        super().__init__(args)
        impl = args.impl
        self.cache = PagedKVCache.create(self.nb, self.ms, self.mb, num_kv_heads=self.hkv,
                                         head_dim=self.d, block_size=self.bs, layout=layout)
        self.spec = self.cache.spec
        self.alloc = BlockAllocator.for_cache(self.cache)
        self.tb = self.spec.token_bytes
        self.shadow = np.zeros((self.ms, self.cap, self.tb), np.uint8)
        self.inject_due = False
        donate = (0,) if jax.default_backend() != "cpu" else ()

        @partial(jax.jit, donate_argnums=donate)
        def step(cache, k, v, ids, q_dec, dec_ids, q_pf, qsl, pf_ids):
            cache = cache.append(k, v, ids, impl=impl)
            return (cache, cache.decode(q_dec, dec_ids, impl=impl),
                    cache.prefill(q_pf, qsl, pf_ids, impl=impl))

        @jax.jit
        def ref(cache, q_dec, dec_ids, q_pf, qsl, pf_ids):
            return (cache.decode(q_dec, dec_ids, impl="reference"),
                    cache.prefill(q_pf, qsl, pf_ids, impl="reference"))

        self.step_fn, self.ref_fn = step, ref
        self.encode = jax.jit(lambda k, v: self.spec.encode(k, v, impl))
        self.encode_ref = jax.jit(lambda k, v: self.spec.encode(k, v, "reference"))

    def run_step(self) -> None:
        al, st = self.alloc, self.st
        for s in [s for s in self.seqs.values() if s.done >= s.total]:
            al.free(s.row)
            self.finish(s)
        for s in self.admit(np.flatnonzero(~al.live).tolist()):
            assert al.add() == s.row
            self.seqs[s.row] = s
            self.shadow[s.row] = 0
        dec, pf = self.schedule()
        ids = [s.row for s, n in pf for _ in range(n)] + [s.row for s in dec]
        n_real = len(ids)
        self.cache, _ = al.prepare(self.cache, np.asarray(ids, np.int32))
        # overflow injection: an idle or decoding sequence gets more tokens than its blocks hold
        victim, room, extra = None, 0, 0
        prefilling = {s.row for s, _ in pf}  # their queries must be their last positions
        idle = [r for r in self.seqs if r not in prefilling]
        if self.a.overflow_every and st["steps"] % self.a.overflow_every == 0:
            self.inject_due = True
        if self.inject_due and idle:  # else: retried at the next step
            victim = int(self.rng.choice(idle))
            room = al.capacity(victim) - int(al.lengths[victim])
            extra = int(self.rng.integers(1, 4))
            if n_real + room + extra > self.budget:
                victim = None
            else:
                ids += [victim] * (room + extra)
                st["overflow_injected"] += 1
                self.inject_due = False
        ids_all = np.full(self.budget, -1, np.int32)
        ids_all[:len(ids)] = ids
        k, v = self.randn(self.budget, self.hkv, self.d), self.randn(self.budget, self.hkv, self.d)
        q_pf = self.randn(self.budget, self.hq, self.d)
        qsl = np.zeros(self.ms + 1, np.int32)
        qsl[1:len(pf) + 1] = np.cumsum([n for _, n in pf])
        qsl[len(pf) + 1:] = qsl[len(pf)]
        pf_ids = np.full(self.ms, -1, np.int32)
        pf_ids[:len(pf)] = [s.row for s, _ in pf]
        q_dec = self.randn(self.ms, self.hq, self.d)
        dec_ids = np.full(self.ms, -1, np.int32)
        dec_ids[:len(dec)] = [s.row for s in dec]
        lens_before = al.lengths.copy()
        for s, n in pf:
            lens_before[s.row] -= n
        for s in dec:
            lens_before[s.row] -= 1
        self.cache, out_dec, out_pf = self.step_fn(self.cache, k, v, ids_all, q_dec, dec_ids,
                                                   q_pf, qsl, pf_ids)
        # host shadow: rows the store writes for these tokens, placed at each sequence's next
        # positions (the victim's fitting ones only)
        rows = np.asarray(self.encode(k, v))
        if self.a.impl != "reference":
            diff = (rows[:len(ids)] != np.asarray(self.encode_ref(k, v))[:len(ids)]).any(1)
            st["codec_diff_rows"] += int(diff.sum())
        pos = lens_before.copy()
        for i, r in enumerate(ids):
            if i >= n_real and pos[r] >= al.capacity(r):
                continue  # the injected overflow: dropped
            self.shadow[r, pos[r]] = rows[i]
            pos[r] += 1
        if victim is not None:
            al.lengths[victim] += room  # the host learns what the device accepted
        for s, n in pf:
            s.done += n
        for s in dec:
            s.done += 1
        st["prefill_tokens"] += sum(n for _, n in pf)
        st["decode_tokens"] += len(dec)
        st["tokens"] += n_real + room
        self.check_state(victim, extra)
        self.check_bytes()
        self.check_outputs(dec, pf, q_dec, out_dec, q_pf, qsl, out_pf)
        if victim is not None:  # retire it: freed at once, its row reset at the next sync
            al.free(victim)
            self.finish(self.seqs[victim])

    def check_state(self, victim, extra) -> None:
        al, st = self.alloc, self.st
        lens = np.asarray(self.cache.seq_lens)
        ov = np.asarray(self.cache.overflow)
        want_ov = np.zeros_like(ov)
        if victim is not None:
            want_ov[victim] = extra
            if ov[victim] == extra and lens[victim] == al.lengths[victim]:
                st["overflow_detected"] += 1
        bad = int((lens != al.lengths).sum() + (ov != want_ov).sum())
        bad += int(not np.array_equal(np.asarray(self.cache.block_table), al.block_table))
        owned = al.block_table[al.live]
        owned = owned[owned >= 0]
        bad += int(len(np.unique(owned)) != len(owned)
                   or len(owned) != self.nb - al.num_free_blocks)
        if bad:
            print(f"  state mismatch at step {st['steps']}: lens {lens} vs {al.lengths}, "
                  f"overflow {ov} vs {want_ov}", flush=True)
        st["state_mismatch"] += bad

    def check_bytes(self) -> None:
        al = self.alloc
        live = np.flatnonzero(al.live)
        lens = al.lengths[live]
        seq = np.repeat(live, lens)
        pos = np.concatenate([np.arange(n) for n in lens]) if len(lens) else np.zeros(0, int)
        slots = al.block_table[seq, pos // self.bs] * self.bs + pos % self.bs
        flat = np.asarray(self.cache.kv_cache).reshape(-1, self.tb)
        bad = flat[slots] != self.shadow[seq, pos]
        self.st["checked_rows"] += len(slots)
        if bad.any():
            rows = np.flatnonzero(bad.any(1))
            print(f"  byte mismatch at step {self.st['steps']}: {len(rows)} token rows, e.g. "
                  f"sequence {seq[rows[0]]} position {pos[rows[0]]}", flush=True)
            self.st["byte_mismatch"] += int(bad.sum())

    def check_outputs(self, dec, pf, q_dec, out_dec, q_pf, qsl, out_pf) -> None:
        """Sampled sequences: kernel vs reference on the live cache, and reference on the
        live cache vs reference on a scratch cache built from the shadows alone."""
        k, st = self.k, self.st
        d_idx = self.sample(list(range(len(dec))))
        p_idx = self.sample(list(range(len(pf))))
        if not d_idx and not p_idx:
            return
        qd = jnp.zeros((k, self.hq, self.d), jnp.float16)
        qd = qd.at[:len(d_idx)].set(q_dec[np.asarray(d_idx, int)]) if d_idx else qd
        live_d = np.full(k, -1, np.int32)
        live_d[:len(d_idx)] = [dec[i].row for i in d_idx]
        tok = [np.arange(qsl[i], qsl[i + 1]) for i in p_idx]
        qp_idx = np.concatenate(tok) if tok else np.zeros(0, int)
        qp = jnp.zeros((k * self.chunk, self.hq, self.d), jnp.float16)
        qp = qp.at[:len(qp_idx)].set(q_pf[qp_idx]) if len(qp_idx) else qp
        qs = np.zeros(k + 1, np.int32)
        qs[1:len(p_idx) + 1] = np.cumsum([len(t) for t in tok])
        qs[len(p_idx) + 1:] = qs[len(p_idx)]
        live_p = np.full(k, -1, np.int32)
        live_p[:len(p_idx)] = [pf[i][0].row for i in p_idx]
        ref_d, ref_p = (np.asarray(x, np.float32) for x in
                        self.ref_fn(self.cache, qd, live_d, qp, qs, live_p))
        out_dec, out_pf = np.asarray(out_dec, np.float32), np.asarray(out_pf, np.float32)
        for j, i in enumerate(d_idx):
            self.note_err("max_err_decode", rel_l2(out_dec[i], ref_d[j]))
        for j, t in enumerate(tok):
            self.note_err("max_err_prefill", rel_l2(out_pf[t], ref_p[qs[j]:qs[j + 1]]))
        # scratch cache: row j <- sampled sequence j's shadow, blocks j*mb .. (j+1)*mb - 1
        rows = [r for r in live_d[:len(d_idx)]] + [r for r in live_p[:len(p_idx)]]
        flat = np.zeros((2 * k * self.cap, self.tb), np.uint8)
        lens = np.zeros(2 * k, np.int32)
        for j, r in enumerate(rows):
            n = int(self.alloc.lengths[r])
            flat[j * self.cap:j * self.cap + n] = self.shadow[r, :n]
            lens[j] = n
        spec = self.spec
        scratch = PagedKVCache(jnp.asarray(flat.reshape(spec.cache_shape(2 * k * self.mb))),
                               jnp.arange(2 * k * self.mb, dtype=jnp.int32).reshape(2 * k, -1),
                               jnp.asarray(lens), jnp.zeros(2 * k, jnp.int32), spec)
        sd = np.where(live_d >= 0, np.arange(k), -1).astype(np.int32)
        sp = np.where(live_p >= 0, len(d_idx) + np.arange(k), -1).astype(np.int32)
        iso_d, iso_p = (np.asarray(x, np.float32) for x in
                        self.ref_fn(scratch, qd, sd, qp, qs, sp))
        iso = max([rel_l2(iso_d[j], ref_d[j]) for j in range(len(d_idx))]
                  + [rel_l2(iso_p[qs[j]:qs[j + 1]], ref_p[qs[j]:qs[j + 1]])
                     for j in range(len(p_idx))])
        self.note_err("max_isolation", iso)
        if iso > self.a.iso_tol:
            st["state_mismatch"] += 1
            print(f"  isolation error {iso:.2e} at step {st['steps']}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000,
                   help="steps (default 3000: about 2 minutes on an H200 is the target; "
                        "see the steps/s printed)")
    p.add_argument("--layout", default="tq4", help="tq4 | vllm:<preset> | contiguous")
    p.add_argument("--impl", default="auto", choices=["auto", "pallas", "reference"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=170.0,
                   help="stop after this many seconds of the loop, compiles included, even "
                        "before --steps (0: no limit; bench/gpu_run.sh gives the soak 200 s)")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="cache/model sizes (default: gpu on a GPU, tiny elsewhere)")
    p.add_argument("--sample", type=int, default=4, help="sequences checked per step and kind")
    p.add_argument("--arrival", type=float, default=0.5, help="arrival probability per try")
    p.add_argument("--overflow-every", type=int, default=37,
                   help="inject an overflow every N steps (paged; 0: never)")
    p.add_argument("--print-every", type=int, default=None)
    p.add_argument("--tol", type=float, default=None,
                   help="max relative L2 error vs reference (default: 1e-3, fp16 output "
                        "rounding, for --impl reference; else 5e-2)")
    p.add_argument("--iso-tol", type=float, default=1e-5)
    a = p.parse_args(argv)
    a.size = a.size or ("gpu" if jax.default_backend() == "gpu" else "tiny")
    a.tol = a.tol if a.tol is not None else (1e-3 if a.impl == "reference" else 5e-2)
    a.print_every = a.print_every or (100 if a.size == "gpu" else 10)
    if a.layout == "contiguous":
        soak = ContiguousSoak(a)
    elif a.layout == "tq4" or a.layout.startswith("vllm:"):
        name = a.layout.split(":", 1)[1] if a.layout != "tq4" else "tq4"
        if name != "tq4" and name not in tq.vllm.PRESETS:
            p.error(f"unknown preset {name!r}; one of {sorted(tq.vllm.PRESETS)}")
        soak = PagedSoak(a, name)
    else:
        p.error(f"--layout must be tq4, vllm:<preset> or contiguous, got {a.layout!r}")
    print(f"soak: layout {a.layout}, impl {a.impl}, size {a.size} {SIZES[a.size]}, "
          f"{a.steps} steps, seed {a.seed}, jax {jax.__version__} on {jax.default_backend()}",
          flush=True)
    t0 = time.time()
    for i in range(a.steps):
        soak.run_step()
        soak.st["steps"] = i + 1
        late = a.max_seconds and time.time() - t0 > a.max_seconds
        if (i + 1) % a.print_every == 0 or i + 1 == a.steps or late:
            soak.report(t0)
        if late:
            print(f"time limit: stopped after {i + 1} of {a.steps} steps", flush=True)
            break
    st, wall = soak.st, time.time() - t0
    st["served"] = st["finished"]
    fails = {
        "byte mismatches": st["byte_mismatch"],
        "state/isolation mismatches": st["state_mismatch"],
        "undetected overflows": st["overflow_injected"] - st["overflow_detected"],
        "error above tol": int(max(st["max_err_decode"], st["max_err_prefill"]) > a.tol),
    }
    rows = [("steps", st["steps"]), ("sequences admitted", st["admitted"]),
            ("sequences served (finished)", st["served"]), ("tokens written", st["tokens"]),
            ("  prefill / decode tokens", f"{st['prefill_tokens']} / {st['decode_tokens']}"),
            ("max rel. error vs reference: decode", f"{st['max_err_decode']:.3e}"),
            ("max rel. error vs reference: prefill", f"{st['max_err_prefill']:.3e}"),
            ("max isolation error (shadow rebuild)", f"{st['max_isolation']:.3e}"),
            ("token rows byte-checked", st["checked_rows"]),
            ("byte mismatches (must be 0)", st["byte_mismatch"]),
            ("state mismatches (must be 0)", st["state_mismatch"]),
            ("overflows injected / detected", f"{st['overflow_injected']} / "
                                              f"{st['overflow_detected']}"),
            ("rows != reference store (info)", st["codec_diff_rows"]),
            ("wall time, steps/s", f"{wall:.1f} s, {st['steps'] / wall:.1f}")]
    w = max(len(r[0]) for r in rows)
    print("\n| " + "what".ljust(w) + " | value |\n|" + "-" * (w + 2) + "|-------|")
    for name, val in rows:
        print(f"| {name.ljust(w)} | {val} |")
    bad = {k: v for k, v in fails.items() if v}
    print(f"\n{'FAIL: ' + ', '.join(f'{k} {v}' for k, v in bad.items()) if bad else 'OK'} "
          f"({a.layout}, {st['steps']} steps, {st['served']} sequences served, {st['tokens']} "
          f"tokens, max error {max(st['max_err_decode'], st['max_err_prefill']):.2e}, "
          f"{st['byte_mismatch']} byte mismatches)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
