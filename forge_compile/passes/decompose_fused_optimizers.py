"""Rewrite ``fused=True`` optimizer ops (``_fused_adamw``, ``_fused_adam``, ``_fused_sgd``) as
per-element ATen ops, one chain per parameter.

These ops update a whole list of parameters in one call: to the fused_linear_update matcher they
are an opaque consumer of every gradient. Decomposed into the elementwise rule they implement
(the math of ATen's FusedAdamKernel.cpp / FusedSGDKernel.cpp: bias corrections from the step
counter, lerp for exp_avg, ``v·β2 + (1-β2)·g²``, ``√v / √bc2 + eps``), each gradient gets its own
update chain, which the matcher then fuses like any other optimizer.

Refused (left as is, counted, logged): ``grad_scale`` / ``found_inf`` present (AMP's scaler: the
step may be skipped at runtime), and list outputs read by something else than ``getitem``.
"""
from __future__ import annotations

import logging
import operator
from typing import Dict, Optional

import torch
from torch._dynamo.utils import counters

from forge_compile.context import PassContext

__all__ = ["decompose_fused_optimizers"]

log = logging.getLogger("forge_compile")
aten = torch.ops.aten

_ADAM = {aten._fused_adamw.default: "adamw", aten._fused_adamw.tensor_lr: "adamw",
         aten._fused_adam.default: "adam", aten._fused_adam.tensor_lr: "adam"}
_SGD = {aten._fused_sgd.default, aten._fused_sgd.tensor_lr}


def _v(x):
    return x.meta["val"] if isinstance(x, torch.fx.Node) else x


