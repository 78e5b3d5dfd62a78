"""Is the T=512 row limited by AdamW's math or by the memory system? The same warp-specialised
kernel, the same bytes, a trivial rule.

Why: at AdamW 4096² T=512 the fused kernel streams at 85% of a copy of its own 411 MB, and no
measured change moved that (docs/kernels.md, study runs 7-12). Two changes sped up AdamW's
epilogue alone and left the fused row unchanged: half the barriers (75% → 78% of copy) and
32-row chunks (75% → 81%). So the epilogue's issue rate looks spent as an explanation. This
script times the rule ``scale3`` beside AdamW. It reads W and two state tensors and writes each
back times a per-step scalar: the same 3 reads and 3 writes per element, and the same kernel,
configs, tile order and TMA ring, with three multiplies instead of two IEEE divisions and a
square root.
- If fused ``scale3`` runs where fused AdamW does, the memory system (with the GEMM's dY/X
  traffic beside it) is the ceiling at this access pattern, and the 0.16 ms target needs a
  different layout of the bytes, not a cheaper epilogue.
- If it runs near the copy, the AdamW math is what is left.
Each is also timed with ``skip_gemm`` (the epilogue's stream alone).

Timing: ``do_bench`` (the benchmark's method) and ``do_bench_cudagraph`` medians, beside a
torch copy of the same bytes. ``scale3``'s result is checked bit for bit against torch (a
product of fp32 numbers rounds the same everywhere). Prepared 2026-11-23 (eighth session),
not yet run: the session's device time was spent. On the GPU device:
  python3 benchmarks/experiments/stream_ceiling.py --out $OUT/stream_ceiling.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    forge_bytes, make_case, zero_grad_adamw_scalars)
from benchmarks.experiments.bench_fused_linear_update_tma import save_rows  # noqa: E402
from forge_compile.epilogue import GRAD, PARAM, EpilogueProgram, Instr  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import (  # noqa: E402
    _num_sms as _num_sms_orig, fused_linear_update_ws)


def scale3_program() -> EpilogueProgram:
    """W, a, b ← c·W, c·a, c·b: AdamW's tensors and bytes, none of its math (the gradient is
    not read)."""
    return EpilogueProgram(
        tensors=(GRAD, PARAM, "a", "b"), scalars=("c",),
        ops=(Instr("p1", "mul", (PARAM, "c")), Instr("a1", "mul", ("a", "c")),
             Instr("b1", "mul", ("b", "c"))),
        outputs=((PARAM, "p1"), ("a", "a1"), ("b", "b1")))


def _subnormal_frac(t: torch.Tensor) -> float:
    a = t.abs()
    return ((a > 0) & (a < torch.finfo(torch.float32).tiny)).float().mean().item()


def subnormal_check(date: str) -> list:
    """Does the AdamW epilogue-alone timing depend on the state's values?

    With ``skip_gemm`` the gradient is 0, so m <- 0.9·m each call. From 1e-3 it is subnormal
    after ~770 calls and then stays at ±2^-149 (0.9 × 2^-149 rounds back to 2^-149), where
    IEEE division takes ptxas's slow path. ``do_bench`` (~1500 calls) and a CUDA-graph replay
    (~600 calls each) run that long; zero_grad_adamw_scalars' beta1 = 0.9999 keeps m normal.
    Fresh state for each timing.
    """
    import triton
    from triton.testing import do_bench, do_bench_cudagraph
    rows = []
    for T in (512,):
        c = make_case(4096, 4096, T, "adamw")
        for name in ("ws:0", "ws:1"):
            cfg = flu._GPU_WS_CONFIGS[int(name[-1])]
            for beta1 in (0.9, 0.9999):
                sc = zero_grad_adamw_scalars(beta1)
                for mode in ("do_bench", "graph"):
                    p, st = c["p"].clone(), [s.clone() for s in c["state"]]

                    def run(p=p, st=st, sc=sc):
                        fused_linear_update_ws(c["dy"], c["x"], p, st, sc, c["prog"], cfg,
                                               skip_gemm=True)
                    if mode == "do_bench":
                        ms = do_bench(run, warmup=25, rep=200, return_mode="median")
                    else:
                        ms = do_bench_cudagraph(run, rep=100, return_mode="median")
                    torch.cuda.synchronize()
                    row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, date=date, N=4096, K=4096, T=T,
                               config=name, rule="adamw", skip_gemm=True, beta1=beta1,
                               timing=mode, ms=round(ms, 4),
                               m_subnormal_after=round(_subnormal_frac(st[0]), 4),
                               m_zero_after=round((st[0] == 0).float().mean().item(), 4))
                    rows.append(row)
                    print(f"T={T} {name} adamw epilogue alone beta1={beta1} {mode:8s} "
                          f"{ms:.4f} ms; m afterwards: {row['m_subnormal_after']:.1%} "
                          f"subnormal, {row['m_zero_after']:.1%} zero", flush=True)
    return rows


def size_sweep(date: str, ws_ids=(0, 1)) -> list:
    """Time = fixed cost + bytes / bandwidth? The fused kernel (AdamW, and scale3: the same
    math as the stream alone), its stream alone (scale3) and a copy of the same bytes over
    N = 1024..16384 (K=4096, T=512), least-squares fit per kind, for the shipped WS configs
    ``ws_ids``. Each CTA's first GEMM (before any update) would show as the fused kernel's
    fixed cost beyond the stream's; measured 20:12 UTC for ws:0 and ws:1, the difference is in
    the bandwidth (2631 vs 2860 GB/s), not the fixed cost (docs/kernels.md, "Ninth session");
    the eighteenth session asks it again of the ninth candidate (ws:8)."""
    import triton
    from triton.testing import do_bench
    scale3 = scale3_program()
    c_scale = torch.tensor(1.0, device="cuda")
    rows = []
    for k, i in enumerate(ws_ids):
        name, cfg = f"ws:{i}", flu._GPU_WS_CONFIGS[i]
        pts = {"fused adamw": [], "fused scale3": [], "stream scale3": [], "copy": []}
        for N in (1024, 2048, 4096, 6144, 8192, 12288, 16384):
            c = make_case(N, 4096, 512, "adamw")
            nbytes = forge_bytes(N, 4096, 512, 2)
            src = torch.randn(nbytes // 8, device="cuda")
            dst = torch.empty_like(src)
            for what, fn in (
                    ("fused adamw", lambda: fused_linear_update_ws(
                        c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], cfg)),
                    ("fused scale3", lambda: fused_linear_update_ws(
                        c["dy"], c["x"], c["p"], c["state"], [c_scale], scale3, cfg)),
                    ("stream scale3", lambda: fused_linear_update_ws(
                        c["dy"], c["x"], c["p"], c["state"], [c_scale], scale3, cfg,
                        skip_gemm=True)),
                    ("copy", lambda: dst.copy_(src))):
                if what == "copy" and k:
                    continue
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                pts[what].append((nbytes, ms))
                rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 triton=triton.__version__, date=date, N=N, K=4096, T=512,
                                 config=name, what=what, bytes=nbytes, ms=round(ms, 4)))
                print(f"{name} N={N:5d} {what:13s} {ms:.4f} ms", flush=True)
        for what, p in pts.items():
            if not p:
                continue
            b = torch.tensor([x for x, _ in p], dtype=torch.float64)
            t = torch.tensor([y for _, y in p], dtype=torch.float64)
            A = torch.stack([torch.ones_like(b), b], 1)
            fixed, per_byte = torch.linalg.lstsq(A, t[:, None]).solution[:, 0].tolist()
            print(f"{name} {what:13s}: {fixed * 1e3:.1f} us fixed + "
                  f"{1 / per_byte / 1e6:.0f} GB/s", flush=True)
            rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                             triton=triton.__version__, date=date, K=4096, T=512, config=name,
                             what=what + " fit", fixed_us=round(fixed * 1e3, 2),
                             GBps=round(1 / per_byte / 1e6, 1)))
    return rows


def products_program(prog: EpilogueProgram, only=None) -> EpilogueProgram:
    """``prog`` with every division and square root replaced by a product (``sqrt(x)`` by
    x·x): the same tensors, reads, writes and data flow, none of the IEEE division's and square
    root's range checks and slow-path branches. ``only``: the outputs of the ops to replace
    (default: all of them). A timing control only: its update is not AdamW's."""
    ops = tuple(Instr(i.out, "mul", (i.args[0], i.args[0]) if i.op == "sqrt" else i.args)
                if i.op in ("div", "sqrt") and (only is None or i.out in only) else i
                for i in prog.ops)
    return dataclasses.replace(prog, ops=ops)


