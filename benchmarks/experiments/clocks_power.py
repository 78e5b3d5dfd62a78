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

Run 31 adds energy: NVML's energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, read
through ctypes: the driver's own library, no package) over the last 2 s of each sustained
phase gives joules per call and the mean power. References for the stream's energy per byte:
a device copy of the same DRAM bytes and torch's fused optimizer alone. And a control that
changes power but nothing else: the GEMM alone and the fused kernel with dY = X = 0 run the
same instructions on the same bytes (AdamW with the zero-gradient scalars that keep m normal),
but the tensor cores' operands do not toggle. If the fused kernel is bound by the board's
power limit, zero operands make it faster; if it is bound by a unit's throughput, they do not.
Run 32 repeats it with run 29's attribution (stream alone; the fused kernel without its wgmma,
``skip_mma``; fused) under ``do_bench`` too, whose memset between calls keeps the clock up.
    python benchmarks/experiments/clocks_power.py [--out PATH]
"""
from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    anchor_fns, make_case, optimizer_step, zero_grad_adamw_scalars)
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import fused_linear_update_ws  # noqa: E402
from bench_fused_linear_update_tma import (  # noqa: E402
    graphed, save_rows, study_args, study_setup)

SUSTAIN_S = 2.5
RAMP_S = 0.5        # clock samples and the energy window start this long into a phase
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


class Energy:
    """NVML's total-energy counter of GPU 0 (mJ since the driver loaded), through ctypes."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.handle = ctypes.c_void_p()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(0), ctypes.byref(self.handle)):
            raise RuntimeError("nvmlDeviceGetHandleByIndex_v2(0) failed")

    def mJ(self) -> int:
        e = ctypes.c_ulonglong()
        if self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(e)):
            raise RuntimeError("nvmlDeviceGetTotalEnergyConsumption failed")
        return e.value


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


def sustained(fn, sampler: Sampler, energy: Energy) -> dict:
    """fn back to back for SUSTAIN_S seconds (graph replays): ms and mJ per call over the phase
    after its first RAMP_S seconds, the mean power there, and the sampled clocks."""
    fn()
    torch.cuda.synchronize()
    replay = graphed(fn, CALLS_PER_GRAPH, warmup=2)
    replay()
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.monotonic()
    n = e0 = 0
    while time.monotonic() - t0 < SUSTAIN_S:
        if not e0 and time.monotonic() - t0 >= RAMP_S:
            e0 = energy.mJ()          # the GPU is synchronised here: the window starts now
            ev0.record()
            n = 0
        for _ in range(20):
            replay()
        n += 20
        torch.cuda.synchronize()     # the host stays within 20 replays of the GPU
    ev1.record()
    torch.cuda.synchronize()
    e1 = energy.mJ()
    t1 = time.monotonic()
    ms_total = ev0.elapsed_time(ev1)
    calls = n * CALLS_PER_GRAPH
    return {"ms": round(ms_total / calls, 4), "mJ_per_call": round((e1 - e0) / calls, 4),
            "mean_W": round((e1 - e0) / ms_total, 1), **sampler.window(t0, t1)}


def under_do_bench(fn, sampler: Sampler) -> dict:
    from triton.testing import do_bench
    t0 = time.monotonic()
    ms = do_bench(fn, warmup=200, rep=int(SUSTAIN_S * 1000), quantiles=[0.5])
    return {"ms": round(ms, 4), **sampler.window(t0, time.monotonic())}


def main():
    a = study_args(__doc__, "clocks_power.jsonl")
    t0 = time.time()
    rows, emit, _ = study_setup([], t0)
    sampler, energy = Sampler(), Energy()
    limits = subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm,clocks.max.mem",
                             "--format=csv,noheader"], capture_output=True, text=True).stdout
    print("power limit, max SM clock, max memory clock:", limits.strip(), flush=True)
    torch.cuda.synchronize()
    ti, ei = time.monotonic(), energy.mJ()
    time.sleep(2.0)
    emit(study="clocks and power", variant="idle", limits=limits.strip(),
         mean_W=round((energy.mJ() - ei) / (time.monotonic() - ti) / 1e3, 1),
         **sampler.window(ti - RAMP_S, time.monotonic()))
    for opt, T, ws in (("adamw", 512, 0), ("adamw", 2048, 4), ("sgd_momentum", 2048, 5)):
        cfg = flu._GPU_WS_CONFIGS[ws]
        c = make_case(4096, 4096, T, opt)
        args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], cfg)
        zsc = zero_grad_adamw_scalars() if opt == "adamw" else c["scalars"]
        zargs = args[:4] + (zsc,) + args[5:]
        dy, x, st, grad = c["dy"], c["x"], c["state"], c["grad"]
        grad.copy_(torch.mm(dy.t(), x))
        # dY = X = 0: the same launch, instructions and bytes; the tensor cores see zeros
        zero_args = (torch.zeros_like(dy), torch.zeros_like(x)) + zargs[2:]
        # the stream's DRAM bytes (W/state read and written once) as one copy
        src = torch.randn(4096 * 4096 * (1 + len(st)), device="cuda")
        dst = torch.empty_like(src)
        variants = {
            "mm alone": lambda: torch.mm(dy.t(), x),
            "anchor": anchor_fns(c, opt)["mm_bf16+cast"],
            "copy same bytes": lambda: dst.copy_(src),
            "torch optimizer alone": lambda: optimizer_step(c, opt, grad),
            "stream alone": lambda: fused_linear_update_ws(*zargs, skip_gemm=True),
            "gemm alone": lambda: fused_linear_update_ws(*args, skip_epilogue=True),
            "gemm alone, zero operands": lambda: fused_linear_update_ws(*zero_args,
                                                                        skip_epilogue=True),
            "fused without wgmma": lambda: fused_linear_update_ws(*zargs, skip_mma=True),
            "fused": lambda: fused_linear_update_ws(*args),
            "fused, zero operands": lambda: fused_linear_update_ws(*zero_args),
        }
        for name, fn in variants.items():
            emit(study="clocks and power", mode="sustained", optimizer=opt, N=4096, K=4096,
                 T=T, config=f"ws{ws}", variant=name, **sustained(fn, sampler, energy))
            time.sleep(0.5)
        for name in ("anchor", "stream alone", "gemm alone", "fused without wgmma", "fused",
                     "fused, zero operands"):
            emit(study="clocks and power", mode="do_bench", optimizer=opt, N=4096, K=4096,
                 T=T, config=f"ws{ws}", variant=name, **under_do_bench(variants[name], sampler))
            time.sleep(0.5)
        torch.cuda.empty_cache()
    sampler.close()
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
