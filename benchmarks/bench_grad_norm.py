"""Benchmark: ``forge_compile::grad_sqnorm`` (a weight gradient's norm² from dY and X, for
clip_grad_norm_), every implementation, on one CUDA GPU.

Per row (the product's N×K, T tokens, operand dtype), medians of the fused kernel's tuner clock
(``fused_linear_update.gpu_time_ms``: L2 flushed before each launch, the host's launch time
kept out):
  mm_only_ms  torch.mm(dYᵀ, X) alone, whole, in the operands' dtype: the GEMM a norm of the
              gradient needs anyway, what eager's backward makes
  mm_ms       the "mm" path: torch.mm in blocks of at most 64 MiB, each block's norm
  triton_ms   {config: ms} for each Triton candidate (the product squared and summed in registers)
  pick        what the op picks (its own timing, once per shape and process)
Shapes: the 953M Llama's weights (2048², 5632×2048, 2048×5632, 32000×2048) and 4096², at
T = 512, 2048 and 4096. Appends one JSON object per row to benchmarks/results/grad_norm.jsonl.
    python benchmarks/bench_grad_norm.py [--dtypes bfloat16,float32] [--tokens 512,2048,4096]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels import grad_norm  # noqa: E402

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048), (4096, 4096)]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "grad_norm.jsonl")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--tokens", default="512,2048,4096")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_grad_norm: needs a CUDA GPU")
    import triton
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"# {info}")
    print("| dtype | N×K | T | mm alone ms | mm blocks + norm ms | best Triton ms (config) | "
          "pick | best vs mm blocks |")
    print("|---|---|---|---|---|---|---|---|")
    with open(a.out, "a") as f:
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            for N, K in SHAPES:
                for T in map(int, a.tokens.split(",")):
                    dy = torch.randn(T, N, device="cuda").to(dtype)
                    x = torch.randn(T, K, device="cuda").to(dtype)
                    at = dy.t()                       # as the graph passes it: a view
                    mm_only = flu.gpu_time_ms(lambda: torch.mm(at, x))
                    mm = flu.gpu_time_ms(lambda: grad_norm.grad_sqnorm_mm(at, x))
                    tri = {}
                    for c in grad_norm.sqnorm_candidates(at, x):
                        if c != "mm":
                            tri[repr(c)] = flu.gpu_time_ms(
                                lambda: grad_norm.grad_sqnorm_triton(at, x, c))
                    pick = grad_norm.chosen(at, x)
                    best = min(tri, key=tri.get)
                    row = dict(info, dtype=dt, N=N, K=K, T=T, mm_only_ms=mm_only, mm_ms=mm,
                               triton_ms=tri, pick=repr(pick),
                               tflops_best=2 * N * K * T / tri[best] / 1e9)
                    f.write(json.dumps(row) + "\n")
                    print(f"| {dt} | {N}×{K} | {T} | {mm_only:.4f} | {mm:.4f} | "
                          f"{tri[best]:.4f} ({best[13:-1]}) | {pick if pick == 'mm' else repr(pick)[13:-1]} | "
                          f"{tri[best] / mm:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