def time_interleaved(c: dict, variants: dict, rounds: int) -> dict:
    """name → (upper median, the rounds' times) of the fused op on ``c`` for each variant
    (name → (program, scalars, config)), fresh copies of W and the state per call, in
    ``rounds`` interleaved rounds of the benchmark's ``do_bench``."""
    from triton.testing import do_bench
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (prog, sc, kc) in variants.items():
            p, st = c["p"].clone(), [t.clone() for t in c["state"]]
            times[k].append(do_bench(lambda: fused_linear_update_ws(
                c["dy"], c["x"], p, st, sc, prog, kc), warmup=25, rep=100,
                return_mode="median"))
    # the upper median of the rounds (the 3rd of 4)
    return {k: (sorted(v)[len(v) // 2], v) for k, v in times.items()}


def math_cost(date: str, rounds: int = 4) -> list:
    """What AdamW's IEEE divisions and square root cost in the fused kernel with 8 epilogue
    warps: the tuned T=512 and T=2048 configs (ws8, ws7), AdamW as shipped, with WS_FAST_IEEE
    (the same bits), with products in their place, and scale3, fused, interleaved rounds of
    the benchmark's ``do_bench`` (eighteenth session)."""
    import triton
    from forge_compile import rules
    scale3 = scale3_program()
    c_scale = torch.tensor(1.0, device="cuda")
    rows = []
    for T, i in ((512, 8), (2048, 7)):
        c = make_case(4096, 4096, T, "adamw")
        cfg = flu._GPU_WS_CONFIGS[i]
        fast = dataclasses.replace(cfg, WS_FAST_IEEE=1)
        progs = {"adamw": (c["prog"], c["scalars"], cfg),
                 "adamw, fast ieee": (c["prog"], c["scalars"], fast)}
        if cfg.WS == "epi_rows_grab":     # WS_ROLL: the halves in a loop, half the code
            progs.update({
                "adamw, roll": (c["prog"], c["scalars"], dataclasses.replace(cfg, WS_ROLL=2)),
                "adamw, roll + fast ieee": (c["prog"], c["scalars"],
                                            dataclasses.replace(fast, WS_ROLL=2))})
        progs.update({
                 "adamw, products": (products_program(rules.adamw_program()), c["scalars"], cfg),
                 "scale3": (scale3, [c_scale], cfg)})
        for k, (ms, v) in time_interleaved(c, progs, rounds).items():
            rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                             triton=triton.__version__, date=date, N=4096, K=4096, T=T,
                             config=f"ws:{i}", rule=k, ms=round(ms, 4),
                             rounds=[round(t, 4) for t in v]))
            print(f"T={T} ws:{i} fused {k:24s} {ms:.4f} ms  rounds {[round(t, 4) for t in v]}",
                  flush=True)
    return rows


def roll_study(date: str, rounds: int = 4, shapes: str = "4096x4096", ops: bool = False) -> list:
    """WS_ROLL on the "epi_rows" path (nineteenth session): the T=2048 picks (ws6, ws7; 16
    chunks unrolled) with their chunks in a runtime loop of 2-16 passes, with and without
    WS_FAST_IEEE, AdamW fused at T=2048, interleaved rounds of the benchmark's ``do_bench``;
    products in place of the IEEE operations as the control. ``ops``: instead, the eleventh
    candidate (ws:7, 4 passes, fast IEEE) against itself with each IEEE operation alone made a
    product."""
    import triton
    from forge_compile import rules
    rows = []
    for shape in shapes.split(","):
        N, K = map(int, shape.split("x"))
        c = make_case(N, K, 2048, "adamw")
        sc = c["scalars"]
        variants = {}
        for i, rolls in () if ops else ((7, (0, 2, 4, 8, 16)), (6, (0, 4))):
            base = flu._GPU_WS_CONFIGS[i]
            for r in rolls:
                for f in (0, 1):
                    variants[f"ws:{i} roll {r}{' fast' if f else ''}"] = (
                        c["prog"], sc, dataclasses.replace(base, WS_ROLL=r, WS_FAST_IEEE=f))
        if ops:
            # which of the three operations the rolled fast path still pays for: each one
            # alone as a product (AdamW's v_sqrt = sqrt(v), v_hat = v_sqrt /
            # bias_correction2_sqrt, a scalar divisor, and ratio = m / denom)
            fast4 = flu._GPU_WS_CONFIGS[10]
            variants["ws:10"] = (c["prog"], sc, fast4)
            for out in ("v_sqrt", "v_hat", "ratio"):
                variants[f"ws:10, {out} product"] = (
                    products_program(rules.adamw_program(), {out}), sc, fast4)
            variants["ws:10, products"] = (products_program(rules.adamw_program()), sc, fast4)
        else:
            variants["ws:7 products"] = (products_program(rules.adamw_program()), sc,
                                         flu._GPU_WS_CONFIGS[7])
        for k, (ms, v) in time_interleaved(c, variants, rounds).items():
            rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                             triton=triton.__version__, date=date, N=N, K=K, T=2048,
                             config=k, rule="adamw", ms=round(ms, 4),
                             rounds=[round(t, 4) for t in v]))
            print(f"{N}x{K} T=2048 {k:24s} {ms:.4f} ms  rounds {[round(t, 4) for t in v]}",
                  flush=True)
    return rows


