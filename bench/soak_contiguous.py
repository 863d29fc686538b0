"""bench/soak.py --layout contiguous: the soak of ``tq.TQ4Cache`` (batch rows are sequence
slots)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import tq4jax as tq
from soak_base import Soak, rel_l2


class ContiguousSoak(Soak):
    """tq.TQ4Cache: batch rows are sequence slots; update + attend of up to ``chunk`` tokens
    per row and step."""

    def __init__(self, args):
        super().__init__(args)
        impl = args.impl
        self.cache = tq.TQ4Cache.create(1, self.ms, self.hkv, self.cap, self.d)
        sp = self.cache.spec
        self.tb = tq.paged_layout(self.hkv, self.d).row_bytes
        self.shadow = np.zeros((self.ms, self.cap, self.tb), np.uint8)
        self.lengths = np.zeros(self.ms, np.int64)

        @jax.jit
        def step(cache, k, v, nl, q):
            cache = cache.update(0, k, v, nl, impl=impl)
            return cache, cache.attend(0, q, nl, impl=impl)

        @jax.jit
        def ref(cache, idx, q, nl):
            sub = jax.tree.map(lambda x: x[idx], cache)  # every leaf is batch-major
            return sub.attend(0, q, nl, impl="reference")

        def encode(k, v):  # the rows update writes: [B, T, row bytes]
            kp, kn, vp, vn = tq.compress_kv(k, v, sp.rotation, sp.codebook("k")[1],
                                            sp.codebook("v")[1], impl=impl)
            b, t = k.shape[:2]
            as_b = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(b, t, -1)
            return jnp.concatenate([kp.reshape(b, t, -1), as_b(kn), vp.reshape(b, t, -1),
                                    as_b(vn)], -1)

        self.step_fn, self.ref_fn, self.encode = step, ref, jax.jit(encode)

    def device_rows(self, cache) -> np.ndarray:
        """The cache's codes and norms as token rows [B, C, row bytes]."""
        def part(codes, norms):
            c = np.asarray(codes).transpose(0, 2, 1, 3).reshape(self.ms, self.cap, -1)
            n = np.ascontiguousarray(np.asarray(norms).transpose(0, 2, 1)).view(np.uint8)
            return [c, n.reshape(self.ms, self.cap, -1)]
        return np.concatenate(part(cache.k_codes[0], cache.k_norms[0])
                              + part(cache.v_codes[0], cache.v_norms[0]), -1)

    def from_rows(self, rows: np.ndarray, lens: np.ndarray) -> tq.TQ4Cache:
        """A TQ4Cache holding ``rows`` [K, C, row bytes] (the inverse of device_rows)."""
        h, half = self.hkv, self.d // 2
        kk = rows.shape[0]
        cut = np.cumsum([h * half, 4 * h, h * half])
        parts = np.split(rows, cut, axis=-1)
        codes = lambda x: jnp.asarray(x.reshape(kk, self.cap, h, half).transpose(0, 2, 1, 3))
        norms = lambda x: jnp.asarray(np.ascontiguousarray(x).view(np.float32).reshape(
            kk, self.cap, h).transpose(0, 2, 1))
        return dataclasses.replace(self.cache, k_codes=(codes(parts[0]),),
                                   k_norms=(norms(parts[1]),), v_codes=(codes(parts[2]),),
                                   v_norms=(norms(parts[3]),),
                                   lengths=(jnp.asarray(lens, jnp.int32),))

    def run_step(self) -> None:
        st = self.st
        for s in [s for s in self.seqs.values() if s.done >= s.total]:
            self.finish(s)
        free = [r for r in range(self.ms) if r not in self.seqs]
        new = self.admit(free)
        if new:  # the missing TQ4Cache.reset(rows): only the lengths are reset
            rows = jnp.asarray([s.row for s in new], jnp.int32)
            self.cache = dataclasses.replace(
                self.cache, lengths=(self.cache.lengths[0].at[rows].set(0),))
        for s in new:
            self.seqs[s.row] = s
            self.lengths[s.row] = 0
            self.shadow[s.row] = 0
        nl = np.zeros(self.ms, np.int32)
        for s in self.seqs.values():
            nl[s.row] = 1 if s.phase == "decode" else min(s.prompt - s.done, self.chunk)
        k = self.randn(self.ms, self.chunk, self.hkv, self.d)
        v = self.randn(self.ms, self.chunk, self.hkv, self.d)
        q = self.randn(self.ms, self.chunk, self.hq, self.d)
        self.cache, out = self.step_fn(self.cache, k, v, jnp.asarray(nl), q)
        rows = np.asarray(self.encode(k, v))
        was_decode = {s.row: s.phase == "decode" for s in self.seqs.values()}
        for s in self.seqs.values():
            n, at = nl[s.row], self.lengths[s.row]
            self.shadow[s.row, at:at + n] = rows[s.row, :n]
            self.lengths[s.row] += n
            s.done += n
            st["decode_tokens" if was_decode[s.row] else "prefill_tokens"] += n
        st["tokens"] += int(nl.sum())
        # state + bytes
        lens = np.asarray(self.cache.lengths[0])
        bad = int((lens[list(self.seqs)] != self.lengths[list(self.seqs)]).sum())
        st["state_mismatch"] += bad
        dev = self.device_rows(self.cache)
        for r in self.seqs:
            n = self.lengths[r]
            miss = int((dev[r, :n] != self.shadow[r, :n]).sum())
            st["checked_rows"] += int(n)
            if miss:
                print(f"  byte mismatch at step {st['steps']}: row {r}", flush=True)
            st["byte_mismatch"] += miss
        # outputs of a sample: kernel vs reference on the live rows vs reference on rows
        # rebuilt from the shadow
        active = [r for r in sorted(self.seqs) if nl[r] > 0]
        pick = self.sample(active)
        if not pick:
            return
        idx = np.asarray(pick + [pick[0]] * (self.k - len(pick)), np.int32)
        qs, nls = q[idx], jnp.asarray(nl[idx])
        ref = np.asarray(self.ref_fn(self.cache, idx, qs, nls), np.float32)
        iso_cache = self.from_rows(self.shadow[idx], self.lengths[idx])
        iso = np.asarray(self.ref_fn(iso_cache, np.arange(self.k, dtype=np.int32), qs, nls),
                         np.float32)
        out = np.asarray(out, np.float32)
        for j, r in enumerate(pick):
            n = nl[r]
            key = "max_err_decode" if was_decode[r] else "max_err_prefill"
            self.note_err(key, rel_l2(out[r, :n], ref[j, :n]))
            e = rel_l2(iso[j, :n], ref[j, :n])
            self.note_err("max_isolation", e)
            if e > self.a.iso_tol:
                st["state_mismatch"] += 1
