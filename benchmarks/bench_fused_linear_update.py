"""Benchmark: fused weight-gradient GEMM + optimizer update vs "cuBLAS mm, then torch's fused
optimizer" (the anchor of /work/shared/bench/ANCHORS.md), on one CUDA GPU.

Per row (N×K weight, T tokens, optimizer), medians of ``triton.testing.do_bench``:
  mm_ms      cuBLAS ``dyᵀ·x`` alone (bf16 in, bf16 out)
  anchor_ms  ANCHORS.md's baseline: mm in bf16, cast into the fp32 grad buffer, then
             ``torch._fused_adamw_`` / ``torch._fused_sgd_`` on it (reproduces its 0.263 ms)
  anchor_best_ms  the stronger of that and mm straight to fp32 (``torch.mm(..., out_dtype=
             torch.float32)``, no cast pass) + the same fused optimizer
  forge_ms   ``fused_linear_update_triton`` (autotuned, tuning done before timing)
Bytes moved by forge: W and each state tensor read and written once (fp32), dy and x read once;
``roofline_frac`` = forge GB/s over the device-to-device copy bandwidth measured in the same run.
``--weights bfloat16``: a pure-bf16 model (W and state in bf16, rows keyed ``weights``); the anchor
is then what eager's ``fused=True`` optimizer runs there, the bf16 mm straight into the bf16 grad
and ``torch._fused_adamw_`` / ``_fused_sgd_`` on bf16 tensors (``mm_bf16``); forge rounds W
stochastically (the default ``bf16_rounding``).

Appends one JSON object per row to benchmarks/results/fused_linear_update.jsonl (``--out``).
    python benchmarks/bench_fused_linear_update.py [--quick] [--out PATH]
    python benchmarks/bench_fused_linear_update.py --operands float32 --tokens 512,4096,16384
    python benchmarks/bench_fused_linear_update.py --quick --weights bfloat16
    python benchmarks/bench_fused_linear_update.py --plot docs/fused_linear_update.png
      (CPU: the jsonl's latest bf16 run as a chart, against the issue's targets)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forge_compile import rules  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [512, 2048, 8192]
OPTIMIZERS = ["adamw", "sgd_momentum"]
QUANTILES = [0.5, 0.2, 0.8]
LR, BETAS, EPS, WD, MOMENTUM = 1e-4, (0.9, 0.999), 1e-8, 1e-2, 0.9


def zero_grad_adamw_scalars(beta1: float = 0.9999, device="cuda"):
    """make_case's AdamW scalars with another beta1, for timings with a zero gradient
    (``skip_gemm``). There m <- beta1·m each call: with 0.9 it is subnormal after ~770 calls
    and stays at ±2^-149 (0.9 × 2^-149 rounds back), where IEEE division takes ptxas's slow
    path (docs/kernels.md, "Ninth session"); 0.9999 keeps m normal for 7000 calls. beta1 is a
    by-value kernel argument, so the kernel runs the same instructions."""
    return rules.adamw_scalars(LR, (beta1, BETAS[1]), EPS, WD, step=10, device=device)


def make_case(N: int, K: int, T: int, optimizer: str, device="cuda", seed=0,
              operands=torch.bfloat16, weights=torch.float32, rounding="stochastic"):
    """One setup shared by every timed variant: inputs, weight, state (``weights`` dtype),
    program (a bf16 W rounded as ``rounding`` says), scalars."""
    g = torch.Generator(device=device).manual_seed(seed)
    dy = torch.randn(T, N, device=device, generator=g).to(operands)
    x = torch.randn(T, K, device=device, generator=g).div_(T ** 0.5).to(operands)
    p = torch.randn(N, K, device=device, generator=g)
    if optimizer == "adamw":
        prog = rules.adamw_program()
        state = [torch.randn(N, K, device=device, generator=g) * 1e-3,
                 torch.rand(N, K, device=device, generator=g) * 1e-6]
        scalars = rules.adamw_scalars(LR, BETAS, EPS, WD, step=10, device=device)
    elif optimizer == "sgd_momentum":
        prog = rules.sgd_program(momentum=True)
        state = [torch.randn(N, K, device=device, generator=g) * 1e-3]
        scalars = rules.sgd_scalars(LR, MOMENTUM, device=device)
    else:
        raise ValueError(optimizer)
    if weights == torch.bfloat16:
        prog = dataclasses.replace(prog, param_rounding=rounding)
    return dict(dy=dy, x=x, p=p.to(weights), state=[t.to(weights) for t in state], prog=prog,
                scalars=scalars, grad=torch.empty(N, K, device=device),
                step=torch.tensor(10.0, device=device))


def _has_mm_out_dtype(dy, x) -> bool:
    try:
        torch.mm(dy[:, :16].t(), x[:, :16], out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError):
        return False


def optimizer_step(c, optimizer: str, g) -> None:
    """torch's fused optimizer (``torch._fused_adamw_`` / ``torch._fused_sgd_``) on make_case's
    weight and state with the fp32 gradient ``g``: the anchor's second half."""
    p, st = c["p"], c["state"]
    if optimizer == "adamw":
        torch._fused_adamw_([p], [g], [st[0]], [st[1]], [], [c["step"]], lr=LR,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD, eps=EPS,
                            amsgrad=False, maximize=False)
    else:
        torch._fused_sgd_([p], [g], [st[0]], weight_decay=0.0, momentum=MOMENTUM, lr=LR,
                          dampening=0.0, nesterov=False, maximize=False,
                          is_first_step=False)


