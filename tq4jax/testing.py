"""Testing helpers: prove on a CPU-only machine that Pallas kernels lower for a CUDA GPU.

``lower_for_gpu(fn, *args)`` (alias ``lower_to_triton``) traces ``fn`` against an abstract CUDA
device with compiled (not interpreted) kernels and returns the StableHLO text, which embeds
each kernel: Triton IR for the Triton-lowered backend (``__gpu$xla.gpu.triton``), the Mosaic
GPU module for the Mosaic backend (``mosaic_gpu``, for sm_90). It runs the Pallas lowering
(every "not implemented" error, Mosaic's layout, wgmma and TMA checks) but neither compiles
PTX nor executes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import jax
from jax._src import mesh as mesh_lib

GPU_NAME = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def compiled_kernels() -> Iterator[None]:
    """Force ``interpret=False`` (``TQ4JAX_INTERPRET=0``) inside the block."""
    old = os.environ.get("TQ4JAX_INTERPRET")
    os.environ["TQ4JAX_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQ4JAX_INTERPRET", None)
        else:
            os.environ["TQ4JAX_INTERPRET"] = old


def lower_for_gpu(fn: Callable, *args: Any) -> str:
    """Lower ``jax.jit(fn)(*args)`` for an abstract CUDA GPU; args may be ShapeDtypeStructs.

    Returns the lowered module text; raises if a kernel does not lower.
    """
    dev = mesh_lib.AbstractDevice(GPU_NAME, 1, "cuda")
    amesh = mesh_lib.AbstractMesh((1,), ("x",), (mesh_lib.AxisType.Explicit,),
                                  abstract_device=dev)
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with compiled_kernels(), jax.sharding.use_abstract_mesh(amesh):
        return jax.jit(fn).trace(*structs).lower().as_text()


lower_to_triton = lower_for_gpu


def kernel_jaxpr(fn: Callable, *args: Any) -> str:
    """The jaxpr text of ``fn`` with compiled (not interpreted) kernels, kernel bodies
    included: for checking which primitives a kernel uses."""
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with compiled_kernels():
        return str(jax.make_jaxpr(fn)(*structs))
