"""Study: the persistent TMA-fed Gluon kernel (fused_linear_update_tma.py) against the shipped
Triton kernel, on one Hopper GPU (docs/kernels.md, "TMA / Gluon experiment").

1. correctness of every studied config against the fp64 reference (relative error ≤ 1e-5 for
   bf16/fp16 operands, as tests/test_fused_linear_update.py; bf16 weights: ≤ 1 ulp, unbiased);
   exits non-zero on a failure, before timing anything;
2. fused timings on the issue's rows: the shipped kernel (autotuned) vs each TMA config;
3. the epilogue's traffic alone (``skip_gemm``: grad = 0) for AdamW, AdamW without its div and
   sqrt, and SGD-momentum, vs torch's fused optimizer alone on the same tensors;
4. host time per launch of the op (tiny shape, 300 back-to-back calls).

Timings are medians of ``triton.testing.do_bench_cudagraph`` (CUDA graphs: no host overhead in
the GPU time). One JSON object per measurement to ``--out``.
    python benchmarks/experiments/bench_fused_linear_update_tma.py [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    copy_bandwidth_GBps, forge_bytes, make_case)
from forge_compile.epilogue import EpilogueProgram, Instr  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
import fused_linear_update_tma as tma  # noqa: E402
import test_fused_linear_update as ref  # noqa: E402

C = tma.TmaConfig
CONFIGS = {
    "128x128x64 split8 stages3 slots5": C(128, 128, 64, 8, 3, 5),
    "128x128x64 split4 stages2 slots3": C(128, 128, 64, 4, 2, 3),
    "128x128x32 split8 stages4 slots6": C(128, 128, 32, 8, 4, 6),
    "128x256x64 split8 stages3 slots1": C(128, 256, 64, 8, 3, 1),
    "256x128x32 split8 stages3 slots3 w16": C(256, 128, 32, 8, 3, 3, 16),
    # the same with W/state written back by TMA from the ring (no gl.store)
    "128x128x64 split8 stages3 slots5 tma-store": C(128, 128, 64, 8, 3, 5, TMA_STORE=True),
    "128x128x32 split8 stages4 slots6 tma-store": C(128, 128, 32, 8, 4, 6, TMA_STORE=True),
    "128x256x64 split8 stages2 slots2 tma-store": C(128, 256, 64, 8, 2, 2, TMA_STORE=True),
    "256x128x32 split8 stages3 slots3 w16 tma-store": C(256, 128, 32, 8, 3, 3, 16,
                                                          TMA_STORE=True),
}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [512, 2048, 8192]


def _adamw_without_div_sqrt() -> EpilogueProgram:
    """AdamW's traffic and lerp, with its two divisions and the sqrt replaced by products."""
    g, p = "grad", "param"
    ops = [("pd", "mul", (p, "decay")), ("m", "lerp", ("exp_avg", g, "one_minus_beta1")),
           ("vd", "mul", ("exp_avg_sq", "beta2")), ("gs", "mul", ("one_minus_beta2", g)),
           ("g2", "mul", ("gs", g)), ("v", "add", ("vd", "g2")), ("r", "mul", ("m", "v")),
           ("dp", "mul", ("neg_step_size", "r")), ("pn", "add", ("pd", "dp"))]
    return EpilogueProgram(
        (g, p, "exp_avg", "exp_avg_sq"),
        ("decay", "one_minus_beta1", "beta2", "one_minus_beta2", "bias_correction2_sqrt",
         "eps", "neg_step_size"),
        tuple(Instr(*o) for o in ops), (("param", "pn"), ("exp_avg", "m"), ("exp_avg_sq", "v")))


