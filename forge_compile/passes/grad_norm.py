"""Rewrite a weight gradient's 2-norm to read the GEMM's operands instead of the gradient.

``torch.nn.utils.clip_grad_norm_`` computes ``‖g‖`` of every gradient (``_foreach_norm`` over
the list; with ``foreach=False`` AOTAutograd's ``sum(pow(g, 2))`` of each, as a hand-written
clip's ``(g ** 2).sum()``; or ``linalg_vector_norm``), then scales every gradient by
``min(max_norm / (total + 1e-6), 1)`` before the update. The scale is an elementwise product with
a 0-d value, which the fused update takes as a scalar; what kept every weight unfused was the
norm, a reader of the gradient outside the update. Here each weight gradient's norm becomes
``sqrt(forge_compile::grad_sqnorm(A, B))`` on the operands of its GEMM ``A·B``
(forge_compile/kernels/grad_norm.py: a second GEMM, in blocks, the gradient never whole). The
gradient is then read by its update only and fuse_linear_updates can fuse it; the scale depends
on dY and X, not on the gradient, so the liveness proof holds.

The cost is memory as well as the GEMM: every such update waits for the last norm, so the
weight's dY and X stay alive until the backward ends, where without the rewrite its gradient
would. A norm is rewritten only where the operands take fewer bytes than the gradient; weights
that read one operand buffer (q, k and v one X) are weighed together, the buffer counted once
(``_weigh``; the 953M Llama: o_proj below 2,048 tokens a step, q/k/v below 3,072, the others
about 3,000-3,850, docs/README.md). The others keep their gradient and their norm, and that
weight stays unfused with the reason that its norm reads the gradient.

Entries of ``_foreach_norm`` that are not weight gradients (biases, norms, embeddings) stay in
a ``_foreach_norm`` over them alone. A gradient whose update is then refused for another reason
(a hook's stash of it, say) keeps the rewritten norm: the same value, for one GEMM more.
"""
from __future__ import annotations

import logging
import operator
from typing import Dict, List, Optional

import torch
from torch._dynamo.utils import counters

from forge_compile.context import PassContext
from forge_compile.kernels.grad_norm import grad_sqnorm  # noqa: F401 (registers the op)
from forge_compile.passes.liveness import is_view
from forge_compile.passes.fused_linear_update import (_TRANSPARENT, NORM_FROM_OPERANDS,
                                                     NORM_KEPT, _product_operands,
                                                     _val, grad_source, hint_nbytes,
                                                     lower_rules)

__all__ = ["rewrite_grad_norms"]

log = logging.getLogger("forge_compile")
aten = torch.ops.aten
SQNORM_OP = torch.ops.forge_compile.grad_sqnorm.default


def _nbytes(n) -> Optional[int]:
    """``n``'s bytes; with a symbolic shape (dynamic=True, or Dynamo's automatic dynamic after
    a shape change) the value at this compile, without a guard, so a token count that crosses
    the operands-against-gradient line later does not recompile: only the memory differs, the
    norm is the same value either way. None where a size has no hint (data-dependent)."""
    v = _val(n)
    return hint_nbytes(v) if isinstance(v, torch.Tensor) else 0


def _is_two(ord_) -> bool:
    return isinstance(ord_, (int, float)) and not isinstance(ord_, bool) and ord_ == 2


def _feeds_an_update(g: torch.fx.Node) -> bool:
    """Whether ``g`` flows through elementwise ops into a ``copy_`` of a graph input of its
    shape (a parameter or its optimizer state): a weight gradient, not an activation whose
    squares a loss sums (that one's norm stays: its product is computed anyway)."""
    shape = tuple(_val(g).shape)
    seen, stack = set(), [g]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target is aten.copy_.default and u.args[0].op == "placeholder":
                if isinstance(_val(u.args[0]), torch.Tensor) and \
                        tuple(_val(u.args[0]).shape) in (shape, shape[::-1]):
                    return True
            elif u.target in lower_rules or u.target in _TRANSPARENT or \
                    u.target is operator.getitem:
                stack.append(u)
    return False


