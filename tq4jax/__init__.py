"""tq4jax: TurboQuant 4-bit KV-cache compression and fused attention kernels for JAX.

Every op has a Pallas-Triton kernel and a pure-jnp reference (``impl="auto"|"pallas"|"reference"``).
"""

from .attention import (attention_reference, flash_attention, flash_attention_tq4,
                        flash_attention_tq4_kv)
from .codebook import haar_rotation, hadamard_rotation, lloyd_max
from .codec import (compress, compress_kv, compress_reference, decompress, decompress_reference,
                    dequantize, dequantize_reference)
from .layout import PagedLayout, bytes_per_token_head, paged_layout
from .paged import (paged_decode, paged_decode_reference, paged_prefill, paged_prefill_reference,
                    paged_write, paged_write_reference)
from .cache import DenseCache, TQ4Cache, TQ4Spec
from .nn import dot_product_attention, make_attention_fn
from . import vllm

__version__ = "0.1.0"

__all__ = [
    "lloyd_max", "haar_rotation", "hadamard_rotation",
    "compress", "compress_kv", "decompress", "dequantize",
    "compress_reference", "decompress_reference", "dequantize_reference",
    "bytes_per_token_head",
    "flash_attention", "flash_attention_tq4", "flash_attention_tq4_kv", "attention_reference",
    "paged_layout", "PagedLayout", "paged_write", "paged_write_reference", "paged_decode",
    "paged_decode_reference", "paged_prefill", "paged_prefill_reference",
    "TQ4Spec", "TQ4Cache", "DenseCache", "dot_product_attention", "make_attention_fn",
    "vllm",
]