def grid_scaling(date: str) -> list:
    """How fast can fewer SMs stream W/state, and run the GEMM? Decides whether giving the
    GEMM and the update separate SMs (fused_linear_update_roles.py) can pay: the WS kernel's
    epilogue alone (scale3, and AdamW with beta1 = 0.9999 so m stays normal) and its GEMM alone
    (skip_epilogue) on a persistent grid of n CTAs, one per SM."""
    import triton
    from triton.testing import do_bench
    from forge_compile.kernels import fused_linear_update_ws as ws
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    scale3 = scale3_program()
    c_scale = torch.tensor(1.0, device="cuda")      # values unchanged: nothing decays
    rows = []
    for T in (512, 2048):
        c = make_case(4096, 4096, T, "adamw")
        adamw_sc = zero_grad_adamw_scalars()
        cfg = flu._GPU_WS_CONFIGS[0 if T == 512 else 2]
        for n in (nsm, 116, 99, 88, 66, 44, 33):
            ws._num_sms = lambda index, n=n: n
            for what, prog, sc, kw in (("stream scale3", scale3, [c_scale], dict(skip_gemm=True)),
                                       ("stream adamw", c["prog"], adamw_sc, dict(skip_gemm=True)),
                                       ("gemm alone", c["prog"], c["scalars"],
                                        dict(skip_epilogue=True))):
                if what.startswith("stream") and (T != 512 or n < 44):
                    continue
                ms = do_bench(lambda: fused_linear_update_ws(
                    c["dy"], c["x"], c["p"], c["state"], sc, prog, cfg, **kw),
                    warmup=25, rep=100, return_mode="median")
                gbps = forge_bytes(4096, 4096, 0, 2) / ms / 1e6
                rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                                 triton=triton.__version__, date=date, N=4096, K=4096, T=T,
                                 what=what, ctas=n, ms=round(ms, 4),
                                 GBps_per_sm=round(gbps / n, 1) if what.startswith("stream")
                                 else None))
                print(f"T={T} {what:14s} {n:3d} CTAs: {ms:.4f} ms"
                      + (f" ({gbps:.0f} GB/s, {gbps / n:.1f} per SM)"
                         if what.startswith("stream") else ""), flush=True)
        # the fused kernel itself on a smaller grid: 1024 tiles on 128 CTAs are exactly 8 each
        # (132 CTAs: 100 run 8 tiles, 32 run 7)
        for n in (nsm, 128, 124, 116):
            ws._num_sms = lambda index, n=n: n
            ms = do_bench(lambda: fused_linear_update_ws(
                c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], cfg),
                warmup=25, rep=200, return_mode="median")
            rows.append(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                             triton=triton.__version__, date=date, N=4096, K=4096, T=T,
                             what="fused adamw", ctas=n, ms=round(ms, 4)))
            print(f"T={T} fused adamw    {n:3d} CTAs: {ms:.4f} ms", flush=True)
        ws._num_sms = _num_sms_orig
    return rows


