"""Paged KV-cache manager for serving: a jit-friendly cache pytree and a host block allocator.

* :class:`PagedKVCache` (device arrays + static :class:`CacheSpec`), pure methods usable in
  ``jax.jit``: ``append`` (slot mapping built on device, then ``tq.paged_write`` /
  ``tq.vllm.turboquant_store``), ``decode`` (``tq.paged_decode`` / ``tq.vllm.turboquant_decode``),
  ``prefill`` (``tq.paged_prefill``; vLLM: ``tq.vllm.full_dequant_kv`` + float32 attention).
* :class:`BlockAllocator`: host free list and numpy block-table mirror, pushed by ``sync``.

Overflow rule (cache overflow is an error, never a clamp). In one ``append``, token i with
``s = seq_ids[i]`` in ``[0, max_seqs)`` is the r-th token of s (r counts the earlier tokens of
s in ``seq_ids``) and goes to position ``p = seq_lens[s] + r``. Let ``A[s]`` be the number of
*leading* entries of ``block_table[s]`` that are valid block ids (``0 <= id < num_blocks``).
The token is written iff ``p < block_size * A[s]``, at slot
``block_table[s, p // block_size] * block_size + p % block_size``; otherwise its slot is -1
(nothing is written anywhere) and ``overflow[s]`` grows by one. ``seq_lens[s]`` grows by the
tokens written (always a prefix of s's new tokens). ``seq_ids`` outside ``[0, max_seqs)`` are
padding (never written, not counted). Where it can be known before the call - an eager
``append`` on concrete arrays, or :meth:`BlockAllocator.prepare_append` - a token that would be
dropped raises :class:`CacheOverflowError` instead; under jit check ``cache.overflow`` (e.g.
:meth:`PagedKVCache.check_overflow` or :meth:`BlockAllocator.verify` after the step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import tq4jax as tq

__all__ = ["CacheSpec", "PagedKVCache", "BlockAllocator", "CacheOverflowError",
           "OutOfBlocksError", "TQ4"]

#: Layout name of the family-A (turboquant-vllm TQ4) paged cache.
TQ4 = "tq4"


class CacheOverflowError(RuntimeError):
    """A sequence would grow past its allocated blocks or past its block-table row."""


class OutOfBlocksError(RuntimeError):
    """The block pool (or the pool of sequence rows) is exhausted."""


@functools.lru_cache(maxsize=None)
def _table(kind: str, d: int, arg: int | None) -> Any:
    """Read-only rotation ("haar"/"hadamard", arg = seed) or codebook ("lloyd", arg = bits)."""
    out = {"haar": tq.haar_rotation, "hadamard": tq.hadamard_rotation,
           "lloyd": tq.lloyd_max}[kind](d, arg)
    for x in out if isinstance(out, tuple) else (out,):
        x.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static (hashable) description of a paged cache.

    ``layout``: ``"tq4"`` (family A: Haar rotation of ``seed``, ``tq.lloyd_max`` codebooks of
    ``k_bits``/``v_bits``) or a ``tq.vllm.PRESETS`` name (family B: Hadamard rotation, random
    signs from ``seed`` (None: none), key codebook ``tq.lloyd_max(D, mse_bits)`` or the tuple
    ``centroids`` (e.g. vLLM's own solver's values); bits from the preset).
    """
    layout: str
    num_kv_heads: int
    head_dim: int
    block_size: int
    k_bits: int = 4
    v_bits: int = 4
    seed: int | None = 42
    centroids: tuple | None = None

    def __post_init__(self):
        for name in ("num_kv_heads", "head_dim", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.layout == TQ4:
            if self.centroids is not None or not isinstance(self.seed, (int, np.integer)):
                raise ValueError("tq4 takes an int seed (its Haar rotation) and no centroids=")
            return
        if self.layout not in tq.vllm.PRESETS:
            raise ValueError(f"layout must be 'tq4' or one of {sorted(tq.vllm.PRESETS)}, "
                             f"got {self.layout!r}")
        if self.head_dim & (self.head_dim - 1):
            raise ValueError(f"vLLM layouts use a Hadamard rotation: head_dim must be a power "
                             f"of two, got {self.head_dim}")
        p = self.preset
        object.__setattr__(self, "k_bits", p.mse_bits)
        object.__setattr__(self, "v_bits", p.value_quant_bits)
        if self.centroids is not None:
            object.__setattr__(self, "centroids", tuple(float(c) for c in self.centroids))
            if len(self.centroids) != 1 << p.mse_bits:
                raise ValueError(f"centroids must have {1 << p.mse_bits} entries")

    is_vllm = property(lambda self: self.layout != TQ4)

    @property
    def preset(self):
        """The ``tq.vllm.TurboQuantPreset`` (vLLM layouts only)."""
        return tq.vllm.preset(self.layout, self.head_dim)

    @property
    def rotation(self) -> np.ndarray:
        """float32 [D, D]: Haar (tq4) or Hadamard (vLLM)."""
        return _table("hadamard" if self.is_vllm else "haar", self.head_dim, self.seed)

    def codebook(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(centroids, boundaries) of ``which`` = "k" or "v" ("v": tq4 only)."""
        if self.is_vllm and self.centroids is not None and which == "k":
            c = np.asarray(self.centroids, np.float32)
            return c, 0.5 * (c[1:] + c[:-1])
        return _table("lloyd", self.head_dim, self.k_bits if which == "k" else self.v_bits)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's row (all KV heads)."""
        return (self.num_kv_heads * self.preset.slot_bytes if self.is_vllm
                else tq.paged_layout(self.num_kv_heads, self.head_dim).row_bytes)

    def cache_shape(self, num_blocks: int) -> tuple:
        return (self.preset.cache_shape(num_blocks, self.block_size, self.num_kv_heads)
                if self.is_vllm else (num_blocks, self.block_size, self.token_bytes))

    def write(self, kv_cache: jax.Array, key: jax.Array, value: jax.Array,
              slot_mapping: jax.Array, impl: str = "auto") -> jax.Array:
        """The layout's store op: key/value [N, H_KV, D] float, slot_mapping [N] int32."""
        if self.is_vllm:
            return tq.vllm.turboquant_store(kv_cache, key, value, slot_mapping, self.rotation,
                                            self.codebook("k")[0], **self.preset.store_kwargs(),
                                            impl=impl)
        return tq.paged_write(kv_cache, key, value, slot_mapping, self.rotation,
                              self.codebook("k")[1], self.codebook("v")[1], impl=impl)

    def encode(self, key: Any, value: Any, impl: str = "reference") -> jax.Array:
        """The bytes the store op writes for key/value [N, H_KV, D]: uint8 [N, token_bytes]."""
        key, value = jnp.asarray(key), jnp.asarray(value)
        n = key.shape[0]
        scratch = jnp.zeros(self.cache_shape(n)[:1] + (1,) + self.cache_shape(n)[2:], jnp.uint8)
        out = self.write(scratch, key, value, jnp.arange(n, dtype=jnp.int32), impl)
        return out.reshape(n, self.token_bytes)


def _allocated_tokens(block_table, num_blocks: int, block_size: int, xp=jnp):
    """Tokens each sequence may hold: block_size x the leading valid entries of its row."""
    ok = (block_table >= 0) & (block_table < num_blocks)
    return xp.sum(xp.cumprod(ok.astype(xp.int32), axis=1), axis=1) * block_size


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _scale(sm_scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv_cache", "block_table", "seq_lens", "overflow"],
                   meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Paged TQ4 / vLLM-TurboQuant KV cache of one layer (a pytree: jit it, donate it).

    Attributes:
      kv_cache: uint8 ``spec.cache_shape(num_blocks)``.
      block_table: int32 [max_seqs, max_blocks_per_seq]; -1 = no block.
      seq_lens: int32 [max_seqs], tokens cached per sequence.
      overflow: int32 [max_seqs], tokens ``append`` dropped (module docstring) since the row
        was reset: nonzero means the caller's allocation was wrong.
      spec: static :class:`CacheSpec`.
    """
    kv_cache: jax.Array
    block_table: jax.Array
    seq_lens: jax.Array
    overflow: jax.Array
    spec: CacheSpec

    @classmethod
    def create(cls, num_blocks: int, max_seqs: int, max_blocks_per_seq: int, *,
               num_kv_heads: int, head_dim: int, block_size: int = 16, layout: str = TQ4,
               k_bits: int = 4, v_bits: int = 4, seed: int | None = 42,
               centroids: Sequence[float] | None = None) -> "PagedKVCache":
        """An empty cache: zero bytes, an empty block table (-1), zero lengths."""
        spec = CacheSpec(layout, num_kv_heads, head_dim, block_size, k_bits, v_bits, seed,
                         None if centroids is None else tuple(centroids))
        if num_blocks < 1 or max_seqs < 1 or max_blocks_per_seq < 1:
            raise ValueError("num_blocks, max_seqs and max_blocks_per_seq must be >= 1")
        return cls(jnp.zeros(spec.cache_shape(num_blocks), jnp.uint8),
                   jnp.full((max_seqs, max_blocks_per_seq), -1, jnp.int32),
                   jnp.zeros((max_seqs,), jnp.int32), jnp.zeros((max_seqs,), jnp.int32), spec)

    num_blocks = property(lambda self: self.kv_cache.shape[0])
    max_seqs = property(lambda self: self.block_table.shape[0])
    max_blocks_per_seq = property(lambda self: self.block_table.shape[1])
    #: Most tokens one sequence can address (max_blocks_per_seq x block_size).
    seq_capacity = property(lambda self: self.max_blocks_per_seq * self.spec.block_size)

    def slot_mapping(self, seq_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Slots of new tokens (seq_ids int [N]) by the overflow rule -> (slots int32 [N]
        (-1: skipped), written int32 [max_seqs], dropped int32 [max_seqs])."""
        ids = jnp.asarray(seq_ids).astype(jnp.int32)
        n, ms, bs = ids.shape[0], self.max_seqs, self.spec.block_size
        live = (ids >= 0) & (ids < ms)
        grp = jnp.where(live, ids, ms)  # padding sorts last
        order = jnp.argsort(grp, stable=True)
        srt = grp[order]
        rank = jnp.zeros((n,), jnp.int32).at[order].set(
            jnp.arange(n, dtype=jnp.int32) - jnp.searchsorted(srt, srt, side="left").astype(
                jnp.int32))
        safe = jnp.where(live, ids, 0)
        pos = self.seq_lens[safe] + rank
        cap = _allocated_tokens(self.block_table, self.num_blocks, bs)[safe]
        fits = live & (pos < cap)
        page = jnp.clip(pos // bs, 0, self.max_blocks_per_seq - 1)
        blk = self.block_table[safe, page]
        slots = jnp.where(fits, blk * bs + pos % bs, -1).astype(jnp.int32)
        count = lambda m: jnp.zeros((ms,), jnp.int32).at[grp].add(  # noqa: E731
            m.astype(jnp.int32), mode="drop")
        return slots, count(fits), count(live & ~fits)

    def append(self, key: Any, value: Any, seq_ids: Any, *, impl: str = "auto",
               check: bool = True) -> "PagedKVCache":
        """Store new tokens after each sequence's cached ones; returns the updated cache.

        Args:
          key, value: [N, H_KV, D] float, flat tokens of many sequences.
          seq_ids: int32 [N], each token's sequence (row); negative = padding.
          check: on concrete (non-traced) arguments, raise CacheOverflowError (ValueError for
            an id >= max_seqs) before writing if a token would be dropped (a device sync).
        """
        if check and _is_concrete(seq_ids, self.seq_lens, self.block_table):
            self._host_check(np.asarray(seq_ids))
        slots, written, dropped = self.slot_mapping(seq_ids)
        kv = self.spec.write(self.kv_cache, key, value, slots, impl)
        return dataclasses.replace(self, kv_cache=kv, seq_lens=self.seq_lens + written,
                                   overflow=self.overflow + dropped)

    def _host_check(self, ids: np.ndarray) -> None:
        if ids.ndim != 1 or (ids >= self.max_seqs).any():
            raise ValueError(f"seq_ids must be [N] ints < max_seqs ({self.max_seqs}) or "
                             f"negative (padding), got shape {ids.shape}, max {ids.max()}")
        count = np.bincount(ids[ids >= 0], minlength=self.max_seqs)
        need = np.asarray(self.seq_lens) + count
        cap = _allocated_tokens(np.asarray(self.block_table), self.num_blocks,
                                self.spec.block_size, np)
        bad = np.flatnonzero((need > cap) & (count > 0))
        if bad.size:
            raise CacheOverflowError(
                f"append would overflow sequences {bad.tolist()}: needs {need[bad].tolist()} "
                f"tokens, allocated blocks hold {cap[bad].tolist()} (allocate blocks first)")

    def _rows(self, seq_ids: Any, n: int) -> tuple[jax.Array, jax.Array]:
        """Block table rows (invalid entries -> 0) and lengths of ``seq_ids`` (None: all)."""
        if seq_ids is None:
            if n != self.max_seqs:
                raise ValueError(f"without seq_ids, q must have one row per sequence "
                                 f"({self.max_seqs}), got {n}")
            return jnp.maximum(self.block_table, 0), self.seq_lens
        ids = jnp.asarray(seq_ids).astype(jnp.int32)
        if ids.shape != (n,):
            raise ValueError(f"seq_ids must have shape ({n},), got {tuple(ids.shape)}")
        live = (ids >= 0) & (ids < self.max_seqs)
        safe = jnp.where(live, ids, 0)
        return (jnp.maximum(self.block_table[safe], 0),
                jnp.where(live, self.seq_lens[safe], 0))

    def decode(self, q: Any, seq_ids: Any = None, *, sm_scale: float | None = None,
               impl: str = "auto", max_num_kv_splits: int = 32) -> jax.Array:
        """One query per sequence over its cached tokens (append the query's token first).

        Args:
          q: [S, H_Q, D] fp16/bf16.
          seq_ids: int32 [S] (negative: padding); None: S == max_seqs, row s is sequence s.
          max_num_kv_splits: vLLM layouts' split grid.
        Returns: [S, H_Q, D] in q's dtype (zeros for padding and empty sequences).
        """
        q = jnp.asarray(q)
        bt, lens = self._rows(seq_ids, q.shape[0])
        sp = self.spec
        if sp.is_vllm:
            return tq.vllm.turboquant_decode(
                q, self.kv_cache, bt, lens, sp.rotation, sp.codebook("k")[0],
                _scale(sm_scale, sp.head_dim), **sp.preset.decode_kwargs(),
                max_num_kv_splits=max_num_kv_splits, impl=impl)
        return tq.paged_decode(q, self.kv_cache, bt, lens, sp.codebook("k")[0], sp.rotation,
                               num_kv_heads=sp.num_kv_heads, head_dim=sp.head_dim,
                               block_size=sp.block_size, sm_scale=sm_scale,
                               v_centroids=sp.codebook("v")[0], impl=impl)

    def prefill(self, q: Any, query_start_loc: Any, seq_ids: Any = None, *,
                sm_scale: float | None = None, use_int8_qk: bool | None = None,
                impl: str = "auto", chunk: int = 64) -> jax.Array:
        """Causal attention of new tokens (already appended) of many sequences.

        Args:
          q: [N, H_Q, D] fp16/bf16, the new tokens of every sequence back to back.
          query_start_loc: int32 [S + 1] cumulative; sequence j owns tokens
            ``query_start_loc[j]:query_start_loc[j+1]``, its last positions.
          seq_ids: int32 [S] (negative: padding); None: S == max_seqs.
          use_int8_qk: tq4 only (``tq.paged_prefill``'s; None = its default).
          chunk: vLLM layouts: tokens per step of the attention's ``lax.map``.
        Returns: [N, H_Q, D] in q's dtype; tokens outside every sequence give zeros.
        """
        q, qsl = jnp.asarray(q), jnp.asarray(query_start_loc)
        bt, lens = self._rows(seq_ids, qsl.shape[0] - 1)
        sp = self.spec
        if not sp.is_vllm:
            return tq.paged_prefill(q, self.kv_cache, bt, lens, qsl, sp.codebook("k")[0],
                                    sp.rotation, num_kv_heads=sp.num_kv_heads,
                                    head_dim=sp.head_dim, block_size=sp.block_size,
                                    sm_scale=sm_scale, use_int8_qk=use_int8_qk,
                                    v_centroids=sp.codebook("v")[0], impl=impl)
        return self._vllm_prefill(q, qsl, bt, lens, _scale(sm_scale, sp.head_dim), impl, chunk)

    def _vllm_prefill(self, q, qsl, bt, lens, scale, impl, chunk):
        """full_dequant_kv + float32 causal attention, ``chunk`` tokens at a time."""
        sp, p = self.spec, self.spec.preset
        if q.ndim != 3 or q.shape[2] != sp.head_dim or q.shape[1] % sp.num_kv_heads:
            raise ValueError(f"q must have shape [N, k * {sp.num_kv_heads}, {sp.head_dim}], "
                             f"got {tuple(q.shape)}")
        k, v = tq.vllm.full_dequant_kv(self.kv_cache, bt, lens, sp.codebook("k")[0],
                                       **p.dequant_kwargs(), head_dim=sp.head_dim, impl=impl)
        n, hq, d = q.shape
        s, hkv, cap = lens.shape[0], sp.num_kv_heads, k.shape[2]
        t = jnp.arange(n, dtype=jnp.int32)
        seq = jnp.clip(jnp.searchsorted(qsl[1:], t, side="right"), 0, s - 1).astype(jnp.int32)
        inside = (t >= qsl[0]) & (t < qsl[-1])
        seq_len = jnp.clip(lens[seq], 0, cap)
        at = seq_len - (qsl[seq + 1] - qsl[seq]) + (t - qsl[seq])
        qf = q.astype(jnp.float32)
        if not p.key_fp8:  # keys live in rotated space
            qf = jnp.matmul(qf, jnp.asarray(sp.rotation).T, precision=lax.Precision.HIGHEST)
        qf = qf.reshape(n, hkv, hq // hkv, d)
        keys = jnp.arange(cap)

        def one(x):
            qi, si, ai, li, ok = x
            ki, vi = k[si].astype(jnp.float32), v[si].astype(jnp.float32)  # [H_KV, cap, D]
            sc = jnp.einsum("hgd,htd->hgt", qi, ki, precision=lax.Precision.HIGHEST) * scale
            vis = ok & (keys < li) & (keys <= ai)
            m = jnp.max(jnp.where(vis, sc, -jnp.inf), axis=-1, keepdims=True)
            pr = jnp.where(vis, jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
            tot = jnp.sum(pr, axis=-1, keepdims=True)
            o = jnp.einsum("hgt,htd->hgd", pr, vi, precision=lax.Precision.HIGHEST)
            return o / jnp.where(tot > 0, tot, 1.0)

        out = lax.map(one, (qf, seq, at, seq_len, inside), batch_size=max(1, min(chunk, n)))
        return out.reshape(n, hq, d).astype(q.dtype)

    def check_overflow(self) -> None:
        """Host check (syncs with the device): CacheOverflowError if an append dropped tokens."""
        bad = np.flatnonzero(ov := np.asarray(self.overflow))
        if bad.size:
            raise CacheOverflowError(f"appends dropped tokens of sequences {bad.tolist()} "
                                     f"({ov[bad].tolist()} tokens): blocks were not allocated")


class BlockAllocator:
    """Host-side block pool and block-table mirror of a :class:`PagedKVCache`.

    ``block_table`` (numpy int32 [max_seqs, max_blocks_per_seq], -1 = none) and ``lengths``
    (tokens announced by :meth:`prepare_append`) mirror the device state; push every change
    with :meth:`sync` before the next device call (:meth:`prepare` does both). Freed blocks
    are reused last-in first-out; a row's blocks always form a prefix of its table row.
    """

    def __init__(self, num_blocks: int, max_seqs: int, max_blocks_per_seq: int,
                 block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.block_table = np.full((max_seqs, max_blocks_per_seq), -1, np.int32)
        self.lengths = np.zeros(max_seqs, np.int64)
        self.n_blocks = np.zeros(max_seqs, np.int64)
        self.live = np.zeros(max_seqs, bool)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() -> lowest id first
        self._reset: set[int] = set()
        self._dirty = True

    @classmethod
    def for_cache(cls, cache: PagedKVCache) -> "BlockAllocator":
        """An allocator for an empty ``cache`` (its table must be all -1)."""
        return cls(cache.num_blocks, cache.max_seqs, cache.max_blocks_per_seq,
                   cache.spec.block_size)

    max_seqs = property(lambda self: self.block_table.shape[0])
    num_free_blocks = property(lambda self: len(self._free))

    def live_seqs(self) -> list[int]:
        return np.flatnonzero(self.live).tolist()

    def capacity(self, seq_id: int) -> int:
        """Tokens the blocks allocated to ``seq_id`` hold."""
        return int(self.n_blocks[seq_id]) * self.block_size

    def _check_live(self, seq_id: int) -> int:
        if not (0 <= seq_id < self.max_seqs and self.live[seq_id]):
            raise ValueError(f"sequence {seq_id} is not live")
        return int(seq_id)

    def add(self, num_tokens: int = 0) -> int:
        """Admit a sequence: the lowest free row, with blocks for ``num_tokens`` tokens.
        Raises OutOfBlocksError (no free row or blocks) or CacheOverflowError (too long)."""
        free_rows = np.flatnonzero(~self.live)
        if not free_rows.size:
            raise OutOfBlocksError(f"all {self.max_seqs} sequence rows are in use")
        s = int(free_rows[0])
        self._blocks_needed({s: num_tokens})  # raises before anything changes
        self.live[s], self.lengths[s], self._dirty = True, 0, True
        self._reset.add(s)
        self.reserve(s, num_tokens)
        return s

    def _blocks_needed(self, want: dict[int, int]) -> dict[int, int]:
        """New blocks per sequence for {seq: total tokens}; raises if a row or the pool can't."""
        need = {}
        for s, n in want.items():
            blocks = -(-int(n) // self.block_size)
            if blocks > self.block_table.shape[1]:
                raise CacheOverflowError(
                    f"sequence {s} needs {n} tokens: more than its block-table row holds "
                    f"({self.block_table.shape[1]} blocks x {self.block_size})")
            need[s] = max(0, blocks - int(self.n_blocks[s]))
        if sum(need.values()) > len(self._free):
            raise OutOfBlocksError(f"need {sum(need.values())} blocks, {len(self._free)} free")
        return need

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Grow ``seq_id``'s blocks to hold ``num_tokens`` tokens in total (never shrinks)."""
        self._grow(self._blocks_needed({self._check_live(seq_id): num_tokens}))

    def _grow(self, need: dict[int, int]) -> None:
        for s, k in need.items():
            for _ in range(k):
                self.block_table[s, self.n_blocks[s]] = self._free.pop()
                self.n_blocks[s] += 1
        self._dirty |= any(need.values())

    def free(self, seq_id: int) -> None:
        """Finish a sequence: its blocks go back to the pool, its row is reset at sync."""
        s = self._check_live(seq_id)
        self._free.extend(self.block_table[s, :self.n_blocks[s]][::-1].tolist())
        self.block_table[s] = -1
        self.n_blocks[s], self.lengths[s], self.live[s], self._dirty = 0, 0, False, True
        self._reset.add(s)

    def prepare_append(self, seq_ids: Any, grow: bool = True) -> np.ndarray:
        """Announce an append of tokens of ``seq_ids`` (negative: padding): grow their blocks
        (``grow``) or raise CacheOverflowError, before changing anything. -> int32 ids."""
        ids = np.asarray(seq_ids).astype(np.int32)
        real = ids[ids >= 0]
        for s in np.unique(real):
            self._check_live(int(s))
        new_len = self.lengths + np.bincount(real, minlength=self.max_seqs)
        short = {int(s): int(new_len[s]) for s in np.flatnonzero(new_len > self.n_blocks
                                                                  * self.block_size)}
        if short and not grow:
            raise CacheOverflowError(f"append would overflow sequences {sorted(short)} "
                                     f"(capacity {[self.capacity(s) for s in sorted(short)]})")
        self._grow(self._blocks_needed(short))
        self.lengths = new_len
        return ids

    def sync(self, cache: PagedKVCache) -> PagedKVCache:
        """Push the block table and reset the lengths and overflow counters of rows freed or
        admitted since the last sync. Returns ``cache`` itself when nothing changed."""
        if (cache.num_blocks, *cache.block_table.shape) != (self.num_blocks,
                                                             *self.block_table.shape):
            raise ValueError("cache and allocator differ in shape")
        if not self._dirty:
            return cache
        rows = jnp.asarray(sorted(self._reset), jnp.int32)
        cache = dataclasses.replace(cache, block_table=jnp.asarray(self.block_table),
                                    seq_lens=cache.seq_lens.at[rows].set(0),
                                    overflow=cache.overflow.at[rows].set(0))
        self._reset, self._dirty = set(), False
        return cache

    def prepare(self, cache: PagedKVCache, seq_ids: Any,
                grow: bool = True) -> tuple[PagedKVCache, np.ndarray]:
        """:meth:`prepare_append` then :meth:`sync`: (cache to append to, int32 ids)."""
        ids = self.prepare_append(seq_ids, grow)
        return self.sync(cache), ids

    def verify(self, cache: PagedKVCache) -> None:
        """Host check (syncs with the device): no append dropped tokens (CacheOverflowError),
        the cache's table and lengths equal this mirror (RuntimeError)."""
        cache.check_overflow()
        bad = np.flatnonzero((np.asarray(cache.block_table) != self.block_table).any(1)
                             | (np.asarray(cache.seq_lens) != self.lengths))
        if bad.size:
            raise RuntimeError(f"device table/seq_lens differ from the allocator's at rows "
                               f"{bad.tolist()} (sync missing, or appends not announced)")
