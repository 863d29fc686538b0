"""bench/soak.py's shared parts: sizes, the sequence record, the scheduling and checking loop
that every cache kind shares (:class:`Soak`)."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

#: (max_seqs, block_size, max_blocks_per_seq, num_blocks, H_Q, H_KV, D, token budget, chunk)
SIZES = {"tiny": (6, 4, 8, 28, 4, 2, 64, 24, 8),
         "gpu": (32, 16, 32, 384, 8, 2, 128, 256, 64)}


@dataclasses.dataclass
class Seq:
    row: int
    prompt: int
    total: int
    done: int = 0  # tokens sent to the cache

    @property
    def phase(self) -> str:
        return "prefill" if self.done < self.prompt else "decode"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6))


class Soak:
    def __init__(self, args):
        self.a = args
        (self.ms, self.bs, self.mb, self.nb, self.hq, self.hkv, self.d, self.budget,
         self.chunk) = SIZES[args.size]
        self.cap = self.mb * self.bs
        self.k = min(args.sample, self.ms)
        self.rng = np.random.default_rng([args.seed, 0])  # scheduling, sampling
        self.data = np.random.default_rng([args.seed, 1])  # tokens and queries
        self.seqs: dict[int, Seq] = {}
        self.committed = 0  # blocks promised to live sequences (admission control)
        self.st = dict(steps=0, admitted=0, finished=0, tokens=0, prefill_tokens=0,
                       decode_tokens=0, max_err_decode=0.0, max_err_prefill=0.0,
                       max_isolation=0.0, byte_mismatch=0, state_mismatch=0,
                       overflow_injected=0, overflow_detected=0, codec_diff_rows=0,
                       checked_rows=0)

    # ------------------------------------------------------------------------ scheduling
    def randn(self, *shape):
        return jnp.asarray(self.data.standard_normal(shape, np.float32), jnp.float16)

    def admit(self, free_rows: list[int]) -> list[Seq]:
        """New sequences (prompt + generation <= capacity), while rows and blocks allow."""
        new = []
        while free_rows and self.rng.random() < self.a.arrival:
            total = int(self.rng.integers(2, self.cap + 1))
            blocks = -(-total // self.bs)
            if self.committed + blocks > self.nb:
                break
            prompt = int(self.rng.integers(1, total))
            self.committed += blocks
            new.append(Seq(free_rows.pop(0), prompt, total))
        self.st["admitted"] += len(new)
        return new

    def schedule(self) -> tuple[list, list]:
        """(decode sequences, [(seq, chunk)] prefill) within the token budget."""
        live = sorted(self.seqs.values(), key=lambda s: s.row)
        dec = [s for s in live if s.phase == "decode"][:self.budget]
        left, pf = self.budget - len(dec), []
        for s in live:
            if s.phase == "prefill" and left > 0:
                n = min(s.prompt - s.done, self.chunk, left)
                pf.append((s, n))
                left -= n
        return dec, pf

    def finish(self, s: Seq) -> None:
        self.committed -= -(-s.total // self.bs)
        del self.seqs[s.row]
        self.st["finished"] += 1

    def sample(self, items: list) -> list:
        if len(items) <= self.k:
            return list(items)
        return [items[i] for i in sorted(self.rng.choice(len(items), self.k, replace=False))]

    def note_err(self, key: str, err: float) -> None:
        self.st[key] = max(self.st[key], err)

    def report(self, t0: float) -> None:
        s = self.st
        print(f"step {s['steps']:6d} | live {len(self.seqs):3d} | served {s['finished']:5d} | "
              f"tokens {s['tokens']:8d} | err dec {s['max_err_decode']:.2e} pf "
              f"{s['max_err_prefill']:.2e} iso {s['max_isolation']:.1e} | byte mismatch "
              f"{s['byte_mismatch']} state {s['state_mismatch']} | overflow "
              f"{s['overflow_detected']}/{s['overflow_injected']} | "
              f"{s['steps'] / (time.time() - t0):.1f} steps/s", flush=True)
