"""How the L2 state and the host change one row's time: forge's warp-specialised kernel, the
anchor and same-sized copies, each timed five ways.

Why: the study script (``do_bench_cudagraph``) measured AdamW 4096² T=512 at 0.159 ms and the
benchmark (``do_bench``) at 0.164-0.165 ms. ``do_bench`` zeroes a 256 MB buffer before every
run (L2 cold, and left full of dirty lines that must be written back while the timed kernel
runs); ``do_bench_cudagraph`` flushes nothing; a host slower than the GPU would add its gaps to
either. The modes separate the three:

  do_bench        triton.testing.do_bench (256 MB memset before each run), median
  graph           triton.testing.do_bench_cudagraph (no flush), median
  ev_memset       CUDA events around each run, 256 MB memset before it (do_bench's flush)
  ev_readflush    CUDA events, a 256 MB read before each run (L2 cold, no dirty lines)
  ev_warm         CUDA events, back to back (no flush)

The ``ev_*`` loops are enqueued behind a GPU sleep (``torch.cuda._sleep``), so the GPU never
waits on the host: no host time is in them. On the GPU device:
  python3 benchmarks/experiments/timing_modes.py --out $OUT/timing_modes.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.bench_fused_linear_update import anchor_fns, forge_bytes, make_case  # noqa: E402
from benchmarks.experiments.bench_fused_linear_update_tma import save_rows  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402


def events_ms(fn, flush, n: int = 100) -> float:
    """Median of ``n`` runs of ``fn`` between CUDA events, ``flush`` (or nothing) before each,
    all enqueued behind a GPU sleep long enough that the host never starves the GPU."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(4e8))     # ~0.2 s at 1.98 GHz: covers n × (host time of a run)
    for s, e in zip(starts, ends):
        if flush is not None:
            flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def flushers():
    """(memset flush, read flush) of a 256 MB buffer, do_bench's size: the memset leaves L2 full
    of dirty lines, the read (a sum into one element) leaves it cold and clean."""
    cache = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    sink = torch.empty((), dtype=torch.int64, device="cuda")
    return cache.zero_, lambda: torch.sum(cache, 0, dtype=torch.int64, out=sink)


def modes(fn) -> dict:
    from triton.testing import do_bench, do_bench_cudagraph
    memset_flush, read_flush = flushers()
    return {
        "do_bench": do_bench(fn, warmup=25, rep=200, return_mode="median"),
        "graph": do_bench_cudagraph(fn, rep=200, return_mode="median"),
        "ev_memset": events_ms(fn, memset_flush),
        "ev_readflush": events_ms(fn, read_flush),
        "ev_warm": events_ms(fn, None),
    }


def main() -> None:
    import triton
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", default="4096,4096,512", help="N,K,T")
    ap.add_argument("--ws-config", type=int, default=1,
                    help="index into _GPU_WS_CONFIGS (1: the benchmark's pick at T=512, "
                         "2: at T=2048; bench.log, 2026-11-23 16:4x UTC)")
    a = ap.parse_args()
    t0 = time.time()
    N, K, T = map(int, a.shape.split(","))
    c = make_case(N, K, T, "adamw")
    nbytes = forge_bytes(N, K, T, 2)
    cfg = flu._GPU_WS_CONFIGS[a.ws_config]
    src = torch.randn(nbytes // 8, device="cuda")       # a copy moving forge's bytes
    dst = torch.empty_like(src)
    big = torch.randn(2 ** 28, device="cuda")            # the benchmark's 1 GiB copy
    big_dst = torch.empty_like(big)
    fns = {
        "forge_ws": lambda: flu.fused_linear_update_triton(
            c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"], config=cfg, seed=0),
        "anchor_mm_cast_fused_adamw": anchor_fns(c, "adamw")["mm_bf16+cast"],
        "copy_same_bytes": lambda: dst.copy_(src),
        "copy_1GiB": lambda: big_dst.copy_(big),
    }
    moved = {"forge_ws": nbytes, "anchor_mm_cast_fused_adamw": None,
             "copy_same_bytes": 2 * src.numel() * 4, "copy_1GiB": 2 * big.numel() * 4}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = (f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, {date}; AdamW {N}×{K} T={T}, forge {cfg}")
    print(head, flush=True)
    rows = []
    for name, fn in fns.items():
        m = modes(fn)
        row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, date=date, N=N, K=K, T=T, fn=name,
                   bytes=moved[name], **{k: round(v, 4) for k, v in m.items()})
        if moved[name]:
            row.update({f"{k}_GBps": round(moved[name] / v / 1e6, 1) for k, v in m.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ("do_bench", "graph", "ev_memset", "ev_readflush", "ev_warm")
    print("| fn (ms) | " + " | ".join(cols) + " |")
    for r in rows:
        print(f"| {r['fn']} | " + " | ".join(
            f"{r[k]:.4f}" + (f" ({r[k + '_GBps']:.0f} GB/s)" if r["bytes"] else "")
            for k in cols) + " |")
    if a.out:
        save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