def _candidate(g: torch.fx.Node) -> Optional[tuple]:
    """(gemm, A, B) when ``g`` is a weight gradient A·B (through views and casts up) that feeds
    an update and whose operands' sizes are known, else None."""
    if not isinstance(g, torch.fx.Node) or not isinstance(_val(g), torch.Tensor):
        return None
    gemm, _ = grad_source(g)
    if gemm is None or not _feeds_an_update(g):
        return None
    a, b = _product_operands(gemm)
    if not all(isinstance(x, torch.fx.Node) and isinstance(_val(x), torch.Tensor)
               for x in (a, b)):
        return None
    if None in (_nbytes(a), _nbytes(b), _nbytes(g)):
        log.info("forge_compile: the norm of %s reads the gradient: its operands' sizes are "
                 "data-dependent", g.name)
        return None
    return gemm, a, b


def _buffer(n: torch.fx.Node) -> torch.fx.Node:
    """The node whose buffer ``n`` views (an X that q, k and v read through their own views
    is one buffer, held once)."""
    while is_view(n) and n.args and isinstance(n.args[0], torch.fx.Node):
        n = n.args[0]
    return n


def _weigh(grads: List[torch.fx.Node]) -> Dict[torch.fx.Node, tuple]:
    """The gradients among ``grads`` whose norms are computed from their GEMM's operands:
    g -> (gemm, A, B). Gradients that share an operand buffer (q, k and v read one X; gate
    and up another) are weighed together: the buffers they hold, each once, against the
    gradients they free. A group that holds more is weighed weight by weight; a weight whose
    dY and X alone outweigh its gradient keeps it (NORM_KEPT: the bytes, for its refusal)."""
    found = {}
    for g in dict.fromkeys(grads):
        c = _candidate(g)
        if c is not None:
            found[g] = c
    # groups: the connected components of gradients and the operand buffers they read
    parent: Dict[torch.fx.Node, torch.fx.Node] = {}

    def root(x):
        while parent.setdefault(x, x) is not x:
            x = parent[x]
        return x
    for g, (_, a, b) in found.items():
        for buf in (_buffer(a), _buffer(b)):
            parent[root(buf)] = root(g)
    groups: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
    for g in found:
        groups.setdefault(root(g), []).append(g)
    out = {}
    for members in groups.values():
        bufs = {_buffer(x): x for g in members for x in found[g][1:]}
        held = sum(_nbytes(x) for x in bufs.values())
        freed = sum(_nbytes(g) for g in members)
        if len(members) > 1 and held < freed:
            out.update((g, found[g]) for g in members)
            continue
        for g in members:
            gemm, a, b = found[g]
            alone, grad = _nbytes(a) + _nbytes(b), _nbytes(g)
            if alone < grad:
                out[g] = found[g]
                continue
            gemm.meta[NORM_KEPT] = (alone, grad)
            counters["forge_compile"]["grad norm kept: operands larger than the gradient"] += 1
            log.info("forge_compile: the norm of %s reads the gradient: its GEMM's operands "
                     "(%d bytes, held until the clip's scale is known) take more than the "
                     "gradient (%d bytes)", g.name, alone, grad)
    return out


def _cast_like(graph: torch.fx.Graph, out: torch.fx.Node, like: torch.fx.Node) -> torch.fx.Node:
    if _val(like).dtype == torch.float32:
        return out
    # prims.convert_element_type, not aten._to_copy: the post-grad graph is decomposed, and
    # Inductor refuses a _to_copy there ("both a fallback and a decomp for same op")
    cast = graph.call_function(torch.ops.prims.convert_element_type.default,
                               (out, _val(like).dtype))
    cast.meta["val"] = _val(like)
    return cast


def _norm_of(graph: torch.fx.Graph, gemm, a, b, like: torch.fx.Node,
             root: bool = True) -> torch.fx.Node:
    """``sqrt(grad_sqnorm(a, b))`` (``root=False``: the sum of squares itself) in the dtype of
    the node ``like`` it replaces."""
    out = graph.call_function(SQNORM_OP, (a, b))
    out.meta["val"] = _val(a).new_empty((), dtype=torch.float32)
    if root:
        out = graph.call_function(aten.sqrt.default, (out,))
        out.meta["val"] = out.args[0].meta["val"]
    gemm.meta[NORM_FROM_OPERANDS] = True
    counters["forge_compile"]["grad norm from the GEMM operands"] += 1
    return _cast_like(graph, out, like)


