"""forge_compile::grad_sqnorm: Σ (A·B)² without the product whole, against the product's own
norm (float64 reference), in one block and in many."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from forge_compile.kernels import grad_norm
from forge_models import interpreted_json

SQNORM = torch.ops.forge_compile.grad_sqnorm.default


def _operands(dtype, m=37, k=19, n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=g).to(dtype).t()      # dYᵀ: a transposed view, as the graph has
    b = torch.randn(k, n, generator=g).to(dtype)
    return a, b


@pytest.mark.parametrize("block_rows", [None, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_sqnorm_matches_the_products_norm(dtype, block_rows, monkeypatch):
    """fp32 operands: within 1e-6 of the float64 norm² of the fp32 product. bf16 operands: the
    product is rounded to bf16 first, as eager's bf16 GEMM makes the gradient, so the reference
    is that rounded product's norm² (within 1e-6); blocks of 1 and 5 rows give the same."""
    a, b = _operands(dtype)
    if block_rows is not None:
        monkeypatch.setattr(grad_norm, "BLOCK_BYTES", block_rows * b.shape[1] * a.element_size())
    got = SQNORM(a, b)
    prod = torch.mm(a, b).double()
    want = prod.square().sum()
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.double() - want) <= 1e-6 * want, (got.item(), want.item())
    if dtype == torch.bfloat16:      # not the unrounded product's: that differs by ~1e-3
        exact = torch.mm(a.double(), b.double()).square().sum()
        assert abs(want - exact) > 1e-6 * exact


def test_grad_sqnorm_fake_and_bad_shapes():
    with FakeTensorMode():
        out = SQNORM(torch.empty(8, 4, dtype=torch.bfloat16), torch.empty(4, 6, dtype=torch.bfloat16))
        assert out.shape == () and out.dtype == torch.float32
        with pytest.raises(ValueError, match="needs 2-D a .* and b"):
            SQNORM(torch.empty(8, 4), torch.empty(5, 6))


# ============================================================================ Triton kernel
# The kernel against the product's norm², the partials poisoned with NaN (an unwritten tile
# makes the sum NaN). Tolerance 1e-6 relative for every dtype: fp32 (IEEE dots) against the
# float64 product, whose fp32 accumulation errs by ~sqrt(T)·6e-8 an element and averages out
# in the sum; bf16/fp16 against torch.mm's product in that dtype (rounded once from fp32 as the
# kernel rounds its tile), where a rounding that flips by one ulp between the two accumulation
# orders is rarer than 1 element in 1,000 and moves the sum by less than 1e-7.
SQNORM_RTOL = 1e-6
_INTERP_CASES = {   # name -> (dtype, m, k, n): m×k (a, dYᵀ) times k×n (b, X)
    "ragged_fp32": (torch.float32, 37, 19, 23),
    "ragged_bf16": (torch.bfloat16, 37, 19, 23),
    "ragged_fp16": (torch.float16, 37, 19, 23),
    "even_bf16": (torch.bfloat16, 64, 32, 64),      # EVEN_T and EVEN_NK with 32x32x16 tiles
    "strided_bf16": (torch.bfloat16, 40, 17, 33),   # b a column slice with stride 2
}


def _reference(a, b) -> float:
    prod = torch.mm(a.double(), b.double()) if a.dtype == torch.float32 else torch.mm(a, b)
    return float(prod.double().square().sum())


def _interp_operands(name):
    dtype, m, k, n = _INTERP_CASES[name]
    a, b = _operands(dtype, m, k, n, seed=len(name))
    if name.startswith("strided"):
        b = _operands(dtype, m, k, 2 * n, seed=1)[1][:, ::2]
    return a, b


def _main_interpreter():
    """Run in a subprocess with TRITON_INTERPRET=1 and FORGE_CPU_TRITON=1: each case through
    the op (which must pick the Triton kernel), the relative error printed as JSON."""
    import json
    grad_norm.POISON = float("nan")
    out = {}
    for name in _INTERP_CASES:
        a, b = _interp_operands(name)
        how = grad_norm.chosen(a, b)
        got = float(SQNORM(a, b))
        want = _reference(a, b)
        out[name] = {"how": repr(how), "rel": abs(got - want) / want}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    return interpreted_json(__file__, timeout=300)


@pytest.mark.parametrize("name", sorted(_INTERP_CASES))
def test_grad_sqnorm_triton_interpreted(interpreted, name):
    """The Triton kernel under the interpreter, through the op: ragged tiles and T, fp32 /
    bf16 / fp16, strided operands, within SQNORM_RTOL of the product's norm²."""
    res = interpreted[name]
    assert res["how"].startswith("SqnormConfig("), res
    assert res["rel"] <= SQNORM_RTOL, res


def test_grad_sqnorm_mm_on_cpu_without_the_interpreter(monkeypatch):
    """Without FORGE_CPU_TRITON the CPU op runs torch.mm blocks."""
    monkeypatch.delenv("FORGE_CPU_TRITON", raising=False)
    a, b = _operands(torch.bfloat16)
    assert grad_norm.chosen(a, b) == "mm"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1000, 333, 3000), (512, 256, 768)],
                         ids=["1000x333x3000", "512x256x768"])
def test_gpu_grad_sqnorm_every_candidate(dtype, shape, monkeypatch):
    """Every CUDA candidate (Triton configs and "mm") and the op's timed pick, a = dYᵀ as a
    transposed view, within SQNORM_RTOL of the product's norm², partials poisoned."""
    monkeypatch.setattr(grad_norm, "POISON", float("nan"))
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m + k)
    a = torch.randn(k, m, generator=g, device="cuda").to(dtype).t()
    b = torch.randn(k, n, generator=g, device="cuda").to(dtype)
    want = _reference(a, b)
    for how in grad_norm.sqnorm_candidates(a, b):
        got = float(grad_norm._run(a, b, how))
        assert abs(got - want) <= SQNORM_RTOL * want, (how, got, want)
    assert abs(float(SQNORM(a, b)) - want) <= SQNORM_RTOL * want


def test_grad_sqnorm_deterministic_mode_runs_mm(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the op runs "mm" in every process (the
    timed pick may differ between processes, and each candidate sums in its own order), unless
    torch.mm's fp32 dots are not the fused update's; where the Triton kernel could run (the
    interpreter's environment) it is picked otherwise."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FORGE_CPU_TRITON", "1")
    monkeypatch.setattr(grad_norm, "_CHOSEN", {})
    a, b = _operands(torch.bfloat16)
    assert isinstance(grad_norm.chosen(a, b), grad_norm.SqnormConfig)
    monkeypatch.setattr(grad_norm, "_CHOSEN", {})
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert grad_norm.chosen(a, b) == "mm"
        # fp32 with FORGE_FP32_DOT=tf32: torch.mm (TF32 flag off) would not compute the dots
        # the fused update uses, so even here the Triton kernel runs
        a32, b32 = _operands(torch.float32)
        assert grad_norm.chosen(a32, b32) == "mm"
        monkeypatch.setenv("FORGE_FP32_DOT", "tf32")
        monkeypatch.setattr(grad_norm, "_CHOSEN", {})
        assert isinstance(grad_norm.chosen(a32, b32), grad_norm.SqnormConfig)
    finally:
        torch.use_deterministic_algorithms(was)


if __name__ == "__main__" and "--interpreter" in __import__("sys").argv:
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _main_interpreter()
