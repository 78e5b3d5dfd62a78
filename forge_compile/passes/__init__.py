"""The forge graph passes, run in Inductor's post_grad_custom_pre_pass on the whole captured step.

PASSES is the one list that fixes their order; each entry is a verb-named pass
``(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule``.
docs/invariants.md says what every pass must preserve.
"""
from __future__ import annotations

from typing import Callable, List

import torch

from forge_compile.context import PassContext

__all__ = ["PASSES", "run_passes"]

Pass = Callable[[torch.fx.GraphModule, PassContext], torch.fx.GraphModule]

# Order and why (filled by the rewrite work): analysis passes first, mutating passes last.
PASSES: List[Pass] = []


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Run every pass of PASSES in order."""
    for p in PASSES:
        gm = p(gm, ctx)
    return gm
