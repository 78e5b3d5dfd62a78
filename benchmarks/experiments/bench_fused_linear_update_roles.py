"""Study: the role-split kernel (fused_linear_update_roles.py: GEMM on some SMs, the update on
the others, gradient tiles through a ring in L2) against the shipped warp-specialised kernel.

1. correctness of every config against the fp64 reference (the TMA study's check: AdamW,
   SGD-momentum, Lion; ragged shapes; bf16/fp16 operands; bf16 weights stochastically rounded);
   exits non-zero on a failure, before timing;
2. ``do_bench`` medians (the benchmark's method) of each config on the rows asked for, beside
   the shipped WS kernel with the config the autotuner picks there, the anchor (mm, then
   ``torch._fused_adamw_``/``_fused_sgd_``) and a copy of the same bytes; the update of every
   timed config is compared bit for bit with the WS kernel's on the same inputs.
    python3 benchmarks/experiments/bench_fused_linear_update_roles.py --out $OUT/roles.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    anchor_fns, forge_bytes, make_case)
from bench_fused_linear_update_tma import check_correctness, save_rows  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws  # noqa: E402
import fused_linear_update_roles as roles  # noqa: E402

R = roles.RolesConfig
CONFIGS = {
    "p25 ns3": R(PRODUCERS=0.25),
    "p15 ns3": R(PRODUCERS=0.15),
    "p20 ns4": R(PRODUCERS=0.20, NS=4),
    "p25 ns4": R(PRODUCERS=0.25, NS=4),
    "p35 ns4": R(PRODUCERS=0.35, NS=4),
    "p45 ns4": R(PRODUCERS=0.45, NS=4),
    "p55 ns4": R(PRODUCERS=0.55, NS=4),
    "p65 ns4": R(PRODUCERS=0.65, NS=4),
    "p25 ns4 cw32": R(PRODUCERS=0.25, NS=3, CW=32),
    "p45 256": R(BLOCK_K=256, num_stages=3, CW=8, NS=4, PRODUCERS=0.45),
    "p55 256": R(BLOCK_K=256, num_stages=3, CW=8, NS=4, PRODUCERS=0.55),
}
# the WS config the autotuner picked on each row in the 19:55 UTC bench
WS_PICK = {512: flu._GPU_WS_CONFIGS[0], 2048: flu._GPU_WS_CONFIGS[2]}


def main():
    import triton
    from triton.testing import do_bench
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rows", default="adamw:4096:4096:512,adamw:4096:4096:2048")
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    configs = {n: CONFIGS[n] for n in a.configs.split(",")}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {date}", flush=True)
    if not a.skip_check:
        bad = check_correctness({n: configs[n] for n in list(configs)[:2]}, roles.launch)
        print(f"correctness: {len(bad)} failures ({time.time() - t0:.0f} s)", flush=True)
        for b in bad:
            print("  FAIL", b, flush=True)
        if bad:
            sys.exit(1)
    rows = []
    for spec in a.rows.split(","):
        opt, N, K, T = spec.split(":")
        N, K, T = int(N), int(K), int(T)
        c = make_case(N, K, T, opt)
        nbytes = forge_bytes(N, K, T, len(c["state"]))
        src = torch.randn(nbytes // 8, device="cuda")
        dst = torch.empty_like(src)

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        base = {"copy": bench(lambda: dst.copy_(src)),
                "anchor": bench(anchor_fns(c, opt)["mm_bf16+cast"])}
        ws_cfg = WS_PICK[min(WS_PICK, key=lambda t: abs(t - T))]
        base["ws"] = bench(lambda: fused_linear_update_ws(
            c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], ws_cfg))
        print(f"{spec}: copy of {nbytes / 1e6:.0f} MB {base['copy']:.4f} ms; anchor "
              f"{base['anchor']:.4f}; WS {base['ws']:.4f} ms ({base['ws'] / base['anchor']:.3f}x, "
              f"{base['copy'] / base['ws']:.0%} of copy)", flush=True)
        for name, cfg in configs.items():
            # the same inputs through the WS kernel: the updates must agree (the GEMMs'
            # summation orders may differ, so bitwise equality is reported, not required)
            p1, s1 = c["p"].clone(), [s.clone() for s in c["state"]]
            pr, sr = c["p"].clone(), [s.clone() for s in c["state"]]
            fused_linear_update_ws(c["dy"], c["x"], pr, sr, c["scalars"], c["prog"], ws_cfg)
            roles.launch(c["dy"], c["x"], p1, s1, c["scalars"], c["prog"], cfg)
            torch.cuda.synchronize()
            rel = max(((u - v).norm() / v.norm()).item() for u, v in zip((p1, *s1), (pr, *sr)))
            same = all(torch.equal(u, v) for u, v in zip((p1, *s1), (pr, *sr)))
            ms = bench(lambda: roles.launch(c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                            c["prog"], cfg))
            row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=triton.__version__, date=date, optimizer=opt, N=N, K=K, T=T,
                       config=name, cfg=repr(cfg), ms=round(ms, 4),
                       ws_ms=round(base["ws"], 4), anchor_ms=round(base["anchor"], 4),
                       copy_ms=round(base["copy"], 4), of_anchor=round(ms / base["anchor"], 3),
                       of_copy=round(base["copy"] / ms, 3), rel_vs_ws=rel, bitwise_vs_ws=same)
            rows.append(row)
            print(f"  {name:14s} {ms:.4f} ms  {row['of_anchor']:.3f}x anchor  "
                  f"{row['of_copy']:.0%} of copy  vs WS: rel {rel:.1e} bitwise {same}",
                  flush=True)
    if a.out:
        save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