def check_correctness(configs=None, launch=None, fits=None) -> list:
    """Every config against the fp64 reference; ``launch(dy, x, p, state, scalars, prog, cfg,
    seed=)`` (default: the TMA kernel's); ``fits(cfg, n_state)`` False: a config whose shared
    memory does not hold that many state tensors is not run for that rule. Returns the
    failures."""
    configs = CONFIGS if configs is None else configs
    launch = tma.launch if launch is None else launch
    rules = ref._rules("cuda")
    bad = []
    for i, (name, cfg) in enumerate(configs.items()):
        names = ["adamw", "sgd_momentum", "lion"] if i == 0 else ["adamw", "sgd_momentum"]
        for rule in names:
            prog, sc = rules[rule]
            if fits is not None and not fits(cfg, len(prog.state)):
                continue
            # Lion on the two shapes of the test suite only: its update is sign(c), and on the
            # 1M-element shape one element's c sits within fp32 rounding of 0, so the fp32
            # accumulation order decides its sign; that one flip alone is 2·lr/‖W‖ = 1.96e-5
            # relative error vs the fp64 reference (measured: exactly 1.957e-5, exp_avg 4e-8).
            shapes = [ref.RAGGED, (512, 768, 256)] + ([] if rule == "lion" else [
                (1024, 1024, 2048)])
            for shape in shapes:
                for dt in ((torch.bfloat16, torch.float16) if i == 0 else (torch.bfloat16,)):
                    dy, x, p, s = ref._inputs(prog, *shape, dt, "cuda", seed=7)
                    err = ref._errors(prog, dy, x, p, s, sc,
                                      lambda *a: launch(*a, cfg, seed=1234))
                    if not err.pop("finite") or max(err.values()) > 1e-5:
                        bad.append((name, rule, shape, str(dt), err))
    prog, sc = rules["adamw"]
    dy, x, p, s = ref._inputs(prog, 2048, 1024, 256, torch.bfloat16, "cuda",
                              param_dtype=torch.bfloat16)
    sr = ref._sr_stats(prog, dy, x, p, s, sc,
                       lambda *a: launch(*a, next(iter(configs.values())), seed=1234))
    try:
        ref._check_interp("bf16-weights-sr", sr)
    except AssertionError:
        bad.append(("bf16 weights", sr))
    return bad


def study_setup(bad: list, t0: float):
    """Report the correctness failures (exit 1 if any), measure the copy bandwidth; returns
    (rows, emit, copy GB/s) where emit(**row) prints and records one row with device and versions."""
    import triton
    print(f"correctness: {len(bad)} failures ({time.time() - t0:.0f} s)", flush=True)
    for b in bad:
        print("  FAIL", b, flush=True)
    if bad:
        sys.exit(1)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}
    bw = copy_bandwidth_GBps()
    rows = []

    def emit(**row):
        row = {**meta, "copy_GBps": round(bw, 1), **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, emit, bw


def fused_rows(emit, shapes, configs, launch, label, fits=None):
    """The issue's rows: the autotuned choice (``label``) vs every studied config (those that
    ``fits(cfg, n_state)``)."""
    for opt in ("adamw", "sgd_momentum"):
        for N, K in shapes:
            for T in TOKENS:
                c = make_case(N, K, T, opt)
                args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"])
                flu.fused_linear_update_triton(*args)            # tunes
                cfg = flu.tuned_config(*args)
                row = {label: round(_ms(lambda: flu.fused_linear_update_triton(
                    *args, config=cfg, seed=0)), 4), f"{label}_config": str(cfg)}
                for name, tc in configs.items():
                    if fits is None or fits(tc, len(c["state"])):
                        row[name] = round(_ms(lambda: launch(*args, tc)), 4)
                emit(study="fused", optimizer=opt, N=N, K=K, T=T, **row)
                torch.cuda.empty_cache()


def save_rows(rows, out, t0):
    """Append the rows to ``out`` (JSON lines)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"total {time.time() - t0:.0f} s; {len(rows)} rows -> {out}")


def study_args(doc: str, default_out: str) -> argparse.Namespace:
    """A study script's command line: ``--out`` (default: ``benchmarks/results/<default_out>``)
    and ``--do-bench`` (the timer, see TIMER)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", default_out))
    add_timer_arg(ap)
    return set_timer(ap.parse_args())


def add_timer_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--do-bench", action="store_true",
                    help="time with the benchmark's protocol (do_bench: a 256 MB memset before "
                         "each call) instead of back-to-back CUDA-graph replays")


