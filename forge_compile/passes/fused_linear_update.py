"""The FORGE rewrite: weight-gradient GEMM + its optimizer update → one in-place fused op.

For every parameter W updated in the captured step (a ``copy_(W, new_W)`` at the end of the
functional graph) the pass:

1. walks back from ``new_W`` through elementwise ops to the gradient, and accepts it only if the
   gradient is one ``mm`` seen through views/transposes/casts/copies
   (``mm(permute(dY), X)`` in Inductor's post-grad graph, ``mm → permute → permute →
   copy(empty, ·)`` in the raw AOT graph, ``_to_copy(mm_bf16, fp32)`` under autocast, and
   Inductor's shape padding of it, ``slice(mm(constant_pad_nd(A), constant_pad_nd(B)))``,
   taken off: the op reads A and B);
2. collects the update region: every elementwise node computed from the gradient, the sinks
   (``copy_`` of W and of the optimizer state) they feed, and the grad-independent elementwise nodes
   (``mul(W, 1 - lr·wd)``, ``mul(v, β2)``) those read;
3. proves with networkx (passes/liveness.py) that the gradient and every gradient-derived value
   has no reader outside the region (no norm/clip, hook output, graph output, surviving ``.grad``),
   that no per-step scalar the update reads is computed from the region (a trust ratio or clip
   coefficient is), and finds the last reader of W and the state outside the region (``dX = dY·W``);
4. lowers the region into an EpilogueProgram (forge_compile.epilogue): 0-d graph values become
   runtime scalar inputs (the LR, the bias corrections from the step counter), Python numbers
   baked by Dynamo become constants;
5. inserts ``forge_compile::fused_linear_update_(dY, X, W, state, scalars, program)`` after the last
   reader of W/state, erases the sinks and every node that became dead (the gradient included).

Anything not proven is left unfused, with ``ctx.report.unfused[name] = reason``, a
``refused: <category>`` counter and a log line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch._inductor.inductor_prims  # noqa: F401 (registers torch.ops.prims.fma)
from torch._dynamo.utils import counters
from torch.fx.experimental import symbolic_shapes

from forge_compile import patterns as _patterns
from forge_compile.context import FusedParam, PassContext
from forge_compile.epilogue import GRAD, PARAM, OPS, EpilogueProgram, Instr
# importing the kernel module registers the fused op (FUSED_OP below)
from forge_compile.kernels.fused_linear_update import stochastic_rounding
from forge_compile.passes.liveness import GraphFacts, is_mutation, is_view

__all__ = ["fuse_linear_updates", "Refused", "lower_rules"]

log = logging.getLogger("forge_compile")
aten = torch.ops.aten
prims = torch.ops.prims
FUSED_OP = torch.ops.forge_compile.fused_linear_update_.default

_FLOAT_DTYPES = (torch.float32, torch.float64)
# weight/state dtypes the fused update writes; it computes in fp32 (fp64 for fp64 weights), and a
# bf16 weight's new value is rounded once (ForgeOptions.bf16_rounding). fp16 weights are left to
# eager: fp16 training without a GradScaler overflows where the fp32 epilogue would not.
_UPDATE_DTYPES = _FLOAT_DTYPES + (torch.bfloat16,)
# meta keys of a weight-gradient GEMM whose norm passes/grad_norm.py computes from its operands,
# or leaves reading the gradient: (bytes of dY and X, bytes of the gradient)
NORM_FROM_OPERANDS = "forge_norm_from_operands"
NORM_KEPT = "forge_norm_kept"


class Refused(Exception):
    """A parameter left unfused: ``category`` (the counter key) and a human ``detail``."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Lowering rules: ATen op → epilogue instructions. ``e(op, *args)`` emits one instruction.
# Numerics follow ATen's CPU kernels: add/sub with alpha is one fmadd there (vec::fmadd).
# ---------------------------------------------------------------------------------------------

def _alpha(e, op, a, b, alpha=1):
    if alpha == 1:
        return e(op, a, b)
    return e("fma", b, alpha if op == "add" else -alpha, a)


def _rsub(e, a, b, alpha=1):
    return _alpha(e, "sub", b, a, alpha)


def _div(e, a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise Refused("not elementwise-exact", f"div with rounding_mode={rounding_mode}")
    return e("div", a, b)


def _addcmul(e, s, t1, t2, value=1):
    # ATen: self + value * t1 * t2
    return e("add", s, e("mul", e("mul", t1, value) if value != 1 else t1, t2))


def _addcdiv(e, s, t1, t2, value=1):
    # ATen: self + value * t1 / t2
    return e("add", s, e("div", e("mul", t1, value) if value != 1 else t1, t2))


def _clamp(e, x, min=None, max=None):
    if min is not None:
        x = e("maximum", x, min)
    if max is not None:
        x = e("minimum", x, max)
    return x


def _un(op):
    return lambda e, x: e(op, x)


def _bin(op):
    return lambda e, a, b: e(op, a, b)


lower_rules = {
    aten.add.Tensor: lambda e, a, b, alpha=1: _alpha(e, "add", a, b, alpha),
    aten.add.Scalar: lambda e, a, b, alpha=1: _alpha(e, "add", a, b, alpha),
    aten.sub.Tensor: lambda e, a, b, alpha=1: _alpha(e, "sub", a, b, alpha),
    aten.sub.Scalar: lambda e, a, b, alpha=1: _alpha(e, "sub", a, b, alpha),
    aten.rsub.Tensor: _rsub,
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _bin("mul"),
    aten.mul.Scalar: _bin("mul"),
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.div.Tensor_mode: _div,
    aten.pow.Tensor_Scalar: _bin("pow"),
    aten.pow.Tensor_Tensor: _bin("pow"),
    aten.pow.Scalar: _bin("pow"),
    aten.maximum.default: _bin("maximum"),
    aten.minimum.default: _bin("minimum"),
    aten.clamp_min.default: _bin("maximum"),
    aten.clamp_min.Tensor: _bin("maximum"),
    aten.clamp_max.default: _bin("minimum"),
    aten.clamp_max.Tensor: _bin("minimum"),
    aten.clamp.default: _clamp,
    aten.clamp.Tensor: _clamp,
    aten.where.self: lambda e, c, a, b: e("where", c, a, b),
    aten.lerp.Scalar: lambda e, a, b, w: e("lerp", a, b, w),
    aten.lerp.Tensor: lambda e, a, b, w: e("lerp", a, b, w),
    aten.addcmul.default: _addcmul,
    aten.addcdiv.default: _addcdiv,
    prims.fma.default: lambda e, a, b, c: e("fma", a, b, c),
    aten.square.default: lambda e, x: e("mul", x, x),
    aten.sgn.default: _un("sign"),
}
for _name in ("neg", "sqrt", "rsqrt", "reciprocal", "abs", "sign", "exp", "log"):
    lower_rules[getattr(aten, _name).default] = _un(_name)
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    lower_rules[getattr(aten, _name).Tensor] = _bin(_name)
    lower_rules[getattr(aten, _name).Scalar] = _bin(_name)
for _name in ("sqrt", "rsqrt", "reciprocal", "abs", "sign", "exp", "log", "neg"):
    if hasattr(prims, _name):
        lower_rules[getattr(prims, _name).default] = _un(_name)
for _name, _op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"),
                   ("maximum", "maximum"), ("minimum", "minimum"), ("pow", "pow")):
    if hasattr(prims, _name):
        lower_rules[getattr(prims, _name).default] = _bin(_op)

