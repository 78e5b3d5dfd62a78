"""Does where W, m and v sit in memory, or the order the CTAs walk the tiles in, change the
T=512 row's time? Warp-specialised kernel, AdamW 4096² T=512, one config.

Why: the kernel runs at 85% of a copy of its own bytes (timing_modes.py). Each chunk's three
TMA loads read W, m and v at the same (row, column); separately allocated 64 MB tensors start
at equally aligned addresses, so if the DRAM channel hash let equal low address bits camp on
one channel, offsetting m and v would show it. GROUP_N sets which tiles the 132 CTAs hold at
once (their addresses, and the dY/X panels they share in L2).

Timing: CUDA events with a 256 MB read flush before each run, enqueued behind a GPU sleep
(``timing_modes.events_ms``: no host time, L2 cold, no dirty lines), plus ``do_bench``. Every
variant's result is compared bit for bit with the baseline's (same inputs, fp32 weights: the
kernel is deterministic). On the GPU device:
  python3 benchmarks/experiments/placement.py --out $OUT/placement.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.bench_fused_linear_update import forge_bytes, make_case  # noqa: E402
from benchmarks.experiments.bench_fused_linear_update_tma import save_rows  # noqa: E402
from benchmarks.experiments.timing_modes import events_ms, flushers  # noqa: E402
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402


def placed(t: torch.Tensor, offset_bytes: int) -> torch.Tensor:
    """A copy of ``t`` whose storage starts ``offset_bytes`` into a fresh buffer."""
    pad = offset_bytes // t.element_size()
    buf = torch.empty(t.numel() + pad, dtype=t.dtype, device=t.device)
    out = buf[pad:].view(t.shape)
    out.copy_(t)
    return out


def main() -> None:
    import triton
    from triton.testing import do_bench
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ws-config", type=int, default=1)
    a = ap.parse_args()
    t0 = time.time()
    N, K, T = 4096, 4096, 512
    c = make_case(N, K, T, "adamw")
    base_cfg = flu._GPU_WS_CONFIGS[a.ws_config]
    nbytes = forge_bytes(N, K, T, 2)
    _, read_flush = flushers()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {date}; AdamW {N}×{K} T={T}; base {base_cfg}", flush=True)

    variants = {"baseline": (0, 0, base_cfg)}
    for off in (256, 1024, 4096, 65536, 2 ** 20):
        variants[f"m,v offset {off} B, {2 * off} B"] = (off, 2 * off, base_cfg)
    for g in (1, 2, 4, 16, 32):
        variants[f"GROUP_N={g}"] = (0, 0, dataclasses.replace(base_cfg, GROUP_N=g))

    ref = None
    rows = []
    for name, (off_m, off_v, cfg) in variants.items():
        p0 = c["p"].clone()
        state = [placed(c["state"][0], off_m), placed(c["state"][1], off_v)]
        s0 = [s.clone() for s in state]

        def run(p0=p0, state=state, cfg=cfg):      # bound now: `del` ends the variant
            flu.fused_linear_update_triton(c["dy"], c["x"], p0, state, c["scalars"], c["prog"],
                                           config=cfg, seed=0)
        # one update from the case's inputs, for the bit-for-bit check
        p1, s1 = c["p"].clone(), [s.clone() for s in state]
        flu.fused_linear_update_triton(c["dy"], c["x"], p1, s1, c["scalars"], c["prog"],
                                       config=cfg, seed=0)
        out = [p1, *s1]
        if ref is None:
            ref = out
        same = all(torch.equal(u, r) for u, r in zip(out, ref))
        ev = events_ms(run, read_flush)
        db = do_bench(run, warmup=25, rep=200, return_mode="median")
        row = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, date=date, N=N, K=K, T=T, variant=name,
                   config=dataclasses.asdict(cfg), ev_readflush_ms=round(ev, 4),
                   do_bench_ms=round(db, 4), GBps=round(nbytes / ev / 1e6, 1),
                   equal_to_baseline=same,
                   m_addr_mod_2MiB=state[0].data_ptr() % 2 ** 21,
                   v_addr_mod_2MiB=state[1].data_ptr() % 2 ** 21)
        rows.append(row)
        print(f"{name:32s} events {ev:.4f} ms  do_bench {db:.4f} ms  "
              f"{row['GBps']:.0f} GB/s  equal {same}", flush=True)
        del p0, state, s0, p1, s1, out
    if a.out:
        save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
