"""forge_compile: a torch.compile backend that never materialises weight gradients.

``torch.compile(train_step, backend="forge")`` captures forward, backward, ``opt.step()`` and
``opt.zero_grad()`` as one graph, fuses each weight-gradient GEMM with the optimizer update of
that weight (FORGE), and lets Inductor compile the rest.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from forge_compile.backend import ForgeBackend, forge_backend, inductor_mode_patches
from forge_compile.context import ForgeOptions
from forge_compile.explain import ExplainReport, explain
from forge_compile.patterns import register_pattern, unregister_pattern

__all__ = ["compile", "explain", "ExplainReport", "ForgeOptions", "ForgeBackend",
           "forge_backend", "register_pattern", "unregister_pattern"]
__version__ = "0.1.0"


def compile(fn: Callable, *, fullgraph: bool = False, mode: Optional[str] = None,
            **options) -> Callable:
    """``torch.compile(fn, backend="forge", mode=mode)`` with forge options, e.g. ``fuse=False``,
    ``inner="aot_eager"``. ``mode``: torch.compile's Inductor modes, e.g. "reduce-overhead" (CUDA
    graphs). Unknown options or modes raise a one-line error naming the valid ones."""
    opts = ForgeOptions.from_kwargs(**options)
    inductor_mode_patches(mode, opts.inner)       # fail here, not at the first call
    backend = ForgeBackend(opts)
    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph, mode=mode)
    compiled._forge_options = dict(options, **({"mode": mode} if mode else {}))
    compiled._forge_fn = fn
    compiled._forge_backend = backend
    compiled._forge_fullgraph = fullgraph
    return compiled
