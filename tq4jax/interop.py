"""Zero-copy DLPack interop with the PyTorch originals' caches (torch is optional and imported
only inside these functions; ``import tq4jax`` never imports it).

Three cache kinds cross over, both ways, checked on the way in:

* turboquant-vllm's ``CompressedDynamicCache`` (LAYOUTS.md A1) <-> :class:`tq4jax.TQ4Cache`:
  :func:`tq4_cache_from_compressed` / :func:`load_into_compressed`, or, for raw per-layer
  tensors, :func:`tq4_cache_from_torch` / :func:`tq4_cache_to_torch`. Attributes read from a
  ``CompressedDynamicCache`` (turboquant-vllm 1.5.0): ``head_dim``, ``k_bits``, ``v_bits``,
  ``rotation`` (property, [D, D] f32), ``key_compressor`` / ``value_compressor``
  ``.quantizer.codebook.centroids`` / ``.boundaries``, ``_seed`` (informative), and the
  private per-layer lists ``_compressed_keys`` / ``_compressed_values`` of ``_CompressedLayer``
  (``.indices`` uint8 [B, H, S, D/2] nibble-packed when ``.packed``, else one byte per
  coordinate [B, H, S, D]; ``.norms`` f32 [B, H, S, 1]; None for a bypassed layer).
  :func:`load_into_compressed` also writes those two lists (and, outside ``fused_mode``, the
  ``_decompressed_k`` / ``_decompressed_v`` buffers, through its ``_get_compressors`` and
  ``_dequantize_layer``).
* the family-A paged cache ``[num_blocks, block_size, total_bytes]`` uint8 (turboquant-vllm's
  vLLM backend; rows may be padded, e.g. to ``H * next_pow2(D + 8)``) <-> the array
  :func:`tq4jax.paged_write` / :func:`tq4jax.paged_decode` take (pass ``total_bytes=`` when
  the row is wider than ``paged_layout(H, D).row_bytes``): :func:`paged_cache_from_torch`,
  :func:`paged_cache_to_torch`.
* a vLLM TurboQuant ``kv_cache`` ``[num_blocks, block_size, H_KV, slot]`` uint8 <-> the array
  :func:`tq4jax.vllm.turboquant_decode` takes: :func:`vllm_cache_from_torch`,
  :func:`vllm_cache_to_torch`.

Zero copy: the JAX array and the torch tensor share one buffer (DLPack), so an in-place write
on one side (the originals' stores, or a donated ``paged_write`` under ``jax.jit``) is seen by
the other. JAX treats arrays as immutable: copy (``copy=True``, or ``.clone()``) when both
sides keep using and writing the data. Only C-contiguous tensors whose data pointer JAX can
adopt are taken without a copy (JAX's CPU client needs 64-byte alignment: torch's allocator
gives it, ``torch.from_numpy`` of a numpy array often does not); otherwise the ``from``
functions raise a ValueError unless ``copy=True``. Codes written with one rotation and
codebook must be read with the same ones: the originals' tables travel with the cache here
(:class:`TQ4DataSpec`; their seed-42 rotation comes from torch's generator, which
:func:`tq4jax.haar_rotation` does not reproduce).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .cache import TQ4Cache, TQ4Spec
from .layout import VllmSlot, pack_nibbles, paged_layout, unpack_nibbles, vllm_slot
from .vllm.presets import TurboQuantPreset, preset as vllm_preset

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["from_torch", "to_torch", "TQ4DataSpec", "tq4_cache_from_torch",
           "tq4_cache_to_torch", "tq4_cache_from_compressed", "load_into_compressed",
           "paged_cache_from_torch", "paged_cache_to_torch", "vllm_cache_from_torch",
           "vllm_cache_to_torch"]

Layers = Sequence[tuple[Any, Any, Any, Any]]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tq4jax.interop needs PyTorch (pip install torch)") from e
    return torch


# ----------------------------------------------------------------------------------------------
# generic conversion
# ----------------------------------------------------------------------------------------------

def from_torch(tensor: "torch.Tensor", name: str = "tensor", *, copy: bool = False) -> jax.Array:
    """A torch tensor as a JAX array on the same device, sharing its buffer (DLPack).

    Args:
      tensor: a C-contiguous ``torch.Tensor`` (any dtype DLPack carries; detached if needed).
      name: the argument's name in error messages.
      copy: False (default): zero-copy or a ValueError (non-contiguous tensor, or a buffer JAX
        cannot adopt, e.g. a misaligned data pointer); True: always copy.
    Returns:
      ``jax.Array`` with the tensor's shape and dtype.
    Raises:
      TypeError: not a torch tensor. ValueError: not contiguous / not adoptable / no JAX
        device for it (without ``copy``).
    """
    torch = _torch()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    tensor = tensor.detach()
    if copy:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    elif not tensor.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous for a zero-copy view (shape "
                         f"{tuple(tensor.shape)}, strides {tensor.stride()}); pass copy=True "
                         f"to copy it (writes then no longer reach the original)")
    try:
        out = jax.dlpack.from_dlpack(tensor)
    except Exception as e:
        raise ValueError(f"{name} ({tensor.dtype} on {tensor.device}) cannot be taken over by "
                         f"JAX via DLPack: {e}") from e
    if not copy and tensor.numel() and out.unsafe_buffer_pointer() != tensor.data_ptr():
        raise ValueError(f"{name}: JAX copied the buffer instead of sharing it (its data pointer "
                         f"{tensor.data_ptr():#x} may be misaligned); pass copy=True to accept "
                         f"a copy")
    return out


def to_torch(array: Any, name: str = "array") -> "torch.Tensor":
    """A single-device JAX array as a torch tensor sharing its buffer (DLPack).

    The tensor aliases the JAX buffer: do not write into it while JAX still uses the array
    (``.clone()`` first), and do not donate the array to a jit-ed function afterwards.
    """
    torch = _torch()
    if not isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete jax.Array, got {type(array).__name__}")
    if len(array.devices()) != 1:
        raise ValueError(f"{name} must live on one device (DLPack), got {len(array.devices())}")
    return torch.from_dlpack(array)


def _check_tensor(name: str, t: Any, dtype: str, ndim: int | tuple, what: str) -> None:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dtype != getattr(torch, dtype):
        raise TypeError(f"{name} must have dtype torch.{dtype}, got {t.dtype}")
    if t.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def _check_array(name: str, a: Any, dtype: Any, ndim: int, what: str) -> None:
    if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete jax.Array {what}, got {type(a).__name__}")
    if a.dtype != jnp.dtype(dtype):
        raise TypeError(f"{name} must have dtype {jnp.dtype(dtype)}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {what}, got shape {tuple(a.shape)}")


# ----------------------------------------------------------------------------------------------
# family A, contiguous: CompressedDynamicCache <-> TQ4Cache
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TQ4DataSpec(TQ4Spec):
    """A :class:`~tq4jax.TQ4Spec` whose rotation and codebooks are data (e.g. the torch
    originals' seed-42 rotation, which numpy cannot regenerate) instead of derived from
    ``seed``. Hashable (bytes), so still a static pytree field. Build with :meth:`of`."""
    rotation_bytes: bytes = dataclasses.field(default=b"", repr=False)
    k_codebook_bytes: bytes = dataclasses.field(default=b"", repr=False)
    v_codebook_bytes: bytes = dataclasses.field(default=b"", repr=False)

    @classmethod
    def of(cls, rotation: Any, k_codebook: tuple[Any, Any],
           v_codebook: tuple[Any, Any] | None = None, *, seed: int = 42) -> "TQ4DataSpec":
        """The spec of codes written with these tables.

        Args:
          rotation: Pi float [D, D] (D even), numpy, JAX or torch (CPU or GPU).
          k_codebook: ``(centroids [2**bits], boundaries [2**bits - 1])`` of the keys, bits
            1..4; v_codebook: the values' (None = the keys').
          seed: kept for information only (the rotation is data).
        Returns:
          A hashable ``TQ4DataSpec`` (float32 tables stored as bytes).
        """
        rot = _host_f32(rotation, "rotation")
        d = rot.shape[0]
        if rot.shape != (d, d) or d % 2:
            raise ValueError(f"rotation must be [D, D] with D even, got {rot.shape}")
        tables = []
        for which, cb in (("k", k_codebook), ("v", v_codebook or k_codebook)):
            c, b = (_host_f32(x, f"{which}_codebook") for x in cb)
            n = c.shape[0]
            if c.ndim != 1 or n not in (2, 4, 8, 16) or b.shape != (n - 1,):
                raise ValueError(f"{which}_codebook must be (centroids [2**bits], boundaries "
                                 f"[2**bits - 1]) with bits 1..4, got {c.shape}, {b.shape}")
            tables.append((n.bit_length() - 1, np.concatenate([c, b]).tobytes()))
        return cls(d, tables[0][0], tables[1][0], int(seed), rot.tobytes(), tables[0][1],
                   tables[1][1])

    @property
    def rotation(self) -> np.ndarray:
        d = self.head_dim
        return np.frombuffer(self.rotation_bytes, np.float32).reshape(d, d)

    def codebook(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        raw = np.frombuffer(self.k_codebook_bytes if which == "k" else self.v_codebook_bytes,
                            np.float32)
        n = 1 << (self.k_bits if which == "k" else self.v_bits)
        return raw[:n], raw[n:]


def _host_f32(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite floats, got {a.dtype}")
    return np.ascontiguousarray(a, np.float32)


def tq4_cache_from_torch(layers: Layers, spec: TQ4Spec, *, capacity: int | None = None,
                         copy: bool = False) -> TQ4Cache:
    """Per-layer torch tensors (what ``CompressedDynamicCache.get_compressed(i)`` returns) as a
    :class:`~tq4jax.TQ4Cache`, zero-copy.

    Args:
      layers: per layer ``(k_packed, k_norms, v_packed, v_norms)``: codes uint8
        [B, H_KV, S, D/2] (nibble-packed, high nibble = even coordinate), or [B, H_KV, S, D]
        one code per byte (3-bit and other non-4-bit originals; packed here: needs ``copy``);
        norms float32 [B, H_KV, S, 1] or [B, H_KV, S]. Every layer the same shape.
      spec: the rotation and codebooks the codes were written with (:class:`TQ4DataSpec`).
      capacity: token capacity of the cache (None = S, zero-copy; larger pads = a copy).
      copy: as :func:`from_torch`.
    Returns:
      ``TQ4Cache`` with ``lengths`` S in every row and layer, ``spec`` = ``spec``.
    """
    if not isinstance(spec, TQ4Spec):
        raise TypeError(f"spec must be a TQ4Spec (e.g. TQ4DataSpec.of), got {type(spec).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must hold at least one layer")
    d, out, shape = spec.head_dim, {"kc": [], "kn": [], "vc": [], "vn": []}, None
    for i, layer in enumerate(layers):
        if layer is None or len(layer) != 4:
            raise ValueError(f"layers[{i}] must be (k_packed, k_norms, v_packed, v_norms), got "
                             f"{type(layer).__name__}")
        for key, name, t in zip(("kc", "kn", "vc", "vn"),
                                ("k_packed", "k_norms", "v_packed", "v_norms"), layer):
            name = f"layers[{i}].{name}"
            if key.endswith("c"):
                _check_tensor(name, t, "uint8", 4, "[batch, kv_heads, seq, head_dim // 2]")
                lead = tuple(t.shape[:3])
                if t.shape[3] not in (d // 2, d):
                    raise ValueError(f"{name} must have {d // 2} (nibble-packed) or {d} bytes "
                                     f"per vector for head_dim {d}, got {tuple(t.shape)}")
                if shape is not None and lead != shape:
                    raise ValueError(f"{name} must have shape {shape} + (codes,) like "
                                     f"layers[0], got {tuple(t.shape)}")
                shape, packed = lead, t.shape[3] == d // 2
                arr = from_torch(t, name, copy=copy)
                if not packed:
                    if not copy:
                        raise ValueError(f"{name} holds one code per byte ([.., {d}]); TQ4Cache "
                                         f"stores nibbles, which needs a copy: pass copy=True")
                    if int(jnp.max(arr, initial=0)) > 15:
                        raise ValueError(f"{name} holds codes > 15: not a codebook of <= 4 bits")
                    arr = pack_nibbles(arr)
            else:
                _check_tensor(name, t, "float32", (3, 4), "[batch, kv_heads, seq, 1]")
                if tuple(t.shape) not in (shape + (1,), shape):
                    raise ValueError(f"{name} must have shape {shape + (1,)} to match the "
                                     f"codes, got {tuple(t.shape)}")
                arr = from_torch(t.reshape(shape) if t.is_contiguous() else t, name, copy=copy)
                arr = arr.reshape(shape) if arr.ndim == 4 else arr
            out[key].append(arr)
    b, h, s = shape
    cap = s if capacity is None else capacity
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < s:
        raise ValueError(f"capacity must be an int >= the stored tokens ({s}), got {capacity!r}")
    if cap > s:
        out = {k: [jnp.pad(x, [(0, 0), (0, 0), (0, cap - s)] + [(0, 0)] * (x.ndim - 3))
                   for x in v] for k, v in out.items()}
    lengths = tuple(jnp.full((b,), s, jnp.int32) for _ in layers)
    return TQ4Cache(tuple(out["kc"]), tuple(out["kn"]), tuple(out["vc"]), tuple(out["vn"]),
                    lengths, spec)


def _common_lengths(cache: TQ4Cache) -> list[int]:
    lens = []
    for i, x in enumerate(cache.lengths):
        if isinstance(x, jax.core.Tracer):
            raise TypeError("cache.lengths must be concrete (call outside jax.jit)")
        v = np.asarray(x)
        if v.size and not np.all(v == v[0]):
            raise ValueError(f"layer {i}: the rows hold different lengths {v.tolist()}; the "
                             f"originals keep one length per layer (reset or trim the rows)")
        lens.append(int(v[0]) if v.size else 0)
    return lens


def tq4_cache_to_torch(cache: TQ4Cache) -> list[tuple["torch.Tensor", ...]]:
    """A :class:`~tq4jax.TQ4Cache` as per-layer torch tensors in ``get_compressed``'s form.

    Returns:
      Per layer ``(k_packed uint8 [B, H, L, D/2], k_norms f32 [B, H, L, 1], v_packed,
      v_norms)``: views of the JAX buffers (zero-copy; not contiguous when L < capacity), L
      the layer's length. Raises ValueError when the rows of a layer hold different lengths.
    """
    if not isinstance(cache, TQ4Cache):
        raise TypeError(f"cache must be a TQ4Cache, got {type(cache).__name__}")
    out = []
    for i, n in enumerate(_common_lengths(cache)):
        kc, kn, vc, vn = (to_torch(f[i], f"cache.{a}[{i}]") for f, a in (
            (cache.k_codes, "k_codes"), (cache.k_norms, "k_norms"), (cache.v_codes, "v_codes"),
            (cache.v_norms, "v_norms")))
        out.append((kc[:, :, :n], kn[:, :, :n].unsqueeze(-1), vc[:, :, :n],
                    vn[:, :, :n].unsqueeze(-1)))
    return out


def _spec_of(source: Any) -> TQ4DataSpec:
    for attr in ("head_dim", "k_bits", "v_bits", "rotation", "key_compressor",
                 "value_compressor", "_compressed_keys", "_compressed_values"):
        if not hasattr(source, attr):
            raise TypeError(f"source must be a turboquant-vllm CompressedDynamicCache (missing "
                            f"attribute {attr!r}), got {type(source).__name__}")
    for name, bits in (("k_bits", source.k_bits), ("v_bits", source.v_bits)):
        if not 1 <= int(bits) <= 4:
            raise ValueError(f"source.{name}={bits}: tq4jax stores codes of 1..4 bits")
    cb = lambda c: (c.quantizer.codebook.centroids, c.quantizer.codebook.boundaries)  # noqa: E731
    return TQ4DataSpec.of(source.rotation, cb(source.key_compressor),
                          cb(source.value_compressor), seed=int(getattr(source, "_seed", 42)))


def tq4_cache_from_compressed(source: Any, *, capacity: int | None = None,
                              copy: bool = False) -> TQ4Cache:
    """A turboquant-vllm ``CompressedDynamicCache``'s compressed layers as a
    :class:`~tq4jax.TQ4Cache` (zero-copy for 4-bit layers), with the original's rotation and
    codebooks (:class:`TQ4DataSpec`), so ``TQ4Cache.attend`` / ``update`` read and write codes
    the original can read back. ``capacity`` and ``copy`` as :func:`tq4_cache_from_torch`.

    Raises ValueError for a layer without compressed data (not yet updated, or bypassed) or
    with another head_dim than ``source.head_dim``.
    """
    spec = _spec_of(source)
    layers = []
    for i, (k, v) in enumerate(zip(source._compressed_keys, source._compressed_values)):
        if k is None or v is None:
            raise ValueError(f"source layer {i} has no compressed data (bypassed full-attention "
                             f"layer); a TQ4Cache needs every layer")
        layers.append((k.indices, k.norms, v.indices, v.norms))
    return tq4_cache_from_torch(layers, spec, capacity=capacity, copy=copy)


def load_into_compressed(cache: TQ4Cache, target: Any) -> None:
    """Replace a ``CompressedDynamicCache``'s compressed layers with a
    :class:`~tq4jax.TQ4Cache`'s (first ``lengths`` tokens of each layer).

    The cache must use ``target``'s rotation and codebooks (build it with
    :func:`tq4_cache_from_compressed`, or replace its spec by :meth:`TQ4DataSpec.of` of the
    target's tables); a ValueError otherwise. 4-bit streams are shared with the JAX buffers
    (zero-copy views); others are unpacked to one byte per code (a copy). Outside
    ``fused_mode`` the target's decompressed buffers are rebuilt with its own dequantizer.
    """
    import importlib

    want = _spec_of(target)
    spec = cache.spec
    if spec.head_dim != want.head_dim or not np.array_equal(spec.rotation, want.rotation):
        raise ValueError("cache was written with another rotation/head_dim than target's: its "
                         "codes would decode to garbage there (use tq4_cache_from_compressed)")
    for w in ("k", "v"):
        if any(not np.array_equal(a, b) for a, b in zip(spec.codebook(w), want.codebook(w))):
            raise ValueError(f"cache's {w} codebook differs from target's {w}_bits="
                             f"{getattr(want, w + '_bits')} codebook")
    layer_cls = next((type(x) for x in (*target._compressed_keys, *target._compressed_values)
                      if x is not None), None) or importlib.import_module(
                          type(target).__module__)._CompressedLayer
    keys, values = [], []
    for kc, kn, vc, vn in tq4_cache_to_torch(cache):
        for store, codes, norms, bits in ((keys, kc, kn, want.k_bits),
                                          (values, vc, vn, want.v_bits)):
            if bits != 4:  # the original keeps one byte per code below 4 bits
                codes = to_torch(unpack_nibbles(from_torch(codes.contiguous())).astype(jnp.uint8))
            store.append(layer_cls(indices=codes, norms=norms, packed=bits == 4))
    target._compressed_keys, target._compressed_values = keys, values
    if not getattr(target, "fused_mode", False):
        kcomp, vcomp = target._get_compressors(want.head_dim)
        target._decompressed_k = [target._dequantize_layer(kcomp, x) for x in keys]
        target._decompressed_v = [target._dequantize_layer(vcomp, x) for x in values]


# ----------------------------------------------------------------------------------------------
# paged caches
# ----------------------------------------------------------------------------------------------

def _check_int(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def _paged_check(name: str, shape: tuple, num_kv_heads: int, head_dim: int,
                 block_size: int | None) -> None:
    h, d = _check_int("num_kv_heads", num_kv_heads), _check_int("head_dim", head_dim)
    row = paged_layout(h, d).row_bytes
    if block_size is not None and shape[1] != _check_int("block_size", block_size):
        raise ValueError(f"{name} must have block_size {block_size} as axis 1, got {shape}")
    if shape[2] < row:
        raise ValueError(f"{name} rows must hold at least {row} bytes (paged_layout({h}, {d})"
                         f".row_bytes: K codes, K norms, V codes, V norms), got {shape}; wrong "
                         f"num_kv_heads/head_dim?")


def paged_cache_from_torch(kv_cache: "torch.Tensor", num_kv_heads: int, head_dim: int, *,
                           block_size: int | None = None, copy: bool = False) -> jax.Array:
    """turboquant-vllm's paged TQ4 cache tensor as the array :func:`tq4jax.paged_write` /
    ``paged_decode`` / ``paged_prefill`` take, zero-copy.

    Args:
      kv_cache: uint8 [num_blocks, block_size, total_bytes], C-contiguous, ``total_bytes >=
        paged_layout(num_kv_heads, head_dim).row_bytes`` (H * (D + 8)). When wider (padded
        rows, as turboquant-vllm's vLLM backend allocates), pass
        ``total_bytes=kv_cache.shape[-1]`` to the tq4jax ops.
      num_kv_heads, head_dim: the cache's layout; block_size: checked when given.
      copy: as :func:`from_torch`.
    Returns:
      uint8 ``jax.Array`` [num_blocks, block_size, total_bytes].
    """
    _check_tensor("kv_cache", kv_cache, "uint8", 3, "[num_blocks, block_size, total_bytes]")
    _paged_check("kv_cache", tuple(kv_cache.shape), num_kv_heads, head_dim, block_size)
    return from_torch(kv_cache, "kv_cache", copy=copy)


def paged_cache_to_torch(kv_cache: jax.Array, num_kv_heads: int,
                         head_dim: int) -> "torch.Tensor":
    """A family-A paged cache array as the uint8 tensor ``fused_paged_tq4_decode`` /
    ``fused_paged_tq4_int8_prefill`` take (zero-copy; checks as
    :func:`paged_cache_from_torch`)."""
    _check_array("kv_cache", kv_cache, jnp.uint8, 3, "[num_blocks, block_size, total_bytes]")
    _paged_check("kv_cache", tuple(kv_cache.shape), num_kv_heads, head_dim, None)
    return to_torch(kv_cache, "kv_cache")


def _slot_layout(layout: Any, head_dim: int | None) -> VllmSlot:
    if isinstance(layout, str):
        if head_dim is None:
            raise ValueError("head_dim is required with a preset name")
        layout = vllm_preset(layout, head_dim)
    if isinstance(layout, TurboQuantPreset):
        layout = vllm_slot(layout.head_dim, layout.mse_bits, layout.value_quant_bits,
                           layout.key_packed_size, layout.key_fp8)
    if not isinstance(layout, VllmSlot):
        raise TypeError(f"layout must be a preset name, TurboQuantPreset or VllmSlot, got "
                        f"{type(layout).__name__}")
    if head_dim is not None and head_dim != layout.head_dim:
        raise ValueError(f"head_dim {head_dim} differs from the layout's {layout.head_dim}")
    return layout


def _vllm_check(name: str, shape: tuple, lay: VllmSlot, num_kv_heads: int | None,
                block_size: int | None) -> None:
    if shape[3] != lay.slot_bytes:
        raise ValueError(f"{name} slots must be {lay.slot_bytes} bytes (head_dim {lay.head_dim}"
                         f", {lay.mse_bits}-bit keys{' fp8' if lay.key_fp8 else ''}, "
                         f"{lay.value_bits}-bit values), got shape {shape}")
    for axis, want, what in ((2, num_kv_heads, "num_kv_heads"), (1, block_size, "block_size")):
        if want is not None and shape[axis] != _check_int(what, want):
            raise ValueError(f"{name} must have {what} {want} as axis {axis}, got {shape}")


def vllm_cache_from_torch(kv_cache: "torch.Tensor", layout: str | TurboQuantPreset | VllmSlot,
                          head_dim: int | None = None, *, num_kv_heads: int | None = None,
                          block_size: int | None = None, copy: bool = False) -> jax.Array:
    """A vLLM TurboQuant ``kv_cache`` tensor as the array :func:`tq4jax.vllm.turboquant_decode`
    (and ``turboquant_store`` / ``full_dequant_kv``) take, zero-copy.

    Args:
      kv_cache: uint8 [num_blocks, block_size, H_KV, slot], C-contiguous, slot = the layout's
        ``slot_bytes`` (vLLM's ``slot_size_aligned``).
      layout: a preset name (``"turboquant_4bit_nc"``, needs ``head_dim``), a
        :class:`~tq4jax.vllm.TurboQuantPreset` or a :class:`~tq4jax.vllm.VllmSlot`.
      num_kv_heads, block_size: checked when given. copy: as :func:`from_torch`.
    Returns:
      uint8 ``jax.Array`` [num_blocks, block_size, H_KV, slot].
    """
    lay = _slot_layout(layout, head_dim)
    _check_tensor("kv_cache", kv_cache, "uint8", 4, "[num_blocks, block_size, H_KV, slot]")
    _vllm_check("kv_cache", tuple(kv_cache.shape), lay, num_kv_heads, block_size)
    return from_torch(kv_cache, "kv_cache", copy=copy)


def vllm_cache_to_torch(kv_cache: jax.Array, layout: str | TurboQuantPreset | VllmSlot,
                        head_dim: int | None = None) -> "torch.Tensor":
    """A vLLM-layout cache array as a torch uint8 tensor (zero-copy; checks as
    :func:`vllm_cache_from_torch`)."""
    lay = _slot_layout(layout, head_dim)
    _check_array("kv_cache", kv_cache, jnp.uint8, 4, "[num_blocks, block_size, H_KV, slot]")
    _vllm_check("kv_cache", tuple(kv_cache.shape), lay, None, None)
    return to_torch(kv_cache, "kv_cache")