# value-preserving nodes: (target → index of the data argument). Casts are checked separately.
_TRANSPARENT = {
    aten.clone.default: 0, aten.alias.default: 0, aten.detach.default: 0,
    aten.view.default: 0, aten.reshape.default: 0, aten._unsafe_view.default: 0,
    aten.permute.default: 0, aten.t.default: 0, aten.transpose.int: 0,
    aten._to_copy.default: 0, prims.convert_element_type.default: 0,
    aten.copy.default: 1, aten.contiguous.default: 0, aten.lift_fresh_copy.default: 0,
    # functionalization's view_copy forms
    aten.t_copy.default: 0, aten.permute_copy.default: 0, aten.transpose_copy.int: 0,
    aten.view_copy.default: 0, aten.alias_copy.default: 0,
}
_PERMUTES = (aten.permute.default, aten.permute_copy.default)
_TS = (aten.t.default, aten.t_copy.default)
_TRANSPOSES = (aten.transpose.int, aten.transpose_copy.int)
_CONSTANT_FILL = {aten.full.default: 1, aten.scalar_tensor.default: 0,
                  aten.full_like.default: 1}
_ZERO_ONE = {aten.zeros_like.default: 0.0, aten.ones_like.default: 1.0,
             aten.zeros.default: 0.0, aten.ones.default: 1.0}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


# a size's hint without a guard: optimization_hint on torch 2.13, size_hint on 2.11 (where
# hint_int warns that it is deprecated for size_hint)
_size_hint = (getattr(symbolic_shapes, "optimization_hint", None)
              or getattr(symbolic_shapes, "size_hint", None) or symbolic_shapes.hint_int)


def hint_nbytes(v: torch.Tensor) -> Optional[int]:
    """Bytes of ``v``; a symbolic size at its value for this compile, without a guard (a
    decision on memory, or a report, must not recompile the step for each token count). None
    where a size has no value (data-dependent)."""
    try:
        return int(_size_hint(v.numel() * v.element_size()))
    except Exception:   # noqa: BLE001 - an unbacked size
        return None


def _shape(n):
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_scalar_tensor(n) -> bool:
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dim() == 0


def _is_symnum(n) -> bool:
    v = _val(n)
    return isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool)


def _op_name(n: torch.fx.Node) -> str:
    return str(n.target) if n.op == "call_function" else f"{n.op} {n.target}"


def _flips(n: torch.fx.Node) -> Optional[int]:
    """How many times a transparent node transposes a 2-D value (0/1), None if it reshapes."""
    src = n.args[_TRANSPARENT[n.target]]
    s_in, s_out = _shape(src), _shape(n)
    if n.target in _PERMUTES:
        dims = [d % 2 for d in n.args[1]]
        return 0 if dims == [0, 1] else 1 if dims == [1, 0] else None
    if n.target in _TS:
        return 1
    if n.target in _TRANSPOSES:
        d0, d1 = (d % 2 for d in n.args[1:3])
        return 0 if d0 == d1 else 1
    if s_in != s_out or s_in is None or len(s_in) != 2:
        return None
    return 0


def _precision_note(gemm_dtype: torch.dtype, update_dtype: torch.dtype,
                    rounding: str = "stochastic", replayed: bool = False) -> str:
    """Where the fused update differs from eager's by design, "" if nowhere:
    - a GEMM in bf16/fp16 (autocast, or low-precision operands) whose gradient eager rounds to
      that dtype before casting it up for an fp32/fp64 update; the fused op hands its fp32
      accumulator to the update instead;
    - a bf16 weight (and state): eager rounds the gradient and each optimizer op's result to
      bf16; the fused update computes in fp32 and rounds once, the weight as ``rounding`` says
      (``replayed``: the step replays from CUDA graphs, and a stochastic rounding's seed is
      drawn on the device at each replay)."""
    if update_dtype is torch.bfloat16:
        how = ("to nearest, as eager does" if rounding == "nearest" else
               "stochastically (unbiased, within one bf16 ulp of the fp32 value; eager rounds to "
               "nearest: options={'bf16_rounding': 'nearest'} does too)"
               + (", its seed drawn on the GPU at every CUDA-graph replay" if replayed else ""))
        return ("bf16 weight: updated in fp32 from the unrounded fp32 gradient and rounded once, "
                "where eager rounds the gradient and every optimizer op's result to bf16 (as "
                "torch.compile's Inductor does, intermediate values stay fp32); the state is "
                f"rounded to nearest, the weight {how}")
    if gemm_dtype not in (torch.bfloat16, torch.float16) or update_dtype not in _FLOAT_DTYPES:
        return ""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[gemm_dtype]
    u = torch.finfo(gemm_dtype).eps / 2         # unit roundoff: bf16 2^-8, fp16 2^-11
    return (f"updated from the fp32 accumulator of the {short} GEMM; eager rounds this gradient "
            f"to {short} first (autocast), so the two updates differ by up to one {short} "
            f"rounding of the gradient ({u:.1e} relative, 2^{int(math.log2(u))})")


def _cast_ok(n: torch.fx.Node) -> bool:
    """A cast inside the gradient chain: only to fp32/fp64 (bf16 → fp32 under autocast)."""
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.dtype in _FLOAT_DTYPES


def _zero_padded(n) -> Tuple[object, Tuple[int, int]]:
    """(source, (rows, columns) appended) when ``n`` = constant_pad_nd(source, pad, 0) appends
    zeros at the end of a 2-D source's dimensions only (Inductor's pad_mat1/pad_mat2); (n, (0, 0))
    for anything else."""
    if not (isinstance(n, torch.fx.Node) and n.op == "call_function"
            and n.target is aten.constant_pad_nd.default):
        return n, (0, 0)
    src, pad = n.args[0], list(n.args[1])
    value = n.args[2] if len(n.args) > 2 else n.kwargs.get("value", 0)
    shape = _shape(src) if isinstance(src, torch.fx.Node) else None
    # pad lists the last dimension first, (before, after) each: [before1, after1, before0, after0]
    if (value != 0 or shape is None or len(shape) != 2 or len(pad) not in (2, 4)
            or any(pad[0::2]) or any(p < 0 for p in pad)):
        return n, (0, 0)
    return src, (pad[3] if len(pad) == 4 else 0, pad[1])


