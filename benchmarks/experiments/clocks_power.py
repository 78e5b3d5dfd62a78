"""Study: does the fused kernel run at a lower SM clock than its parts? (docs/kernels.md,
"Thirteenth session", run 30.)

Runs 28-29 left the T=2048 fused kernel 42-51 µs above its W/state stream alone, with the
wgmma alone adding 12-29 µs even when every dY/X load hits L2. One cause no run separated: an
H100 at its power limit lowers its SM clock, and the fused kernel is the only one that keeps
the tensor cores and DRAM busy together. This runs each variant back to back for 2 s (a CUDA
graph of 10 calls, replayed) while ``nvidia-smi`` samples the SM and memory clocks, the power
draw and the clock-event reasons every 20 ms, and once more under ``triton.testing.do_bench``
(the benchmark's protocol: a 256 MB memset before each call). Variants, 4096²: cuBLAS mm alone,
the anchor (mm, cast, torch's fused optimizer), the shipped WS kernel's W/state stream alone
(grad 0), its GEMM alone, and the fused kernel. Nothing on the card is changed (read-only
queries). Samples from the first 0.3 s of each phase are dropped (the clock ramps).
    python benchmarks/experiments/clocks_power.py [--out PATH]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (anchor_fns, make_case,  # noqa: E402
                                                  zero_grad_adamw_scalars)
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws  # noqa: E402
from bench_fused_linear_update_tma import save_rows, study_args, study_setup  # noqa: E402

SUSTAIN_S = 2.0
RAMP_S = 0.3
CALLS_PER_GRAPH = 10
# nvidia-smi's clock-event reason bits (nvml.h, nvmlClocksEventReason*)
REASONS = {0x1: "idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
           0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
FIELDS = ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu"]


def _reason_field() -> str:
    """The driver's name for the clock-event reasons (renamed from 'throttle' in 2023)."""
    for f in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        r = subprocess.run(["nvidia-smi", f"--query-gpu={f}", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if r.returncode == 0 and "not a valid field" not in r.stdout.lower():
            return f
    raise RuntimeError("nvidia-smi knows neither clocks_event_reasons nor "
                       "clocks_throttle_reasons")


class Sampler:
    """nvidia-smi -lms 20 in the background; samples tagged with the host's monotonic clock."""

    def __init__(self):
        self.reason = _reason_field()
        self.samples = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=" + ",".join(FIELDS + [self.reason]),
             "--format=csv,noheader,nounits", "-lms", "20"],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                sm, mem, pw, temp = (float(p) for p in parts[:4])
                reasons = int(parts[4], 16)
            except (ValueError, IndexError):
                continue
            self.samples.append((time.monotonic(), sm, mem, pw, temp, reasons))

    def window(self, t0: float, t1: float) -> dict:
        s = [x for x in self.samples if t0 + RAMP_S <= x[0] <= t1]
        if not s:
            return {"samples": 0}
        union = 0
        for x in s:
            union |= x[5]
        return {"samples": len(s),
                "sm_MHz": statistics.median(x[1] for x in s),
                "sm_MHz_min": min(x[1] for x in s),
                "mem_MHz": statistics.median(x[2] for x in s),
                "power_W": statistics.median(x[3] for x in s),
                "power_W_max": max(x[3] for x in s),
                "temp_C": max(x[4] for x in s),
                "power_capped_frac": round(sum(bool(x[5] & 0x4) for x in s) / len(s), 2),
                "reasons": sorted(n for b, n in REASONS.items() if union & b)}

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def sustained(fn, sampler: Sampler) -> dict:
    """fn back to back for SUSTAIN_S seconds (graph replays); ms per call and the clocks."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(2):                      # warm-up on a side stream, as graphs want
            fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.monotonic()
    ev0.record()
    n = 0
    while time.monotonic() - t0 < SUSTAIN_S:
        for _ in range(20):
            g.replay()
        n += 20
        torch.cuda.synchronize()     # the host stays within 20 replays of the GPU
    ev1.record()
    torch.cuda.synchronize()
    t1 = time.monotonic()
    return {"ms": round(ev0.elapsed_time(ev1) / (n * CALLS_PER_GRAPH), 4),
            **sampler.window(t0, t1)}


def under_do_bench(fn, sampler: Sampler) -> dict:
    from triton.testing import do_bench
    t0 = time.monotonic()
    ms = do_bench(fn, warmup=200, rep=int(SUSTAIN_S * 1000), quantiles=[0.5])
    return {"ms": round(ms, 4), **sampler.window(t0, time.monotonic())}


def main():
    a = study_args(__doc__, "clocks_power.jsonl")
    t0 = time.time()
    rows, emit, _ = study_setup([], t0)
    sampler = Sampler()
    limits = subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm,clocks.max.mem",
                             "--format=csv,noheader"], capture_output=True, text=True).stdout
    print("power limit, max SM clock, max memory clock:", limits.strip(), flush=True)
    time.sleep(1.5)
    emit(study="clocks and power", variant="idle", limits=limits.strip(),
         **sampler.window(time.monotonic() - 1.2 - RAMP_S, time.monotonic()))
    for opt, T, ws in (("adamw", 512, 0), ("adamw", 2048, 4), ("sgd_momentum", 2048, 5)):
        cfg = flu._GPU_WS_CONFIGS[ws]
        c = make_case(4096, 4096, T, opt)
        args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], cfg)
        zsc = zero_grad_adamw_scalars() if opt == "adamw" else c["scalars"]
        zargs = args[:4] + (zsc,) + args[5:]
        dy, x = c["dy"], c["x"]
        anchor = anchor_fns(c, opt)["mm_bf16+cast"]
        variants = {
            "mm alone": lambda: torch.mm(dy.t(), x),
            "anchor": anchor,
            "stream alone": lambda: fused_linear_update_ws(*zargs, skip_gemm=True),
            "gemm alone": lambda: fused_linear_update_ws(*args, skip_epilogue=True),
            "fused": lambda: fused_linear_update_ws(*args),
        }
        for name, fn in variants.items():
            emit(study="clocks and power", mode="sustained", optimizer=opt, N=4096, K=4096,
                 T=T, config=f"ws{ws}", variant=name, **sustained(fn, sampler))
            time.sleep(0.5)
        for name in ("anchor", "fused"):
            emit(study="clocks and power", mode="do_bench", optimizer=opt, N=4096, K=4096,
                 T=T, config=f"ws{ws}", variant=name, **under_do_bench(variants[name], sampler))
            time.sleep(0.5)
        del c, variants
        torch.cuda.empty_cache()
    sampler.close()
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
