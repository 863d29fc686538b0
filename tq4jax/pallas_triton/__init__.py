"""Kernel backend 1: Pallas kernels lowered through Triton (any CUDA GPU; on a machine without
one they run in interpret mode). Every op has a kernel here; the op layer
(:mod:`tq4jax.codec`, :mod:`tq4jax.attention`, :mod:`tq4jax.paged`, :mod:`tq4jax.vllm`)
checks arguments and calls these entry points:

* :mod:`.codec`: ``compress``, ``decompress``, ``dequantize``;
* :mod:`.attention`: ``attention`` (contiguous, dense or TQ4 K/V);
* :mod:`.paged`: ``paged_attention`` (family-A paged decode and prefill);
* :mod:`.vllm`: ``store``, ``decode``, ``dequant`` (vLLM layout).

Shared in-kernel pieces live in :mod:`.tiles` (loads, stores, block tables, softmax step) and
:mod:`.lut` (in-register codebook lookups); tile sizes and thresholds in :mod:`.tuning`.
"""

from . import attention, codec, paged, tuning, vllm

__all__ = ["attention", "codec", "paged", "tuning", "vllm"]
