"""The forge graph passes, run in Inductor's post_grad_custom_pre_pass on the whole captured step.

PASSES is the one list that fixes their order; each entry is a verb-named pass
``(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule``.
docs/invariants.md says what every pass must preserve.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from forge_compile.context import PassContext
from forge_compile.passes.dedupe_casts import dedupe_casts
from forge_compile.passes.decompose_fused_optimizers import decompose_fused_optimizers
from forge_compile.passes.fused_linear_update import fuse_linear_updates
from forge_compile.passes.grad_norm import rewrite_grad_norms
from forge_compile.passes.unroll_foreach import unroll_foreach

__all__ = ["PASSES", "run_passes"]

Pass = Callable[[torch.fx.GraphModule, PassContext], torch.fx.GraphModule]

PASSES: List[Pass] = [
    # 0. autocast casts one input once per linear (q, k, v): identical casts alive together
    #    become one buffer, as stock torch.compile's partitioner CSE makes them. Value-preserving.
    dedupe_casts,
    # 1. fused=True optimizers are one op over lists (_fused_adamw): rewrite them as the
    #    equivalent _foreach_* / per-element ATen ops first, so that 2. also unrolls them.
    decompose_fused_optimizers,
    # 2. foreach=True (the GPU default) hides each parameter's update in list ops: one per-element
    #    chain per parameter is what the matcher needs. Value-preserving, so safe if 3. refuses.
    unroll_foreach,
    # 3. clip_grad_norm_'s norms of weight gradients read the GEMM's operands, not the
    #    gradient (a second GEMM): then the gradient has no reader but its update, so 4. may
    #    fuse it. Value-preserving up to the norm's summation order.
    rewrite_grad_norms,
    # 4. the mutating rewrite, last (STYLE 4): GEMM + update region -> fused_linear_update_.
    fuse_linear_updates,
]


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Run every pass of PASSES in order."""
    for p in PASSES:
        gm = p(gm, ctx)
    return gm
