"""Does asking L2 for each CTA's first tile at kernel start (``L2_PREFETCH``) shorten the
warp-specialised kernel? Levels: 0 none, 1 the first tile's dY/X panels, 2 its W/state rows,
3 both (``fused_linear_update_ws.l2_prefetch_source``).

Why: every CTA starts with a whole GEMM before its first update, so for the first tile's
GEMM DRAM serves only dY/X, through a ring with STAGES - 1 loads in flight, and the W/state
stream waits. ``do_bench`` zeroes 256 MB before each run, so dY/X come from DRAM cold;
``do_bench_cudagraph`` runs back to back with them still in L2. That difference is 0.1648 vs
0.1585 ms at AdamW 4096² T=512 (timing_modes.py, 2026-11-23), and memset's dirty lines
explain 1.7% of it.

Timing: ``triton.testing.do_bench`` medians (the benchmark's method) and
``do_bench_cudagraph`` medians. Every level's result is compared bit for bit with level 0's
(same inputs; a prefetch cannot change what is computed). On the GPU device:
  python3 benchmarks/experiments/l2_prefetch.py --out $OUT/l2_prefetch.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.bench_fused_linear_update import forge_bytes, make_case  # noqa: E402
from benchmarks.experiments.bench_fused_linear_update_tma import save_rows  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws  # noqa: E402

# the shipped warp-specialised candidates and the half hand-off (study run 10: 0.6% ahead of
# its whole-tile twin at T=512)
CONFIGS = {
    "ws:0 rows e16 bt64 st3 sl2": flu._GPU_WS_CONFIGS[0],
    "ws:1 rows e16 bt32 st4 sl4": flu._GPU_WS_CONFIGS[1],
    "ws:2 rows e8 bt64 st3 sl2": flu._GPU_WS_CONFIGS[2],
    "rows-half e16 bt32 st4 sl4": dataclasses.replace(flu._GPU_WS_CONFIGS[1],
                                                      WS="epi_rows_half"),
}
ROWS = [("adamw", 4096, 4096, 512), ("adamw", 4096, 4096, 2048), ("adamw", 11008, 4096, 512),
        ("sgd_momentum", 4096, 4096, 512)]


def main() -> None:
    import triton
    from triton.testing import do_bench, do_bench_cudagraph
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--levels", default="0,1,2,3")
    a = ap.parse_args()
    levels = [int(v) for v in a.levels.split(",")]
    t0 = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {date}", flush=True)
    rows = []
    for opt, N, K, T in ROWS:
        c = make_case(N, K, T, opt)
        nbytes = forge_bytes(N, K, T, len(c["state"]))
        for name, cfg in CONFIGS.items():
            ref = None
            for lvl in levels:
                p, st = c["p"].clone(), [s.clone() for s in c["state"]]

                def run(p=p, st=st, cfg=cfg, lvl=lvl):
                    fused_linear_update_ws(c["dy"], c["x"], p, st, c["scalars"], c["prog"],
                                           cfg, seed=0, l2_prefetch=lvl)
                # one update from the case's inputs, for the bit-for-bit check
                p1, s1 = c["p"].clone(), [s.clone() for s in c["state"]]
                fused_linear_update_ws(c["dy"], c["x"], p1, s1, c["scalars"], c["prog"], cfg,
                                       seed=0, l2_prefetch=lvl)
                out = [p1, *s1]
                ref = out if ref is None else ref
                same = all(torch.equal(u, r) for u, r in zip(out, ref))
                db = do_bench(run, warmup=25, rep=200, return_mode="median")
                gr = do_bench_cudagraph(run, rep=100, return_mode="median")
                row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, date=date, optimizer=opt, N=N, K=K, T=T,
                           config=name, l2_prefetch=lvl, do_bench_ms=round(db, 4),
                           graph_ms=round(gr, 4), GBps_do_bench=round(nbytes / db / 1e6, 1),
                           equal_to_level0=same)
                rows.append(row)
                print(f"{opt:12s} {N}x{K} T={T:<5d} {name:28s} L2_PREFETCH={lvl}  do_bench "
                      f"{db:.4f} ms  graph {gr:.4f} ms  equal {same}", flush=True)
                del p, st, p1, s1, out
    if a.out:
        save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
