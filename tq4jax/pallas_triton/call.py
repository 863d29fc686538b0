"""``pallas_call`` for the Triton lowering (with optional output poisoning) and the
BlockSpec helpers of its kernels."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..backend import KernelMode


def _poison_value(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.nan
    return 0xAB if dtype == jnp.uint8 else -0x5A5A5A5


def pallas_call(kernel: Callable, *, mode: KernelMode, out_shape: Any, grid: tuple,
                num_warps: int = 4, num_stages: int = 2, in_specs: Any = None,
                out_specs: Any = None) -> Callable:
    """``pl.pallas_call`` for the Triton backend. Arguments may be pytrees (tuples,
    NamedTuples, None for an absent input): the kernel receives its refs in the same shape,
    and ``in_specs`` mirrors it. Without specs every ref is a whole array (kernels index it);
    specs only offset base pointers on Triton.

    ``mode.poison`` pre-fills the outputs with garbage via aliased inputs. Silences the
    Pallas-Triton DeprecationWarning that JAX >= 0.11 emits on every lowering.
    """
    outs = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)
    n_out = len(outs)

    def call(*args):
        n_in = len(args)  # top-level arguments (pytrees: a kernel gets refs in their shape)
        n_flat = len(jax.tree.leaves(args))
        body, aliases, extra, specs = kernel, {}, (), {}
        if in_specs is not None:
            specs = dict(in_specs=list(in_specs), out_specs=out_specs)
        if mode.poison:
            extra = tuple(jnp.full(o.shape, _poison_value(o.dtype), o.dtype) for o in outs)
            aliases = {n_flat + i: i for i in range(n_out)}
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


def head_spec(x: Any, hkv: int) -> pl.BlockSpec:
    """BlockSpec of an array [B, HKV, ...] blocked per (batch, KV head) = grid axis 1."""
    zeros = (0,) * (x.ndim - 2)
    return pl.BlockSpec((None, None) + tuple(x.shape[2:]),
                        lambda r, i, s: (i // hkv, i % hkv) + zeros)


def whole_spec(x: Any) -> pl.BlockSpec:
    """BlockSpec of an array every program reads whole (Triton: only a base pointer)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
