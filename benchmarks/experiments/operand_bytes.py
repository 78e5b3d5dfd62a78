"""Study runs 56-57: how fast would the T=2048 rows be with fewer dY/X bytes per W element,
if that cost no synchronisation, and at what SM clock does each variant run? (docs/kernels.md,
"Twenty-fourth session".)

Why: the T=2048 rows miss 0.6× (AdamW) and 80% of copy bandwidth (all) by what the GEMM's
operand loads add beside the W/state stream: per 128×128 tile 1 MiB of dY/X from L2 beside
384 KiB of W/state (runs 28b, 29, 32). Every scheme that reads each operand byte from L2 fewer
times (CTA-pair multicast, runs 36-38; larger tiles, run 16) has been slower, but each also
paid a cost of its own (cross-CTA waits, a starved ring). This run prices the bytes alone: the
tuned kernel's source with its ring loads thinned, so that on some T steps a slot keeps the
operand tile it held before and only the remaining bytes are waited for. The wgmma, the
hand-off and the stream are unchanged; the gradient is wrong (that is the point: it measures
time, nothing else), so these variants are never checked against the reference. The same
harness's unthinned build is checked (fp64 reference, 1e-5) and timed beside them.

Variants: the fraction of the operand bytes still loaded
  full 1.0, x_half 0.75 (X on every 2nd step: what CTA pairs multicasting X could save,
  with perfect overlap), both_half 0.5 (dY and X every 2nd step: 2×2 clusters multicasting
  both), both_quarter 0.25, none 0.0 (the first ring round only: the wgmma on the same
  tiles ever after),
  and the stream alone (``skip_gemm`` with a constant gradient, STREAM_GRAD, handed over
  per tile) as the floor. An upper bound: a multicast still fills
  each CTA's shared memory, the thinned ring does not.
Run 57 (``--clocks``): each variant's SM clock while it runs, from ``%clock64`` over
``%globaltimer`` summed in the kernel (``clock_source``), under ``do_bench`` and back to back.
``--ncu-variant V``: only V's launches, for ncu (``scripts/gpu_kernels.sh ncu-operands``).
    python benchmarks/experiments/operand_bytes.py [--out PATH] [--rounds 4] [--shapes 4096x4096]
        [--clocks] [--ncu-variant V]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import forge_bytes, make_case  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels import fused_linear_update_ws as ws  # noqa: E402
from allocations import interleaved  # noqa: E402
from bench_fused_linear_update_tma import save_rows, study_setup  # noqa: E402
import test_fused_linear_update as ref  # noqa: E402

RTOL = 1e-5
# variant -> (period P, what the other steps load: "dy" or nothing). Ring step gstep loads dY
# and X when (gstep + gstep // STAGES) % P == 0, else only ``off``: every P-th step (the
# savings spread evenly, as a multicast's are) and, the phase moving by one each round of the
# ring, every slot in every P-th round, so no slot ever holds bytes that were never loaded. P
# = 0: only the first round loads (each slot once per launch). Two earlier schemes were
# biased (docs/kernels.md, "Twenty-fourth session"): by step parity, half the slots were
# never loaded and held zeros, a zero product draws less power and AdamW's fast IEEE path
# falls back on a zero gradient; by whole rounds, the loads came in bursts
VARIANTS = {"full": (1, None), "x_half": (2, "dy"), "both_half": (2, None),
            "both_quarter": (4, None), "none": (0, None)}
_ISSUE = re.compile(r"@gluon\.jit\ndef _issue_gemm\(step, gstep, off_n, off_k, dy_desc, x_desc, "
                    r"dy_smem, x_smem, ld_bar,\n.*?\n(?=\n)", re.S)


def operand_frac(period: int, off: str) -> float:
    """The fraction of the dY/X bytes a variant still loads (dY and X tiles are equal here)."""
    if period == 0:
        return 0.0
    return (1 + (period - 1) * (0.5 if off == "dy" else 0.0)) / period


def thinned_source(src: str, period: int, off: str) -> str:
    """``src`` with ``_issue_gemm`` loading dY and X on every ``period``-th ring step (see
    VARIANTS) and only ``off`` ("dy" or None: nothing) on the others (``period`` 0: the first
    round only); the slot's barrier waits for the bytes actually loaded (an arrival alone
    where nothing is)."""
    m = _ISSUE.search(src)
    if m is None:
        raise RuntimeError("the generated source has no single-CTA _issue_gemm to thin "
                           "(WS_CLUSTER=2?)")
    body = m.group(0)
    loads = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("tma.")]
    dy_load = next(ln for ln in loads if "(dy_desc" in ln)
    x_load = next(ln for ln in loads if "(x_desc" in ln)
    head = body[:body.index("    mbarrier.expect")]
    both = ["mbarrier.expect(bar, dy_desc.block_type.nbytes + x_desc.block_type.nbytes)",
            dy_load, x_load]
    other = (["mbarrier.expect(bar, dy_desc.block_type.nbytes)", dy_load] if off == "dy"
             else ["mbarrier.arrive(bar, count=1)"])
    cond = ("gstep < STAGES" if period == 0
            else f"(gstep + gstep // STAGES) % {period} == 0")
    out = (head + f"    if {cond}:\n" + "".join(f"        {ln}\n" for ln in both)
           + "    else:\n" + "".join(f"        {ln}\n" for ln in other))
    return src[:m.start()] + out.rstrip("\n") + src[m.end():]


_ACC_INIT = "acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, mma)"
# the stream's constant gradient: AdamW's m and v stay normal (a zero gradient decays m
# through the subnormals to 0, and the T=2048 pick's fast IEEE path falls back on zeros: the
# ninth session's "epilogue alone" trap)
STREAM_GRAD = 1e-3


def const_grad_source(src: str) -> str:
    """``src`` with every tile's accumulator starting at STREAM_GRAD instead of 0: launched
    with ``skip_gemm`` (no T loop), the stream and the hand-off alone, on a non-zero gradient."""
    if src.count(_ACC_INIT) != 1:
        raise RuntimeError(f"expected one {_ACC_INIT!r} in the generated source")
    return src.replace(_ACC_INIT, "acc = gl.full([BLOCK_N, BLOCK_K], "
                                  f"{STREAM_GRAD}, gl.float32, mma)")


_CLOCK_ASM = {"cycles": "mov.u64 $0, %clock64;", "ns": "mov.u64 $0, %globaltimer;"}


def _read_clock(kind: str, dest: str) -> str:
    # the program id is a dummy operand: it makes the result a scalar of the program
    return (f"    {dest} = gl.inline_asm_elementwise({_CLOCK_ASM[kind]!r}, '=l,r', [clk_pid], "
            "dtype=gl.int64, is_pure=False, pack=1)\n")


def clock_source(src: str) -> str:
    """``src`` with each CTA adding its SM cycles (``%clock64``) and nanoseconds
    (``%globaltimer``) from its start to the end of its partitions into ``clk_ptr`` (a new
    argument after the strides: int64, two per program): over many launches, their ratio is the
    SM clock the kernel ran at, under whatever protocol launches it."""
    i = src.rindex("@gluon.jit")
    head, kern = src[:i], src[i:]
    at = kern.index("SCALAR_PTR_0: gl.constexpr")
    kern = kern[:at] + "clk_ptr, " + kern[at:]
    body = kern.index("):\n", at) + 3
    start = ("    clk_pid = gl.program_id(0)\n" + _read_clock("cycles", "clk_c0")
             + _read_clock("ns", "clk_t0"))
    kern = kern[:body] + start + kern[body:]
    end_at = kern.index("    ], [", kern.index("gl.warp_specialize(["))
    end_at = kern.index("\n", end_at) + 1
    end = (_read_clock("cycles", "clk_c1") + _read_clock("ns", "clk_t1")
           + "    gl.atomic_add(clk_ptr + 2 * clk_pid, clk_c1 - clk_c0)\n"
           + "    gl.atomic_add(clk_ptr + 2 * clk_pid + 1, clk_t1 - clk_t0)\n")
    return head + kern[:end_at] + end + kern[end_at:]


def build(cfg, prog, period: int, off: str, const_grad: bool = False, clocks: bool = False):
    prog = flu.load_program(prog)
    ws._kernel(prog, *ws.kernel_args(cfg))        # installs the L2-hint and encoding hooks
    src = ws.kernel_source(prog, *ws.kernel_args(cfg))
    if period != 1:
        src2 = thinned_source(src, period, off)
        if src2 == src:
            raise RuntimeError("thinning left the source unchanged")
        src = src2
    if const_grad:
        src = const_grad_source(src)
    if clocks:
        src = clock_source(src)
    return flu._import_generated(src, "flu_ws_thin")._fused_linear_update_ws_kernel


def variant_launcher(cfg, c, v: str, clk=None):
    """One call of variant ``v`` (a VARIANTS name, or "stream": the stream and hand-off alone on
    STREAM_GRAD) on the case ``c``; with ``clk`` (int64, two per SM) the ``clock_source`` build
    adding its cycles and nanoseconds there."""
    stream = v == "stream"
    k = build(cfg, c["prog"], *VARIANTS["full" if stream else v], const_grad=stream,
              clocks=clk is not None)
    _, grid, args, kwargs = ws.ws_launch_args(c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                              c["prog"], cfg, 0, skip_gemm=stream)
    if clk is not None:
        args = (*args, clk)
    return lambda: k[grid](*args, **kwargs)


def clock_runs(a, t0):
    """``--clocks``: each variant's SM clock while it runs (``clock_source``: cycles over
    nanoseconds summed over every CTA and launch), under the benchmark's ``do_bench`` (a 256 MB
    memset before each call) and back to back (200 calls, no memset), with its do_bench time."""
    import torch
    from triton.testing import do_bench
    rows, emit, bw = study_setup([], t0)
    names = a.clock_variants.split(",")
    clk = torch.zeros(2 * torch.cuda.get_device_properties(0).multi_processor_count,
                      dtype=torch.int64, device="cuda")
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        T = int(a.tokens.split(",")[0])
        for opt in a.optimizers.split(","):
            c = make_case(N, K, T, opt)
            cfg = flu._GPU_WS_CONFIGS[a.ws]
            keep = [t.clone() for t in (c["p"], *c["state"])]
            for v in names:
                run = variant_launcher(cfg, c, v, clk)
                run()
                out = {}
                for mode in ("do_bench", "back_to_back"):
                    clk.zero_()
                    torch.cuda.synchronize()
                    if mode == "do_bench":
                        ms = do_bench(run, warmup=25, rep=100, quantiles=[0.5])
                    else:
                        for _ in range(200):
                            run()
                    torch.cuda.synchronize()
                    cyc, ns = clk[0::2].sum().item(), clk[1::2].sum().item()
                    out[mode] = cyc / ns
                emit(study="operand_bytes_clocks", optimizer=opt, N=N, K=K, T=T, variant=v,
                     config=str(cfg), ms=round(ms, 4),
                     sm_GHz_do_bench=round(out["do_bench"], 3),
                     sm_GHz_back_to_back=round(out["back_to_back"], 3))
                for t, kk in zip((c["p"], *c["state"]), keep):
                    t.copy_(kk)
    save_rows(rows, a.out, t0)


def ncu_launches(a):
    """The launches ncu profiles (scripts/gpu_kernels.sh ncu-operands): one variant, 4 calls."""
    import torch
    N, K = map(int, a.shapes.split(",")[0].split("x"))
    c = make_case(N, K, int(a.tokens.split(",")[0]), a.optimizers.split(",")[0])
    cfg = flu._GPU_WS_CONFIGS[a.ws]
    run = variant_launcher(cfg, c, a.ncu_variant)
    for _ in range(4):
        run()
    torch.cuda.synchronize()
    print(f"{a.ncu_variant}: 4 launches of {cfg}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "operand_bytes.jsonl"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--optimizers", default="adamw,sgd_momentum")
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--ncu-variant", choices=[*VARIANTS, "stream"],
                    help="for ncu: launch only this variant 4 times (the first shape, token "
                         "count and optimizer; config --ws) and exit")
    ap.add_argument("--ws", type=int, default=10,
                    help="with --ncu-variant: the WS candidate (_GPU_WS_CONFIGS index; the "
                         "tuner's pick at T=2048 in run 56)")
    ap.add_argument("--clocks", action="store_true",
                    help="the SM clock each variant runs at (clock_runs; config --ws)")
    ap.add_argument("--clock-variants", default="full,x_half,none,stream")
    a = ap.parse_args()
    if a.ncu_variant:
        return ncu_launches(a)
    t0 = time.time()
    if a.clocks:
        return clock_runs(a, t0)
    bad, cases = [], []
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        for T in map(int, a.tokens.split(",")):
            for opt in a.optimizers.split(","):
                c = make_case(N, K, T, opt)
                cfg = flu.tuned_config(c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"])
                if not cfg.WS:
                    print(f"{opt} {N}x{K} T={T}: the tuner picked a non-WS config {cfg}; skipped",
                          flush=True)
                    continue
                # the harness's own unthinned build against the fp64 reference
                full = build(cfg, c["prog"], *VARIANTS["full"])

                def run_full(dy, x, p, st, sc, prog, full=full):
                    _, grid, args, kwargs = ws.ws_launch_args(dy, x, p, st, sc, prog, cfg, 0)
                    full[grid](*args, **kwargs)
                err = ref._errors(c["prog"], c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                  run_full)
                if not err.pop("finite"):
                    bad.append(f"{opt} T={T}: non-finite output")
                bad += [f"{opt} T={T} {name}: relative error {e:.2e} > {RTOL}"
                        for name, e in err.items() if not e <= RTOL]
                cases.append((N, K, T, opt, c, cfg))
    rows, emit, bw = study_setup(bad, t0)                  # exits 1 on a failure
    for N, K, T, opt, c, cfg in cases:
        keep = [t.clone() for t in (c["p"], *c["state"])]
        fns = {v: variant_launcher(cfg, c, v) for v in [*VARIANTS, "stream"]}
        fns["shipped"] = lambda c=c: flu.fused_linear_update_triton(
            c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], seed=0)
        times, med = interleaved({0: fns}, a.rounds)
        med, times = med[0], times[0]
        nbytes = forge_bytes(N, K, T, len(c["state"]))
        for v, ms in med.items():
            frac = operand_frac(*VARIANTS[v]) if v in VARIANTS else None
            emit(study="operand_bytes", optimizer=opt, N=N, K=K, T=T, variant=v,
                 operand_frac=frac, config=str(cfg), ms=round(ms, 4),
                 frac_copy_bw=round(nbytes / (ms * 1e-3) / 1e9 / bw, 3),
                 samples=[round(t, 4) for t in times[v]])
        print(f"{opt} {N}x{K} T={T}: " + ", ".join(f"{v} {ms:.4f}" for v, ms in med.items()),
              flush=True)
        for t, k in zip((c["p"], *c["state"]), keep):      # the thinned runs wrote garbage
            t.copy_(k)
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