def set_timer(a: argparse.Namespace) -> argparse.Namespace:
    global TIMER
    TIMER = "do_bench" if a.do_bench else "cudagraph"
    return a


# "cudagraph": do_bench_cudagraph's back-to-back replays (no flush; the H100 then runs a fused
# T >= 2048 kernel at its 700 W power limit, thirteenth session); "do_bench": the benchmark's
# protocol, triton's do_bench with its 256 MB memset before each call, the call replayed from a
# CUDA graph so that a study launch path's host time stays out of it (--do-bench)
TIMER = "cudagraph"


def graphed(fn, calls: int = 1, warmup: int = 1):
    """The replay of a CUDA graph of ``calls`` calls of ``fn``, captured after ``warmup`` calls
    on a side stream (off the default stream, as capture wants)."""
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g.replay


def _ms(fn) -> float:
    from triton.testing import do_bench, do_bench_cudagraph
    fn()
    if TIMER == "cudagraph":
        return do_bench_cudagraph(fn, rep=40, quantiles=[0.5])
    return do_bench(graphed(fn), warmup=25, rep=200, quantiles=[0.5])


def main():
    a = study_args(__doc__, "fused_linear_update_tma.jsonl")
    t0 = time.time()
    rows, emit, bw = study_setup(check_correctness(), t0)

    fused_rows(emit, SHAPES, CONFIGS, tma.launch, "shipped")
    # the epilogue's traffic alone, 4096² (the GEMM skipped: grad = 0)
    for opt, label, prog in (("adamw", "adamw", None),
                             ("adamw", "adamw without div/sqrt", _adamw_without_div_sqrt()),
                             ("sgd_momentum", "sgd_momentum", None)):
        c = make_case(4096, 4096, 512, opt)
        prog = prog or c["prog"]
        args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], prog)
        nbytes = forge_bytes(4096, 4096, 0, len(c["state"]))
        for name, tc in CONFIGS.items():
            for skip in (True, False):
                ms = _ms(lambda: tma.launch(*args, tc, skip_gemm=skip))
                emit(study="epilogue only" if skip else "fused T=512", program=label,
                     config=name, ms=round(ms, 4),
                     frac_copy_bw=round(nbytes / (ms * 1e-3) / 1e9 / bw, 3))
        if label != "adamw without div/sqrt":
            g = torch.randn_like(c["p"])
            p, st = c["p"], c["state"]
            if opt == "adamw":
                def fo():
                    torch._fused_adamw_([p], [g], [st[0]], [st[1]], [], [c["step"]], lr=1e-4,
                                        beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
                                        amsgrad=False, maximize=False)
            else:
                def fo():
                    torch._fused_sgd_([p], [g], [st[0]], weight_decay=0.0, momentum=0.9,
                                      lr=1e-4, dampening=0.0, nesterov=False, maximize=False,
                                      is_first_step=False)
            ms = _ms(fo)
            nb = nbytes + 4096 * 4096 * 4          # it reads the fp32 gradient too
            emit(study="torch fused optimizer alone", program=label, ms=round(ms, 4),
                 frac_copy_bw=round(nb / (ms * 1e-3) / 1e9 / bw, 3))
    # host time per launch of the op (what a compiled step pays per fused weight)
    c = make_case(256, 256, 64, "adamw")
    args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps())
    op = torch.ops.forge_compile.fused_linear_update_
    for _ in range(5):
        op(*args)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(300):
        op(*args)
    torch.cuda.synchronize()
    emit(study="host us per op launch", us=round((time.perf_counter() - t) / 300 * 1e6, 1))
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
