"""Where the host time of one fused-kernel launch goes (cProfile, tiny shape so the GPU waits on
the host): the Triton kernel vs the warp-specialised one (with its launch cache,
forge_compile/kernels/launch_cache.py, off and on), 300 launches each, and through the op.
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
    from forge_compile.kernels.launch_cache import ENV_LAUNCH_CACHE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    for name, cfg in (("triton", flu._GPU_CONFIGS[0]), ("ws", flu._GPU_WS_CONFIGS[0])):
        for cached in ("0", "1") if cfg.WS else ("1",):
            os.environ[ENV_LAUNCH_CACHE] = cached
            us = host_us_per_launch(cfg, a.n)
            print(f"== {name}" + (f", launch cache {cached}" if cfg.WS else "")
                  + f": {us:.1f} us per launch (unprofiled)", flush=True)
        prof = cProfile.Profile()
        host_us_per_launch(cfg, a.n, profile=prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    # the op as a compiled step calls it: autotuned config, checks, launch (cache on)
    us = host_us_per_launch(None, a.n, launch=flu.fused_linear_update_)
    print(f"== op (autotuned: {flu.tuned_config(*_args())}): {us:.1f} us per launch", flush=True)
    prof = cProfile.Profile()
    host_us_per_launch(None, a.n, profile=prof, launch=flu.fused_linear_update_)
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


def _args():
    from benchmarks.bench_fused_linear_update import make_case
    c = make_case(256, 256, 64, "adamw")
    return c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps()


if __name__ == "__main__":
    main()