def _gemm_operands(mm: torch.fx.Node) -> Tuple[Tuple[object, object], Tuple[int, int]]:
    """((A, B), (rows, columns)) of an mm with Inductor's shape padding (fx_passes/pad_mm.py,
    on CUDA where its timing or ``force_shape_pad`` says so) taken off: mm(pad(A), pad(B)) is
    A·B with ``rows`` zero rows and ``columns`` zero columns appended, when the zeros appended to
    A's columns meet those appended to B's rows (the contracted dimension: they add exact zeros).
    Unpadded operands come back as they are, with (0, 0)."""
    (a, (am, ak)), (b, (bk, bn)) = (_zero_padded(x) for x in mm.args[:2])
    sa, sb = (_shape(x) if isinstance(x, torch.fx.Node) else None for x in (a, b))
    if sa is None or sb is None or sa[1] != sb[0] or ak != bk:
        return tuple(mm.args[:2]), (0, 0)
    return (a, b), (am, bn)


def _trimmed_gemm(n: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The mm when ``n`` is pad_mm's slices of it back to the unpadded product's shape (each
    slice from 0 in steps of 1, every node of the chain read by the next one only), else None."""
    out = _shape(n)
    while n.op == "call_function" and n.target is aten.slice.Tensor:
        if n.kwargs:
            return None
        dim, start, _, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
        if dim not in (0, 1, -1, -2) or start not in (0, None) or step != 1:
            return None
        src = n.args[0]
        if not isinstance(src, torch.fx.Node) or len(src.users) != 1:
            return None
        n = src
    if n.op != "call_function" or n.target is not aten.mm.default or out is None:
        return None
    (a, b), (rows, cols) = _gemm_operands(n)
    if (rows or cols) and out == (_shape(a)[0], _shape(b)[1]):
        return n
    return None


def _product_operands(gemm: torch.fx.Node) -> Tuple[object, object]:
    """(A, B) whose product is the gradient value ``gemm`` (an mm, or ``_trimmed_gemm``'s
    slice of one): padding is taken off only where the product stays the same; an mm whose
    padded rows or columns are part of the value keeps its padded operands."""
    mm = _trimmed_gemm(gemm)
    if mm is not None:
        return _gemm_operands(mm)[0]
    operands, appended = _gemm_operands(gemm)
    return operands if appended == (0, 0) else tuple(gemm.args[:2])


def grad_source(n: torch.fx.Node) -> Tuple[Optional[torch.fx.Node], int]:
    """(gemm, transposes) if ``n`` is an mm seen through transparent nodes, else (None, 0).
    ``gemm``: the mm, or the slice that cuts Inductor's shape padding off one
    (``_trimmed_gemm``)."""
    flips = 0
    while n.op == "call_function" and n.target in _TRANSPARENT:
        f = _flips(n)
        if f is None or (n.target in (aten._to_copy.default, prims.convert_element_type.default)
                         and not _cast_ok(n)):
            return None, 0
        flips ^= f
        n = n.args[_TRANSPARENT[n.target]]
        if not isinstance(n, torch.fx.Node):
            return None, 0
    if n.op == "call_function" and n.target is aten.mm.default:
        return n, flips
    if n.op == "call_function" and _trimmed_gemm(n) is not None:
        return n, flips     # Inductor's padded mm cut back: the unpadded product
    return None, 0


def _fold(op: str, args) -> float:
    from forge_compile.epilogue import _TORCH_OPS
    t = [torch.tensor(a, dtype=torch.float64) for a in args]
    return _TORCH_OPS[op](*t).item()


class _Builder:
    """Collects the epilogue program while the region is lowered."""

    def __init__(self):
        self.ops: List[Instr] = []
        self.k = 0

    def emit(self, op: str, *args):
        if op not in OPS:
            raise Refused("unknown epilogue op", op)
        if not any(isinstance(a, str) for a in args):
            return _fold(op, args)
        name = f"v{self.k}"
        self.k += 1
        self.ops.append(Instr(name, op, tuple(args)))
        return name


class _Analysis:
    """The update region of one parameter: proof, epilogue program, and what to rewrite."""

    def __init__(self, facts: GraphFacts, sinks: Dict[torch.fx.Node, torch.fx.Node],
                 names: Dict[torch.fx.Node, Optional[str]]):
        self.facts = facts
        self.sinks_by_dest = sinks          # placeholder → its copy_ node
        self.names = names

    # -- 1. find the gradient GEMM (grad_source) ---------------------------------------------------
    def _reads_gemm(self, f: torch.fx.Node, wshape) -> bool:
        """True when an input of ``f`` is a W-shaped GEMM seen through elementwise ops."""
        seen, stack = set(), list(f.all_input_nodes)
        while stack:
            n = stack.pop()
            if n in seen or n.op != "call_function" or _shape(n) not in (wshape, wshape[::-1]):
                continue
            seen.add(n)
            if grad_source(n)[0] is not None:
                return True
            if n.target in lower_rules or n.target in _TRANSPARENT:
                stack.extend(n.all_input_nodes)
        return False

    def find_gemm(self, value: torch.fx.Node, wshape) -> torch.fx.Node:
        """The one weight-gradient mm the update of W reads; Refused otherwise."""
        seen: Set[torch.fx.Node] = set()
        stack = [value]
        mms: Set[torch.fx.Node] = set()
        foreign: List[torch.fx.Node] = []
        outside: List[str] = []     # gradients read as graph inputs (.grad of an earlier graph)
        while stack:
            n = stack.pop()
            if not isinstance(n, torch.fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder" and (self.names.get(n) or "").endswith(".grad"):
                outside.append(self.names[n])
            if n.op != "call_function" or _is_scalar_tensor(n) or _shape(n) != wshape:
                continue
            mm, _ = grad_source(n)
            if mm is not None:
                mms.add(mm)
                continue
            if n.target in _CONSTANT_FILL or n.target in _ZERO_ONE:
                continue
            if n.target in _TRANSPARENT:
                stack.append(n.args[_TRANSPARENT[n.target]])
                continue
            if _patterns._lookup(n.target) is not None or n.target in lower_rules:
                stack.extend(a for a in n.all_input_nodes)
                continue
            foreign.append(n)
        for f in foreign:
            if self._reads_gemm(f, wshape):
                raise Refused("not elementwise",
                              f"the update reads {f.name} = {_op_name(f)}, computed from a GEMM "
                              "by an op with no epilogue rule (see forge_compile.register_pattern)")
        if foreign and mms:
            f, mm = foreign[0], next(iter(mms))
            raise Refused("GEMM plus another gradient",
                          f"the gradient sums the GEMM {mm.name} and {f.name} = {_op_name(f)}, "
                          "which is no GEMM (a weight tied to an embedding, e.g. "
                          "tie_word_embeddings=True, also takes the embedding's scatter-add): "
                          "the sum exists before the update, so the update stays unfused")
        if foreign:
            f = foreign[0]
            raise Refused("gradient is not a GEMM",
                          f"the update reads {f.name} = {_op_name(f)} (bias, norm or embedding "
                          f"gradient, or a non-elementwise update)")
        if not mms and outside:
            from forge_compile.capture import distributed_note
            note = distributed_note()
            raise Refused("gradient computed outside the graph",
                          f"the update reads {outside[0]}, computed before this graph (its "
                          "backward ran in another graph or eagerly, e.g. after a graph break)"
                          + (f"; {note}" if note else ""))
        if not mms:
            raise Refused("no gradient", "the update of this tensor reads no gradient")
        if len(mms) > 1:
            raise Refused("several gradient GEMMs",
                          f"the update reads {len(mms)} GEMMs ({', '.join(m.name for m in mms)}): "
                          "a shared/tied weight, or gradients accumulated over micro-batches in "
                          "the step (fusing their sum would keep every micro-batch's activations "
                          "alive until the update)")
        return mms.pop()

    def _late_reads(self, grad_nodes, F: Set[torch.fx.Node], sinks: Set[torch.fx.Node],
                    escapes) -> List[Tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]:
        """The step's reads of the updated weight or state (an evaluation forward after
        ``opt.step()``, a log of the new exp_avg): [(reader, new value, its tensor)]. Each
        reader is made to read the tensor itself, which the fused op has updated in place by
        then (_rewrite; _plan checks that the op comes first).
        Such a read may go through elementwise ops that the walk took into ``F`` (autocast's
        bf16 cast of the new weight) and that no sink needs: those leave ``F`` and stay in the
        graph, computed after the op. Refused when a reader outside the update reads anything
        else of it: the gradient, an intermediate of the rule, or the old weight beside the new
        one (which the op has overwritten by then)."""
        new_of = {s.args[1]: s.args[0] for s in sinks}
        needed: Set[torch.fx.Node] = set()
        work = list(new_of)
        while work:
            m = work.pop()
            if m not in needed and (m in F or m in grad_nodes):
                needed.add(m)
                work.extend(m.all_input_nodes)
        written = {s.args[0] for s in sinks}
        dangling = F - needed
        late: Set[torch.fx.Node] = set()          # F nodes computed from new values only
        for m in sorted(dangling, key=self.facts.order.__getitem__):
            if all(x in new_of or x in late
                   or (x not in F and x not in grad_nodes and x not in written)
                   for x in m.all_input_nodes):
                late.add(m)
        for u, n in escapes:
            if n in new_of or n in late:
                continue
            what = _op_name(u)
            if n in dangling:
                old = self._old_read(n, dangling, written)
                if old is not None:
                    raise Refused("old and new value read after the update",
                                  f"{u.name} = {what} reads {n.name}, computed from the new and "
                                  f"the old {self.names.get(old) or old.name} (e.g. the update's "
                                  "size, w - w_before, where the clone of w_before was a no-op "
                                  "in the functional graph): the fused op overwrites it first")
            cat = "gradient read outside the update"
            if "norm" in what:
                cat = "gradient read by a norm (clip_grad_norm_ / LAMB / logging)"
            raise Refused(cat, f"{n.name} is read by {u.name} = {what}")
        F -= late
        readers = late | {u for u, _ in escapes}
        return [(r, n, new_of[n]) for r in sorted(readers, key=self.facts.order.__getitem__)
                for n in dict.fromkeys(r.all_input_nodes) if n in new_of]

    @staticmethod
    def _old_read(n: torch.fx.Node, dangling: Set[torch.fx.Node],
                  written: Set[torch.fx.Node]) -> Optional[torch.fx.Node]:
        """The written tensor whose old value ``n`` reads through ``dangling`` nodes, if any."""
        seen, work = set(), [n]
        while work:
            m = work.pop()
            if m in seen:
                continue
            seen.add(m)
            for x in m.all_input_nodes:
                if x in written:
                    return x
                if x in dangling:
                    work.append(x)
        return None

    # -- 2./3. region and proof -------------------------------------------------------------------
    def analyse(self, dest: torch.fx.Node):
        wshape = _shape(dest)
        if wshape is None or len(wshape) != 2:
            raise Refused("not a 2-D weight", f"shape {wshape}: a bias or norm parameter has no gradient GEMM")
        mm = self.find_gemm(self.sinks_by_dest[dest].args[1], wshape)
        # the gradient's value: the mm, or the slice cutting Inductor's padding off it; the op
        # reads the unpadded operands (a padded copy of dY or X then dies with the mm)
        self.gemm = mm
        self.operands = _product_operands(mm)
        # E: the gradient and its transparent copies; F: everything computed from it.
        grad_nodes: Dict[torch.fx.Node, int] = {mm: 0}
        work = [mm]
        F: Set[torch.fx.Node] = set()
        sinks: Set[torch.fx.Node] = set()
        new_state: List[torch.fx.Node] = []
        escapes: List[Tuple[torch.fx.Node, torch.fx.Node]] = []   # (reader, value it reads)
        while work:
            n = work.pop()
            for u in n.users:
                if u in grad_nodes or u in F or u in sinks:
                    continue
                if u.op == "output":
                    if n in grad_nodes:
                        raise Refused("gradient is a graph output",
                                      f"{n.name} (the gradient itself) is returned by the graph: a "
                                      ".grad kept after the step, or state set to a copy of it")
                    # optimizer state created in this step (Lion's exp_avg, SGD's first
                    # momentum buffer with weight decay): the op writes it into a fresh buffer
                    new_state.append(n)
                    continue
                if (u.op == "call_function" and u.target in _TRANSPARENT and n in grad_nodes
                        and u.args[_TRANSPARENT[u.target]] is n):
                    f = _flips(u)
                    if f is not None and (u.target not in (aten._to_copy.default,
                                                           prims.convert_element_type.default)
                                          or _cast_ok(u)):
                        grad_nodes[u] = grad_nodes[n] ^ f
                        work.append(u)
                        continue
                if u.op == "call_function" and u.target is aten.copy_.default:
                    if u.args[1] is n and u.args[0].op == "placeholder" and u.args[0] in self.sinks_by_dest:
                        sinks.add(u)
                        continue
                    raise Refused("gradient written to a graph input",
                                  f"{u.name} = copy_({u.args[0].name}, {n.name})")
                admissible = (u.op == "call_function" and _shape(u) == wshape
                              and (u.target in lower_rules or u.target in _TRANSPARENT
                                   or _patterns._lookup(u.target) is not None))
                if not admissible:
                    escapes.append((u, n))      # judged once the region is known (_late_reads)
                    continue
                F.add(u)
                work.append(u)
        if not sinks:
            raise Refused("no update", "the gradient feeds no parameter/state update")
        self.late_reads = self._late_reads(grad_nodes, F, sinks, escapes)
        # (new value, its reader) pairs that _rewrite rewires to the updated tensor
        self.rewired = {(n, r) for r, n, _ in self.late_reads}
        self.grad_nodes, self.F, self.sinks = grad_nodes, F, sinks
        self.new_state = list(dict.fromkeys(new_state))
        self.out_node = next(n for n in self.facts.graph.nodes if n.op == "output")

        # lower every sink value (this also collects the grad-independent region nodes)
        self.builder = _Builder()
        self.memo: Dict[torch.fx.Node, object] = {}
        self.tensor_inputs: List[torch.fx.Node] = []
        self.scalar_nodes: List[torch.fx.Node] = []
        self.parity: Optional[int] = None
        self.region: Set[torch.fx.Node] = set()
        outputs = []
        for s in sorted(sinks, key=self.facts.order.__getitem__):
            d = s.args[0]
            if _shape(d) != wshape:
                raise Refused("state not shaped like the weight", f"{d.name}: {_shape(d)}")
            val = self._value(s.args[1], wshape)
            if not isinstance(val, (str, tuple)):
                raise Refused("constant update", f"{d.name} is set to a constant")
            outputs.append((d, val))
        self.new_outputs = []
        for n in self.new_state:
            val = self._value(n, wshape)
            if not isinstance(val, str):
                raise Refused("constant update", f"{n.name} is a constant")
            self.new_outputs.append((n, val))
        missing = F - self.region
        dead_f = {n for n in missing if not n.users}
        if missing - dead_f:
            n = sorted(missing - dead_f, key=self.facts.order.__getitem__)[0]
            raise Refused("gradient read outside the update", f"{n.name} = {_op_name(n)} reaches no update")

        # liveness proof (networkx): gradient and gradient-derived values are read only inside
        grad_dep = set(grad_nodes) | F
        esc = self.facts.escapes(grad_dep, allowed=self.region | sinks | set(grad_nodes))
        esc = [(v, r) for v, r in esc
               if not (r is self.out_node and v in self.new_state) and (v, r) not in self.rewired]
        if esc:
            v, r = esc[0]
            raise Refused("gradient read outside the update", f"{v.name} is read by {r.name} = {_op_name(r)}")
        for sc in self.scalar_nodes:
            if self.facts.depends_on(sc, grad_dep):
                raise Refused("update not elementwise",
                              f"per-step value {sc.name} = {_op_name(sc)} is computed from the "
                              "gradient (trust ratio / clip coefficient / global norm)")
        self.outputs = outputs
        self.wshape = wshape
        return self

    def _value(self, n, wshape):
        """The program value of graph value ``n`` (a name or a number); extends the region."""
        if not isinstance(n, torch.fx.Node):
            if isinstance(n, bool):
                return n
            if isinstance(n, (int, float)):
                return n
            raise Refused("unsupported argument", repr(n))
        if n in self.memo:
            return self.memo[n]
        if n in self.grad_nodes:
            p = self.grad_nodes[n]
            if _shape(n) != wshape:
                raise Refused("gradient shape", f"{n.name} {_shape(n)} vs weight {wshape}")
            if self.parity is None:
                self.parity = p
            elif self.parity != p:
                raise Refused("gradient read in two layouts", n.name)
            v = self.memo[n] = GRAD
            return v
        if _is_scalar_tensor(n) or _is_symnum(n):
            self.scalar_nodes.append(n)
            v = self.memo[n] = f"s{len(self.scalar_nodes) - 1}"
            return v
        if n.op == "placeholder":
            if _shape(n) != wshape:
                raise Refused("broadcast input", f"{n.name} has shape {_shape(n)}, weight {wshape}")
            self.tensor_inputs.append(n)
            v = self.memo[n] = ("tensor", n)
            return v
        if n.op == "call_function" and n.target in _CONSTANT_FILL:
            c = n.args[_CONSTANT_FILL[n.target]]
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                self.memo[n] = float(c)
                self.region.add(n)
                return float(c)
        if n.op == "call_function" and n.target in _ZERO_ONE:
            self.memo[n] = _ZERO_ONE[n.target]
            self.region.add(n)
            return self.memo[n]
        if n.op != "call_function" or _shape(n) != wshape:
            raise Refused("per-element input computed outside the update",
                          f"{n.name} = {_op_name(n)} (shape {_shape(n)})")
        v = _val(n)
        if v.dtype not in _UPDATE_DTYPES + (torch.bool,):
            raise Refused("update computed in low precision",
                          f"{n.name} is {v.dtype}; the fused epilogue computes in fp32 for "
                          "fp32, fp64 and bf16 weights only")
        if n.target in _TRANSPARENT:
            if n.target in _PERMUTES + _TS + _TRANSPOSES and _flips(n) != 0:
                raise Refused("transposed state", n.name)
            if _flips(n) is None:
                raise Refused("reshaped value in the update", n.name)
            out = self._value(n.args[_TRANSPARENT[n.target]], wshape)
        else:
            rule = _patterns._lookup(n.target) or lower_rules.get(n.target)
            if rule is None:
                raise Refused("not elementwise", f"{n.name} = {_op_name(n)}")
            args = [self._arg(a, wshape) for a in n.args]
            kwargs = {k: self._arg(a, wshape) for k, a in n.kwargs.items()
                      if k not in ("out",)}
            out = rule(self.builder.emit, *args, **kwargs)
        self.region.add(n)
        self.memo[n] = out
        return out

    def _arg(self, a, wshape):
        if isinstance(a, (list, tuple)):
            raise Refused("list argument in the update", repr(a))
        if isinstance(a, torch.dtype) or a is None or isinstance(a, str):
            return a
        v = self._value(a, wshape)
        return _tensor_ref(v[1]) if isinstance(v, tuple) else v


def _tensor_ref(n: torch.fx.Node) -> str:
    # a placeholder read by the region, until _plan knows its label ("param", "exp_avg", …)
    return "@" + n.name


def _state_label(name: Optional[str], i: int) -> str:
    if name and "]." in name:
        return name.rsplit("].", 1)[1]
    if name and "." in name:
        return name.rsplit(".", 1)[1]
    return f"state{i}"


def _transpose_node(graph: torch.fx.Graph, n: torch.fx.Node) -> torch.fx.Node:
    if (n.op == "call_function" and n.target in _PERMUTES
            and [d % 2 for d in n.args[1]] == [1, 0]):
        return n.args[0]
    if n.op == "call_function" and n.target in _TS:
        return n.args[0]
    t = graph.call_function(aten.permute.default, (n, [1, 0]))
    t.meta["val"] = _val(n).permute(1, 0)
    return t


def _param_names(gm, ctx) -> Dict[torch.fx.Node, Optional[str]]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(ctx.input_names) if ctx is not None and ctx.input_names else []
    return {p: (names[i] if i < len(names) else None) for i, p in enumerate(phs)}


def _is_param_name(name: Optional[str]) -> bool:
    return name is None or ("[" not in name and not name.endswith(".grad"))


def _read_like_param(t: torch.fx.Node) -> bool:
    """Without names: a parameter is read by the model (a view, a matmul, a norm, a broadcast);
    optimizer state is read only by same-shaped elementwise update ops and its copy_."""
    for u in t.users:
        if u.op != "call_function":
            return True
        if u.target is aten.copy_.default:
            continue
        if getattr(u.target, "is_view", False) or _shape(u) != _shape(t):
            return True
        if u.target not in lower_rules and u.target not in _TRANSPARENT:
            return True
        if _val(u).dtype != _val(t).dtype and _val(u).dtype is not torch.bool:
            return True     # a cast for the forward (autocast's bf16 copy of W)
    return False


def _record_refusal(ctx, name: str, r: Refused, dest: torch.fx.Node):
    counters["forge_compile"][f"refused: {r.category}"] += 1
    reason = f"{r.category}: {r.detail}" if r.detail else r.category
    if ctx is not None:
        ctx.report.unfused[name] = reason
        v = _val(dest)      # its gradient is materialised: same shape and dtype as the parameter
        ctx.report.unfused_bytes[name] = v.numel() * v.element_size()
    log.info("forge_compile: %s not fused: %s", name, reason)


def fuse_linear_updates(gm: torch.fx.GraphModule, ctx: Optional[PassContext]) -> torch.fx.GraphModule:
    """Replace every provably-dead weight gradient GEMM + its update by fused_linear_update_."""
    if ctx is not None and not ctx.options.fuse:
        return gm
    graph = gm.graph
    names = _param_names(gm, ctx)
    # the sinks: copy_(placeholder, value) at the end of the functional graph
    sinks: Dict[torch.fx.Node, torch.fx.Node] = {}
    dup: Set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_function" and n.target is aten.copy_.default and n.args[0].op == "placeholder":
            if n.args[0] in sinks:
                dup.add(n.args[0])
            sinks[n.args[0]] = n
    done: Set[torch.fx.Node] = set()
    changed = False
    scalar_copies = {} if ctx is not None and ctx.cudagraphs else None
    rounding = ctx.options.bf16_rounding if ctx is not None else "stochastic"
    # stochastic rounding draws a fresh seed on the host at each call; a CUDA-graph replay
    # repeats the one drawn at capture, so every step would round each weight the same way
    # (biased where the same small update recurs): there the seed is XORed with a value drawn
    # on the device in the graph, which torch's graph-safe RNG redraws at every replay
    replayed = rounding == "stochastic" and ctx is not None and ctx.cudagraphs
    for dest in list(sinks):
        if dest in done or not isinstance(_val(dest), torch.Tensor) or _val(dest).dim() == 0:
            continue
        name = names.get(dest) or dest.name
        if not _is_param_name(names.get(dest)):
            continue
        if names.get(dest) is None and not _read_like_param(dest):
            continue    # optimizer state (read only by its update) is reported with its param
        if not _val(dest).is_floating_point():
            continue
        facts = GraphFacts(graph)
        a = _Analysis(facts, sinks, names)
        try:
            if dest in dup:
                raise Refused("written twice", f"{name} has several copy_ nodes")
            a.analyse(dest)
            plan = _plan(a, names, dup, rounding)
        except Refused as r:
            kept = getattr(a, "gemm", None) is not None and a.gemm.meta.get(NORM_KEPT)
            if kept:        # passes/grad_norm.py left this gradient's norm reading it: say why
                r = Refused(r.category, f"{r.detail}; its norm (clip_grad_norm_) reads the "
                            f"gradient: dY and X ({kept[0]:,} B, held until the clip's scale) "
                            f"outweigh it ({kept[1]:,} B)")
            _record_refusal(ctx, name, r, dest)
            continue
        param, state, prog, pos = plan
        pname = names.get(param) or param.name
        if names.get(param) and names.get(param) != name and not _is_param_name(names.get(param)):
            pname = name
        done.update([param] + list(state))
        prog = _rewrite(graph, a, param, state, prog, pos, scalar_copies,
                        ctx.report if scalar_copies is not None else None)
        changed = True
        # the gradient the update reads: the GEMM's output, or its cast up (autocast's bf16 GEMM
        # cast to fp32: eager holds the fp32 one in .grad until the step)
        gemm_dtype, update_dtype = _val(a.gemm).dtype, _val(param).dtype
        gbytes = math.prod(a.wshape) * max(gemm_dtype.itemsize, update_dtype.itemsize)
        counters["forge_compile"]["fused"] += 1
        note = _precision_note(gemm_dtype, update_dtype, prog.param_rounding, replayed)
        late_readers = len({r for r, _, _ in a.late_reads})
        if ctx is not None:
            ctx.report.fused[pname] = FusedParam(name=pname, shape=tuple(a.wshape),
                                                 gradient_bytes=gbytes, rule=str(prog),
                                                 precision_note=note,
                                                 read_after_update=late_readers,
                                                 norm_from_operands=bool(
                                                     a.gemm.meta.get(NORM_FROM_OPERANDS)))
            ctx.report.unfused.pop(pname, None)
            ctx.report.unfused_bytes.pop(pname, None)
        log.info("forge_compile: fused %s %s (%d gradient bytes never materialised)%s%s",
                 pname, tuple(a.wshape), gbytes,
                 f"; its new value is read later in the step by {late_readers} node(s), after "
                 "the fused update" if late_readers else "", f"; {note}" if note else "")
    if changed:
        # dead allocations left over (the .grad buffers of the AOT graph: empty([N, K]) with no
        # user once the gradient chain is gone) would otherwise count as gradient-sized buffers
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return gm


def _plan(a: _Analysis, names, dup, rounding: str = "stochastic"):
    """Pick param/state, build the program, find the insertion point (hazard check);
    ``rounding``: a bf16 weight's (ForgeOptions.bf16_rounding)."""
    dests = [s.args[0] for s in sorted(a.sinks, key=a.facts.order.__getitem__)]
    for d in dests:
        if d in dup:
            raise Refused("written twice", f"{names.get(d) or d.name} has several copy_ nodes")
        nm = names.get(d)
        if nm and nm.endswith(".grad"):
            raise Refused(".grad kept across steps",
                          f"the gradient is accumulated into {nm}, a tensor from before this "
                          "step (micro-batches accumulated by earlier calls, or a .grad that "
                          "survives the step): the sum must be written into it, so it exists; "
                          "gradient accumulation keeps every weight's gradient by design")
    for s in a.sinks:
        if s.users:
            raise Refused("update is a graph output",
                          f"{s.name} (the new {names.get(s.args[0]) or s.args[0].name}) is returned "
                          "by the graph (e.g. a .grad that survives the step)")
    reads = [t for t in a.tensor_inputs if t not in dests]
    for t in reads:
        nm = names.get(t)
        if nm and nm.endswith(".grad"):
            raise Refused(".grad kept across steps", f"the update reads {nm} from the previous step")
    # the param: a tensor with a user-facing param name; else the one read outside the region
    def is_param(d):
        nm = names.get(d)
        return nm is not None and _is_param_name(nm)
    params = [d for d in dests if is_param(d)]
    if not params:
        params = [d for d in dests if names.get(d) is None and _read_like_param(d)] or dests
    param = params[0]
    state = [d for d in dests if d is not param] + reads
    for t in [param] + state:
        if _val(t).dtype not in _UPDATE_DTYPES:
            raise Refused("update computed in low precision",
                          f"{names.get(t) or t.name} is {_val(t).dtype}; the fused update "
                          "writes fp32, fp64 and bf16 weights and state only")
        if _val(t).dtype is not _val(param).dtype:
            raise Refused("state dtype differs from the weight's",
                          f"{names.get(t) or t.name} is {_val(t).dtype}, the weight "
                          f"{_val(param).dtype}")
    labels = {param: PARAM}
    used = {GRAD, PARAM}
    for i, s in enumerate(state):
        lab = _state_label(names.get(s), i)
        while lab in used or lab in ("v", "s"):
            lab = f"{lab}_{i}"
        used.add(lab)
        labels[s] = lab
    # tensor inputs appear in instr args as "@<node name>" (see _tensor_ref): map to labels
    by_ref = {_tensor_ref(t): labels[t] for t in [param] + state}
    ops = tuple(Instr(i.out, i.op, tuple(by_ref.get(x, x) if isinstance(x, str) else x
                                         for x in i.args)) for i in a.builder.ops)
    outputs = []
    for d, v in a.outputs:
        v = labels[v[1]] if isinstance(v, tuple) else v
        if v == labels[d]:
            continue        # unchanged (copy_(x, x))
        outputs.append((labels[d], v))
    if not any(dst == PARAM for dst, _ in outputs):
        raise Refused("no parameter update", "the weight itself is not updated")
    # state created in this step: written (never read) into fresh buffers made by _rewrite
    new_labels = []
    for j, (n, v) in enumerate(a.new_outputs):
        lab = f"new_state{j}"
        while lab in used:
            lab = "_" + lab
        used.add(lab)
        new_labels.append(lab)
        outputs.append((lab, v))
    scalars = tuple(f"s{i}" for i in range(len(a.scalar_nodes)))
    prog = EpilogueProgram(tensors=(GRAD, PARAM) + tuple(labels[s] for s in state) + tuple(new_labels),
                           scalars=scalars, ops=ops, outputs=tuple(outputs),
                           # fp32/fp64 weights keep the default: one program (and kernel) each
                           param_rounding=(rounding if _val(param).dtype is torch.bfloat16
                                           else "stochastic"))
    # hazards: the op overwrites param/state; every outside reader must come first
    mutated = [param] + state
    inside = a.region | a.sinks | set(a.grad_nodes) | a.F | ({a.out_node} if a.new_state else set())
    # region nodes that stay in the graph (read outside): they read the old W, so stay before
    # (a late read of the new weight/state is rewired to the updated tensor: not such a reader)
    kept = {n for n in a.region
            if any(u not in inside and (n, u) not in a.rewired for u in n.users)}
    work = list(kept)
    while work:
        for x in work.pop().all_input_nodes:
            if x in a.region and x not in kept:
                kept.add(x)
                work.append(x)
    exclude = inside - kept
    last = a.facts.last_reader(mutated, exclude)
    if last is not None and last.op == "output":
        raise Refused("weight is a graph output", "the old value of the weight/state is returned")
    first_sink = min(a.sinks, key=a.facts.order.__getitem__)
    if last is not None and a.facts.order[last] > a.facts.order[first_sink]:
        raise Refused("weight read after its update", f"{last.name} reads it after {first_sink.name}")
    _hoist_step_scalars(a.facts, a.scalar_nodes)
    # the GEMM operands are placed through their views: Inductor's reorder_for_locality (run on
    # inference graphs before forge's pass) sinks each view, and the weight-gradient mm with it,
    # to just before its first reader, the optimizer at the end of the graph; _rewrite rebuilds
    # the views at the fused op
    ready = [x for src in a.operands for x in _view_chain_inputs(src)]
    pos = a.facts.latest([last] + ready + list(a.scalar_nodes) + [param] + state)
    early = next((x for x in a.late_reads if a.facts.order[x[0]] <= a.facts.order[pos]), None)
    if early is not None:
        r, n, d = early
        raise Refused("updated value read before the update can run",
                      f"the new {names.get(d) or d.name} ({n.name}) is read by {r.name} = "
                      f"{_op_name(r)}, which comes before {pos.name}, the last node the fused "
                      "update waits for")
    return param, state, prog, pos


