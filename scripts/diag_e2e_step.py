"""Where one training step's time goes, per method: benchmarks/bench_e2e.py's Llama (default 4
layers, 1x512, bf16 autocast), each method timed (median of --steps after 2 warm-up steps), then
2 steps under torch.profiler: wall time per step, GPU kernel time per step (the sum of every
kernel's own time: below the wall time, the GPU waited on the host), and the kernels that take
the most GPU time. One process, the methods one after the other (torch._dynamo.reset() between).
    python scripts/diag_e2e_step.py [--layers 4] [--config 1x512] [--amp bf16]
        [--methods eager_fused,compile_inductor,forge] [--out DIR]
Writes DIR/diag_e2e_step_CONFIG_AMP.txt (the tables, line by line) when --out is given.
"""
import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def kernel_table(prof, steps: int, top: int):
    """-> (GPU kernel ms per step, kernel launches per step, [(ms per step, calls per step,
    name)] of the top kernels)."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:                                    # torch < 2.5 spelling
            t = e.self_cuda_time_total
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3 / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    return sum(r[0] for r in rows), sum(r[1] for r in rows), rows[:top]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_model_args(p, layers=4, amp="bf16")
    p.add_argument("--methods", default="eager_fused,compile_inductor,forge")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--out")
    p.add_argument("--cprofile", type=int, default=0,
                   help="also run this many steps under cProfile: the host functions by own time")
    p.add_argument("--trace", action="store_true",
                   help="also write the profiled steps' chrome trace (gzipped, under --out) and "
                        "where the GPU waited in it (scripts/trace_gaps.py)")
    p.add_argument("--cuda-only", action="store_true",
                   help="profile the GPU side alone (kernels and the runtime's launch calls, no "
                        "host ops: less profiler time on the host, so the gaps are nearer an "
                        "unprofiled step's; the trace then names no host op)")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, batch, seq, dev, build = B.model_setup(a)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    say = B.line_writer(a.out, f"diag_e2e_step_{a.config.replace('+', '_')}_{a.amp}.txt",
                        f"{B.model_name(cfg, a.amp)}, {a.config}, torch {torch.__version__}, "
                        f"{B.device_name(dev)}")
    for method in a.methods.split(","):
        torch._dynamo.reset()
        model = build()
        step, keep = B.make_method(method, model, "inductor", B.forward_context(a.amp, dev.type))
        data = B.make_batches(cfg, batch, seq, 2 + a.steps + 2, dev)
        warm, times, _, peak = B.warm_and_time(step, data[:2], data[2:2 + a.steps], dev)
        acts = ([] if a.cuda_only and cuda else [ProfilerActivity.CPU]) + \
            ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for ids in data[-2:]:
                step(ids)
            sync()
        gpu_ms, launches, top = kernel_table(prof, 2, a.top)
        if a.trace and a.out:
            import gzip
            import shutil

            import trace_gaps
            raw = os.path.join(a.out, f"trace_{method}.json")
            prof.export_chrome_trace(raw)
            gaps = trace_gaps.analyse(trace_gaps.load(raw), top=a.top)
            with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(raw)
        wall = 1e3 * statistics.median(times)
        say(f"\n== {method}: {wall:.2f} ms/step (median of {a.steps}; all {[round(1e3 * t, 1) for t in times]}), "
            f"GPU kernels {gpu_ms:.2f} ms/step ({100 * gpu_ms / wall:.0f}% of the wall, "
            f"{launches:.0f} launches), peak "
            f"{peak:.2f} GiB over the timed steps, warm-up {warm:.0f} s")
        for ms, calls, name in top:
            say(f"  {ms:8.3f} ms  {calls:6.1f}x  {name[:110]}")
        if a.trace and a.out:
            say("  where the GPU waited, 2 steps (scripts/trace_gaps.py):")
            for ln in gaps:
                say("    " + ln)
        if a.cprofile:
            import cProfile
            import io
            import pstats
            data2 = B.make_batches(cfg, batch, seq, a.cprofile, dev, seed=7)
            pr = cProfile.Profile()
            sync()
            pr.enable()
            for ids in data2:
                step(ids)
            sync()
            pr.disable()
            buf = io.StringIO()
            st = pstats.Stats(pr, stream=buf)
            say(f"  host, {a.cprofile} steps under cProfile ({st.total_tt * 1e3 / a.cprofile:.1f} ms/step); "
                "by own time, then by cumulative time:")
            st.sort_stats("tottime").print_stats(a.top)
            st.sort_stats("cumulative").print_stats(a.top + 10)
            rows = False
            for ln in buf.getvalue().splitlines():
                rows = rows or "ncalls" in ln          # pstats' header; the table follows it
                if rows and ln.strip():
                    say("    " + ln.strip()[:160])
        del step, keep, model
        if cuda:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
