"""Which implementation an op runs (``impl=``), and how Pallas kernels run.

``impl`` values, accepted by every op:

* ``"auto"`` (default): on a GPU the fastest kernel backend measured for the op and the
  device (:func:`resolve_impl`); elsewhere the pure-jnp reference.
* ``"pallas"``: a Pallas kernel, the backend chosen as by ``"auto"``; on a machine without a
  GPU the Triton-lowered kernel in interpret mode.
* ``"triton"``: the Pallas kernels lowered through Triton (``tq4jax.pallas_triton``): every op,
  any CUDA GPU; the portable path.
* ``"mosaic"``: the Pallas Mosaic GPU kernels (``tq4jax.pallas_mosaic``): decode on Hopper
  (sm_90+) where it has a kernel; a ValueError for an op, shape or GPU it does not serve.
  Without a GPU it runs in GPU interpret mode. ``auto``/``pallas`` take it where
  ``tq4jax.pallas_mosaic.tuning.AUTO_MOSAIC`` records it measured faster (the vLLM-layout
  decode at B >= 8 over >= 8K-key caches on an H200).
* ``"reference"``: the pure ``jax.numpy`` path (same math, float32 accumulation).

Environment: ``TQ4JAX_INTERPRET=1|0`` overrides whether Triton-lowered kernels run in
interpret mode; ``TQ4JAX_POISON=1`` pre-fills every kernel output with garbage (tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple

import jax

IMPLS = ("auto", "pallas", "triton", "mosaic", "reference")


def on_gpu() -> bool:
    """True when JAX's default backend is a (CUDA/ROCm) GPU."""
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default GPU, or None without one."""
    if not on_gpu():
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def resolve_impl(impl: str, mosaic: bool = False, prefer_mosaic: bool = False) -> str:
    """Map ``impl`` to the path that runs: ``"triton"``, ``"mosaic"`` or ``"reference"``.

    ``mosaic``: the op has a Mosaic GPU kernel for these arguments; ``prefer_mosaic``: it was
    measured faster than the Triton-lowered one there (``auto``/``pallas`` then pick it on a
    Hopper GPU). ValueError for an unknown ``impl`` or an explicit ``"mosaic"`` that cannot
    run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference" or (impl == "auto" and not on_gpu()):
        return "reference"
    hopper = (compute_capability() or (0, 0)) >= (9, 0)
    if impl == "mosaic":
        if not mosaic:
            raise ValueError("impl='mosaic': this op (or these arguments) has no Mosaic GPU "
                             "kernel; use 'triton' or 'auto'")
        if on_gpu() and not hopper:  # without a GPU: interpret mode, or lowering for sm_90
            raise ValueError("impl='mosaic' needs an sm_90+ (Hopper) GPU")
        return "mosaic"
    if impl in ("auto", "pallas") and mosaic and prefer_mosaic and hopper:
        return "mosaic"
    return "triton"


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


def reference_of(op: Callable) -> Callable:
    """``op`` pinned to ``impl="reference"``: the op's own signature and argument checks,
    run on the pure ``jax.numpy`` path (named ``<op>_reference``)."""

    @functools.wraps(op)
    def reference(*args: Any, **kwargs: Any) -> Any:
        if "impl" in kwargs:
            raise TypeError(f"{op.__name__}_reference takes no impl argument")
        return op(*args, **kwargs, impl="reference")

    reference.__name__ = reference.__qualname__ = f"{op.__name__}_reference"
    reference.__doc__ = (f":func:`{op.__name__}` on the pure ``jax.numpy`` reference path: "
                         f"same signature and checks, float32 math.")
    return reference


def check_config(config: Any, kind: type, path: str, op: str) -> Any:
    """``config=`` of a kernel op: None, or the ``kind`` of tiling the chosen kernel backend
    takes (ignored on the reference path)."""
    if config is not None and path != "reference" and not isinstance(config, kind):
        raise TypeError(f"{op}: config must be a {kind.__module__}.{kind.__name__}, got "
                        f"{type(config).__name__}")
    return config
