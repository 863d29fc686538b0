"""Backend selection shared by every op: `impl=` resolution and interpret mode.

* ``impl="auto"``: the Pallas kernel on a GPU, the pure-jnp reference elsewhere.
* ``impl="pallas"``: the Pallas kernel; interpret mode (CPU) when no GPU is present.
* ``impl="reference"``: the pure ``jax.numpy`` path.

``TQ4JAX_INTERPRET=1|0`` overrides whether Pallas kernels run in interpret mode.
``TQ4JAX_POISON=1`` pre-fills every kernel output with garbage (NaN / 0xAB) through an
aliased input, so tests catch elements a kernel forgot to write.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

IMPLS = ("auto", "pallas", "reference")


def on_gpu() -> bool:
    """True when JAX's default backend is a (CUDA/ROCm) GPU."""
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def resolve_impl(impl: str) -> str:
    """Map ``impl`` to ``"pallas"`` or ``"reference"``; raise ValueError on anything else."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if on_gpu() else "reference"
    return impl


def interpret_mode() -> bool:
    """Whether Pallas kernels run with ``interpret=True`` (env ``TQ4JAX_INTERPRET`` wins)."""
    env = os.environ.get("TQ4JAX_INTERPRET", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise ValueError(f"TQ4JAX_INTERPRET must be '0' or '1', got {env!r}")
    return not on_gpu()


class KernelMode(NamedTuple):
    """How Pallas kernels run; a static (hashable) argument of every jitted kernel wrapper."""
    interpret: bool
    poison: bool


def kernel_mode() -> KernelMode:
    """Current mode from the environment (read at trace time)."""
    poison = os.environ.get("TQ4JAX_POISON", "").strip() == "1"
    return KernelMode(interpret=interpret_mode(), poison=poison)


def _poison_value(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.nan
    return 0xAB if dtype == jnp.uint8 else -0x5A5A5A5


def pallas_call(kernel: Callable, *, mode: KernelMode, out_shape: Any, grid: tuple,
                num_warps: int = 4, num_stages: int = 2, in_specs: Any = None,
                out_specs: Any = None) -> Callable:
    """``pl.pallas_call`` for the Triton backend. Without specs every ref is a whole array
    (kernels index it); specs only offset base pointers on Triton.

    ``mode.poison`` pre-fills the outputs with garbage via aliased inputs. Silences the
    Pallas-Triton DeprecationWarning that JAX >= 0.11 emits on every lowering.
    """
    outs = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)
    n_out = len(outs)

    def call(*args):
        n_in = len(args)
        body, aliases, extra, specs = kernel, {}, (), {}
        if in_specs is not None:
            specs = dict(in_specs=list(in_specs), out_specs=out_specs)
        if mode.poison:
            extra = tuple(jnp.full(o.shape, _poison_value(o.dtype), o.dtype) for o in outs)
            aliases = {n_in + i: i for i in range(n_out)}
            if specs:
                outs_specs = out_specs if isinstance(out_specs, (tuple, list)) else (out_specs,)
                specs["in_specs"] += list(outs_specs)

            def poisoned(*refs):  # drop the aliased input refs; outputs follow them
                return kernel(*refs[:n_in], *refs[n_in + n_out:])

            body = poisoned

        fn = pl.pallas_call(
            body, out_shape=out_shape, grid=grid, input_output_aliases=aliases, **specs,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=mode.interpret)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)
            return fn(*args, *extra)

    return call


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tiles need power-of-two element counts)."""
    return 1 << max(0, (int(n) - 1).bit_length())