class _Emitter:
    """Creates nodes before an anchor, with meta['val'] computed on the fake inputs."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node):
        self.graph, self.anchor = graph, anchor

    def __call__(self, target, *args, **kwargs):
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_function(target, args, kwargs)
        n.meta["val"] = target(*[_v(a) for a in args], **{k: _v(a) for k, a in kwargs.items()})
        return n


def _f32(x: float) -> float:
    """x rounded to float32 (a Python float again)."""
    return torch.tensor(x, dtype=torch.float32).item()


def _one_minus(e: _Emitter, x: torch.fx.Node) -> torch.fx.Node:
    """1 - x as (-x) + 1 (the same IEEE result): aten.rsub has no Inductor lowering (Inductor
    decomposes it before the post-grad passes run), and a node this pass emits is lowered as it
    is: with rsub.Scalar every fused=True Adam(W) step failed to compile under Inductor
    ("both a fallback and a decomp for same op: aten.rsub.Scalar", torch 2.13)."""
    return e(aten.add.Tensor, e(aten.neg.default, x), 1)


def _lerp(e: _Emitter, a: torch.fx.Node, b: torch.fx.Node, w: float) -> torch.fx.Node:
    """lerp(a, b, w) for a constant w in ATen's two-sided form (w < 0.5: a + w·(b - a), else
    b - (1 - w)·(b - a)) from ops Inductor lowers: aten.lerp.Scalar is decomposed before the
    post-grad passes, and Inductor refuses it after them (as rsub, _one_minus)."""
    d = e(aten.sub.Tensor, b, a)
    if abs(w) < 0.5:
        return e(aten.add.Tensor, a, e(aten.mul.Tensor, d, w))
    return e(aten.sub.Tensor, b, e(aten.mul.Tensor, d, 1 - w))


def _adam_chain(e: _Emitter, mode: str, p, g, m, v, vmax, step, kw) -> Dict[str, torch.fx.Node]:
    """One parameter of _fused_adam(w): returns the new values {param, exp_avg, exp_avg_sq, max}."""
    lr, b1, b2, wd, eps = kw["lr"], kw["beta1"], kw["beta2"], kw["weight_decay"], kw["eps"]
    bc1 = _one_minus(e, e(aten.pow.Scalar, b1, step))
    bc2 = _one_minus(e, e(aten.pow.Scalar, b2, step))
    step_size = e(aten.div.Tensor, lr, bc1) if isinstance(lr, torch.fx.Node) else \
        e(aten.mul.Tensor, e(aten.reciprocal.default, bc1), lr)
    bc2_sqrt = e(aten.sqrt.default, bc2)
    if kw["maximize"]:
        g = e(aten.neg.default, g)
    if wd != 0:
        if mode == "adamw":
            decay = _one_minus(e, e(aten.mul.Tensor, lr, wd)) if isinstance(lr, torch.fx.Node) \
                else 1 - lr * wd
            p = e(aten.mul.Tensor, p, decay)
        else:
            g = e(aten.add.Tensor, g, p, alpha=wd)
    if _v(p).device.type == "cuda":
        # Eager fused=True on CUDA behaves as if β were cast to fp32 and 1-β formed in fp32
        # ((1-β2) = 0.00099998713 for β2 = 0.999, 1.29e-5 below 0.001): measured on an H100
        # (torch 2.11, scripts/diag_fused_true_adamw.py), its exp_avg_sq is 1.27e-5 from an fp64
        # AdamW while foreach's is 2e-7. The same constants here make forge equal eager.
        f1 = _f32(b1)
        m2 = e(aten.add.Tensor, e(aten.mul.Tensor, m, f1), e(aten.mul.Tensor, g, _f32(1 - f1)))
        v_keep = _f32(b2)
        v_new = _f32(1 - v_keep)
    else:
        m2 = _lerp(e, m, g, 1 - b1)
        v_keep, v_new = b2, 1 - b2
    v2 = e(aten.add.Tensor, e(aten.mul.Tensor, v, v_keep),
           e(aten.mul.Tensor, e(aten.mul.Tensor, g, g), v_new))
    out = {"exp_avg": m2, "exp_avg_sq": v2}
    vd = v2
    if kw["amsgrad"]:
        vd = out["max_exp_avg_sq"] = e(aten.maximum.default, vmax, v2)
    denom = e(aten.add.Tensor, e(aten.div.Tensor, e(aten.sqrt.default, vd), bc2_sqrt), eps)
    upd = e(aten.div.Tensor, e(aten.mul.Tensor, m2, step_size), denom)
    out["param"] = e(aten.sub.Tensor, p, upd)
    return out


def _sgd_chain(e: _Emitter, p, g, buf, kw) -> Dict[str, torch.fx.Node]:
    """One parameter of _fused_sgd (FusedSGDKernel.cpp's order of operations)."""
    lr, wd, mom, damp = kw["lr"], kw["weight_decay"], kw["momentum"], kw["dampening"]
    if kw["maximize"]:
        g = e(aten.neg.default, g)
    if wd != 0:
        g = e(aten.add.Tensor, g, p, alpha=wd)
    out = {}
    if mom != 0:
        if kw["is_first_step"]:
            b2 = e(aten.clone.default, g)
        else:
            b2 = e(aten.add.Tensor, e(aten.mul.Tensor, buf, mom), g, alpha=1 - damp)
        out["momentum_buffer"] = b2
        g = e(aten.add.Tensor, g, b2, alpha=mom) if kw["nesterov"] else b2
    out["param"] = e(aten.sub.Tensor, p, e(aten.mul.Tensor, g, lr))
    return out


def _list_getitems(node: torch.fx.Node) -> Optional[Dict[tuple, torch.fx.Node]]:
    """{(output index, list index): node} for every ``node[j][i]``; None if used otherwise."""
    out = {}
    for u in node.users:
        if u.target is not operator.getitem:
            return None
        for w in u.users:
            if w.target is not operator.getitem:
                return None
            out[(u.args[1], w.args[1])] = w
    return out


def decompose_fused_optimizers(gm: torch.fx.GraphModule, ctx: Optional[PassContext]) -> torch.fx.GraphModule:
    """Rewrite _fused_adamw/_fused_adam/_fused_sgd nodes as per-element ATen ops."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or (node.target not in _ADAM and node.target not in _SGD):
            continue
        kw = dict(node.kwargs)
        if kw.get("grad_scale") is not None or kw.get("found_inf") is not None:
            counters["forge_compile"]["refused: fused optimizer with grad_scale/found_inf"] += 1
            log.info("forge_compile: %s kept: grad_scale/found_inf (AMP scaler) present", node.target)
            continue
        items = _list_getitems(node)
        if items is None:
            counters["forge_compile"]["refused: fused optimizer output used as a list"] += 1
            continue
        e = _Emitter(graph, node)
        new: Dict[tuple, torch.fx.Node] = {}
        params, grads = node.args[0], node.args[1]
        if node.target in _ADAM:
            m_l, v_l, vmax_l, steps = node.args[2:6]
            for i, (p, g) in enumerate(zip(params, grads)):
                vals = _adam_chain(e, _ADAM[node.target], p, g, m_l[i], v_l[i],
                                   vmax_l[i] if kw["amsgrad"] else None, steps[i], kw)
                new[(0, i)], new[(1, i)] = vals["param"], g
                new[(2, i)], new[(3, i)] = vals["exp_avg"], vals["exp_avg_sq"]
                if kw["amsgrad"]:
                    new[(4, i)] = vals["max_exp_avg_sq"]
        else:
            bufs = node.args[2]
            for i, (p, g) in enumerate(zip(params, grads)):
                vals = _sgd_chain(e, p, g, bufs[i] if bufs else None, kw)
                new[(0, i)], new[(1, i)] = vals["param"], g
                if "momentum_buffer" in vals:
                    new[(2, i)] = vals["momentum_buffer"]
        if any(k not in new for k in items):
            counters["forge_compile"]["refused: fused optimizer output not decomposed"] += 1
            continue
        for k, w in items.items():
            w.replace_all_uses_with(new[k])
        for u in list(node.users):
            for w in list(u.users):
                graph.erase_node(w)
            graph.erase_node(u)
        graph.erase_node(node)
        counters["forge_compile"]["fused optimizer decomposed"] += 1
        changed = True
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return gm
