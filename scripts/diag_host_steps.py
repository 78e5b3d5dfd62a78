"""Per-step host counters of a compiled training step (benchmarks/bench_e2e.py's Llama): for
each timed step its wall time, the fused op's launch plans made and used, the launch cache's
hits and misses, the WS module's descriptor encodings kept, and Python's garbage collections
and their time. Steps alternate between bench_e2e's protocol (the loss read with float() after
each step, the previous loss held) and diag_e2e_step's (the result dropped), in one process.
    python scripts/diag_host_steps.py [--layers 16] [--config 1x512] [--amp bf16] [--steps 12]
        [--method forge] [--out DIR]
"""
import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_model_args(p, layers=16, amp="bf16")
    p.add_argument("--method", default="forge")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out")
    a = p.parse_args()
    from forge_compile.kernels import fused_linear_update as flu
    from forge_compile.kernels import launch_cache
    try:
        from forge_compile.kernels import fused_linear_update_ws as ws
    except ImportError:
        ws = None
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, batch, seq, dev, build = B.model_setup(a)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = build()
    step, keep = B.make_method(a.method, model, "inductor", B.forward_context(a.amp, dev.type))
    data = B.make_batches(cfg, batch, seq, a.warmup + a.steps, dev)
    gc_t = {"n": 0, "s": 0.0, "t0": 0.0, "gen2": 0}
    # host time inside the op's two paths: a plan's launch, and the full path (checks, tuned
    # config, arguments, launch cache)
    op_t = {"plan": 0.0, "full": 0.0, "nfull": 0}
    plan_run, full = flu._Plan.run, flu._triton_checked

    def timed_plan_run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return plan_run(self, *args, **kwargs)
        finally:
            op_t["plan"] += time.perf_counter() - t

    def timed_full(*args, **kwargs):
        t = time.perf_counter()
        try:
            return full(*args, **kwargs)
        finally:
            op_t["full"] += time.perf_counter() - t
            op_t["nfull"] += 1
    flu._Plan.run, flu._triton_checked = timed_plan_run, timed_full

    def on_gc(phase, info):
        if phase == "start":
            gc_t["t0"] = time.perf_counter()
        else:
            gc_t["n"] += 1
            gc_t["s"] += time.perf_counter() - gc_t["t0"]
            gc_t["gen2"] += info["generation"] == 2
    gc.callbacks.append(on_gc)
    lines = [f"{B.model_name(cfg, a.amp)}, {a.config}, {a.method}, torch {torch.__version__}, "
             f"{B.device_name(dev)}, warm-up {a.warmup} steps"]
    print(lines[0], flush=True)
    t0 = time.perf_counter()
    for i in range(a.warmup):
        float(step(data[i]))            # bench_e2e's warm-up reads each loss too
    sync()
    lines.append(f"warm-up {time.perf_counter() - t0:.0f} s")
    print(lines[-1], flush=True)

    def counters():
        return (flu.PLAN_STATS["made"], flu.PLAN_STATS["hits"], launch_cache.STATS["hits"],
                launch_cache.STATS["misses"], len(ws._ENCODED) if ws is not None else -1,
                gc_t["n"], gc_t["gen2"], gc_t["s"], op_t["plan"], op_t["full"], op_t["nfull"])
    times = {"bench": [], "diag": []}
    held = None
    for i in range(a.warmup, a.warmup + a.steps):
        mode = "bench" if (i - a.warmup) % 2 == 0 else "diag"
        c0 = counters()
        sync()
        t = time.perf_counter()
        out = step(data[i])
        sync()
        ms = 1e3 * (time.perf_counter() - t)
        if mode == "bench":
            held = out
            float(held)
        else:
            del out
        c1 = counters()
        d = [b - a_ for a_, b in zip(c0, c1)]
        times[mode].append(ms)
        lines.append(f"step {i} {mode:5s} {ms:7.2f} ms  plans made {d[0]:3d} used {d[1]:3d}  "
                     f"launch cache hits {d[2]:3d} misses {d[3]:3d}  encodings kept {c1[4]:5d} "
                     f"(+{d[4]})  gc {d[5]} (gen2 {d[6]}) {1e3 * d[7]:.2f} ms  in plans "
                     f"{1e3 * d[8]:.2f} ms, full path {d[10]}x {1e3 * d[9]:.2f} ms")
        print(lines[-1], flush=True)
    for mode, ts in times.items():
        if ts:
            lines.append(f"{mode}: median {statistics.median(ts):.2f} ms of {len(ts)}")
            print(lines[-1], flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"diag_host_steps_{a.method}_{a.config}_{a.amp}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
