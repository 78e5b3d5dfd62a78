"""Study: does the autotuner's final round pick the fastest config when the GPU's power limiter
drifts? (docs/kernels.md, "Thirteenth session", run 34.)

Runs 30-32 found the H100 at its 700 W limit within a timing at T >= 2048, and the bench's
autotune log had a finalist at 1.278 ms in the first pass and 1.433 in the final round (AdamW
11008x4096 T=8192). Two final rounds on the same first-pass finalists, alternating which runs
first:
  sequential   each finalist for 100 ms in turn (the tuner before this session)
  interleaved  fused_linear_update._final_pick: 4 rounds of 25 ms, every finalist once per
               round, lowest median (the tuner now)
Then every finalist is timed for the truth: 6 interleaved rounds of do_bench(rep=100), median.
A pick's loss = truth(pick) / truth(best) - 1. Rows where the tuner's choice moved between
bench runs (AdamW T=2048 and T=8192, SGD-m 4096x11008 T=2048) and AdamW 4096² T=512.
    TUNER_REPS=4 python benchmarks/experiments/tuner_stability.py [--out PATH]
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import config_label, make_case  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from bench_fused_linear_update_tma import save_rows, study_args, study_setup  # noqa: E402

KEYS = [("adamw", 4096, 4096, 2048), ("adamw", 4096, 11008, 2048),
        ("adamw", 11008, 4096, 8192), ("sgd_momentum", 4096, 11008, 2048),
        ("adamw", 4096, 4096, 512)]


def short(c: flu.KernelConfig) -> str:
    return config_label(dataclasses.asdict(c))


def main():
    from triton.testing import do_bench
    a = study_args(__doc__, "tuner_stability.jsonl")
    reps = int(os.environ.get("TUNER_REPS", "4"))
    t0 = time.time()
    rows, emit, _ = study_setup([], t0)
    for opt, N, K, T in KEYS:
        c = make_case(N, K, T, opt)
        dy, x = c["dy"], c["x"]
        prog = flu.load_program(c["prog"])
        precision = flu._input_precision(dy, x)
        p2, s2 = c["p"].clone(), [s.clone() for s in c["state"]]
        cands = flu.candidate_configs(dy, x, p2, s2)

        def time_ms(cfg, rep=25):
            return do_bench(lambda: flu._run(dy, x, p2, s2, c["scalars"], prog, cfg,
                                             precision, 0),
                            warmup=5, rep=rep, quantiles=[0.5])
        for cfg in cands:                      # compile everything before any timing
            flu._run(dy, x, p2, s2, c["scalars"], prog, cfg, precision, 0)
        torch.cuda.synchronize()
        picks = {"sequential": [], "interleaved": []}
        finalists = set()
        for r in range(reps):
            first = sorted((time_ms(cfg), i, cfg) for i, cfg in enumerate(cands))
            finals = [cfg for _, _, cfg in first[:3]]
            finalists.update(finals)
            order = ("sequential", "interleaved") if r % 2 == 0 else ("interleaved",
                                                                     "sequential")
            for how in order:
                if how == "sequential":
                    pick = min(finals, key=lambda cfg: time_ms(cfg, rep=100))
                else:
                    pick = flu._final_pick(finals, time_ms)
                picks[how].append(pick)
        finalists = sorted(finalists, key=short)
        truth = {cfg: [] for cfg in finalists}
        for _ in range(6):
            for cfg in finalists:
                truth[cfg].append(time_ms(cfg, rep=100))
        truth = {cfg: statistics.median(v) for cfg, v in truth.items()}
        best = min(truth.values())
        for how, ps in picks.items():
            losses = [truth[p] / best - 1 for p in ps]
            emit(study="tuner final round", optimizer=opt, N=N, K=K, T=T, final_round=how,
                 picks=[short(p) for p in ps], loss_pct=[round(100 * v, 2) for v in losses],
                 mean_loss_pct=round(100 * statistics.mean(losses), 2))
        emit(study="tuner truth", optimizer=opt, N=N, K=K, T=T,
             truth_ms={short(cfg): round(ms, 4) for cfg, ms in truth.items()})
        torch.cuda.empty_cache()
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
