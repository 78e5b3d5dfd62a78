"""Structural tests of the fused_linear_update rewrite on small hand-built ATen graphs.

Each graph is a functional train-step tail as AOTAutograd produces it: the weight-gradient GEMM,
the optimizer update, and ``copy_`` of the new values into the parameter/state inputs. What must
fire, what must NOT fire (and the reason recorded), hazards, idempotence, runtime scalars, and the
register_pattern API. The rewritten graph is run and compared with the original graph.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

import forge_compile.patterns as patterns
from forge_compile.context import CompileReport, ForgeOptions, PassContext
from forge_compile.epilogue import EpilogueProgram
from forge_compile.passes import run_passes

aten = torch.ops.aten
FUSED = torch.ops.forge_compile.fused_linear_update_.default

T, N, K = 37, 20, 12          # T not a multiple of anything; N != K so layouts are checked


def _ctx(names):
    return PassContext(options=ForgeOptions(), input_names=list(names), report=CompileReport(0))


def _trace(fn, args):
    # functionalized like AOTAutograd's graph: input mutations become copy_ nodes at the end
    return make_fx(torch.func.functionalize(fn, remove="mutations"),
                   tracing_mode="fake")(*args)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _run_both(fn, args, names):
    """Trace fn, run the forge passes; return (gm, ctx, max difference of all inputs after a run)."""
    gm = _trace(fn, args)
    ref = copy.deepcopy(gm)
    ctx = _ctx(names)
    gm = run_passes(gm, ctx)
    a1 = [a.clone() for a in args]
    a2 = [a.clone() for a in args]
    out1 = gm(*a1)
    out2 = ref(*a2)
    diff = max(((x - y).abs().max().item() if x.is_floating_point() else 0.0)
               for x, y in zip(a1, a2))
    for o1, o2 in zip(out1 if isinstance(out1, (list, tuple)) else [out1],
                      out2 if isinstance(out2, (list, tuple)) else [out2]):
        if isinstance(o1, torch.Tensor):
            diff = max(diff, (o1 - o2).abs().max().item())
    return gm, ctx, diff


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


# -- the update rules used below (functional tails, as in the AOT graph) -----------------------

def sgd_momentum(dy, x, w, buf):
    g = torch.mm(dy.t(), x)
    b = buf * 0.9 + g
    w.copy_(w - 0.01 * b)
    buf.copy_(b)
    return (dy.sum(),)


def adamw_tail(dy, x, w, m, v, step):
    g = torch.mm(dy.t(), x)
    s = step + 1
    bc1 = 1 - torch.pow(0.9, s)
    bc2 = 1 - torch.pow(0.999, s)
    m2 = torch.lerp(m, g, 0.1)
    v2 = v * 0.999 + g * g * 0.001
    w2 = w * (1 - 1e-3 * 0.1)
    w2 = torch.addcdiv(w2, m2, (v2 / bc2).sqrt() + 1e-8, value=-1e-3) / 1.0
    w2 = w2 + (bc1 - bc1)       # per-step scalars are read
    w.copy_(w2)
    m.copy_(m2)
    v.copy_(v2)
    step.copy_(s)
    return (dy.sum(),)


ADAMW_NAMES = ["dy", "x", "l.weight", "opt.state[l.weight].exp_avg",
               "opt.state[l.weight].exp_avg_sq", "opt.state[l.weight].step"]


def _adamw_args():
    return _inputs((T, N), (T, K), (N, K), (N, K)) + [torch.rand(N, K), torch.tensor(3.0)]


# -- must fire ------------------------------------------------------------------------------

def test_fires_sgd_momentum():
    counters.clear()
    args = _inputs((T, N), (T, K), (N, K), (N, K))
    gm, ctx, diff = _run_both(sgd_momentum, args, ["dy", "x", "l.weight", "opt.state[l.weight].momentum_buffer"])
    assert _count(gm, FUSED) == 1
    assert _count(gm, aten.mm.default) == 0           # the gradient GEMM is gone
    assert _count(gm, aten.copy_.default) == 0        # and the copy-back of W and buf
    assert list(ctx.report.fused) == ["l.weight"]
    assert ctx.report.fused["l.weight"].gradient_bytes == N * K * 4
    assert counters["forge_compile"]["fused"] == 1
    assert diff < 1e-5


def test_fires_adamw_with_scalars_from_step_counter():
    gm, ctx, diff = _run_both(adamw_tail, _adamw_args(), ADAMW_NAMES)
    assert _count(gm, FUSED) == 1 and _count(gm, aten.mm.default) == 0
    op = next(n for n in gm.graph.nodes if n.target is FUSED)
    assert len(op.args[4]) >= 1                         # bias corrections are runtime scalars
    assert "exp_avg" in ctx.report.fused["l.weight"].rule
    assert diff < 1e-5


def test_fires_3d_activations_flattened():
    def f(dy3, x3, w, buf):
        g = torch.mm(dy3.reshape(-1, N).t(), x3.reshape(-1, K))
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy3.sum(),)
    args = _inputs((3, 5, N), (3, 5, K), (N, K), (N, K))
    gm, ctx, diff = _run_both(f, args, ["dy", "x", "w", "opt.state[w].momentum_buffer"])
    assert list(ctx.report.fused) == ["w"] and diff < 1e-5


def test_fires_transposed_gemm_and_double_transpose_copy():
    # mm(xᵀ, dy) is the gradient transposed; the raw AOT graph adds t → t → copy(empty, ·)
    def f(dy, x, w, buf):
        gt = torch.mm(x.t(), dy)                      # [K, N]
        g = torch.empty(N, K).copy_(gt.t().t().t())   # -> [N, K]
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.sum(),)
    args = _inputs((T, N), (T, K), (N, K), (N, K))
    gm, ctx, diff = _run_both(f, args, ["dy", "x", "w", "opt.state[w].momentum_buffer"])
    assert list(ctx.report.fused) == ["w"] and diff < 1e-5


def test_fires_bf16_gemm_cast_to_fp32():
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x).to(torch.float32)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.float().sum(),)
    dy, x = (t.bfloat16() for t in _inputs((T, N), (T, K)))
    gm = _trace(f, [dy, x, torch.randn(N, K), torch.randn(N, K)])
    ctx = _ctx(["dy", "x", "w", "opt.state[w].momentum_buffer"])
    run_passes(gm, ctx)
    assert list(ctx.report.fused) == ["w"]


def test_fires_foreach_lists_unrolled():
    def f(dy1, x1, dy2, x2, w1, w2, b1, b2):
        g1, g2 = torch.mm(dy1.t(), x1), torch.mm(dy2.t(), x2)
        bufs = torch._foreach_add(torch._foreach_mul([b1, b2], 0.9), [g1, g2])
        new = torch._foreach_add([w1, w2], bufs, alpha=-0.01)
        for d, s in zip([w1, w2, b1, b2], new + bufs):
            d.copy_(s)
        return (dy1.sum(),)
    args = _inputs((T, N), (T, K), (T, K), (T, N), (N, K), (K, N), (N, K), (K, N))
    names = ["dy1", "x1", "dy2", "x2", "a.weight", "b.weight",
             "opt.state[a.weight].momentum_buffer", "opt.state[b.weight].momentum_buffer"]
    gm, ctx, diff = _run_both(f, args, names)
    assert sorted(ctx.report.fused) == ["a.weight", "b.weight"]
    assert not any("_foreach" in str(n.target) for n in gm.graph.nodes)
    assert diff < 1e-5


def test_update_ordered_after_last_read_of_weight():
    # dX = dY·W reads W after the gradient GEMM: the in-place update must come after it
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        b = buf * 0.9 + g
        w_new = w - 0.01 * b
        dx = torch.mm(dy, w)
        w.copy_(w_new)
        buf.copy_(b)
        return (dx,)
    args = _inputs((T, N), (T, K), (N, K), (N, K))
    gm, ctx, diff = _run_both(f, args, ["dy", "x", "w", "opt.state[w].momentum_buffer"])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    op = next(n for n in gm.graph.nodes if n.target is FUSED)
    dx = next(n for n in gm.graph.nodes if n.target is aten.mm.default)
    assert order[dx] < order[op]
    assert diff < 1e-5        # dx computed with the OLD weight, as in eager


# -- Inductor's shape padding (fx_passes/pad_mm.py): on CUDA, where its timing (or
# force_shape_pad) says so, mm(A, B) with an unaligned dimension becomes
# mm(constant_pad_nd(A), constant_pad_nd(B)) sliced back to A·B's shape (an fp32 row is aligned
# at 4 elements: N = 20 → 24 is not padded, T = 37 → 40 and an odd N = 19 → 20 are)

def _pad(t, rows, cols):
    return aten.constant_pad_nd(t, [0, cols, 0, rows])


def _sgd_padded(trim_from=0):
    def f(dy, x, w, buf):
        n = w.shape[0]
        g = aten.mm(_pad(dy.t(), 1, 3), _pad(x, 3, 0))[trim_from:trim_from + n]   # [N, K]
        b = buf * 0.9 + g
        dx = aten.mm(_pad(dy, 3, 1), _pad(w, 1, 0))[:-3]       # dX = dY·W, padded the same way
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dx,)
    return f


def test_fires_through_inductors_shape_padding():
    args = _inputs((T, 19), (T, K), (19, K), (19, K))
    gm, ctx, diff = _run_both(_sgd_padded(), args, _SGD_NAMES)
    assert list(ctx.report.fused) == ["w"], ctx.report.unfused
    op = next(n for n in gm.graph.nodes if n.target is FUSED)
    # the op reads dY and X themselves: their padded copies and the padded GEMM are gone
    assert [a.op for a in op.args[:2]] == ["placeholder", "placeholder"], op.args[:2]
    assert _count(gm, aten.mm.default) == 1                  # dX's
    assert _count(gm, aten.constant_pad_nd.default) == 2     # dX's operands
    assert diff < 1e-5


def test_update_ordered_after_the_gemm_that_reads_a_padded_weight():
    # dX reads W through constant_pad_nd: Inductor computes the pad lazily, when the mm is
    # lowered, or inside a kernel fused with another pad; the in-place update must follow the mm,
    # not only the pad (on the CPU with pad_mm forced it ran before, and dX read the new W)
    args = _inputs((T, 19), (T, K), (19, K), (19, K))
    gm, ctx, diff = _run_both(_sgd_padded(), args, _SGD_NAMES)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    op = next(n for n in gm.graph.nodes if n.target is FUSED)
    dx = next(n for n in gm.graph.nodes if n.target is aten.mm.default)
    assert order[dx] < order[op]
    assert diff < 1e-5


def test_padded_rows_that_are_part_of_the_gradient_stay():
    # a weight with a row per padded row (no slice back): the zero rows are the gradient's own,
    # so the op reads the padded operands as they are (taking the pads off would give a 19-row
    # gradient for 20 rows)
    def f(dy, x, w, buf):
        g = aten.mm(_pad(dy.t(), 1, 3), _pad(x, 3, 0))                      # [20, K]
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.sum(),)
    gm, ctx, diff = _run_both(f, _inputs((T, 19), (T, K), (20, K), (20, K)), _SGD_NAMES)
    assert list(ctx.report.fused) == ["w"], ctx.report.unfused
    op = next(n for n in gm.graph.nodes if n.target is FUSED)
    assert _count(gm, aten.constant_pad_nd.default) == 2
    assert tuple(op.args[0].meta["val"].shape) == (T + 3, 20), op.args[0]
    assert diff < 1e-5


def test_refuses_a_slice_of_a_padded_gemm_that_is_not_its_product():
    # rows 1..N of the padded product are not A·B: the update reads a slice, not the gradient
    why = _refused(_sgd_padded(trim_from=1), _inputs((T, 19), (T, K), (19, K), (19, K)),
                   _SGD_NAMES)
    assert "gradient is not a GEMM" in why and "slice" in why


def test_lr_is_a_runtime_scalar():
    def f(dy, x, w, buf, lr):
        g = torch.mm(dy.t(), x)
        b = buf * 0.9 + g
        w.copy_(w - lr * b)
        buf.copy_(b)
        return (dy.sum(),)
    args = _inputs((T, N), (T, K), (N, K), (N, K)) + [torch.tensor(0.01)]
    gm, ctx, _ = _run_both(f, args, ["dy", "x", "w", "opt.state[w].momentum_buffer", "lr"])
    assert list(ctx.report.fused) == ["w"]
    ref = _trace(f, args)
    for lr in (0.5, 0.001):      # a schedule changes a tensor value, never the program
        a1 = [a.clone() for a in args[:4]] + [torch.tensor(lr)]
        a2 = [a.clone() for a in a1]
        gm(*a1), ref(*a2)
        assert (a1[2] - a2[2]).abs().max() < 1e-5


def test_idempotent():
    gm = _trace(adamw_tail, _adamw_args())
    ctx = _ctx(ADAMW_NAMES)
    run_passes(gm, ctx)
    code = gm.code
    run_passes(gm, _ctx(ADAMW_NAMES))
    assert gm.code == code


# -- must NOT fire (each with its reason) ---------------------------------------------------------

def _refused(fn, args, names, param="w"):
    counters.clear()
    gm, ctx, diff = _run_both(fn, args, names)
    assert _count(gm, FUSED) == 0, gm.code
    assert diff < 1e-5                                   # the unfused graph is unchanged
    assert param in ctx.report.unfused
    assert any(k.startswith("refused: ") for k in counters["forge_compile"])
    return ctx.report.unfused[param]


_SGD_NAMES = ["dy", "x", "w", "opt.state[w].momentum_buffer"]


def test_refuses_gradient_with_second_consumer():
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (g.abs().amax(),)       # logging the gradient
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), _SGD_NAMES)
    assert "gradient read outside the update" in why


def test_refuses_gradient_returned():
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (g,)
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), _SGD_NAMES)
    assert "graph output" in why


def _clipped_sgd(dy, x, w, buf):
    g = torch.mm(dy.t(), x)
    coef = torch.clamp(1.0 / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
    b = buf * 0.9 + g * coef
    w.copy_(w - 0.01 * b)
    buf.copy_(b)
    return (dy.sum(),)


def test_refuses_clip_grad_norm_when_the_operands_outweigh_the_gradient():
    # T=37 tokens of dY (20) and X (12): 4736 bytes held until the clip's scale, against the
    # gradient's 960: the norm keeps reading the gradient, and the update is refused for it
    counters.clear()
    why = _refused(_clipped_sgd, _inputs((T, N), (T, K), (N, K), (N, K)), _SGD_NAMES)
    assert "norm" in why
    assert counters["forge_compile"]["grad norm kept: operands larger than the gradient"] == 1


def test_fires_clip_grad_norm_from_the_operands():
    # 4 tokens: dY and X take 512 bytes against the gradient's 960. The norm becomes
    # sqrt(grad_sqnorm(dYᵀ, X)), the gradient's only reader is its update, which is fused
    # with the clip's scale as a scalar
    counters.clear()
    gm, ctx, diff = _run_both(_clipped_sgd, _inputs((4, N), (4, K), (N, K), (N, K)), _SGD_NAMES)
    assert _count(gm, FUSED) == 1 and list(ctx.report.fused) == ["w"], ctx.report.unfused
    assert ctx.report.fused["w"].norm_from_operands
    assert _count(gm, torch.ops.forge_compile.grad_sqnorm.default) == 1
    assert _count(gm, aten.linalg_vector_norm.default) == 0 and _count(gm, aten.mm.default) == 0
    assert counters["forge_compile"]["grad norm from the GEMM operands"] == 1
    assert diff < 1e-5


def test_squares_of_an_activation_are_not_a_gradient_norm():
    # sum(pow(h, 2)) of a forward product h = X·Wᵀ (an activation penalty) has the norm's form,
    # but h feeds no update: its squares are summed from h, with no second GEMM
    def f(dy, x, w, buf):
        penalty = torch.mm(x, w.t()).pow(2).sum()
        g = torch.mm(dy.t(), x)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (penalty,)
    counters.clear()
    gm, ctx, diff = _run_both(f, _inputs((4, N), (4, K), (N, K), (N, K)), _SGD_NAMES)
    assert list(ctx.report.fused) == ["w"]
    assert _count(gm, torch.ops.forge_compile.grad_sqnorm.default) == 0, gm.code
    assert _count(gm, aten.sum.default) == 1
    assert diff < 1e-5


def test_hand_written_clip_reads_the_operands():
    # a clip written by hand: sqrt(Σ (g ** 2).sum()) (aten.sum.default of pow), as in loops
    # over p.grad; the same rewrite, the same fused update
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        coef = torch.clamp(0.1 / ((g ** 2).sum().sqrt() + 1e-6), max=1.0)
        b = buf * 0.9 + g * coef
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.sum(),)
    gm, ctx, diff = _run_both(f, _inputs((4, N), (4, K), (N, K), (N, K)), _SGD_NAMES)
    assert list(ctx.report.fused) == ["w"] and ctx.report.fused["w"].norm_from_operands
    assert _count(gm, aten.pow.Tensor_Scalar) == 0 and _count(gm, aten.mm.default) == 0, gm.code
    assert diff < 1e-5


def test_clip_grad_norm_foreach_keeps_the_other_entries():
    # _foreach_norm over a weight gradient and a bias gradient (a row sum): the weight's entry
    # reads the operands, the bias's stays in a _foreach_norm of its own
    def f(dy, x, w, bias, buf, bbuf):
        g, gb = torch.mm(dy.t(), x), dy.sum(0)
        norms = torch._foreach_norm([g, gb], 2.0)
        coef = torch.clamp(1.0 / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-6), max=1.0)
        for p, grad, mom in ((w, g, buf), (bias, gb, bbuf)):
            m = mom * 0.9 + grad * coef
            mom.copy_(m)
            p.copy_(p - 0.01 * m)
        return (dy.sum(),)
    names = ["dy", "x", "w", "b", "opt.state[w].momentum_buffer", "opt.state[b].momentum_buffer"]
    gm, ctx, diff = _run_both(f, _inputs((4, N), (4, K), (N, K), (N,), (N, K), (N,)), names)
    assert list(ctx.report.fused) == ["w"] and "b" in ctx.report.unfused, ctx.report.unfused
    norms = [n for n in gm.graph.nodes if n.target is aten._foreach_norm.Scalar]
    assert len(norms) == 1 and len(norms[0].args[0]) == 1, gm.code
    assert diff < 1e-5


def test_refuses_grad_hook_side_output():
    # a hook that stashes the gradient (for logging) makes it a graph output
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        stash = g.clone()
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (stash,)
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), _SGD_NAMES)
    assert "graph output" in why or "outside" in why


def test_refuses_grad_kept_across_steps():
    # no zero_grad(set_to_none=True): .grad accumulates and survives the step
    def f(dy, x, w, grad):
        acc = grad + torch.mm(dy.t(), x)
        w.copy_(w - 0.01 * acc)
        grad.copy_(acc)
        return (dy.sum(),)
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), ["dy", "x", "w", "w.grad"])
    assert ".grad" in why


def test_refuses_trust_ratio():
    def f(dy, x, w, m):
        g = torch.mm(dy.t(), x)
        m2 = m * 0.9 + g * 0.1
        ratio = torch.linalg.vector_norm(w) / torch.linalg.vector_norm(m2)
        w.copy_(w - 0.01 * ratio * m2)
        m.copy_(m2)
        return (dy.sum(),)
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), ["dy", "x", "w", "opt.state[w].exp_avg"])
    assert "norm" in why or "not elementwise" in why


def test_refuses_factored_moments():
    # Adafactor-style row/column statistics of g² are reductions, not elementwise
    def f(dy, x, w, r):
        g = torch.mm(dy.t(), x)
        row = (g * g).mean(dim=1, keepdim=True)
        w.copy_(w - 0.01 * g / (row.sqrt() + 1e-8))
        r.copy_(r * 0 + row)
        return (dy.sum(),)
    why = _refused(f, _inputs((T, N), (T, K), (N, K), (N, K)), ["dy", "x", "w", "opt.state[w].row"])
    assert "outside the update" in why


def test_fuse_false_rewrites_nothing():
    gm = _trace(adamw_tail, _adamw_args())
    ctx = PassContext(options=ForgeOptions(fuse=False), input_names=ADAMW_NAMES,
                      report=CompileReport(0))
    run_passes(gm, ctx)
    assert _count(gm, FUSED) == 0 and not ctx.report.fused


# -- register_pattern ---------------------------------------------------------------------------

@torch.library.custom_op("forge_test::soft_sign", mutates_args=())
def soft_sign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


@soft_sign.register_fake
def _(x):
    return torch.empty_like(x)


def test_register_pattern_teaches_an_unknown_op():
    def f(dy, x, w):
        g = torch.mm(dy.t(), x)
        w.copy_(w - 0.01 * torch.ops.forge_test.soft_sign(g))
        return (dy.sum(),)
    args = _inputs((T, N), (T, K), (N, K))
    why = _refused(f, args, ["dy", "x", "w"])
    assert "not elementwise" in why and "soft_sign" in why

    @patterns.register_pattern(torch.ops.forge_test.soft_sign.default)
    def _soft_sign(emit, x):
        return emit("div", x, emit("add", emit("abs", x), 1.0))
    try:
        gm, ctx, diff = _run_both(f, args, ["dy", "x", "w"])
        assert list(ctx.report.fused) == ["w"] and diff < 1e-6
    finally:
        patterns.unregister_pattern(torch.ops.forge_test.soft_sign.default)


# -- fused=True optimizers (one op over lists) ----------------------------------------------------

def _fused_adamw_graph(amsgrad=False, grad_scale=False, op=None):
    op = op or torch.ops.aten._fused_adamw.default

    def f(dy, x, w, m, v, vmax, step):
        g = torch.mm(dy.t(), x)
        s = step + 1
        outs = op([w], [g], [m], [v], [vmax] if amsgrad else [], [s], lr=1e-2, beta1=0.9,
                  beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=amsgrad, maximize=False,
                  grad_scale=torch.ones(()) if grad_scale else None)
        w.copy_(outs[0][0])
        m.copy_(outs[2][0])
        v.copy_(outs[3][0])
        if amsgrad:
            vmax.copy_(outs[4][0])
        step.copy_(s)
        return (dy.sum(),)
    args = _inputs((T, N), (T, K), (N, K), (N, K)) + [torch.rand(N, K), torch.rand(N, K), torch.tensor(2.0)]
    names = ["dy", "x", "w", "opt.state[w].exp_avg", "opt.state[w].exp_avg_sq",
             "opt.state[w].max_exp_avg_sq", "opt.state[w].step"]
    return f, args, names


def _eager_fused(f, args):
    # the real fused CPU kernel, as ground truth for the decomposition
    a = [t.clone() for t in args]
    f(*a)
    return a


def _fused_and_eager_equal(f, args, names):
    """Trace f, run the passes: `w` fused, every input within 1e-6 of the real fused kernel."""
    gm = make_fx(f, tracing_mode="fake")(*args)
    ctx = _ctx(names)
    run_passes(gm, ctx)
    assert list(ctx.report.fused) == ["w"]
    a = [t.clone() for t in args]
    gm(*a)
    for x, y in zip(a, _eager_fused(f, args)):
        assert ((x - y).norm() / y.norm()) < 1e-6
    return gm


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("op", ["_fused_adamw", "_fused_adam"])
def test_fused_adam_ops_decomposed_and_fused(amsgrad, op):
    f, args, names = _fused_adamw_graph(amsgrad, op=getattr(torch.ops.aten, op).default)
    gm = _fused_and_eager_equal(f, args, names)
    assert _count(gm, getattr(torch.ops.aten, op).default) == 0


def test_fused_adamw_with_grad_scale_is_kept():
    counters.clear()
    f, args, names = _fused_adamw_graph(grad_scale=True)
    gm = make_fx(f, tracing_mode="fake")(*args)
    ctx = _ctx(names)
    run_passes(gm, ctx)
    assert _count(gm, torch.ops.aten._fused_adamw.default) == 1
    assert not ctx.report.fused and "w" in ctx.report.unfused
    assert counters["forge_compile"]["refused: fused optimizer with grad_scale/found_inf"] == 1


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_decomposed_and_fused(nesterov):
    def f(dy, x, w, buf):
        g = torch.mm(dy.t(), x)
        outs = torch.ops.aten._fused_sgd.default([w], [g], [buf], weight_decay=0.01, momentum=0.9,
                                                 lr=0.01, dampening=0.0, nesterov=nesterov,
                                                 maximize=False, is_first_step=False)
        w.copy_(outs[0][0])
        buf.copy_(outs[2][0])
        return (dy.sum(),)
    _fused_and_eager_equal(f, _inputs((T, N), (T, K), (N, K), (N, K)),
                           ["dy", "x", "w", "opt.state[w].momentum_buffer"])


def test_fires_state_created_in_the_step():
    # Lion's first step: exp_avg = zeros_like(W) is created in the step and returned as new state;
    # the op writes it into a fresh buffer, the gradient is still never materialised
    def f(dy, x, w):
        g = torch.mm(dy.t(), x)
        m = torch.zeros_like(w)
        upd = torch.sign(m * 0.9 + g * 0.1)
        w.copy_(w * (1 - 1e-3 * 0.1) - 1e-3 * upd)
        m_new = m * 0.99 + g * 0.01
        return (dy.sum(), m_new)
    args = _inputs((T, N), (T, K), (N, K))
    gm, ctx, diff = _run_both(f, args, ["dy", "x", "w"])
    assert list(ctx.report.fused) == ["w"] and diff < 1e-6
    assert _count(gm, aten.mm.default) == 0


def test_refuses_state_that_is_the_gradient():
    # fresh SGD: momentum_buffer = clone(grad) returned: the new state IS the gradient
    def f(dy, x, w):
        g = torch.mm(dy.t(), x)
        buf = g.clone()
        w.copy_(w - 0.01 * buf)
        return (dy.sum(), buf)
    why = _refused(f, _inputs((T, N), (T, K), (N, K)), ["dy", "x", "w"])
    assert "gradient is a graph output" in why


def test_pattern_cache_key_changes_with_registrations():
    k0 = patterns.cache_key()
    patterns.register_pattern(torch.ops.forge_test.soft_sign.default, lambda emit, x: x)
    try:
        assert patterns.cache_key() != k0
    finally:
        patterns.unregister_pattern(torch.ops.forge_test.soft_sign.default)
    assert patterns.cache_key() == k0


def test_refuses_tied_weight_two_gemms():
    # a weight used twice (tied embedding/LM head) gets the sum of two GEMM gradients
    def f(dy, x, dy2, x2, w, buf):
        g = torch.mm(dy.t(), x) + torch.mm(dy2.t(), x2)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.sum(),)
    why = _refused(f, _inputs((T, N), (T, K), (T + 3, N), (T + 3, K), (N, K), (N, K)),
                   ["dy", "x", "dy2", "x2", "w", "opt.state[w].momentum_buffer"])
    assert "several gradient GEMMs" in why


def test_refuses_weight_tied_to_an_embedding_naming_the_tie():
    # a weight that is both an LM head and an embedding table: its gradient is the head's GEMM
    # plus the embedding's scatter-add (index_put with accumulate) of the rows the tokens hit
    def f(dy, x, demb, w, buf, idx):
        g = torch.mm(dy.t(), x) + aten.index_put(torch.zeros_like(w), [idx], demb, True)
        b = buf * 0.9 + g
        w.copy_(w - 0.01 * b)
        buf.copy_(b)
        return (dy.sum(),)
    idx = torch.randint(0, N, (T,), generator=torch.Generator().manual_seed(3))
    why = _refused(f, [*_inputs((T, N), (T, K), (T, K), (N, K), (N, K)), idx],
                   ["dy", "x", "demb", "w", "opt.state[w].momentum_buffer", "idx"])
    assert why.startswith("GEMM plus another gradient"), why
    assert "index_put" in why and "tie_word_embeddings" in why


# -- placement: per-step scalars are hoisted so the fused op does not wait for the optimizer ----

def _closure(nodes):
    out, work = set(), list(nodes)
    while work:
        n = work.pop()
        if n.op == "call_function" and n not in out:
            out.add(n)
            work += list(n.all_input_nodes)
    return out


def test_step_scalars_hoisted_to_the_graph_start():
    gm, ctx, diff = _run_both(adamw_tail, _adamw_args(), ADAMW_NAMES)
    nodes = list(gm.graph.nodes)
    op = next(n for n in nodes if n.target is FUSED)
    chain = _closure(op.args[4])
    assert chain, "the bias corrections are computed in the graph"
    # traced after the GEMM (adamw_tail computes s = step + 1 after mm), now right after the
    # graph inputs, ahead of every other computation
    first_other = min(i for i, n in enumerate(nodes) if n.op != "placeholder" and n not in chain)
    assert all(nodes.index(n) < first_other for n in chain), [n.name for n in nodes]
    assert diff < 1e-5


def test_scalar_reading_an_input_mutated_earlier_is_not_hoisted():
    """A 0-d value read after an in-place write of its input must stay after that write."""
    from forge_compile.passes.fused_linear_update import _hoist_step_scalars
    from forge_compile.passes.liveness import GraphFacts
    g = torch.fx.Graph()
    step = g.placeholder("step")
    x = g.placeholder("x")
    step.meta["val"], x.meta["val"] = torch.tensor(3.0), torch.randn(4)
    big = g.call_function(aten.mul.Tensor, (x, 2.0))
    big.meta["val"] = torch.randn(4)
    write = g.call_function(aten.copy_.default, (step, g.call_function(aten.sum.default, (big,))))
    write.args[1].meta["val"] = write.meta["val"] = torch.tensor(0.0)
    s = g.call_function(aten.add.Tensor, (step, 1.0))
    s.meta["val"] = torch.tensor(1.0)
    g.output((s,))
    before = [n.name for n in g.nodes]
    assert not _hoist_step_scalars(GraphFacts(g), [s])
    assert [n.name for n in g.nodes] == before
    # without the write the same scalar moves to the start
    g2 = torch.fx.Graph()
    step2, x2 = g2.placeholder("step"), g2.placeholder("x")
    step2.meta["val"], x2.meta["val"] = torch.tensor(3.0), torch.randn(4)
    big2 = g2.call_function(aten.mul.Tensor, (x2, 2.0))
    big2.meta["val"] = torch.randn(4)
    s2 = g2.call_function(aten.add.Tensor, (step2, 1.0))
    s2.meta["val"] = torch.tensor(1.0)
    g2.output((s2, big2))
    facts = GraphFacts(g2)
    assert _hoist_step_scalars(facts, [s2])
    assert [n.name for n in g2.nodes][:3] == ["step", "x", s2.name]
    assert facts.order[s2] == 2          # renumbered for the placement that follows


def _sgd_wd_two_weights(dy1, x1, dy2, x2, w1, w2, b1, b2, lr):
    """Two SGD-momentum updates with decoupled weight decay on a tensor lr (as AdamW's
    capturable foreach path computes 1 - lr·wd from it)."""
    for dy, x, w, b in ((dy1, x1, w1, b1), (dy2, x2, w2, b2)):
        g = torch.mm(dy.t(), x)
        nb = b * 0.9 + g
        w.copy_(w * (1 - lr * 0.01) - lr * nb)
        b.copy_(nb)
    return (dy1.sum(),)


def _two_weights_on_meta(dtype, cudagraphs):
    """_sgd_wd_two_weights traced with ``dtype`` tensors on "meta" (standing in for CUDA) and a
    CPU lr, through the passes: (graph module, context, the fused ops); both weights fused."""
    args = [torch.empty(*sh, device="meta", dtype=dtype)
            for sh in ((T, N), (T, K), (T, K), (T, N), (N, K), (K, N), (N, K), (K, N))]
    gm = _trace(_sgd_wd_two_weights, args + [torch.tensor(0.1)])
    ctx = _ctx(["dy1", "x1", "dy2", "x2", "a.weight", "b.weight",
                "opt.state[a.weight].momentum_buffer", "opt.state[b.weight].momentum_buffer",
                "lr"])
    ctx.cudagraphs = cudagraphs
    gm = run_passes(gm, ctx)
    assert sorted(ctx.report.fused) == ["a.weight", "b.weight"]
    return gm, ctx, [n for n in gm.graph.nodes if n.target is FUSED]


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_cudagraphs_bf16_weights_round_with_a_seed_drawn_on_the_device(cudagraphs):
    """bf16 weights, stochastic rounding: a host seed would be frozen into a CUDA graph at
    capture, so under CUDA graphs the pass draws one random value on the weights' device per
    graph (aten.randint, which Inductor runs as a fallback kernel: torch's graph-safe RNG
    redraws it at every replay) and hands it to every fused op as its program's seed_scalar.
    Without CUDA graphs the launch's host seed is fresh per call: no draw."""
    gm, ctx, ops = _two_weights_on_meta(torch.bfloat16, cudagraphs)
    draws = [n for n in gm.graph.nodes if n.target is torch.ops.aten.randint.low]
    progs = [EpilogueProgram.loads(op.args[5]) for op in ops]
    if cudagraphs:
        assert len(draws) == 1 and draws[0].meta["val"].device.type == "meta"
        assert draws[0].args[:2] == (0, 1 << 24)         # exact as fp32, as an int32 in the kernel
        assert all(op.args[4][-1] is draws[0] for op in ops)
        assert all(p.seed_scalar == p.scalars[-1] == "__seed__" for p in progs)
        assert all(p.param_rounding == "stochastic" for p in progs)
        from torch._inductor.lowering import lowerings
        assert torch.ops.aten.randint.low in lowerings
        notes = [f.precision_note for f in ctx.report.fused.values()]
        assert all("its seed drawn on the GPU at every CUDA-graph replay" in n for n in notes)
    else:
        assert not draws and all(p.seed_scalar is None for p in progs)
    gm.graph.lint()


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_cudagraphs_pass_every_scalar_on_the_weights_device(cudagraphs):
    """Weights on another device than a CPU lr tensor ("meta" stands in for CUDA here): under
    CUDA graphs the op reads each scalar on W's device (one copy per scalar for the whole graph),
    since a CPU scalar read by value at capture would be replayed at its capture-time value;
    without CUDA graphs the CPU scalars are passed as they are (read per call, no copy)."""
    gm, ctx, ops = _two_weights_on_meta(torch.float32, cudagraphs)
    scalars = [s for op in ops for s in op.args[4]]
    assert len(scalars) == 4
    devices = {s.meta["val"].device.type for s in scalars}
    copies = [n for n in gm.graph.nodes if n.target is torch.ops.prims.device_put.default]
    if cudagraphs:
        assert devices == {"meta"}
        assert set(scalars) == set(copies)
        # the pass runs after Inductor's decompositions: each copy must have a lowering there
        # (aten._to_copy has only a decomposition, and Inductor asserted on it on the H100)
        from torch._inductor.lowering import lowerings
        assert all(c.target in lowerings for c in copies)
        # one copy per scalar node: lr (read by both updates) and each update's 1 - lr·wd
        sources = [c.args[0] for c in copies]
        assert len(sources) == len(set(sources)) == 3
        lr_copy = next(c for c in copies if c.args[0].op == "placeholder")
        assert all(lr_copy in op.args[4] for op in ops)
        assert ctx.report.scalar_copies == 3          # what explain() reports
        from forge_compile.explain import ExplainReport
        text = str(ExplainReport(graph_count=1, graph_breaks=[], recompiles=0,
                                 compiles=[ctx.report]))
        assert "CUDA graphs: the fused updates read their per-step scalars" in text
        assert "3 host-to-device copies a step" in text
    else:
        assert devices == {"cpu"} and not copies and ctx.report.scalar_copies == 0
    # every use follows its definition: under CUDA graphs each op's copies precede it, the one
    # made for the other op included (the pass moves a copy that sits after an op before it)
    gm.graph.lint()
