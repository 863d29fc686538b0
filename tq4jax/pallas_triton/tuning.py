"""Tuning of the Triton-lowered kernels, as data: every tile size, warp count, split rule and
threshold the kernels use, with the benchmark that chose it.

All choices were measured on an NVIDIA H200 with jax 0.11.2 on 2026-11-21 by the command
named beside each (numbers in bench/HISTORY.md, sections of that date). Every public kernel
op takes ``config=`` to override them (sweeps and benchmarks use that, not these globals).
"""

from __future__ import annotations

from typing import NamedTuple

from ..core import next_pow2
from ..layout import VllmSlot

# ----------------------------------------------------------------------------------------------
# codec: compress / decompress / dequantize
# ----------------------------------------------------------------------------------------------


class CodecConfig(NamedTuple):
    """Rows per program and warps of a codec kernel (powers of two)."""
    block_rows: int
    num_warps: int


#: ``python3 bench/codec.py --sweep`` at D=128.
CODEC = {"compress": CodecConfig(64, 4), "decompress": CodecConfig(64, 8),
         "dequantize": CodecConfig(64, 4)}
#: Compress of at most this many rows (decode-time cache updates) runs as one row block split
#: into column blocks of SMALL_CHUNK packed bytes, so each program loads only its slice of the
#: rotation (``bench/generate.py``: shorter launches in the model's decode step).
SMALL_ROWS, SMALL_CHUNK = 64, 16

# ----------------------------------------------------------------------------------------------
# attention (contiguous and paged family A)
# ----------------------------------------------------------------------------------------------


