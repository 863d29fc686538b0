"""Tuning of the Mosaic GPU decode kernels, as data: the KV-split rule and where ``impl="auto"``
takes a Mosaic kernel instead of the Triton-lowered one.

Measured on an NVIDIA H200 with jax 0.11.2 on 2026-12-04 (bench/RESULTS.md, "Mosaic
configuration sweep"): ``python3 bench/decode.py --mosaic-sweep`` at B=1 (32K), B=8 (8K, 32K)
and B=32 (8K), 32 query / 8 KV heads, D=128, block 16. The best split counts gave every
shape 256-1024 CTAs (B=1: 32-64 splits, 0.082 -> 0.049 ms for the paged decode at 32K; B=8:
16; B=32: 4) with at least 512 keys per split: enough CTAs to fill every SM, few enough that
the split merge and per-split setup stay small. Once the SMs are full, the time per tile per
SM no longer changes with the CTAs resident (B=8: 8 or 16 splits, about 1.1 us per 64-key
tile): the kernels are then bound by instruction throughput, not by latency or bytes. Every
op takes ``config=`` to override this.
"""

from __future__ import annotations

from .tiles import MosaicConfig

#: CTAs (splits x KV heads x sequences) the split rule aims for.
TARGET_CTAS = 1024
#: A split covers at least this many keys (8 tiles of 64).
MIN_SPLIT_KEYS = 512
#: At most this many splits (B=1: 128 splits lost to 64 on every layout).
MAX_SPLITS = 64
#: TMA ring depth (deeper rings lost at B=8: more shared memory, fewer CTAs per SM).
STAGES = 2
#: Block ids one tile ahead in the paged kernels (``MosaicConfig.prefetch``): off, it did not
#: win (an H200, 32K context, 16 splits: paged B=8 0.2905 -> 0.2989 ms, the vLLM and B=1 rows
#: within 1%; ``bench/decode.py --mosaic-sweep --prefetch 0 1``, bench/RESULTS.md).
PREFETCH = False
#: Pallas's warpgroup barrier before and after every shared-memory store (about 7 per tile;
#: ``MosaicConfig.auto_barriers``). False (the kernels' own: 2 per tile) is not yet timed:
#: ``bench/decode.py --mosaic-sweep --auto-barriers 1 0``.
AUTO_BARRIERS = True

#: Ops whose Mosaic kernel ``impl="auto"`` prefers, with the smallest batch (sequences) and
#: cache capacity (keys per sequence) where it was measured faster than the Triton-lowered
#: kernel (both at their tuned configs). vLLM 4bit_nc: 1.13-1.24x at B=8/32 (8K, 32K), 0.96x
#: at B=1; k8v4: 1.24-1.66x at B=8/32, 1.06x at B=1 (too close to call). The TQ4 contiguous
#: and paged kernels lost everywhere (0.79-0.90x) and are chosen only by ``impl="mosaic"``,
#: as is the vLLM decode of 3-bit codes ("vllm_decode_3bit": not yet timed).
AUTO_MOSAIC = {"vllm_decode": (8, 8192)}


def choose_config(batch: int, num_kv_heads: int, keys: int) -> MosaicConfig:
    """The decode config for ``batch`` sequences of ``num_kv_heads`` KV heads over a cache of
    ``keys`` positions per sequence (its static capacity)."""
    splits = min(TARGET_CTAS // max(batch * num_kv_heads, 1), keys // MIN_SPLIT_KEYS,
                 MAX_SPLITS)
    return MosaicConfig(max(splits, 1), STAGES, PREFETCH, AUTO_BARRIERS)


def prefer(op: str, batch: int, keys: int) -> bool:
    """Whether ``impl="auto"`` runs ``op``'s Mosaic kernel (where it serves the arguments and
    the GPU is sm_90+) for ``batch`` sequences over ``keys`` cached positions each."""
    if op not in AUTO_MOSAIC:
        return False
    min_batch, min_keys = AUTO_MOSAIC[op]
    return batch >= min_batch and keys >= min_keys
