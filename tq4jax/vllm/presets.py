"""vLLM's ``--kv-cache-dtype turboquant_*`` presets: bits, fp8 keys, norm correction and the
slot size of each, by name."""

from __future__ import annotations

from typing import NamedTuple

from ..layout import vllm_slot


class TurboQuantPreset(NamedTuple):
    """A vLLM ``--kv-cache-dtype turboquant_*`` preset at one head_dim."""
    name: str
    head_dim: int
    mse_bits: int
    value_quant_bits: int
    key_fp8: bool
    norm_correction: bool
    key_packed_size: int
    slot_bytes: int

    def decode_kwargs(self) -> dict:
        """Layout arguments of :func:`turboquant_decode`."""
        return dict(mse_bits=self.mse_bits, key_packed_size=self.key_packed_size,
                    value_quant_bits=self.value_quant_bits, key_fp8=self.key_fp8,
                    norm_correction=self.norm_correction)

    def store_kwargs(self) -> dict:
        """Layout arguments of :func:`turboquant_store`."""
        return dict(mse_bits=self.mse_bits, key_packed_size=self.key_packed_size,
                    value_quant_bits=self.value_quant_bits, key_fp8=self.key_fp8)

    def dequant_kwargs(self) -> dict:
        """Layout arguments of :func:`full_dequant_kv`."""
        return self.decode_kwargs()

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int) -> tuple:
        """Shape of a cache of this preset: [num_blocks, block_size, H_KV, slot_bytes]."""
        return (num_blocks, block_size, num_kv_heads, self.slot_bytes)


#: name -> (key mse bits, value bits, fp8 keys, norm correction), as vLLM defines them.
PRESETS = {
    "turboquant_4bit_nc": (4, 4, False, True),
    "turboquant_k3v4_nc": (3, 4, False, True),
    "turboquant_3bit_nc": (3, 3, False, True),
    "turboquant_k8v4": (4, 4, True, False),
}


def preset(name: str, head_dim: int) -> TurboQuantPreset:
    """The preset ``name`` (a key of :data:`PRESETS`) at ``head_dim``, with the current vLLM
    ``key_packed_size`` and the even slot size (134 bytes for turboquant_4bit_nc at D=128)."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
    mse, vb, fp8, nc = PRESETS[name]
    lay = vllm_slot(head_dim, mse, vb, None, fp8)
    return TurboQuantPreset(name, lay.head_dim, mse, vb, fp8, nc, lay.key_packed_size,
                            lay.slot_bytes)