def main() -> None:
    import triton
    from triton.testing import do_bench, do_bench_cudagraph
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--subnormal", action="store_true",
                    help="only the AdamW epilogue-alone check of section 'Subnormal state'")
    ap.add_argument("--grid-scaling", action="store_true",
                    help="only the stream and the GEMM on fewer SMs (section 'Roles')")
    ap.add_argument("--size-sweep", action="store_true",
                    help="only the fixed cost per launch (section 'Ninth session')")
    ap.add_argument("--math", action="store_true",
                    help="only AdamW's IEEE divisions and square root against products "
                         "(eighteenth session)")
    ap.add_argument("--roll", action="store_true",
                    help="only WS_ROLL on the T=2048 picks' epi_rows path (nineteenth session)")
    ap.add_argument("--shapes", default="4096x4096", help="with --roll: NxK,NxK...")
    ap.add_argument("--roll-ops", action="store_true", help="with --roll: the eleventh "
                    "candidate with each IEEE operation alone as a product")
    ap.add_argument("--sweep-ws", default="0,1", help="with --size-sweep: the shipped WS "
                    "configs (indices into _GPU_WS_CONFIGS)")
    ap.add_argument("--ncu-variant", choices=("fused", "stream", "gemm", "nowgmma"), default=None,
                    help="three launches at 4096², T = --tokens (one value; ws:1 at T=512, "
                         "ws:2 above), AdamW fused, its stream alone (beta1 0.9999), its GEMM "
                         "alone, or fused without the wgmma (skip_mma: the GEMM's loads kept), "
                         "for ncu (scripts/gpu_kernels.sh ncu-stream)")
    ap.add_argument("--l2", default="", help="with --ncu-variant: the TMA loads' L2 priorities "
                    "(a key of fused_linear_update_ws.L2_MODES)")
    ap.add_argument("--ws", type=int, default=None, help="with --ncu-variant: this shipped WS "
                    "config (_GPU_WS_CONFIGS[I], its own L2 priorities unless --l2 names some) "
                    "instead of ws:1 / ws:2")
    ap.add_argument("--prefetch", type=int, default=0, help="with --ncu-variant: WS_PREFETCH "
                    "(W/state chunks prefetched into L2 beyond the ring; study run 24)")
    ap.add_argument("--fast-ieee", action="store_true", help="with --ncu-variant: "
                    "WS_FAST_IEEE=1 (eighteenth session)")
    ap.add_argument("--group-n", type=int, default=None, help="with --ncu-variant: GROUP_N (the "
                    "tile walk's group of N rows; study run 25)")
    a = ap.parse_args()
    t0 = time.time()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {date}", flush=True)
    if a.ncu_variant:
        T = int(a.tokens.split(",")[0])
        c = make_case(4096, 4096, T, "adamw")
        sc = (zero_grad_adamw_scalars() if a.ncu_variant in ("stream", "nowgmma")
              else c["scalars"])
        if a.ws is None:
            cfg = dataclasses.replace(flu._GPU_WS_CONFIGS[1 if T <= 512 else 2], WS_L2=a.l2)
        else:
            cfg = flu._GPU_WS_CONFIGS[a.ws]
            cfg = dataclasses.replace(cfg, WS_L2=a.l2) if a.l2 else cfg
        cfg = dataclasses.replace(cfg, WS_PREFETCH=a.prefetch, GROUP_N=a.group_n or cfg.GROUP_N,
                                  WS_FAST_IEEE=int(a.fast_ieee))
        for _ in range(3):
            fused_linear_update_ws(c["dy"], c["x"], c["p"], c["state"], sc, c["prog"], cfg,
                                   skip_gemm=a.ncu_variant == "stream",
                                   skip_epilogue=a.ncu_variant == "gemm",
                                   skip_mma=a.ncu_variant == "nowgmma")
        torch.cuda.synchronize()
        return
    sweep = functools.partial(size_sweep, ws_ids=tuple(map(int, a.sweep_ws.split(","))))
    roll = functools.partial(roll_study, shapes=a.shapes, ops=a.roll_ops)
    for asked, study in ((a.size_sweep, sweep), (a.math, math_cost), (a.roll, roll),
                         (a.grid_scaling, grid_scaling),
                         (a.subnormal, subnormal_check)):
        if asked:
            rows = study(date)
            if a.out:
                save_rows(rows, a.out, t0)
            return
    scale3 = scale3_program()
    c_scale = torch.tensor(0.5, device="cuda")      # by pointer, as the op passes scalars
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        c = make_case(4096, 4096, T, "adamw")
        nbytes = forge_bytes(4096, 4096, T, 2)
        src = torch.randn(nbytes // 8, device="cuda")
        dst = torch.empty_like(src)
        copy = {"do_bench": do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                     return_mode="median"),
                "graph": do_bench_cudagraph(lambda: dst.copy_(src), rep=100,
                                            return_mode="median")}
        print(f"T={T} copy of the same {nbytes / 1e6:.0f} MB: do_bench {copy['do_bench']:.4f} "
              f"graph {copy['graph']:.4f} ms", flush=True)
        for name, cfg in (("ws:0", flu._GPU_WS_CONFIGS[0]), ("ws:1", flu._GPU_WS_CONFIGS[1]),
                          ("ws:2", flu._GPU_WS_CONFIGS[2])):
            # scale3 is exact: check it once per config against torch
            p, st = c["p"].clone(), [s.clone() for s in c["state"]]
            fused_linear_update_ws(c["dy"], c["x"], p, st, [c_scale], scale3, cfg)
            exact = all(torch.equal(u, v * 0.5) for u, v in zip((p, *st),
                                                                 (c["p"], *c["state"])))
            for rule, prog, sc in (("adamw", c["prog"], c["scalars"]),
                                   ("scale3", scale3, [c_scale])):
                for skip in (False, True):
                    def run(prog=prog, sc=sc, skip=skip):
                        fused_linear_update_ws(c["dy"], c["x"], p, st, sc, prog, cfg,
                                               skip_gemm=skip)
                    db = do_bench(run, warmup=25, rep=200, return_mode="median")
                    gr = do_bench_cudagraph(run, rep=100, return_mode="median")
                    row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, date=date, N=4096, K=4096, T=T,
                               config=name, rule=rule, skip_gemm=skip,
                               do_bench_ms=round(db, 4), graph_ms=round(gr, 4),
                               of_copy_do_bench=round(copy["do_bench"] / db, 3),
                               of_copy_graph=round(copy["graph"] / gr, 3),
                               scale3_exact=exact)
                    rows.append(row)
                    print(f"T={T} {name} {rule:6s} {'epilogue alone' if skip else 'fused':14s} "
                          f"do_bench {db:.4f} ms ({row['of_copy_do_bench']:.0%} of copy)  "
                          f"graph {gr:.4f} ms ({row['of_copy_graph']:.0%})", flush=True)
            print(f"   scale3 bit-exact against torch: {exact}", flush=True)
    if a.out:
        save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
