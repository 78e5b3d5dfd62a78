"""dedupe_casts: identical casts alive together become one; casts whose lifetimes do not
overlap, or with a mutation of their input between them, stay apart; a compiled autocast step
is bit for bit the same with and without the pass."""

import torch
from torch._dynamo.utils import counters

import forge_compile
import forge_compile.passes as passes
from forge_compile.explain import listen
from forge_compile.passes.dedupe_casts import dedupe_casts

from forge_models import GatedMLP

aten, prims = torch.ops.aten, torch.ops.prims
CAST = prims.convert_element_type.default


def _casts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is CAST]


def _module(build):
    g = torch.fx.Graph()
    out = build(g)
    g.output(out)
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _run(gm, *args):
    return [t.clone() for t in gm(*args)]


def test_casts_read_together_become_one():
    """x cast three times, each read through a view by two GEMMs, the forward's at once and the
    weight gradient's at the end (as q, k, v read X): each later cast is made while the first
    is still held, so one cast remains, same outputs."""
    def build(g):
        x, w = g.placeholder("x"), g.placeholder("w")
        views, fwd = [], []
        for _ in range(3):      # each cast made after the last one's forward GEMM
            c = g.call_function(CAST, (x, torch.bfloat16))
            views.append(g.call_function(aten.view.default, (c, [4, 8])))
            fwd.append(g.call_function(aten.mm.default, (views[-1], w)))
        bwd = [g.call_function(aten.mm.default, (g.call_function(aten.t.default, (v,)), f))
               for v, f in zip(views, fwd)]
        return tuple(fwd + bwd)
    gm = _module(build)
    x, w = torch.randn(4, 8), torch.randn(8, 8, dtype=torch.bfloat16)
    want = _run(gm, x, w)
    counters.clear()
    gm = dedupe_casts(gm, None)
    assert len(_casts(gm)) == 1 and counters["forge_compile"]["casts merged"] == 2
    # no stale mutation-region ids left for Inductor's pattern matcher (it computes them only
    # where the first node has none)
    assert not any("mutation_region_id" in n.meta for n in gm.graph.nodes)
    assert all(torch.equal(a, b) for a, b in zip(_run(gm, x, w), want))


def test_casts_alive_apart_stay_two():
    """A weight cast for the forward, read there only, and cast again for the backward after
    that read: merging would keep the first alive across the gap, so both stay."""
    def build(g):
        x, w = g.placeholder("x"), g.placeholder("w")
        c1 = g.call_function(CAST, (w, torch.bfloat16))
        y = g.call_function(aten.mm.default, (x, c1))
        c2 = g.call_function(CAST, (w, torch.bfloat16))
        return (g.call_function(aten.mm.default, (y, c2)),)
    gm = dedupe_casts(_module(build), None)
    assert len(_casts(gm)) == 2


def test_a_mutation_between_keeps_both():
    """w cast, then w overwritten (the step's copy_), then cast again while the first is still
    read: the two casts see different values and stay two."""
    def build(g):
        w, new = g.placeholder("w"), g.placeholder("new")
        c1 = g.call_function(CAST, (w, torch.bfloat16))
        g.call_function(aten.copy_.default, (w, new))
        c2 = g.call_function(CAST, (w, torch.bfloat16))
        return (g.call_function(aten.sub.Tensor, (c2, c1)),)
    gm = dedupe_casts(_module(build), None)
    assert len(_casts(gm)) == 2
    w, new = torch.zeros(4), torch.ones(4)
    assert torch.equal(gm(w, new)[0], torch.ones(4, dtype=torch.bfloat16))   # new - old


def _gated_step():
    """(model, opt, step): a 32-64-32 gated MLP, AdamW, a step under CPU bf16 autocast."""
    torch.manual_seed(0)
    model = GatedMLP(32, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return model, opt, step


def test_explain_names_the_merged_casts():
    """explain() counts the merged casts and their bytes: a 32-64-32 gated MLP at 16 tokens
    under CPU autocast, gate and up read X (16×32 bf16, 1,024 B): one copy not kept."""
    model, opt, step = _gated_step()
    rep = forge_compile.explain(forge_compile.compile(step, inner="aot_eager"),
                                torch.randn(16, 32), torch.randn(16, 32))
    assert sum(r.casts_merged for r in rep.compiles) == 1
    assert sum(r.cast_bytes_merged for r in rep.compiles) == 16 * 32 * 2
    assert "casts merged: 1 identical cast(s) alive together read one copy" in str(rep)


def test_autocast_step_is_bit_identical_without_the_pass(monkeypatch):
    """A gated MLP (gate and up read one X) under CPU autocast, AdamW, 4 steps, forge with
    Inductor: the casts of X merge, and every parameter and state tensor equals, bit for bit,
    the same compile without the pass."""
    def train(drop: bool):
        if drop:
            monkeypatch.setattr(passes, "PASSES", [p for p in passes.PASSES if p is not dedupe_casts])
        model, opt, step = _gated_step()
        torch._dynamo.reset()
        counters.clear()
        compiled = forge_compile.compile(step)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            compiled(torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g))
        merged = counters["forge_compile"]["casts merged"]
        fused = counters["forge_compile"]["fused"]
        monkeypatch.undo()
        return model, opt, merged, fused
    model, opt, merged, fused = train(False)
    ref, ref_opt, ref_merged, ref_fused = train(True)
    assert merged >= 1 and ref_merged == 0 and fused == ref_fused == 3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        for k, v in opt.state[p].items():
            assert torch.equal(v, ref_opt.state[q][k]), (n, k)


def test_a_symbolic_token_count_is_not_guarded():
    """dynamic=True, 12-16 tokens: the merged casts' bytes are symbolic; the report takes them
    at this compile's value without a guard, so the step compiles once."""
    model, opt, step = _gated_step()
    compiled = torch.compile(step, dynamic=True, backend=forge_compile.ForgeBackend(
        forge_compile.ForgeOptions(inner="aot_eager")))
    g = torch.Generator().manual_seed(2)
    with listen() as reports:
        for rows in range(12, 17):
            compiled(torch.randn(rows, 32, generator=g), torch.randn(rows, 32, generator=g))
    assert len(reports) == 1 and reports[0].casts_merged == 1
    assert reports[0].cast_bytes_merged == 12 * 32 * 2