def _view_chain(n: torch.fx.Node) -> List[torch.fx.Node]:
    """The views from n down to the first non-view node (n first); [] when n is not a view."""
    chain = []
    while is_view(n) and n.args and isinstance(n.args[0], torch.fx.Node):
        chain.append(n)
        n = n.args[0]
    return chain


def _view_chain_inputs(n: torch.fx.Node) -> List[torch.fx.Node]:
    """What the view chain of n reads besides itself: its base and any size arguments."""
    chain = _view_chain(n)
    if not chain:
        return [n]
    inside = set(chain)
    return [x for v in chain for x in v.all_input_nodes if x not in inside]


def _rebuild_views(graph: torch.fx.Graph, n: torch.fx.Node) -> torch.fx.Node:
    """A copy of n's view chain at the current insertion point (n itself if it is no view)."""
    chain = _view_chain(n)
    env: Dict[torch.fx.Node, torch.fx.Node] = {}
    out = n
    for v in reversed(chain):
        # a fresh name from the target: node_copy would reuse v's, and names set directly by
        # torch's remat pass ("…_recomputed") are unknown to the graph's namespace
        args, kwargs = torch.fx.map_arg((v.args, v.kwargs), lambda x: env.get(x, x))
        out = graph.call_function(v.target, args, kwargs)
        out.meta.update(v.meta)
        env[v] = out
    return out


