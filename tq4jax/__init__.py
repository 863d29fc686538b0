"""tq4jax: TurboQuant 4-bit KV-cache compression and fused attention kernels for JAX.

Every op checks its arguments and dispatches (``impl="auto"|"pallas"|"triton"|"mosaic"|
"reference"``, :mod:`tq4jax.backend`) to a Pallas kernel backend (:mod:`tq4jax.pallas_triton`)
or to the pure-jnp reference (:mod:`tq4jax.reference`); ``<op>_reference`` is the op pinned to
the reference path. ARCHITECTURE.md describes the layers.
"""

from . import vllm
from .attention import (attention_reference, flash_attention, flash_attention_reference,
                        flash_attention_tq4, flash_attention_tq4_kv,
                        flash_attention_tq4_kv_reference, flash_attention_tq4_reference)
from .cache import DenseCache, TQ4Cache, TQ4Spec
from .codebook import haar_rotation, hadamard_rotation, lloyd_max
from .codec import (compress, compress_kv, compress_kv_reference, compress_reference,
                    decompress, decompress_reference, dequantize, dequantize_reference)
from .layout import PagedLayout, bytes_per_token_head, paged_layout
from .nn import dot_product_attention, make_attention_fn
from .paged import (paged_decode, paged_decode_reference, paged_prefill, paged_prefill_reference,
                    paged_write, paged_write_reference)
from .serving import BlockAllocator, CacheOverflowError, PagedKVCache


def swap_attention(model, **kwargs):
    """:func:`tq4jax.flax_attention.swap_attention` (needs the ``flax`` extra): every
    ``nnx.MultiHeadAttention`` of ``model`` becomes a TQ4-cache drop-in, in place."""
    try:
        from .flax_attention import swap_attention as swap
    except ImportError as e:  # pragma: no cover - flax is installed with the test extra
        raise ImportError("tq.swap_attention needs flax: pip install 'tq4jax[flax]'") from e
    return swap(model, **kwargs)

__version__ = "0.1.0"

__all__ = [
    "lloyd_max", "haar_rotation", "hadamard_rotation",
    "compress", "compress_kv", "decompress", "dequantize",
    "compress_reference", "compress_kv_reference", "decompress_reference",
    "dequantize_reference", "bytes_per_token_head",
    "flash_attention", "flash_attention_tq4", "flash_attention_tq4_kv",
    "flash_attention_reference", "flash_attention_tq4_reference",
    "flash_attention_tq4_kv_reference", "attention_reference",
    "paged_layout", "PagedLayout", "paged_write", "paged_write_reference", "paged_decode",
    "paged_decode_reference", "paged_prefill", "paged_prefill_reference",
    "TQ4Spec", "TQ4Cache", "DenseCache", "dot_product_attention", "make_attention_fn",
    "PagedKVCache", "BlockAllocator", "CacheOverflowError", "swap_attention", "vllm",
]
