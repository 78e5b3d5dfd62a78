"""A per-signature cache in front of Triton's kernel dispatch, for the fused kernels.

Why it exists: ``JITFunction.run`` binds and specialises every argument on every launch before
it finds the compiled kernel. The warp-specialised kernel has 22 runtime arguments, five of
them TensorDescriptors whose specialisation formats their shared layout as a string. Measured
on the H100 host (torch 2.11, Triton 3.6, ``scripts/profile_launch.py``, 256×256×64 AdamW, 300
launches, 2026-11-23 16:36 UTC): 221.6 µs per launch through ``JITFunction.run``, 175.9 µs
through this cache. The Triton kernel (plain pointer and int arguments) measured 130.7 vs
131.2 µs, no gain; it goes through the cache too since the op's launch plans
(fused_linear_update.py), which repeat a launch from ``bound``. Host time matters where the
GPU work per launch is small (a small model, or many layers at T=512: 0.16 ms of GPU time per
4096² AdamW update), and under do_bench once the host falls behind the GPU: at 16:43 UTC it
did not (``benchmarks/experiments/timing_modes.py``: the same 0.1647 ms with the GPU never
waiting), at 18:25 UTC it did (the launch plans' comment).

``launch`` keys the compiled kernel by Triton's own specialisation of the scalar and pointer
arguments (``native_specialize_impl``, the function JITFunction's binder calls, so alignment
and the int 1 / multiple-of-16 cases are classified exactly as Triton does), the descriptors'
dtype, block, layout and padding (what their specialisation string is made of), the constexpr
and option keywords, the device and Triton's debug/instrumentation switches. A key seen before
launches the cached ``CompiledKernel`` directly (``CompiledKernel[grid]``, the call
``JITFunction.run`` itself ends in); a new key goes through ``JITFunction.run``, which compiles
or finds the kernel, launches it and returns it for the cache. Inductor's Triton launchers skip
``JITFunction.run`` the same way. Interpreted functions (``TRITON_INTERPRET=1``) go straight
to Triton; ``FORGE_LAUNCH_CACHE=0`` turns the cache off.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

__all__ = ["launch", "bound", "grid3", "enabled", "ENV_LAUNCH_CACHE", "STATS"]

ENV_LAUNCH_CACHE = "FORGE_LAUNCH_CACHE"    # "0": every launch through JITFunction.run

# launches that found their compiled kernel here / went through JITFunction.run (tests read them)
STATS = {"hits": 0, "misses": 0}
# id(jit function) -> (jit function, _Entry, or None where the cache does not apply: interpreted)
_ENTRIES: dict = {}


class _Entry:
    """What one jit function's launches need: its parameter order and defaults, the backend
    its binder specialises with, the Triton functions the key calls (looked up once, not per
    launch), and the compiled kernels seen so far."""
    __slots__ = ("names", "defaults", "backend", "compiled", "specialize", "driver", "knobs",
                 "descs")

    def __init__(self, jit):
        from triton import knobs
        from triton._C.libtriton import native_specialize_impl
        from triton.compiler import make_backend
        from triton.runtime.driver import driver
        self.names = list(jit.arg_names)
        self.defaults = {n: p.default for n, p in jit.signature.parameters.items()
                         if p.default is not inspect.Parameter.empty}
        self.backend = make_backend(driver.active.get_current_target())
        self.specialize, self.driver, self.knobs = native_specialize_impl, driver, knobs
        self.descs = _desc_types()
        self.compiled: dict = {}


def _entry(jit) -> Optional[_Entry]:
    # keyed by id: JITFunction.__hash__ goes through its source hash; the jit function is kept
    # in the value, so its id cannot be reused
    hit = _ENTRIES.get(id(jit))
    if hit is None or hit[0] is not jit:
        from triton.runtime.jit import JITFunction
        hit = _ENTRIES[id(jit)] = (jit, _Entry(jit) if isinstance(jit, JITFunction) else None)
    return hit[1]


def _desc_types() -> tuple:
    # Gluon's host-side descriptor (the warp-specialised kernel's); the key below reads its
    # layout, which triton.tools' TensorDescriptor does not have
    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        return (TensorDescriptor,)
    except ImportError:
        return ()


def _specialization_key(e: _Entry, args, kwargs) -> tuple:
    """The cache key of one launch (see the module docstring)."""
    spec = []
    for a in args:
        if isinstance(a, e.descs):
            spec.append((a.base.dtype, tuple(a.block_shape), a.layout, a.padding, len(a.shape)))
        else:
            spec.append(e.specialize(e.backend, a, False, True, True))
    return (e.driver.active.get_current_device(), tuple(spec), tuple(kwargs.items()),
            e.knobs.runtime.debug, e.knobs.compilation.instrumentation_mode)


def launch(jit, grid: tuple, *args, **kwargs):
    """``jit[grid](*args, **kwargs)``, through the cache; returns the compiled kernel."""
    e = _entry(jit) if enabled() else None
    if e is None:
        return jit[grid](*args, **kwargs)
    key = _specialization_key(e, args, kwargs)
    ck = e.compiled.get(key)
    if ck is None:
        STATS["misses"] += 1
        ck = jit[grid](*args, **kwargs)
        if hasattr(ck, "result"):        # Triton's asynchronous compile mode hands a future
            ck = ck.result()
        if ck is not None:
            e.compiled[key] = ck
        return ck
    STATS["hits"] += 1
    ck[grid3(grid)](*_values(e, args, kwargs))
    return ck


def grid3(grid) -> tuple:
    """A launch grid as the three dimensions ``CompiledKernel[grid]`` takes."""
    return (tuple(grid) + (1, 1))[:3]


def _values(e: _Entry, args, kwargs) -> list:
    # every parameter in signature order, constexprs included: what JITFunction.run passes
    vals = list(args)
    for name in e.names[len(args):]:
        vals.append(kwargs[name] if name in kwargs else e.defaults[name])
    return vals


def bound(jit, args, kwargs):
    """(parameter names, values) of a launch in signature order, as a cache hit passes them to
    the compiled kernel (None where the cache does not apply: interpreted, or turned off). The
    op's launch plans (fused_linear_update.py) repeat a launch from them."""
    e = _entry(jit) if enabled() else None
    if e is None:
        return None
    return e.names, _values(e, args, kwargs)


def enabled() -> bool:
    """``FORGE_LAUNCH_CACHE``: unset or 1 on, 0 off; anything else fails with the fix."""
    env = os.environ.get(ENV_LAUNCH_CACHE)
    if env is None or env == "1":
        return True
    if env == "0":
        return False
    raise ValueError(f"{ENV_LAUNCH_CACHE} must be 0 or 1, got {env!r}")