def _hoist_step_scalars(facts: GraphFacts, scalars: List[torch.fx.Node]) -> bool:
    """Move the per-step scalars an update reads (bias corrections from the step counter, the LR
    times weight decay: 0-d ops on graph inputs) to the start of the graph.

    The optimizer computes them after the whole backward; left there they would pin every fused
    op to the end of the graph, and with it every dY and X until then (2-layer h2048 Llama at
    4×1024 with checkpointing, liveness of the CPU aot_eager graph: 2.9 GiB of activations live
    at once; on the H100, 16 layers, the step peak fell 14.56 → 12.76 GiB with this, the
    view-based placement in _plan and Inductor's reorder_for_locality off). Moving a node
    earlier is safe when it reads only graph inputs that nothing mutates before its old
    position, and 0-d values cost nothing to hold. Returns whether a node moved (then
    ``facts.order`` is renumbered)."""
    if not scalars:
        return False
    graph, order = facts.graph, facts.order
    limit = max(order[c] for c in scalars)
    ok: Dict[torch.fx.Node, bool] = {}

    def hoistable(n: torch.fx.Node) -> bool:
        if n in ok:
            return ok[n]
        ok[n] = False
        if n.op in ("placeholder", "get_attr"):
            mutated_before = any(is_mutation(u) and order[u] < limit for u in n.users)
            ok[n] = not mutated_before
            return ok[n]
        if n.op != "call_function" or n.is_impure() or is_mutation(n):
            return False
        v = _val(n)
        if isinstance(v, torch.Tensor) and v.dim() != 0:
            return False
        ok[n] = all(hoistable(x) for x in n.all_input_nodes)
        return ok[n]

    if not all(hoistable(s) for s in scalars):
        return False
    closure: Set[torch.fx.Node] = set()
    work = [s for s in scalars if s.op == "call_function"]
    while work:
        n = work.pop()
        if n not in closure:
            closure.add(n)
            work += [x for x in n.all_input_nodes if x.op == "call_function"]
    first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    moved = False
    for n in sorted(closure, key=order.__getitem__):
        if n is first:
            first = n.next
            continue
        if order[n] > order[first]:
            first.prepend(n)
            moved = True
    if moved:
        facts.order = {n: i for i, n in enumerate(graph.nodes)}
    return moved


