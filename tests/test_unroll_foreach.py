"""unroll_foreach: every supported _foreach_* list op becomes per-entry ATen ops, values unchanged."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from forge_compile.passes.unroll_foreach import unroll_foreach


def _lists(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    b = [torch.rand(5, 3, generator=g) + 0.5, torch.rand(7, generator=g) + 0.5]
    c = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    return a, b, c


CASES = {
    "add_scalar": lambda a, b, c: torch._foreach_add(a, 1.5),
    "add_list_alpha": lambda a, b, c: torch._foreach_add(a, b, alpha=-0.3),
    "sub_scalarlist": lambda a, b, c: torch._foreach_sub(a, [0.1, 0.2]),
    "mul_tensor": lambda a, b, c: torch._foreach_mul(a, torch.tensor(0.7)),
    "div_list": lambda a, b, c: torch._foreach_div(a, b),
    "pow_scalar_and_tensor": lambda a, b, c: torch._foreach_pow(0.9, b),
    "pow_list_scalar": lambda a, b, c: torch._foreach_pow(b, 2.0),
    "maximum_list": lambda a, b, c: torch._foreach_maximum(a, c),
    "maximum_scalar": lambda a, b, c: torch._foreach_maximum(a, 0.1),
    "addcmul_scalar": lambda a, b, c: torch._foreach_addcmul(a, b, c, value=0.25),
    "addcdiv_scalarlist": lambda a, b, c: torch._foreach_addcdiv(a, c, b, [0.5, -0.5]),
    "lerp_scalar": lambda a, b, c: torch._foreach_lerp(a, c, 0.1),
    "lerp_list": lambda a, b, c: torch._foreach_lerp(a, c, b),
    "sqrt": lambda a, b, c: torch._foreach_sqrt(b),
    "neg_abs_sign_reciprocal": lambda a, b, c: (torch._foreach_neg(a) + torch._foreach_abs(a)
                                                + torch._foreach_sign(a) + torch._foreach_reciprocal(b)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unrolled_values_identical(name):
    fn = CASES[name]
    args = _lists()
    gm = make_fx(lambda a, b, c: list(fn(a, b, c)), tracing_mode="fake")(*args)
    assert any("_foreach_" in str(n.target) for n in gm.graph.nodes)
    ref = copy.deepcopy(gm)
    counters.clear()
    unroll_foreach(gm, None)
    assert not any("_foreach_" in str(n.target) for n in gm.graph.nodes), gm.code
    assert counters["forge_compile"]["foreach unrolled"] >= 1
    for x, y in zip(gm(*args), ref(*args)):
        assert torch.equal(x, y)          # same op per entry: bit-identical
    for n in gm.graph.nodes:              # meta['val'] kept for Inductor
        if n.op == "call_function":
            assert "val" in n.meta


def test_unsupported_foreach_kept_and_counted():
    gm = make_fx(lambda a: list(torch._foreach_norm(a)), tracing_mode="fake")(_lists()[0])
    counters.clear()
    unroll_foreach(gm, None)
    assert any("_foreach_norm" in str(n.target) for n in gm.graph.nodes)
    assert any(k.startswith("foreach kept") for k in counters["forge_compile"])


def test_idempotent():
    args = _lists()
    gm = make_fx(lambda a, b, c: list(CASES["addcmul_scalar"](a, b, c)), tracing_mode="fake")(*args)
    unroll_foreach(gm, None)
    code = gm.code
    unroll_foreach(gm, None)
    assert gm.code == code


def test_lists_of_0d_tensors_stay_whole():
    """Step counters and what the optimizer computes from them (0-d entries only) stay one list
    op: the matcher reads them as scalars, and one foreach kernel does what would otherwise be a
    one-element kernel per entry. A list of shaped tensors beside them is still unrolled."""
    steps = [torch.tensor(3.0), torch.tensor(5.0)]
    a = _lists()[0]

    def fn(steps, a):
        bc = torch._foreach_pow(0.9, steps)
        bc = torch._foreach_sub(bc, 1.0)
        return list(torch._foreach_neg(bc)) + list(torch._foreach_mul(a, 2.0))

    gm = make_fx(fn, tracing_mode="fake")(steps, a)
    ref = copy.deepcopy(gm)
    counters.clear()
    unroll_foreach(gm, None)
    kept = sorted(str(n.target) for n in gm.graph.nodes if "_foreach_" in str(n.target))
    assert kept == ["aten._foreach_neg.default", "aten._foreach_pow.ScalarAndTensor",
                    "aten._foreach_sub.Scalar"], gm.code
    assert counters["forge_compile"]["foreach unrolled"] == 1
    assert not any(k.startswith("foreach kept") for k in counters["forge_compile"])
    for x, y in zip(gm(steps, a), ref(steps, a)):
        assert torch.equal(x, y)
