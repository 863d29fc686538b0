"""Upstream vLLM's TurboQuant cache layout (LAYOUTS.md family B), as ``tq4jax.vllm``: presets by
name, the slot layout, and the ops that store into, decode from and dequantize such a cache.
"""

from ..codebook import vllm_codebook as codebook
from ..layout import VllmSlot, pack_bits, unpack_bits, vllm_slot
from ..pallas_triton.tuning import SCORE_MODES, DecodeConfig
from .ops import (full_dequant_kv, full_dequant_kv_reference, turboquant_decode,
                  turboquant_decode_reference, turboquant_store, turboquant_store_reference)
from .presets import PRESETS, TurboQuantPreset, preset

__all__ = ["turboquant_decode", "turboquant_decode_reference", "turboquant_store",
           "turboquant_store_reference", "full_dequant_kv", "full_dequant_kv_reference",
           "preset", "PRESETS", "TurboQuantPreset", "vllm_slot", "VllmSlot", "pack_bits",
           "unpack_bits", "DecodeConfig", "SCORE_MODES", "codebook"]
