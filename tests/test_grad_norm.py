"""forge_compile::grad_sqnorm: Σ (A·B)² without the product whole, against the product's own
norm (float64 reference), in one block and in many."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from forge_compile.kernels import grad_norm

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
