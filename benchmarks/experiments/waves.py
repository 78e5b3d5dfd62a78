"""Study run 55: does the last, partial round of tiles cost the AdamW T ≤ 2048 rows their
missing 2-3%? (docs/kernels.md, "Twenty-second session".)

Why: 4096² in 128×128 tiles is 1024 tiles on 132 SMs, 7.76 rounds: every CTA walks tiles
pid, pid + 132, ..., so 100 CTAs run 8 tiles and 32 run 7, and in the last round 32 SMs idle.
If the kernel's rate is set per SM (bytes in flight per SM, Little's law), that round costs up
to 3% (8 rounds of work time for 7.76 of work); if it is set by DRAM, the 100 busy SMs keep it
saturated and it costs nothing. The study tells the two apart without changing the kernel:
the same config on N = 4096 and K = 3968, 4096, 4224 (992, 1024, 1056 tiles: 7.52, 7.76,
8.00 rounds, all 8 rounds deep). Per-SM bound: the three take about the same time; DRAM bound:
time follows bytes (0.969 : 1 : 1.031). A device copy of W (same pages, same bytes ratio) is
timed beside each as the DRAM-bound yardstick.

Per T: the case of the benchmark (``make_case``) at each K; the op tuned on 4096² and that
config forced on every K (and each K's own tuned config); interleaved rounds of the benchmark's
``do_bench`` (a 256 MB memset before each call, median). Correctness first, as the GPU tests check it: at
each K, one call of the forced config against the fp64 reference of the unfused update (W, m,
v norm-wise relative error ≤ 1e-5).
    python benchmarks/experiments/waves.py [--out PATH] [--rounds 4] [--tokens 512,2048]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import forge_bytes, make_case  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from allocations import interleaved  # noqa: E402
from bench_fused_linear_update_tma import save_rows, study_setup  # noqa: E402
import test_fused_linear_update as ref  # noqa: E402

KS = (3968, 4096, 4224)
RTOL = 1e-5


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "waves.jsonl"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", default="512,2048")
    a = ap.parse_args()
    t0 = time.time()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bad, cases = [], {}
    for T in map(int, a.tokens.split(",")):
        cs = {K: make_case(4096, K, T, "adamw") for K in KS}
        c = cs[4096]
        cfg = flu.tuned_config(c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"])
        for K, ck in cs.items():
            err = ref._errors(ck["prog"], ck["dy"], ck["x"], ck["p"], ck["state"], ck["scalars"],
                              lambda *a: flu.fused_linear_update_triton(*a, config=cfg, seed=0))
            if not err.pop("finite"):
                bad.append(f"T={T} K={K}: non-finite output")
            bad += [f"T={T} K={K} {name}: relative error {e:.2e} > {RTOL}"
                    for name, e in err.items() if not e <= RTOL]
        cases[T] = (cs, cfg)
    rows, emit, bw = study_setup(bad, t0)                  # exits 1 on a failure
    for T, (cs, cfg) in cases.items():
        fns = {}
        for K, ck in cs.items():
            dy, x, sc, prog, p, st = (ck[k] for k in ("dy", "x", "scalars", "prog", "p", "state"))
            own = flu.tuned_config(dy, x, p, st, sc, prog)
            scratch = torch.empty_like(p)
            fns[K] = {
                "forced": lambda dy=dy, x=x, p=p, st=st, sc=sc, prog=prog:
                    flu.fused_linear_update_triton(dy, x, p, st, sc, prog, config=cfg, seed=0),
                "own": lambda dy=dy, x=x, p=p, st=st, sc=sc, prog=prog, own=own:
                    flu.fused_linear_update_triton(dy, x, p, st, sc, prog, config=own, seed=0),
                "copy": lambda p=p, scratch=scratch: scratch.copy_(p)}
            ck["own_config"] = str(own)
        times, med = interleaved(fns, a.rounds)
        for K, m in med.items():
            tiles = (4096 // 128) * (K // 128)
            nbytes = forge_bytes(4096, K, T, 2)
            emit(study="waves", optimizer="adamw", N=4096, K=K, T=T, tiles_128=tiles,
                 rounds=round(tiles / sms, 3), config=str(cfg), own_config=cs[K]["own_config"],
                 forced_ms=round(m["forced"], 4), own_ms=round(m["own"], 4),
                 copy_ms=round(m["copy"], 4),
                 forced_frac_copy_bw=round(nbytes / (m["forced"] * 1e-3) / 1e9 / bw, 3),
                 forced_vs_4096=round(m["forced"] / med[4096]["forced"], 4),
                 copy_vs_4096=round(m["copy"] / med[4096]["copy"], 4),
                 bytes_vs_4096=round(nbytes / forge_bytes(4096, 4096, T, 2), 4),
                 samples={n: [round(t, 4) for t in v] for n, v in times[K].items()})
        print(f"T={T} forced {cfg}: " + ", ".join(
            f"K={K} {m['forced']:.4f} ms ({m['forced'] / med[4096]['forced']:.3f}; copy "
            f"{m['copy'] / med[4096]['copy']:.3f})" for K, m in med.items()), flush=True)
        del fns
        cases[T] = None
        torch.cuda.empty_cache()
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
