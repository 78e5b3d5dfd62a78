"""Study (sixteenth session, run 42): the L2 eviction priority of the W/state stores.

Why: the shipped warp-specialised kernels store W and the state with ``gl.store(...,
eviction_policy="evict_first")`` (since the fourth session; never measured on its own in the
warp-specialised kernel). The fused kernel streams at 85-87% of a copy of its own bytes, the
stream alone at 91-93% (docs/kernels.md, "Ninth session"), and 179 of its 201 MB of writes
reach DRAM inside the kernel (ncu, AdamW 4096² T=512): evict-first lines leave L2 as soon as
a set needs room, in whatever order the sets fill, while a copy's writes leave L2 in address
order. Does a normal or evict-last priority let L2 write W/state back in longer runs?

Method: the shipped config's generated source with the store policy replaced (nothing else
changes; the loads are TMA, with their own L2 modes), launched with the shipped launcher's
arguments. Every variant's W/state must equal the shipped kernel's bit for bit (the priority
changes no value). Interleaved rounds, median of each timing, two timers:
  do_bench   the benchmark's protocol (a 256 MB memset before each call; the call replayed from
             a CUDA graph): dirty lines left in L2 at the end are written back during the next
             memset, outside the timing;
  graph      back-to-back replays of a CUDA graph of 20 calls: each call pays for the previous
             one's dirty lines, so a policy that only leaves more dirty lines behind gains
             nothing here.
    python benchmarks/experiments/store_policy.py [--out PATH]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import make_case  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels import fused_linear_update_ws as ws  # noqa: E402
from forge_compile.kernels.fused_linear_update import _import_generated  # noqa: E402
from bench_fused_linear_update_tma import (  # noqa: E402
    graphed, save_rows, study_args, study_setup)

SHIPPED = 'eviction_policy="evict_first")'
POLICIES = {"evict_first (shipped)": SHIPPED, "normal": ")",
            "evict_last": 'eviction_policy="evict_last")'}
# (rule, T, index into _GPU_WS_CONFIGS): the T=512 picks ws0/ws1, the T=2048 picks ws4/ws6
ROWS = [("adamw", 512, 0), ("adamw", 512, 1), ("adamw", 2048, 6), ("adamw", 2048, 4),
        ("sgd_momentum", 2048, 6)]


def variant_kernel(cfg, prog, policy: str):
    """The config's kernel with the W/state stores' policy replaced (source otherwise equal)."""
    src = ws.kernel_source(prog, *ws.kernel_args(cfg))
    stores = src.count(SHIPPED)
    assert stores > 0 and src.count("gl.store(") == stores, "every gl.store is a W/state store"
    if cfg.WS_L2 and not ws._tma_takes("cache_policy"):
        ws._install_l2_hint_hook()
    src = src.replace(SHIPPED, POLICIES[policy])
    return _import_generated(src, "flu_ws_store")._fused_linear_update_ws_kernel


def main():
    from triton.testing import do_bench
    a = study_args(__doc__, "store_policy.jsonl")
    t0 = time.time()
    rows, emit, bw = study_setup([], t0)
    bad = 0
    for rule, T, idx in ROWS:
        cfg = flu._GPU_WS_CONFIGS[idx]
        c = make_case(4096, 4096, T, rule)
        dy, x, p, st, sc, prog = c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"]
        k0, grid, args, kwargs = ws.ws_launch_args(dy, x, p, st, sc, prog, cfg)
        pi = 2 + (len(st) + 1)           # W's position among the arguments (after the descs)
        assert args[pi] is p
        fns = {}
        for name in POLICIES:
            k = variant_kernel(cfg, flu.load_program(prog), name)
            fns[name] = (lambda k=k: k[grid](*args, **kwargs))
        # bit for bit: the same inputs through the shipped kernel and each variant
        ref = None
        for name, f in [("shipped launcher", lambda: ws.fused_linear_update_ws(
                dy, x, p, st, sc, prog, cfg))] + list(fns.items()):
            saved = [p.clone(), *[s.clone() for s in st]]
            f()
            out = [p.clone(), *[s.clone() for s in st]]
            for t, s0 in zip([p, *st], saved):
                t.copy_(s0)
            if ref is None:
                ref = out
            elif not all(torch.equal(u, v) for u, v in zip(out, ref)):
                bad += 1
                print(f"  FAIL {rule} T={T} ws{idx} {name}: not bit for bit", flush=True)
        timers = {"do_bench": {n: graphed(f) for n, f in fns.items()},
                  "graph": {n: graphed(f, calls=20) for n, f in fns.items()}}
        times = {(tm, n): [] for tm in timers for n in fns}
        for _ in range(5):               # interleaved rounds
            for n in fns:
                times[("do_bench", n)].append(do_bench(timers["do_bench"][n], warmup=10,
                                                       rep=100, quantiles=[0.5]))
                g = timers["graph"][n]
                g()
                torch.cuda.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(5):
                    g()
                e1.record()
                torch.cuda.synchronize()
                times[("graph", n)].append(e0.elapsed_time(e1) / 100)
        for (tm, n), v in times.items():
            emit(study="store_policy", optimizer=rule, N=4096, K=4096, T=T, config=f"ws{idx}",
                 timer=tm, policy=n, ms=round(statistics.median(v), 5),
                 ms_rounds=[round(t, 5) for t in v])
        del c
        torch.cuda.empty_cache()
    print(f"bit-for-bit failures: {bad}", flush=True)
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
