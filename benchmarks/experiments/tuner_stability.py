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

Run 40 (fifteenth session, ``TUNER_MODE=first-pass``): the final round only chooses among the
first pass's three fastest, and the first pass times every candidate once for 25 ms, in list
order (the warp-specialised configs, the winners at T >= 2048, last). In the bench at 05:26 UTC
the tuner left the load-warp candidate out on SGD-m 4096x11008 T=2048 (0.447-0.450 ms against
0.429-0.432 with it, 4%). Per key: the truth for every candidate (6 interleaved rounds of
do_bench(rep=100)), then TUNER_REPS tunings, each with the first pass's timings of every
candidate and the picks of final rounds on the first pass's 3 and 5 fastest. The question: how
often the truly fastest misses the finalists, and what more finalists cost.
    TUNER_MODE=first-pass TUNER_REPS=4 python benchmarks/experiments/tuner_stability.py
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
# run 40: every T=2048 row of the bench and the T=512 target row
FIRST_PASS_KEYS = [(o, N, K, 2048) for o in ("adamw", "sgd_momentum")
                   for N, K in ((4096, 4096), (11008, 4096), (4096, 11008))] + [
                  ("adamw", 4096, 4096, 512)]


def short(c: flu.KernelConfig) -> str:
    return config_label(dataclasses.asdict(c))


def main():
    from triton.testing import do_bench
    a = study_args(__doc__, "tuner_stability.jsonl")
    reps = int(os.environ.get("TUNER_REPS", "4"))
    first_pass = os.environ.get("TUNER_MODE", "") == "first-pass"
    t0 = time.time()
    rows, emit, _ = study_setup([], t0)
    for opt, N, K, T in FIRST_PASS_KEYS if first_pass else KEYS:
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
        if first_pass:
            study_first_pass(emit, (opt, N, K, T), cands, time_ms, reps)
            torch.cuda.empty_cache()
            continue
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
        truth = dict(zip(finalists, truth_ms(finalists, time_ms)))
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


def truth_ms(configs, time_ms):
    """Each config's median over 6 interleaved rounds of ``time_ms(config, rep=100)``."""
    times = [[] for _ in configs]
    for _ in range(6):
        for t, cfg in zip(times, configs):
            t.append(time_ms(cfg, rep=100))
    return [statistics.median(t) for t in times]


def study_first_pass(emit, key, cands, time_ms, reps):
    """Run 40: the truth for every candidate, then ``reps`` tunings as the tuner runs them
    (first pass in list order, final round on the fastest 3 or 5)."""
    opt, N, K, T = key
    truth = truth_ms(cands, time_ms)
    best = min(truth)
    emit(study="tuner truth, all candidates", optimizer=opt, N=N, K=K, T=T,
         configs=[short(c) for c in cands], truth_ms=[round(v, 4) for v in truth])
    for r in range(reps):
        first = [time_ms(cfg) for cfg in cands]
        order = sorted(range(len(cands)), key=first.__getitem__)
        row = {"first_pass_ms": [round(v, 4) for v in first],
               "truth_best_rank": order.index(truth.index(best)) + 1}
        for k in (3, 5):
            pick = flu._final_pick([cands[i] for i in order[:k]], time_ms)
            row[f"pick_top{k}"] = short(pick)
            row[f"loss_top{k}_pct"] = round(100 * (truth[cands.index(pick)] / best - 1), 2)
        emit(study="tuner first pass", optimizer=opt, N=N, K=K, T=T, rep=r, **row)


if __name__ == "__main__":
    main()
