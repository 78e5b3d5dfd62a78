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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from benchmarks.bench_fused_linear_update import host_us_per_launch
    from forge_compile.kernels import fused_linear_update as flu
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    for name, cfg in (("triton", flu._GPU_CONFIGS[0]), ("ws", flu._GPU_WS_CONFIGS[0])):
        us = host_us_per_launch(cfg, a.n)
        prof = cProfile.Profile()
        host_us_per_launch(cfg, a.n, profile=prof)
        print(f"== {name}: {us:.1f} us per launch (unprofiled)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
