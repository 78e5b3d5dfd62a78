"""Liveness facts over an FX graph, computed with networkx.

The fused_linear_update rewrite may only delete a gradient if nothing but the optimizer update
reads it. This module answers the three questions that proof needs, on a networkx DiGraph of the
FX graph (edge u → v when v reads u):

* ``escapes``: every read of a value of a region by a node outside the region (a second
  consumer: a norm for clipping, a hook's side output, the graph output, a ``.grad`` copy …);
* ``depends_on``: whether a value (a per-step scalar the update reads) is computed from the region
  (a trust ratio or a clip coefficient is: then the update is not elementwise);
* ``last_reader``: the last node (in graph order) that reads a tensor outside the region — the fused
  op overwrites W and its state in place, so it must come after it (``dX = dY·W`` reads W).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

import networkx as nx
import torch

__all__ = ["GraphFacts", "aliases", "is_mutation", "is_view"]


def is_view(n: torch.fx.Node) -> bool:
    """True for an op whose output aliases its input (permute, view, expand, slice, …)."""
    if n.op != "call_function":
        return False
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return False
    if getattr(n.target, "is_view", False):
        return True
    # ATen marks aliasing outputs in the schema (Tensor(a) self -> Tensor(a))
    return bool(schema.returns) and schema.returns[0].alias_info is not None \
        and not schema.returns[0].alias_info.is_write


def aliases(t: torch.fx.Node) -> Set[torch.fx.Node]:
    """``t`` and every view of it (a view reads ``t``'s storage when ITS readers run)."""
    out, work = {t}, [t]
    while work:
        for u in work.pop().users:
            if u not in out and is_view(u):
                out.add(u)
                work.append(u)
    return out


def is_mutation(n: torch.fx.Node) -> bool:
    """An op that writes one of its inputs (copy_, and the fused op: its schema says so)."""
    schema = getattr(n.target, "_schema", None)
    return n.op == "call_function" and schema is not None and schema.is_mutable


# ATen ops Inductor runs as extern kernels at their place in the graph (its lowerings of mm,
# addmm, bmm, baddbmm and convolution call the library on realised inputs)
_EXTERN = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default}


def _runs_in_place(n: torch.fx.Node) -> bool:
    """Whether Inductor reads ``n``'s inputs where ``n`` stands: an extern GEMM or convolution,
    an op that writes an input, or one outside aten/prims (a custom op: a fallback kernel).
    Placeholders and the output are where they are."""
    if n.op != "call_function" or n.target in _EXTERN or is_mutation(n):
        return True
    ns = getattr(n.target, "namespace", None)
    return ns is not None and ns not in ("aten", "prims")


class GraphFacts:
    """networkx view of one FX graph plus node positions; rebuild after the graph changes."""

    def __init__(self, graph: torch.fx.Graph):
        self.graph = graph
        self.order: Dict[torch.fx.Node, int] = {n: i for i, n in enumerate(graph.nodes)}
        self.dg = nx.DiGraph()
        self.dg.add_nodes_from(graph.nodes)
        for n in graph.nodes:
            for u in n.users:
                self.dg.add_edge(n, u)

    def escapes(self, region: Set[torch.fx.Node],
                allowed: Set[torch.fx.Node]) -> List[Tuple[torch.fx.Node, torch.fx.Node]]:
        """(value, reader) for every reader of a region value that is neither in region nor allowed."""
        out = []
        for n in region:
            for u in self.dg.successors(n):
                if u not in region and u not in allowed:
                    out.append((n, u))
        return sorted(out, key=lambda e: (self.order[e[0]], self.order[e[1]]))

    def depends_on(self, node: torch.fx.Node, region: Set[torch.fx.Node]) -> bool:
        """True when ``node`` is computed (transitively) from a node of ``region``."""
        return not region.isdisjoint(nx.ancestors(self.dg, node))

    def last_reader(self, tensors: Iterable[torch.fx.Node],
                    exclude: Set[torch.fx.Node]) -> Optional[torch.fx.Node]:
        """The last node in graph order reading any of ``tensors`` (or a view of them),
        outside ``exclude``: ``dX = mm(dY, permute(permute(W)))`` reads W at the mm. A reader
        that Inductor may compute later than where it stands counts where its consumers are
        (``settles``): ``mm(pad(dY), constant_pad_nd(permute(W)))``, Inductor's shape padding
        of dX, reads W at the mm."""
        best, memo = None, {}
        for t in tensors:
            for a in aliases(t):
                for u in self.dg.successors(a):
                    if u in exclude or (is_view(u) and u is not a):
                        continue
                    u = self.settles(u, exclude, memo)
                    if best is None or self.order[u] > self.order[best]:
                        best = u
        return best

    def settles(self, u: torch.fx.Node, exclude: Set[torch.fx.Node],
                memo: Dict[torch.fx.Node, torch.fx.Node]) -> torch.fx.Node:
        """The last node by which ``u`` has surely read its inputs: ``u`` itself when Inductor
        runs it where it stands (an extern GEMM, a custom or mutating op, a fallback), else the
        latest of that over its readers outside ``exclude``. Inductor lowers pointwise ops,
        padding and reductions lazily: such a value is computed when a consumer realises it,
        or inside the consumer's kernel. With Inductor's shape padding forced on the CPU
        (torch 2.13), a constant_pad_nd of W that the fused op followed in the graph ran after
        it, in one kernel with the pad of dY, and dX read the updated weight."""
        if u in memo:
            return memo[u]
        memo[u] = u             # a DAG: only guards a second visit
        if not _runs_in_place(u):
            for v in self.dg.successors(u):
                if v.op == "output" or v in exclude:
                    continue
                w = self.settles(v, exclude, memo)
                if self.order[w] > self.order[memo[u]]:
                    memo[u] = w
        return memo[u]

    def latest(self, nodes: Iterable[torch.fx.Node]) -> Optional[torch.fx.Node]:
        """The node of ``nodes`` that comes last in graph order."""
        nodes = [n for n in nodes if isinstance(n, torch.fx.Node)]
        return max(nodes, key=self.order.__getitem__) if nodes else None