class Config(NamedTuple):
    """Tiling of the attention kernel: query rows and keys per tile, warps, pipeline stages,
    KV splits (grid axis merged by log-sum-exp); ``epilogue``: with splits, merge them, post-
    rotate and cast in one kernel (:mod:`.epilogue`) instead of XLA ops (sinks: XLA always)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int = 1
    epilogue: bool = False


#: Streaming multiprocessors to fill (H100/H200: 132).
NUM_SMS = 132
#: A KV split covers at least this many keys.
MIN_SPLIT_KEYS = 256
#: Largest head dim whose rotation (two [D, D] 16-bit halves) fits the kernel's shared memory.
ROTATE_IN_KERNEL_MAX_D = 128
#: Query rows per KV head up to which (decode) q and the output are rotated in XLA:
#: ``bench/attention.py`` / ``bench/paged.py`` decode at 32K, B=1 and 8 (XLA rotation 3-5%
#: faster: the kernel's rotation loads 128 KB of Pi halves for a 16-row tile).
ROTATE_IN_XLA_MAX_ROWS = 64


def rotate_in_kernel(d: int, n_rows: int) -> bool:
    """Whether the kernel rotates q (``q @ Pi^T``) and post-rotates its output itself, for
    ``n_rows`` query rows per KV head (else XLA does, around the kernel)."""
    return d <= ROTATE_IN_KERNEL_MAX_D and n_rows > ROTATE_IN_XLA_MAX_ROWS


def choose_config(b: int, hkv: int, n_rows: int, sk: int, d: int,
                  compressed: bool = False) -> Config:
    """Tiles for ``n_rows = group * Sq`` query rows per KV head over ``sk`` keys, and enough
    KV splits to give every SM two programs when there are few row blocks.

    Chosen by ``bench/attention.py --sweep`` (decode, causal prefill at 2K-32K) and
    ``bench/paged.py``: decode/short chunks one row block with long key tiles (compressed:
    128 keys); prefill 128x64 at 8 warps (dense from 16K rows: 256 rows; at 4 warps the
    compressed kernels spill, bench/kernel_report.py). Compressed decode runs 2 programs per
    SM (its registers allow no more), so its splits round down to one whole wave."""
    per_sm, whole_wave = 2, False
    if n_rows <= 64:
        bm = max(16, next_pow2(n_rows))
        if d > 128:
            cfg = Config(bm, 32, 4, 2)
        elif compressed:
            cfg, whole_wave = Config(bm, 128, 4, 3), True
        else:
            cfg = Config(bm, 64, 4, 3)
    elif d <= 128:
        cfg = Config(256 if n_rows >= 16384 and not compressed else 128, 64, 8, 3)
    else:
        cfg = Config(64, 32, 8, 2)
    programs = -(-n_rows // cfg.block_m) * b * hkv
    splits = 1
    if programs < per_sm * NUM_SMS:
        fill = (per_sm * NUM_SMS // programs if whole_wave
                else -(-per_sm * NUM_SMS // programs))
        splits = max(1, min(fill, sk // MIN_SPLIT_KEYS))
    return cfg._replace(splits=int(splits), epilogue=FUSED_EPILOGUE)


#: ``choose_config``'s ``epilogue``: the fused split merge. Off: on an H200 (twelfth session,
#: ``bench/decode.py --epilogue``) it lost at B=1 32K (0.89x contiguous, 0.83x paged: few
#: programs do the whole merge and rotation) and was even at B=8 (1.02x / 0.99x).
FUSED_EPILOGUE = False

#: ``paged_prefill``'s default for ``use_int8_qk``: faster in ``bench/paged.py`` (4 x 2K new
#: tokens on 6K context), at about 1% relative L2 error instead of 0.3%.
INT8_QK_DEFAULT = True
#: Paged decode loads K/V norms as float32 words from a bitcast view (rows 4-byte aligned),
#: one key tile ahead (faster in ``bench/paged.py`` decode); prefill keeps byte loads in the
#: tile (the word view and prefetch made prefill twice as slow).
PAGED_DECODE_NORM_WORDS = True
PAGED_DECODE_PREFETCH = True

# ----------------------------------------------------------------------------------------------
# vLLM layout
# ----------------------------------------------------------------------------------------------


#: :class:`DecodeConfig` ``scores`` modes.
SCORE_MODES = ("split", "split_q", "16bit")


class DecodeConfig(NamedTuple):
    """Tiling of the vLLM-layout decode kernel. ``prefetch``: each key tile loads the next
    tile's cache rows and fp16 scalars (key norm, value scale and zero) a loop iteration ahead;
    ``nc_dot``: norm correction sums the squared decoded centroids of each key with two more
    tensor-core dots (a ones matrix times the squared halves) instead of row reductions;
    ``scores`` (MSE keys): ``"split"`` float32-accurate as vLLM's original scores (query and
    codebook as 16-bit (hi, lo) pairs, three tensor-core dots per half, a second codebook
    decode, the norm correction in float32; ``nc_dot`` unused); ``"split_q"`` the query as an
    fp16 (hi, lo) pair (two dots per half) and the codebook in fp16, also for bf16 queries
    (rows scaled into fp16's range by a power of two); ``"16bit"`` single 16-bit dots (q and
    centroids rounded to the query's dtype). ``bench/vllm_layout.py --precision``, 2026-12-03:
    split_q +5-17% time over 16bit, split 2.0-4.4x."""
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True
    nc_dot: bool = True
    scores: str = "split_q"


def vllm_decode_config(lay: VllmSlot) -> DecodeConfig:
    """``bench/vllm_layout.py --sweep PRESET`` (D=128, B=8, 32K): 128-key tiles, 4 warps,
    3 stages for every preset; norm correction by dots; the scalar prefetch for fp8 and 4-bit
    keys (3-bit keys are slower with it); wide heads 32-key tiles, 2 stages."""
    prefetch = lay.key_fp8 or lay.mse_bits == 4
    if lay.head_dim > 128:
        return DecodeConfig(block_n=32, num_stages=2, prefetch=prefetch)
    return DecodeConfig(prefetch=prefetch)


#: (rows per program, warps) of the vLLM store and full-dequant kernels
#: (``bench/vllm_layout.py``).
STORE_TILING = CodecConfig(32, 4)
DEQUANT_TILING = CodecConfig(32, 4)
