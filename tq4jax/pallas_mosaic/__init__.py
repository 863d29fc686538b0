"""Kernel backend 2: Pallas Mosaic GPU kernels for Hopper decode.

* :mod:`.decode`: contiguous TQ4 decode (``flash_attention_tq4_kv`` with one query per
  sequence, D = 128, no mask) - TMA rings, keys on the wgmma M side, in-register ``prmt``
  codebook lookups (:mod:`.lut`).
* :mod:`.paged`: ``paged_decode`` on a paged TQ4 cache (pages copied by TMA from block-table
  entries read in the kernel).
* :mod:`.vllm`: ``tq.vllm.turboquant_decode`` for vLLM's four presets (3-bit, 4-bit or fp8
  keys; 3- or 4-bit values).
* :mod:`.tiles`: what they share (the loop over a split's key tiles, scratch, query packing,
  split merge); :mod:`.tuning`: the split rule and where ``auto`` takes these kernels.

``impl="auto"`` takes the vLLM-layout kernel where it was measured faster than the
Triton-lowered one (:mod:`.tuning`: 4-bit and fp8 keys, B >= 8 sequences over caches of >= 8K
keys on an H200, 1.13-1.66x); the contiguous and paged kernels are correct on an H200 but
slower there (0.79-0.90x at their tuned splits), so they run only with ``impl="mosaic"``.
Without a GPU the kernels run in Mosaic GPU interpret mode, and the tests also lower them for
sm_90 on the CPU. API differences between jax versions live in :mod:`.compat`; split counts
and the ``auto`` rule are data in :mod:`.tuning`.
"""

from .decode import decode, supported
from .paged import paged_decode
from .paged import supported as paged_supported
from .tiles import MosaicConfig
from . import tuning, vllm

__all__ = ["MosaicConfig", "decode", "paged_decode", "paged_supported", "supported",
           "tuning", "vllm"]
