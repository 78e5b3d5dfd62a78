"""Merge identical casts of one tensor whose buffers would be alive at the same time.

Under autocast every ``F.linear`` casts its input to bf16: q, k and v each cast the same
normed hidden state, gate and up another, and each copy is kept for its weight gradient's GEMM
(``dW = dYᵀ·X``). Stock torch.compile does not keep three: AOTAutograd's partitioner runs a CSE
(``fx_graph_cse``) on the joint graph. The step forge captures is one graph that never goes
through the partitioner, so the copies stayed: in the 953M Llama three extra 2 MiB copies a
layer at 1×512 (X is 512 × 2048 bf16), 96 MiB over 16 layers, 8× that at 4×1024 without
checkpointing. One X is also what lets ``rewrite_grad_norms`` weigh q, k and v together.

A cast is merged into an earlier identical one (same op, input, arguments, and no mutation
between them: Inductor's mutation regions, as fx_graph_cse) only where their lifetimes overlap
(the later cast is made before the earlier one's last reader). A weight's cast in the forward
and its cast again in the backward do not overlap: merging them would keep the bf16 weight
alive from the forward to the backward (2 bytes a parameter, 1.8 GiB in the 953M Llama) to
save one cast, so they stay two.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch._dynamo.utils import counters

from forge_compile.context import PassContext
from forge_compile.passes.fused_linear_update import hint_nbytes
from forge_compile.passes.liveness import aliases

__all__ = ["dedupe_casts"]

aten = torch.ops.aten
_CASTS = (torch.ops.prims.convert_element_type.default, aten._to_copy.default)


def _last_read(n: torch.fx.Node, order: Dict[torch.fx.Node, int]) -> int:
    """Where ``n``'s buffer is read last: its readers', through views of it (X reaches both
    of its GEMMs, the forward's and the weight gradient's, through views)."""
    return max([order[n]] + [order[u] for a in aliases(n) for u in a.users])


def _key(n: torch.fx.Node):
    key = (n.target, n.args[0], tuple(n.args[1:]), tuple(sorted(n.kwargs.items())),
           n.meta["mutation_region_id"])
    try:
        hash(key)
    except TypeError:       # an argument that does not hash: leave that cast alone
        return None
    return key


def dedupe_casts(gm: torch.fx.GraphModule, ctx: Optional[PassContext]) -> torch.fx.GraphModule:
    """Replace each cast by an earlier identical cast still alive where it is made."""
    from torch._inductor.pattern_matcher import compute_mutation_region_ids
    graph = gm.graph
    compute_mutation_region_ids(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: Dict[tuple, List[torch.fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _CASTS and n.args and \
                isinstance(n.args[0], torch.fx.Node):
            key = _key(n)
            if key is not None:
                groups.setdefault(key, []).append(n)
    # the ids are dropped again: Inductor's pattern matcher computes them only where the first
    # node has none, and after the later passes add their mutating fused ops ours would be stale
    for n in graph.nodes:
        n.meta.pop("mutation_region_id", None)
    merged = 0
    for nodes in groups.values():
        keep, last = None, -1
        for n in nodes:
            end = _last_read(n, order)
            if keep is not None and order[n] <= last:
                v = n.meta.get("val")
                if isinstance(v, torch.Tensor) and ctx is not None:
                    ctx.report.cast_bytes_merged += hint_nbytes(v) or 0
                n.replace_all_uses_with(keep)
                graph.erase_node(n)
                last = max(last, end)
                merged += 1
            else:
                keep, last = n, end
    if merged:
        counters["forge_compile"]["casts merged"] += merged
        if ctx is not None:
            ctx.report.casts_merged += merged
        graph.lint()
        gm.recompile()
    return gm
