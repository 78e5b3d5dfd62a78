"""Study: is the T=2048 fused kernel waiting on its dY/X loads? (docs/kernels.md, "Twelfth
session", run 28.)

Runs 24-27 ruled out the stream's bytes in flight and the DRAM bytes. What is left is the GEMM's
loads: beside the W/state stream ~10% of its dY/X reads miss L2, and the ring has 3 stages in
flight. This times the shipped T=2048 config (ws4) and the T=512 one (ws0) with dY and X as
overlapping views (row stride 64 elements) of a 0.5 MB buffer: every TMA load of the GEMM then
hits L2, and the kernel runs the same instructions on the same shapes. If the fused time drops
towards the stream alone, the dY/X loads are what it waits on. Run 29 adds the fused kernel
without the wgmma (``skip_mma``: the MMA warps still wait for every ring step's loads and refill
the ring): what the GEMM's loads alone cost the stream, against what the tensor cores add.

The results with overlapping operands are not an update anyone wants (only timed, never
checked); the plain rows are checked elsewhere (the study script's correctness pass).
Timings: medians of ``triton.testing.do_bench_cudagraph``, or with ``--do-bench`` of the
benchmark's ``do_bench`` (run 28b, thirteenth session) (4096², AdamW and SGD-momentum).
    python benchmarks/experiments/resident_operands.py [--out PATH] [--do-bench]
"""
from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import make_case, zero_grad_adamw_scalars  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws  # noqa: E402
from bench_fused_linear_update_tma import _ms, save_rows, study_args, study_setup  # noqa: E402

# a row stride of 64 bf16 elements (128 B: TMA's 16-byte rule holds) makes every row of the
# [T, 4096] view start 64 elements after the previous one: the whole view spans T·64 + 4096
# elements, 0.27 MB at T=2048, resident in L2 after the first touch
ROW_STRIDE = 64


def resident(t: torch.Tensor) -> torch.Tensor:
    T, W = t.shape
    base = torch.randn(T * ROW_STRIDE + W, device=t.device).div_(T ** 0.5).to(t.dtype)
    return base.as_strided((T, W), (ROW_STRIDE, 1))


def main():
    a = study_args(__doc__, "resident_operands.jsonl")
    t0 = time.time()
    rows, emit, _ = study_setup([], t0)
    for opt, T, ws in (("adamw", 2048, 4), ("sgd_momentum", 2048, 5), ("adamw", 512, 0)):
        cfg = flu._GPU_WS_CONFIGS[ws]
        c = make_case(4096, 4096, T, opt)
        row = {}
        for name, dy, x in (("plain", c["dy"], c["x"]),
                            ("resident", resident(c["dy"]), resident(c["x"]))):
            args = (dy, x, c["p"].clone(), [s.clone() for s in c["state"]], c["scalars"],
                    c["prog"], cfg)
            # the ring without the wgmma (grad 0: AdamW's m kept normal, as for the stream)
            zsc = zero_grad_adamw_scalars() if opt == "adamw" else c["scalars"]
            zargs = args[:4] + (zsc,) + args[5:]
            try:     # (the driver may refuse a tensor map whose rows overlap: say so, go on)
                row[f"fused {name}"] = round(_ms(lambda: fused_linear_update_ws(*args)), 4)
                row[f"gemm alone {name}"] = round(_ms(
                    lambda: fused_linear_update_ws(*args, skip_epilogue=True)), 4)
                row[f"fused without wgmma {name}"] = round(_ms(
                    lambda: fused_linear_update_ws(*zargs, skip_mma=True)), 4)
            except Exception as e:      # noqa: BLE001 (a study: record why and continue)
                row[f"error {name}"] = f"{type(e).__name__}: {e}"[:300]
        sc = zero_grad_adamw_scalars() if opt == "adamw" else c["scalars"]
        args = (c["dy"], c["x"], c["p"].clone(), [s.clone() for s in c["state"]], sc,
                c["prog"], cfg)
        row["stream alone"] = round(_ms(lambda: fused_linear_update_ws(*args, skip_gemm=True)), 4)
        emit(study="resident operands", optimizer=opt, N=4096, K=4096, T=T, config=f"ws{ws}",
             **row)
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
