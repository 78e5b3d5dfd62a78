"""``forge_compile::grad_sqnorm(a, b)``: the squared Frobenius norm of the product ``a @ b``, a
weight's gradient ``dYᵀ·X``, without the whole gradient ever existing.

``torch.nn.utils.clip_grad_norm_`` scales every gradient by ``max_norm / ‖all gradients‖``, so
every update waits for every gradient's norm. The ``rewrite_grad_norms`` pass
(forge_compile/passes/grad_norm.py) replaces a weight's norm with the square root of this op on
the GEMM's operands; the gradient is then read by its update only, which the fused op computes
(the clip's scale becomes one of its scalars). The cost is a second weight-gradient GEMM.

The product is computed in blocks of rows, at most ``BLOCK_BYTES`` of it at a time, in the
operands' dtype, as eager's backward makes the gradient (a bf16 GEMM's output is bf16 under
autocast, and eager's norm reads that rounded value); squares are summed in fp32, as
``_foreach_norm`` does on fp32 gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grad_sqnorm", "BLOCK_BYTES"]

# At most 64 MiB of the product lives at once: the same cap as the split-GEMM mode's gradient
# blocks (fused_linear_update.split_gemm_mb), large enough for cuBLAS to run at full rate on a
# block (16 MiB blocks cost the split-GEMM mode up to 1.7x at T=512, docs/kernels.md).
BLOCK_BYTES = 64 << 20


@torch.library.custom_op("forge_compile::grad_sqnorm", mutates_args=())
def grad_sqnorm(a: Tensor, b: Tensor) -> Tensor:
    """Σ (a @ b)², a 0-d fp32 tensor on a's device."""
    out = torch.zeros((), dtype=torch.float32, device=a.device)
    row_bytes = max(1, b.shape[1] * a.element_size())
    rows = max(1, BLOCK_BYTES // row_bytes)
    for r in range(0, a.shape[0], rows):
        # summed in fp32 without an fp32 copy of a bf16 block (64 MiB would take 128 more);
        # the square of the fp32 norm is within 2 ulp of Σ of the squares
        blk = torch.mm(a[r:r + rows], b)
        out += torch.linalg.vector_norm(blk, dtype=torch.float32).square()
    return out


@grad_sqnorm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"grad_sqnorm: a @ b needs 2-D a (M×K) and b (K×N), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return a.new_empty((), dtype=torch.float32)
