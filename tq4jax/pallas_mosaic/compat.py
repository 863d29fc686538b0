"""Pallas Mosaic GPU API differences between jax 0.10.2 (CPU machines) and 0.11.x (the GPU
machine), in one place.

* ``plgpu.load(ref, idx, layout=)``: ``idx`` is required in 0.10.2, deprecated in 0.11.
* ``InterpretGPUParams`` is exported by ``plgpu`` from 0.11 on (0.10.2: ``jax._src``).
* The default lowering semantics changed from Lane (0.10) to Warpgroup (0.11): always explicit.
* GPU interpret mode on 0.10.2 cannot run layouted loads or wgmma from transposed shared
  memory; :data:`INTERPRET_FULL` says whether this jax can (0.11+).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

try:  # jax >= 0.11
    InterpretGPUParams = plgpu.InterpretGPUParams
except AttributeError:  # jax 0.10.2
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401

_LOAD_NEEDS_IDX = (
    inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty)
JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])
#: GPU interpret mode runs layouted loads and wgmma from (transposed) shared memory.
INTERPRET_FULL = JAX_VERSION >= (0, 11)


def load(ref: Any, layout: Any, optimized: bool = True) -> Any:
    """``plgpu.load`` of a whole (already ``.at[]``-indexed) ref into registers
    (``optimized=False``: also where every transfer pattern has bank conflicts)."""
    if _LOAD_NEEDS_IDX:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def interpret_params(out_of_bounds_reads: str = "uninitialized") -> Any:
    """GPU interpret mode. A TMA box hanging past an array's end reads zeros on the GPU (the
    hardware clips it); the interpreter models that with ``"uninitialized"`` reads, which the
    kernels mask as they mask the zeros. ``"raise"``: any read past an array is an error (for
    kernels whose boxes never hang past an end, e.g. the paged one)."""
    return InterpretGPUParams(out_of_bounds_reads=out_of_bounds_reads)


def compiler_params(auto_barriers: bool = True) -> Any:
    """Lane lowering semantics (explicit register layouts; takes ``inline_mgpu``);
    ``auto_barriers=False``: no barrier around each shared-memory store (the kernel places
    its own)."""
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane,
                                unsafe_no_auto_barriers=not auto_barriers)
