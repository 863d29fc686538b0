"""tq4jax: TurboQuant 4-bit KV-cache compression and fused attention kernels for JAX.

Every op has a Pallas-Triton kernel and a pure-jnp reference (``impl="auto"|"pallas"|"reference"``).
"""

from .attention import (attention_reference, flash_attention, flash_attention_tq4,
                        flash_attention_tq4_kv)
from .codebook import haar_rotation, hadamard_rotation, lloyd_max
from .codec import (compress, compress_reference, decompress, decompress_reference, dequantize,
                    dequantize_reference)
from .layout import bytes_per_token_head

__version__ = "0.1.0"

__all__ = [
    "lloyd_max", "haar_rotation", "hadamard_rotation",
    "compress", "decompress", "dequantize",
    "compress_reference", "decompress_reference", "dequantize_reference",
    "bytes_per_token_head",
    "flash_attention", "flash_attention_tq4", "flash_attention_tq4_kv", "attention_reference",
]