def _norm_reads(node: torch.fx.Node) -> List[torch.fx.Node]:
    """The tensors whose whole 2-norm ``node`` computes in a form this pass rewrites: the
    entries of a ``_foreach_norm`` read through getitem, the input of a whole-tensor
    ``linalg_vector_norm``, ``g`` of ``sum(pow(g, 2))`` over every dimension."""
    if node.op != "call_function":
        return []
    if node.target is aten._foreach_norm.Scalar:
        if not _is_two(node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)) or \
                node.kwargs.get("dtype") is not None:
            return []
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            return []
        read = {u.args[1] for u in node.users}
        return [t for i, t in enumerate(node.args[0]) if i in read]
    if node.target is aten.linalg_vector_norm.default:
        # linalg_vector_norm(self, ord=2, dim=None, keepdim=False, *, dtype=None)
        ord_ = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
        if not _is_two(ord_) or dim is not None or keepdim or node.kwargs.get("dtype") is not None:
            return []
        return [node.args[0]]
    if node.target in (aten.sum.dim_IntList, aten.sum.default):
        # sum(pow(g, 2)) over every dimension: how AOTAutograd decomposes the norm of
        # clip_grad_norm_(foreach=False) (pow(·, 0.5) follows), and a hand-written clip's
        # (p.grad ** 2).sum()
        sq = node.args[0]
        whole = node.target is aten.sum.default     # sum(x, *, dtype=None): every dimension
        dims = None if whole else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        keepdim = False if whole else (node.args[2] if len(node.args) > 2
                                       else node.kwargs.get("keepdim", False))
        if (not isinstance(sq, torch.fx.Node) or sq.op != "call_function"
                or sq.target is not aten.pow.Tensor_Scalar or not _is_two(sq.args[1])
                or len(sq.users) != 1 or keepdim or node.kwargs.get("dtype") is not None):
            return []
        g = sq.args[0]
        if not isinstance(_val(g), torch.Tensor):
            return []
        rank = _val(g).dim()
        if dims not in (None, []) and sorted(d % rank for d in dims) != list(range(rank)):
            return []
        return [g]
    return []


def _rewrite_foreach(graph: torch.fx.Graph, node: torch.fx.Node, chosen: dict) -> bool:
    tensors = list(node.args[0])
    users = {}
    for u in node.users:
        users.setdefault(u.args[1], []).append(u)
    keep: List[int] = []
    done = False
    for i, t in enumerate(tensors):
        found = chosen.get(t) if i in users else None
        if found is None:
            keep.append(i)
            continue
        with graph.inserting_before(users[i][0]):
            new = _norm_of(graph, *found, like=users[i][0])
        for u in users[i]:
            u.replace_all_uses_with(new)
            graph.erase_node(u)
        done = True
    if not done:
        return False
    if keep:      # the other entries' norms: one _foreach_norm over them, entries renumbered
        with graph.inserting_before(node):
            rest = graph.call_function(node.target, ([tensors[i] for i in keep],)
                                       + tuple(node.args[1:]), dict(node.kwargs))
        rest.meta["val"] = [_val(node)[i] for i in keep]
        for j, i in enumerate(keep):
            for u in users.get(i, []):
                u.args = (rest, j)
    graph.erase_node(node)
    return True


def _rewrite_whole(graph: torch.fx.Graph, node: torch.fx.Node, found: tuple) -> None:
    """``node`` (a whole-tensor norm, or a sum of squares) becomes the norm (the sum of
    squares) of ``found``'s operands."""
    squares = node.target in (aten.sum.dim_IntList, aten.sum.default)
    with graph.inserting_before(node):
        new = _norm_of(graph, *found, like=node, root=not squares)
    node.replace_all_uses_with(new)
    sq = node.args[0]
    graph.erase_node(node)
    if squares:
        graph.erase_node(sq)


def rewrite_grad_norms(gm: torch.fx.GraphModule, ctx: Optional[PassContext]) -> torch.fx.GraphModule:
    """Replace the 2-norm of each weight gradient (``_foreach_norm`` entries, whole-tensor
    ``linalg_vector_norm``, ``sum(pow(g, 2))``) by ``grad_sqnorm(A, B)`` on its GEMM's
    operands (its square root where the norm itself was read), where ``_weigh`` finds that
    holding the operands takes fewer bytes than the gradients."""
    graph = gm.graph
    reads = {n: _norm_reads(n) for n in graph.nodes}
    reads = {n: r for n, r in reads.items() if r}
    if not reads:
        return gm
    chosen = _weigh([g for r in reads.values() for g in r])
    changed = False
    for node, read in reads.items():
        if node.target is aten._foreach_norm.Scalar:
            changed |= _rewrite_foreach(graph, node, chosen)
        elif read[0] in chosen:
            _rewrite_whole(graph, node, chosen[read[0]])
            changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
