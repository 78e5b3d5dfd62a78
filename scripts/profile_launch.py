"""Where the host time of one fused-kernel launch goes (cProfile, tiny shape so the GPU waits on
the host): the Triton kernel vs the warp-specialised one, 300 launches each.
On the GPU device: python3 scripts/profile_launch.py [--n 300] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch
    from benchmarks.bench_fused_linear_update import make_case
    from forge_compile.kernels import fused_linear_update as flu
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    c = make_case(256, 256, 64, "adamw")
    args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps())
    for name, cfg in (("triton", flu._GPU_CONFIGS[0]), ("ws", flu._GPU_WS_CONFIGS[0])):
        for _ in range(5):
            flu.fused_linear_update_triton(*args, config=cfg, seed=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.n):
            flu.fused_linear_update_triton(*args, config=cfg, seed=0)
        torch.cuda.synchronize()
        us = (time.perf_counter() - t) / a.n * 1e6
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.n):
            flu.fused_linear_update_triton(*args, config=cfg, seed=0)
        torch.cuda.synchronize()
        prof.disable()
        print(f"== {name}: {us:.1f} us per launch (unprofiled)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