def _on_device(graph, s: torch.fx.Node, device: torch.device,
               copies: Dict[Tuple[object, torch.device], torch.fx.Node],
               report) -> torch.fx.Node:
    """``s`` (a 0-d scalar) as a tensor on ``device``: a copy made once per graph, right where
    ``s`` is known (after the placeholders for an input), counted in ``report``."""
    v = _val(s)
    if v.device == device:
        return s
    key = (s, device)
    if key not in copies:
        if s.op == "placeholder":
            where = next(n for n in graph.nodes if n.op != "placeholder")
            ctx = graph.inserting_before(where)
        else:
            ctx = graph.inserting_after(s)
        with ctx:
            # prims.device_put, not aten._to_copy: the pass runs after Inductor's decompositions,
            # and _to_copy has only a decomposition there (no lowering: Inductor asserts)
            c = graph.call_function(prims.device_put.default, (s, device))
        c.meta["val"] = _fake_scalar(v, v.dtype, device)
        copies[key] = c
        report.scalar_copies += 1
    return copies[key]


# the program's name for the device-drawn seed (EpilogueProgram.seed_scalar); the dunder keeps
# it apart from the scalars the matcher names
SEED_SCALAR = "__seed__"


def _device_seed(graph, device: torch.device, like,
                 copies: Dict[Tuple[object, torch.device], torch.fx.Node]) -> torch.fx.Node:
    """One random 0-d float32 in [0, 2^24) on ``device`` per graph, drawn after the
    placeholders: Inductor runs aten.randint as a fallback kernel, which under CUDA graphs
    draws from torch's graph-safe generator, so every replay gets a fresh value. Kept in
    ``copies`` (the graph's scalar copies, ``_on_device``) under (SEED_SCALAR, device), so
    ``_rewrite`` moves it above an op placed before it as it moves those copies."""
    key = (SEED_SCALAR, device)
    if key not in copies:
        where = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(where):
            s = graph.call_function(aten.randint.low, (0, 1 << 24, []),
                                    {"dtype": torch.float32, "device": device})
        s.meta["val"] = _fake_scalar(like, torch.float32, device)
        copies[key] = s
    return copies[key]