def anchor_fns(c, optimizer):
    """name -> callable for the unfused baselines (mm into an fp32 grad, then torch's fused opt)."""
    dy, x, grad = c["dy"], c["x"], c["grad"]
    fns = {}
    if c["p"].dtype == torch.bfloat16:      # a pure-bf16 model: eager's bf16 .grad, as it is
        def mm_bf16():
            optimizer_step(c, optimizer, torch.mm(dy.t(), x))
        fns["mm_bf16"] = mm_bf16
        return fns
    if dy.dtype == torch.float32:       # an fp32 model: cuBLAS SGEMM straight into the grad
        def mm_fp32():
            optimizer_step(c, optimizer, torch.mm(dy.t(), x, out=grad))
        fns["mm_fp32"] = mm_fp32
        return fns

    def cast():
        grad.copy_(torch.mm(dy.t(), x))
        optimizer_step(c, optimizer, grad)
    fns["mm_bf16+cast"] = cast
    if _has_mm_out_dtype(dy, x):
        def fp32_out():
            optimizer_step(c, optimizer, torch.mm(dy.t(), x, out_dtype=torch.float32))
        fns["mm_out_fp32"] = fp32_out
    return fns


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, median."""
    from triton.testing import do_bench
    src = torch.randn(2 ** 28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=400, quantiles=[0.5])
    return 2 * src.numel() * 4 / ms / 1e6


def forge_bytes(N, K, T, n_state, elt=2, w_elt=4):
    return N * K * w_elt * 2 * (1 + n_state) + T * (N + K) * elt


def run(shapes, tokens, optimizers, out_path, rep, operands=torch.bfloat16,
        weights=torch.float32, rounding="stochastic"):
    from triton.testing import do_bench
    import triton
    dev = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_GBps()
    print(f"# {dev}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for optimizer in optimizers:
        for (N, K) in shapes:
            for T in tokens:
                c = make_case(N, K, T, optimizer, operands=operands, weights=weights,
                              rounding=rounding)
                dy, x = c["dy"], c["x"]
                mm_q = do_bench(lambda: torch.mm(dy.t(), x), warmup=25, rep=rep,
                                quantiles=QUANTILES)
                anchors = {k: do_bench(f, warmup=25, rep=rep, quantiles=QUANTILES)
                           for k, f in anchor_fns(c, optimizer).items()}
                anchor_kind = ("mm_bf16" if weights == torch.bfloat16 else
                               "mm_fp32" if operands == torch.float32 else "mm_bf16+cast")
                best_kind = min(anchors, key=lambda k: anchors[k][0])

                def forge(c=c):          # bound now: `del c` ends each row
                    return flu.fused_linear_update_triton(dy, x, c["p"], c["state"],
                                                          c["scalars"], c["prog"])
                ck = forge()                 # autotunes (on scratch copies) + compiles
                cfg = flu.tuned_config(dy, x, c["p"], c["state"], c["scalars"], c["prog"])
                forge_q = do_bench(forge, warmup=25, rep=rep, quantiles=QUANTILES)
                nbytes = forge_bytes(N, K, T, len(c["state"]), elt=dy.element_size(),
                                     w_elt=c["p"].element_size())
                f_ms = forge_q[0]
                row = dict(
                    gpu=dev, torch=torch.__version__, triton=triton.__version__, date=date,
                    optimizer=optimizer, N=N, K=K, T=T, operands=str(operands).split(".")[-1],
                    **({"weights": "bfloat16", "bf16_rounding": rounding}
                       if weights == torch.bfloat16 else {}),
                    mm_ms=round(mm_q[0], 4), anchor_ms=round(anchors[anchor_kind][0], 4),
                    forge_ms=round(f_ms, 4),
                    forge_GBps=round(nbytes / f_ms / 1e6, 1),
                    roofline_frac=round(nbytes / f_ms / 1e6 / copy_gbps, 3),
                    forge_TFLOPs=round(2 * N * K * T / f_ms / 1e9, 1),
                    mm_TFLOPs=round(2 * N * K * T / mm_q[0] / 1e9, 1),
                    forge_vs_anchor=round(f_ms / anchors[anchor_kind][0], 3),
                    anchor_best_ms=round(anchors[best_kind][0], 4), anchor_best_kind=best_kind,
                    forge_vs_best_anchor=round(f_ms / anchors[best_kind][0], 3),
                    bytes=nbytes, copy_GBps=round(copy_gbps, 1),
                    anchor_kind=anchor_kind,
                    anchors_ms={k: round(v[0], 4) for k, v in anchors.items()},
                    forge_q20_q80=[round(forge_q[1], 4), round(forge_q[2], 4)],
                    anchor_q20_q80=[round(anchors[anchor_kind][1], 4),
                                    round(anchors[anchor_kind][2], 4)],
                    config=flu.dataclasses.asdict(cfg),
                    n_regs=getattr(ck, "n_regs", None), n_spills=getattr(ck, "n_spills", None),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
                if out_path:
                    with open(out_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                del c
                torch.cuda.empty_cache()
    print(markdown(rows))
    return rows


def config_label(c: dict) -> str:
    """A KernelConfig in words for tables (``dataclasses.asdict`` of it, or a row's "config")."""
    if c.get("SPLIT_GEMM_MB"):        # cuBLAS per row block + the epilogue-only kernel
        return f"split-GEMM ≤{c['SPLIT_GEMM_MB']:g} MiB, epilogue {c['BLOCK_N']}×{c['BLOCK_K']}"
    if c.get("WS"):                   # the warp-specialised Gluon kernel
        return (f"WS {c['BLOCK_N']}×{c['BLOCK_K']}×{c['BLOCK_T']}, {c['num_warps']} epilogue "
                f"warps, {c['num_stages']} stages, split {c['EPI_SPLIT']}, "
                f"{c['WS_SLOTS']} slots" + (f", L2 {c['WS_L2']}" if c.get("WS_L2") else "")
                + (", load warp" if c.get("WS_LOAD_WARP") else "")
                # (the eighteenth session's rows say WS_ROLL=1 for the 2 passes it had then)
                + (f", rolled ×{max(c['WS_ROLL'], 2)}" if c.get("WS_ROLL") else "")
                + (", fast IEEE" if c.get("WS_FAST_IEEE") else "")
                + (f", clusters of {c['WS_CLUSTER']}" if c.get("WS_CLUSTER", 1) > 1 else ""))
    return (f"{c['BLOCK_N']},{c['BLOCK_K']},{c['BLOCK_T']},{c['num_warps']},"
            f"{c['num_stages']},{int(c['PREFETCH'])},{c['EPI_SPLIT']},{int(c['EPI_PIPE'])}")


def markdown(rows) -> str:
    head = ("| opt | N×K | T | mm ms | anchor ms | best anchor ms | forge ms | forge/anchor | "
            "forge/best | forge GB/s | of copy BW | forge TFLOP/s | "
            "config (BN,BK,BT,warps,stages,prefetch,split,pipe) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cfg = config_label(r["config"])
        opt = r["optimizer"] + ("/fp32" if r.get("operands") == "float32" else "") + (
            f"/bf16 W {r['bf16_rounding']}" if r.get("weights") == "bfloat16" else "")
        lines.append(f"| {opt} | {r['N']}×{r['K']} | {r['T']} | {r['mm_ms']:.3f} | "
                     f"{r['anchor_ms']:.3f} | {r['anchor_best_ms']:.3f} | {r['forge_ms']:.3f} | "
                     f"{r['forge_vs_anchor']:.2f} | {r['forge_vs_best_anchor']:.2f} | "
                     f"{r['forge_GBps']:.0f} | {100 * r['roofline_frac']:.0f}% | "
                     f"{r['forge_TFLOPs']:.0f} | {cfg} |")
    return "\n".join(lines)


_PRECOMPILED = flu._GPU_CONFIGS + flu._GPU_WS_CONFIGS


def host_us_per_launch(cfg, n: int = 300, profile=None, launch=None) -> float:
    """Wall time per launch of ``cfg`` on a tiny AdamW shape (256×256×64: the GPU waits on the
    host), after 5 warm-up launches; ``profile`` (a cProfile.Profile) is enabled around the
    timed loop when given. ``launch``: the entry point (default fused_linear_update_triton
    with ``cfg``; the op itself for instance)."""
    c = make_case(256, 256, 64, "adamw")
    args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"].dumps())
    if launch is None:
        def launch(*a):
            flu.fused_linear_update_triton(*a, config=cfg, seed=0)
    return us_per_call(lambda: launch(*args), n, profile)


def us_per_call(fn, n: int = 300, profile=None) -> float:
    """Wall µs per call of ``fn`` (the GPU's work included up to a final sync), after 5 warm-up
    calls; ``profile`` (a cProfile.Profile) is enabled around the timed loop when given."""
    import time
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    if profile is not None:
        profile.enable()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t) / n * 1e6
    if profile is not None:
        profile.disable()
    return us


def _precompile_one(args):
    optimizer, idx, weights, rounding = args
    c = make_case(1024, 1024, 512, optimizer, weights=weights, rounding=rounding)
    cfg = _PRECOMPILED[idx]
    if cfg.WS and cfg not in flu.candidate_configs(c["dy"], c["x"], c["p"], c["state"]):
        return f"{optimizer} {idx} not a candidate here (shared memory)"
    try:
        flu.fused_linear_update_triton(c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                       c["prog"], config=cfg)
        torch.cuda.synchronize()
        return f"{optimizer} {idx} ok"
    except Exception as e:  # noqa: BLE001 - the autotuner skips it too
        return f"{optimizer} {idx} FAILED {type(e).__name__}: {str(e)[:200]}"


def precompile(optimizers, workers=8, weights=torch.float32, rounding="stochastic"):
    """Compile every candidate config in parallel processes (fills Triton's disk cache), so the
    sequential autotuning only loads kernels. Shapes divisible by 16 share one specialization."""
    import multiprocessing as mp
    jobs = [(o, i, weights, rounding) for o in optimizers for i in range(len(_PRECOMPILED))]
    with mp.get_context("spawn").Pool(workers) as pool:
        for r in pool.imap_unordered(_precompile_one, jobs):
            print("precompile", r, flush=True)


def plot(jsonl: str, png: str, gpu: str = "") -> None:
    """The latest bf16 run of ``jsonl`` (on a GPU whose name contains ``gpu``, if given) as two
    panels, forge/anchor and the fraction of copy bandwidth per row, with the issue's targets
    (≤ 0.6× and ≥ 80% for T ≤ 2048, ≤ 1.0× at T=8192)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(jsonl) if line.strip()]
    rows = [r for r in rows if r.get("operands", "bfloat16") == "bfloat16"
            and "weights" not in r and gpu in r["gpu"]]
    if not rows:
        raise SystemExit(f"no bf16 rows on a GPU named like {gpu!r} in {jsonl}")
    last = rows[-1]["date"]
    rows = [r for r in rows if r["date"] == last]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [f"{'AdamW' if r['optimizer'] == 'adamw' else 'SGD-m'} {r['N']}×{r['K']}\nT={r['T']}"
              for r in rows]
    x = range(len(rows))
    colors = [{512: "C0", 2048: "C1", 8192: "C2"}.get(r["T"], "C3") for r in rows]
    for ax, key, ylabel in ((axes[0], "forge_vs_anchor", "forge / anchor (lower is better)"),
                            (axes[1], "roofline_frac", "fraction of copy bandwidth")):
        bars = ax.bar(x, [r[key] for r in rows], color=colors)
        ax.bar_label(bars, fmt="%.3f" if key == "forge_vs_anchor" else "%.2f", fontsize=6,
                     padding=2)
        ax.set_xticks(list(x), labels, fontsize=6, rotation=90)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.2)
    axes[0].axhline(0.6, color="k", ls="--", lw=0.8, label="target T ≤ 2048: ≤ 0.6")
    axes[0].axhline(1.0, color="k", ls=":", lw=0.8, label="target T = 8192: ≤ 1.0")
    axes[1].axhline(0.8, color="k", ls="--", lw=0.8, label="target T ≤ 2048: ≥ 0.8")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    r0 = rows[0]
    fig.suptitle(f"fused GEMM + update vs mm then torch fused optimizer; {r0['gpu']}, torch "
                 f"{r0['torch']}, Triton {r0['triton']}, {last} (blue T=512, orange 2048, "
                 f"green 8192)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    print(f"wrote {png} ({len(rows)} rows of {last})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "fused_linear_update.jsonl"))
    ap.add_argument("--quick", action="store_true", help="4096×4096 only")
    ap.add_argument("--shapes", default=None, metavar="NxK,...",
                    help="weight shapes instead of the issue's three, e.g. 2048x2048,32000x2048 "
                         "(bench_e2e's Llama)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--precompile", type=int, default=8, help="parallel compile workers (0: off)")
    ap.add_argument("--operands", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of dY and X (float32: an fp32 model; IEEE fp32 dots vs SGEMM)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="T values")
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of W and its state (bfloat16: a pure-bf16 model)")
    ap.add_argument("--bf16-rounding", default="stochastic", choices=["stochastic", "nearest"],
                    help="with --weights bfloat16: how forge rounds W (bf16_rounding)")
    ap.add_argument("--ncu-row", default=None, metavar="OPT,N,K,T",
                    help="launch only forge's kernel for one row, 3 times (for ncu "
                         "--launch-skip 2 --launch-count 1); uses the tuning cache")
    ap.add_argument("--ncu-config", default=None, metavar="ws:I|triton:I",
                    help="with --ncu-row: this candidate (_GPU_WS_CONFIGS[I] or "
                         "_GPU_CONFIGS[I]) instead of the tuned one")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="no GPU work: chart the latest bf16 run in --out and write PNG")
    ap.add_argument("--gpu", default="", help="with --plot: the latest run on a GPU whose "
                    "name contains this (e.g. H100, H200)")
    a = ap.parse_args()
    if a.plot:
        plot(a.out, a.plot, a.gpu)
        return
    if a.ncu_row:
        opt, N, K, T = a.ncu_row.split(",")
        c = make_case(int(N), int(K), int(T), opt, weights=getattr(torch, a.weights),
                      rounding=a.bf16_rounding)
        cfg = None
        if a.ncu_config:
            kind, idx = a.ncu_config.split(":")
            cfg = {"ws": flu._GPU_WS_CONFIGS, "triton": flu._GPU_CONFIGS}[kind][int(idx)]
        for _ in range(3):
            ck = flu.fused_linear_update_triton(c["dy"], c["x"], c["p"], c["state"],
                                                c["scalars"], c["prog"], config=cfg)
        torch.cuda.synchronize()
        cfg = cfg or flu.tuned_config(c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                      c["prog"])
        print("ncu row", a.ncu_row, cfg, "regs", getattr(ck, "n_regs", None),
              "spills", getattr(ck, "n_spills", None), "smem", ck.metadata.shared)
        return
    shapes = SHAPES[:1] if a.quick else SHAPES
    if a.shapes:
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            ap.error(f"--shapes {a.shapes!r}: give N×K pairs as NxK,NxK, e.g. 2048x2048,5632x2048")
    operands, weights = getattr(torch, a.operands), getattr(torch, a.weights)
    if a.precompile and operands == torch.bfloat16:     # the precompiled variants are bf16's
        precompile(a.optimizers.split(","), a.precompile, weights, a.bf16_rounding)
    run(shapes, [int(t) for t in a.tokens.split(",")], a.optimizers.split(","), a.out, a.rep,
        operands, weights, a.bf16_rounding)


if __name__ == "__main__":
    main()
