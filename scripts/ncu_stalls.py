"""Where the fused kernel's warps stall, by SASS opcode (ncu's warp-state sampling).

On the GPU device:
    python3 scripts/ncu_stalls.py --launch            # 3 launches of one row and config
    ncu -k regex:_fused_linear_update_kernel --launch-skip 2 --launch-count 1 \\
        --section SourceCounters -o rep python3 scripts/ncu_stalls.py --launch
    ncu --import rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 scripts/ncu_stalls.py --parse src.csv     # samples per opcode, largest first;
                                                      # shared-memory excess per SASS line
The warp-specialised kernel: launch it with ``benchmarks/bench_fused_linear_update.py
--precompile 0 --ncu-row adamw,4096,4096,512 --ncu-config ws:1`` under ``ncu -k
regex:_fused_linear_update_ws_kernel`` instead.
Defaults: AdamW, 4096×4096, T=512, bf16 operands, the config the autotuner picks there on the
H100 (128×128×64, 16 warps, epilogue split 2); ``--config`` takes another one as
BN,BK,BT,warps,stages,split.
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(opt: str, n: int, k: int, t: int, config: str) -> None:
    import torch
    from benchmarks.bench_fused_linear_update import make_case
    from forge_compile.kernels import fused_linear_update as flu
    bn, bk, bt, warps, stages, split = map(int, config.split(","))
    cfg = flu.KernelConfig(bn, bk, bt, warps, stages, EPI_SPLIT=split)
    c = make_case(n, k, t, opt)
    for _ in range(3):
        flu.fused_linear_update_triton(c["dy"], c["x"], c["p"], c["state"], c["scalars"],
                                       c["prog"], config=cfg, seed=0)
    torch.cuda.synchronize()


def parse(path: str, top: int) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head_i = next(i for i, r in enumerate(rows) if any("Source" == c for c in r))
    head = rows[head_i]
    src = head.index("Source")
    col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    per_op = collections.Counter()
    total = 0
    for r in rows[head_i + 1:]:
        if len(r) <= max(src, col):
            continue
        try:
            n = int(float(r[col] or 0))
        except ValueError:
            continue
        m = re.match(r"\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", r[src])
        if m:
            per_op[m.group(1)] += n
            total += n
    print(f"warp stall samples: {total}")
    for op, n in per_op.most_common(top):
        print(f"  {op:10s} {n:9d}  {100 * n / max(total, 1):5.1f}%")
    # shared-memory wavefronts beyond the ideal (bank conflicts), per SASS line
    exc = next((i for i, c in enumerate(head) if "Shared Excessive" in c), None)
    if exc is None:
        return
    ideal = next((i for i, c in enumerate(head) if "Shared Ideal" in c), None)
    lines = []
    for r in rows[head_i + 1:]:
        try:
            n = int(float(r[exc] or 0))
        except (ValueError, IndexError):
            continue
        if n:
            ide = r[ideal] if ideal is not None and ideal < len(r) else "?"
            lines.append((n, ide, r[src].strip()))
    total_exc = sum(n for n, _, _ in lines)
    print(f"shared wavefronts beyond ideal ({head[exc]}): {total_exc}")
    for n, ide, text in sorted(lines, reverse=True)[:top]:
        print(f"  {n:9d}  ({100 * n / max(total_exc, 1):5.1f}%, ideal {ide})  {text[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launch", action="store_true")
    ap.add_argument("--parse", metavar="CSV")
    ap.add_argument("--row", default="adamw,4096,4096,512", metavar="OPT,N,K,T")
    ap.add_argument("--config", default="128,128,64,16,4,2")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    if a.launch:
        opt, n, k, t = a.row.split(",")
        launch(opt, int(n), int(k), int(t), a.config)
    if a.parse:
        parse(a.parse, a.top)


if __name__ == "__main__":
    main()
