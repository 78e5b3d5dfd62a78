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
    ap.add_argument("--layers-only", action="store_true", help="only the per-layer table")
    ap.add_argument("--split-only", action="store_true",
                    help="only the split-GEMM mode's host time (its plan, cuBLAS's mm with an "
                         "fp32 result beside a plain mm) and its cProfile")
    a = ap.parse_args()
    if a.split_only:
        split(a.n, a.top)
        return
    layers(a.n)
    if a.layers_only:
        return
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


def split(n: int, top: int) -> None:
    """Host µs per call of the split-GEMM mode on the tiny shape, through its plan (one row
    block), beside its parts: torch.mm with an fp32 result (the block's gradient) and a plain
    bf16 torch.mm; then where the plan's calls spend it (cProfile)."""
    import torch
    from benchmarks.bench_fused_linear_update import host_us_per_launch, make_case, us_per_call
    from forge_compile.kernels import fused_linear_update as flu
    cfg = flu._GPU_SPLIT_CONFIGS[0]
    c = make_case(256, 256, 64, "adamw")
    a, b = c["dy"].t(), c["x"]
    print(f"== torch.mm, fp32 result: {us_per_call(lambda: flu._mm_fp32(a, b), n):.1f} us; "
          f"plain: {us_per_call(lambda: torch.mm(a, b), n):.1f} us", flush=True)
    hits = flu.PLAN_STATS["hits"]
    us = host_us_per_launch(cfg, n)
    print(f"== split-GEMM ({cfg}): {us:.1f} us per call, "
          f"{flu.PLAN_STATS['hits'] - hits} plan hits", flush=True)
    prof = cProfile.Profile()
    host_us_per_launch(cfg, n, profile=prof)
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def layers(n: int) -> None:
    """Host µs per call of each layer of the warp-specialised launch, outermost last, on the
    tiny shape (the GPU waits on the host), beside the anchor's own launches: what each layer
    adds. Layers: Triton's ``CompiledKernel[grid]`` with prepared arguments (its launcher: the
    TMA descriptors' encoding and the driver call), the launch cache's key and lookup, building
    the arguments (ws_launch_args), the entry points with their checks and tuned lookup."""
    import torch
    from benchmarks.bench_fused_linear_update import anchor_fns, make_case, us_per_call
    from forge_compile.kernels import fused_linear_update as flu
    from forge_compile.kernels import launch_cache
    from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws, ws_launch_args
    c = make_case(256, 256, 64, "adamw")
    dy, x, p, st, sc, prog = c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps()
    cfg = flu._GPU_WS_CONFIGS[0]
    k, grid, args, kw = ws_launch_args(dy, x, p, st, sc, prog, cfg)
    ck = launch_cache.launch(k, grid, *args, **kw)       # compiles, fills the cache
    vals = launch_cache.bound(k, args, kw)[1]
    g3 = launch_cache.grid3(grid)
    steps = {
        "CompiledKernel[grid](*args)": lambda: ck[g3](*vals),
        "launch_cache.launch": lambda: launch_cache.launch(k, grid, *args, **kw),
        "ws_launch_args (no launch)": lambda: ws_launch_args(dy, x, p, st, sc, prog, cfg),
        "fused_linear_update_ws": lambda: fused_linear_update_ws(dy, x, p, st, sc, prog, cfg),
        "fused_linear_update_triton(config=ws)": lambda: flu.fused_linear_update_triton(
            dy, x, p, st, sc, prog, config=cfg, seed=0),
        "fused_linear_update_triton(config=triton)": lambda: flu.fused_linear_update_triton(
            dy, x, p, st, sc, prog, config=flu._GPU_CONFIGS[0], seed=0),
        "anchor: torch.mm": lambda: torch.mm(dy.t(), x),
        **{f"anchor: {name}": f for name, f in anchor_fns(c, "adamw").items()},
    }
    print("== layers (host µs per call, 256×256×64 AdamW, "
          f"{n} calls after 5 warm-up; WS config {cfg})")
    for name, f in steps.items():
        print(f"   {name:45s} {us_per_call(f, n):8.1f}", flush=True)


def _args():
    from benchmarks.bench_fused_linear_update import make_case
    c = make_case(256, 256, 64, "adamw")
    return c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps()


if __name__ == "__main__":
    main()
