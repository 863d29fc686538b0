"""Paged decode and prefill (Triton lowering): the attention kernel of :mod:`.attention` with a
paged TQ4 cache as its K/V source (LAYOUTS.md A2).

One program per (row block, KV head, KV split): a row block holds the query rows of one
sequence (all query heads of the KV head's group, for one or more of its new tokens), given by
a schedule computed from ``query_start_loc``; block ids come from the block table inside the
kernel, lanes past ``seq_lens`` read neither the block table nor the cache, splits are merged
by log-sum-exp.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ..backend import KernelMode
from ..core import LOG2E, Rotation, rotate_in_xla
from ..layout import NORM_BYTES
from .attention import AttnSpec, Paged, PagedSource, attn_kernel, finish
from .call import pallas_call, whole_spec
from .tuning import Config, rotate_in_kernel


def paged_schedule(query_start_loc: jnp.ndarray, group: int, block_m: int,
                   n_blocks: int) -> jnp.ndarray:
    """Row blocks of the paged kernel: sequence s has ``cdiv(group * q_len_s, block_m)``
    blocks of its query rows. Returns int32 [2 * n_blocks]: the sequence of block i (-1 past
    the last block), then its first row."""
    q_len = jnp.maximum(query_start_loc[1:] - query_start_loc[:-1], 0)
    per_seq = (group * q_len + block_m - 1) // block_m
    ends = jnp.cumsum(per_seq)
    i = jnp.arange(n_blocks, dtype=jnp.int32)
    seq = jnp.sum(ends[None, :] <= i[:, None], axis=1, dtype=jnp.int32)  # one fused op
    live = seq < q_len.shape[0]
    seq = jnp.where(live, seq, 0)
    row0 = (i - (ends[seq] - per_seq[seq])) * block_m
    return jnp.concatenate([jnp.where(live, seq, -1), jnp.where(live, row0, 0)])


def rows_per_kv_head(n_tokens: int, n_seqs: int, group: int) -> int:
    """Typical query rows per KV head and sequence (``group`` heads x mean tokens per
    sequence; decode: ``group``): the row count behind the tile and rotation choices."""
    return group * max(1, n_tokens // max(1, n_seqs))


def schedule_blocks(n_tokens: int, n_seqs: int, group: int, block_m: int) -> int:
    """Static upper bound of the row blocks of :func:`paged_schedule` (each sequence's last
    block may be partial; with group <= block_m a block holds at least one token)."""
    bound = pl.cdiv(n_tokens * group, block_m) + n_seqs - 1
    return max(1, min(bound, n_tokens) if group <= block_m else bound)


@partial(jax.jit, static_argnames=("paged", "k_lut", "v_lut", "scale", "cfg", "mode",
                                   "int8_qk", "norm_words", "window", "softcap"))
def paged_attention(q: jnp.ndarray, kv_cache: jnp.ndarray, block_table: jnp.ndarray,
                    seq_lens: jnp.ndarray, query_start_loc: jnp.ndarray | None,
                    k_table: jnp.ndarray, v_table: jnp.ndarray, rot: Rotation,
                    sinks: jnp.ndarray | None = None, *, paged: Paged, k_lut: Any, v_lut: Any,
                    scale: float, cfg: Config, mode: KernelMode, int8_qk: bool = False,
                    norm_words: bool = False, window: tuple[int, int] | None = None,
                    softcap: float | None = None) -> jnp.ndarray:
    """q [N, H_Q, D] (the queries of every sequence, back to back) -> [N, H_Q, D] in q's
    dtype; tokens outside ``query_start_loc``'s ranges give zeros. ``query_start_loc`` None:
    decode (token s is sequence s's last position; the schedule is static). ``norm_words``:
    norms load as float32 words from a bitcast view of the cache. ``window``, ``softcap``,
    ``sinks`` [H_Q]: as :class:`~.attention.AttnSpec` and :func:`~.attention.finish`."""
    n, hq, d = q.shape
    hkv, bs = paged.num_kv_heads, paged.block_size
    group, splits, n_seqs = hq // hkv, cfg.splits, seq_lens.shape[0]
    cap = block_table.shape[1] * bs
    decode = query_start_loc is None
    in_kernel = rotate_in_kernel(d, rows_per_kv_head(n, n_seqs, group))
    if not in_kernel:
        q = rotate_in_xla(q, rot.pi)
    if decode:
        query_start_loc = jnp.arange(n + 1, dtype=jnp.int32)
    if decode and group <= cfg.block_m:  # one block per sequence
        n_blocks = n
        sched = jnp.asarray(np.concatenate([np.arange(n), np.zeros(n)]).astype(np.int32))
    else:
        n_blocks = schedule_blocks(n, n_seqs, group, cfg.block_m)
        sched = paged_schedule(query_start_loc, group, cfg.block_m, n_blocks)
    rows = n * hq
    words = None
    if norm_words and kv_cache.shape[2] % NORM_BYTES == 0:  # a bitcast, no copy
        words = lax.bitcast_convert_type(kv_cache.reshape(-1, NORM_BYTES), jnp.float32)
    src = PagedSource(kv_cache.reshape(-1, kv_cache.shape[2]), words, block_table.reshape(-1),
                      seq_lens, query_start_loc, sched, k_table, v_table)
    q_rot = tuple(rot.q_halves) if in_kernel else None
    post = tuple(rot.post) if in_kernel else None
    args = (q.reshape(rows, d), q_rot, src, None, post, None, None)
    out_dt = q.dtype if in_kernel and sinks is None else jnp.float32
    if splits == 1:
        out_shape = (jax.ShapeDtypeStruct((rows, d), out_dt),)
        if sinks is not None:
            out_shape += (jax.ShapeDtypeStruct((rows,), jnp.float32),)
    else:
        out_shape = (jax.ShapeDtypeStruct((splits * rows, d), jnp.float32),
                     jax.ShapeDtypeStruct((splits * rows,), jnp.float32))
    spec = AttnSpec(cfg, group, n, cap, d, scale * LOG2E, True, k_lut=k_lut, v_lut=v_lut,
                    rot_q=in_kernel, post=in_kernel, paged=paged, int8_qk=int8_qk,
                    window=window, softcap=softcap)
    outs = pallas_call(partial(attn_kernel, spec=spec), mode=mode,
                       grid=(n_blocks, hkv, splits), out_shape=out_shape,
                       in_specs=jax.tree.map(whole_spec, args),
                       out_specs=tuple(whole_spec(o) for o in out_shape),
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)(*args)
    if splits > 1:
        outs = (outs[0].reshape(splits, rows, d), outs[1].reshape(splits, rows))
    out = finish(outs, (n, hq, d), q.dtype, 0 if splits > 1 else None,
                 None if in_kernel else rot, sinks, mode if cfg.epilogue else None)
    if decode:
        return out
    t = jnp.arange(n)
    inside = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    return jnp.where(inside[:, None, None], out, 0)  # finish() rounded to q's dtype