def _rewrite(graph, a: _Analysis, param, state, prog, pos, scalar_copies=None, report=None):
    """Insert the fused op after ``pos``; erase the sinks and the dead region; return the
    program the op runs (``prog``, with a device seed where the step replays). With
    ``scalar_copies`` (a dict, shared by the graph's ops), every scalar the op reads is passed on
    W's device: under CUDA graphs the op's launch, host code included, is captured once, so a
    CPU scalar it read by value (an lr tensor on the CPU, and 1 - lr·wd computed from it) would
    keep its capture-time value in every replay; on the device the kernel reads it through its
    address, and Inductor's copy of the CPU value runs outside the graphs (a DeviceCopy ends a
    CUDA-graph partition)."""
    anchor = pos.next
    with graph.inserting_before(anchor):
        A, B = (_rebuild_views(graph, src) for src in a.operands)
        if a.parity == 0:       # grad = A·B  → dy = Aᵀ, x = B
            dy, x = _transpose_node(graph, A), B
        else:                   # grad = (A·B)ᵀ = Bᵀ·Aᵀ → dy = B, x = Aᵀ
            dy, x = B, _transpose_node(graph, A)
        scal = []
        for s in a.scalar_nodes:
            if _is_scalar_tensor(s):
                scal.append(s)
            else:
                t = graph.call_function(aten.scalar_tensor.default, (s,), {"dtype": torch.float64})
                t.meta["val"] = _fake_scalar(_val(a.gemm))
                scal.append(t)
        if scalar_copies is not None:
            scal = [_on_device(graph, t, _val(param).device, scalar_copies, report)
                    for t in scal]
            if stochastic_rounding(_val(param), prog):
                scal.append(_device_seed(graph, _val(param).device, _val(a.gemm),
                                         scalar_copies))
                prog = dataclasses.replace(prog, scalars=prog.scalars + (SEED_SCALAR,),
                                           seed_scalar=SEED_SCALAR)
        fresh = []
        for n, _ in a.new_outputs:
            v = _val(n)
            buf = graph.call_function(aten.empty.memory_format, (list(v.shape),),
                                      {"dtype": v.dtype, "device": v.device, "pin_memory": False})
            buf.meta["val"] = torch.empty_like(v, memory_format=torch.contiguous_format)
            fresh.append(buf)
        op = graph.call_function(FUSED_OP, (dy, x, param, list(state) + fresh, scal, prog.dumps()))
        op.meta["val"] = None
    if scalar_copies:
        # a copy (or the seed's draw) made for an earlier op may sit after this one (an op
        # right after the inputs); FX keeps each node's place in graph order as its _sort_key
        # (torch >= 2.5): only the copies past the op are looked for, so the scan stops at the
        # last of them instead of walking to the graph's end for every op
        made = set(scalar_copies.values())
        late = {c for c in scal if c in made and _after(c, op)}
        n = op.next
        while late and n.op != "root":
            if n in late:
                late.discard(n)
                op.prepend(n)
            n = n.next
    for (n, _), buf in zip(a.new_outputs, fresh):
        a.out_node.replace_input_with(n, buf)
    # reads of the new weight/state later in the step read the tensor the op updated in place;
    # they come after the op in graph order (_plan), which Inductor keeps for a read of a buffer
    # a fallback kernel mutates
    for r, n, d in a.late_reads:
        r.replace_input_with(n, d)
    for s in a.sinks:
        graph.erase_node(s)
    # erase what became dead: the gradient chain, the region, their constant leaves
    cands = set(a.region) | set(a.grad_nodes) | a.F
    for n in list(cands):
        cands.update(x for x in n.all_input_nodes if x.op == "call_function")
    changed = True
    while changed:
        changed = False
        for n in list(cands):
            if n.graph is graph and not n.users and n.op == "call_function" and not n.is_impure():
                cands.discard(n)
                graph.erase_node(n)
                changed = True
    return prog


def _after(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Whether ``a`` may come after ``b`` in graph order (True where FX keeps no order key)."""
    ka, kb = getattr(a, "_sort_key", None), getattr(b, "_sort_key", None)
    return ka is None or kb is None or ka > kb


def _fake_scalar(like, dtype=torch.float64, device=None):
    """A 0-d ``dtype`` value on ``device`` (default: ``like``'s), in ``like``'s fake mode."""
    mode = getattr(like, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty((), dtype=dtype, device=like.device if device is None else device)
