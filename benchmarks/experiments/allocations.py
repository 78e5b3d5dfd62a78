"""Study run 50: within one process, does where W, m and v were allocated move the AdamW 4096²
rows, the fused kernel and the anchor alike? (docs/kernels.md, "Eighteenth session".)

Why: the T=512 row reads 0.1545-0.1549 ms in the study's processes and 0.156-0.158 in the
bench's, and run 35 timed the op on fresh copies of W and the state 0.9% faster than on the
case's own tensors in the same process. 0.6× the anchor (0.1539-0.1550 ms) lies inside that
spread. If the spread follows the allocation (the physical pages under W, m and v), then one
bench row is one draw, and the question is whether the ratio to the anchor moves with it.

Per row: the case of the benchmark (``make_case``), the op tuned once, then ``--sets`` sets of
W, m, v, each a clone of the case's made by its own allocations (nothing freed between them),
so each set has its own pages. Interleaved rounds, each set timed with the benchmark's
``do_bench`` (a 256 MB memset before each call, median): the op in place; the anchor (mm, cast,
``torch._fused_adamw_``) on the same W, m, v; and a device copy of W into a scratch tensor (a
plain stream over the same pages). Correctness: before any timing, one call of the op on each
set must give the same W, m, v bit for bit as on set 0 (same inputs, deterministic kernel).
With ``--mix``: the op on the 8 mixes of the slowest and the fastest set's W, m and v.
    python benchmarks/experiments/allocations.py [--out PATH] [--sets 8] [--rounds 4] [--mix]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    anchor_fns, make_case)
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from bench_fused_linear_update_tma import save_rows, study_setup  # noqa: E402


def interleaved(fns: dict, rounds: int):
    """``fns``: case -> name -> callable. Each called once, then ``rounds`` interleaved rounds of
    the benchmark's ``do_bench`` (a 256 MB memset before each call, median) over all of them;
    returns (case -> name -> the rounds' times, case -> name -> their median), in ms."""
    from triton.testing import do_bench
    for fs in fns.values():
        for f in fs.values():
            f()
    times = {k: {n: [] for n in fs} for k, fs in fns.items()}
    for _ in range(rounds):
        for k, fs in fns.items():
            for n, f in fs.items():
                times[k][n].append(do_bench(f, warmup=25, rep=100, quantiles=[0.5]))
    return times, {k: {n: statistics.median(v) for n, v in d.items()} for k, d in times.items()}


def mix(emit, rounds, T, c, cfg, sets, med):
    """The op on W, m, v each taken from the slowest (S) or the fastest (F) set: if one
    tensor's pages set the time, the mixes split by that tensor; if the three together do,
    only the pure S and F reproduce the two ends."""
    from triton.testing import do_bench
    slow = max(med, key=lambda k: med[k]["op"])
    fast = min(med, key=lambda k: med[k]["op"])
    dy, x, sc, prog = c["dy"], c["x"], c["scalars"], c["prog"]
    fns = {}
    for pick in itertools.product("SF", repeat=3):
        src = [sets[slow if q == "S" else fast] for q in pick]
        p, m, v = src[0][0], src[1][1][0], src[2][1][1]
        fns["".join(pick)] = lambda p=p, m=m, v=v: flu.fused_linear_update_triton(
            dy, x, p, [m, v], sc, prog)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(do_bench(f, warmup=25, rep=100, quantiles=[0.5]))
    for k, v in times.items():
        emit(study="allocations mix", optimizer="adamw", N=4096, K=4096, T=T, mix=k,
             slow_set=slow, fast_set=fast, config=str(cfg),
             op_ms=round(statistics.median(v), 4), rounds=[round(t, 4) for t in v])
    print(f"T={T} mixes (W, m, v from the slow set {slow} = S or the fast set {fast} = F): "
          + ", ".join(f"{k} {statistics.median(v):.4f}" for k, v in times.items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "allocations.jsonl"))
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--mix", action="store_true", help="then the op on the 8 mixes of the "
                    "slowest and the fastest set's W, m and v: one tensor's pages, or the three "
                    "together?")
    a = ap.parse_args()
    t0 = time.time()
    bad, cases = [], {}
    for T in map(int, a.tokens.split(",")):     # correctness first, as every study does
        c = make_case(4096, 4096, T, "adamw")
        dy, x, sc, prog = c["dy"], c["x"], c["scalars"], c["prog"]
        flu.fused_linear_update_triton(dy, x, c["p"].clone(), [s.clone() for s in c["state"]],
                                       sc, prog)          # tunes on scratch copies
        sets = [(c["p"].clone(), [s.clone() for s in c["state"]]) for _ in range(a.sets)]
        for p, st in sets:
            flu.fused_linear_update_triton(dy, x, p, st, sc, prog)
        for k, (p, st) in enumerate(sets):
            if not all(torch.equal(u, v) for u, v in zip([p, *st], [sets[0][0], *sets[0][1]])):
                bad.append(f"T={T} set {k} differs from set 0 after one call")
        cases[T] = (c, sets)
    rows, emit, _ = study_setup(bad, t0)                  # exits 1 on a failure
    for T, (c, sets) in cases.items():
        dy, x, sc, prog = c["dy"], c["x"], c["scalars"], c["prog"]
        cfg = flu.tuned_config(dy, x, c["p"], c["state"], sc, prog)
        scratch = torch.empty_like(c["p"])
        fns = {}
        for k, (p, st) in enumerate(sets):
            ck = dict(c, p=p, state=st)
            fns[k] = {
                "op": lambda p=p, st=st: flu.fused_linear_update_triton(dy, x, p, st, sc, prog),
                "anchor": anchor_fns(ck, "adamw")["mm_bf16+cast"],
                "copy": lambda p=p: scratch.copy_(p)}
        times, med = interleaved(fns, a.rounds)
        for k, m in med.items():
            emit(study="allocations", optimizer="adamw", N=4096, K=4096, T=T, set=k,
                 config=str(cfg), op_ms=round(m["op"], 4), anchor_ms=round(m["anchor"], 4),
                 op_vs_anchor=round(m["op"] / m["anchor"], 4), copy_ms=round(m["copy"], 4),
                 rounds={n: [round(t, 4) for t in v] for n, v in times[k].items()},
                 data_ptrs=[t.data_ptr() for t in [sets[k][0], *sets[k][1]]])
        spread = {n: (min(m[n] for m in med.values()), max(m[n] for m in med.values()))
                  for n in ("op", "anchor", "copy")}
        ratios = [m["op"] / m["anchor"] for m in med.values()]
        print(f"T={T}: " + ", ".join(f"{n} {lo:.4f}-{hi:.4f} ms ({100 * (hi / lo - 1):.1f}%)"
                                     for n, (lo, hi) in spread.items())
              + f"; op/anchor {min(ratios):.3f}-{max(ratios):.3f}", flush=True)
        if a.mix:
            mix(emit, a.rounds, T, c, cfg, sets, med)
        del sets, fns, c
        cases[T] = None
        torch.cuda.empty_cache()
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
