"""Study: the warp-specialised Gluon kernel (forge_compile/kernels/fused_linear_update_ws.py)
against the autotuned choice, on one Hopper GPU (docs/kernels.md, "Warp-specialised kernel").

1. correctness of every config against the fp64 reference (the TMA study's check: relative
   error ≤ 1e-5 for bf16/fp16 operands; bf16 weights ≤ 1 ulp and unbiased); exits non-zero on
   a failure, before timing anything;
2. fused timings on the issue's rows: the autotuned choice (which includes the shipped WS
   candidates) vs each studied WS config;
3. the epilogue's traffic alone (``skip_gemm``: grad = 0) at 4096², AdamW and SGD-momentum;
   the GEMM and the accumulator hand-off alone (``skip_epilogue``) vs cuBLAS;
4. host time per launch, the Triton kernel vs the warp-specialised one (tiny shape).

Timings are medians of ``triton.testing.do_bench_cudagraph``. One JSON object per measurement
to ``--out``.
    python benchmarks/experiments/bench_fused_linear_update_ws.py [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from benchmarks.bench_fused_linear_update import (  # noqa: E402
    forge_bytes, host_us_per_launch, make_case, zero_grad_adamw_scalars)
from forge_compile.kernels import fused_linear_update as flu  # noqa: E402
from forge_compile.kernels.fused_linear_update_ws import (  # noqa: E402
    fused_linear_update_ws, ws_fits)
from bench_fused_linear_update_tma import (  # noqa: E402
    _ms, add_timer_arg, check_correctness, fused_rows, save_rows, set_timer, study_setup)


def W(bn, bk, bt, split, stages, warps, maxnreg, PIPE=False, SLOTS=0, STATE_ISSUER="warp"):
    """A warp-specialised KernelConfig: num_warps epilogue warps beside the MMA warpgroup;
    maxnreg = 64K registers / all warps (rounded up to whole warpgroups) / 32."""
    return flu.KernelConfig(bn, bk, bt, warps, stages, EPI_SPLIT=split, EPI_PIPE=PIPE,
                            maxnreg=maxnreg, WS=STATE_ISSUER if SLOTS else "regs",
                            WS_SLOTS=SLOTS)


def fits(cfg, n_state: int) -> bool:
    """Whether the config's shared memory holds ``n_state`` fp32 state tensors beside fp32 W
    (run 20's SGD-momentum-only configs do not hold AdamW's two)."""
    cfg = cfg[0] if isinstance(cfg, tuple) else cfg
    return ws_fits(cfg, torch.float32, n_state)


def launch(*args, seed=0, skip_gemm=False, skip_epilogue=False):
    """The WS launcher; the config is a KernelConfig, a (KernelConfig, hand-off) pair or a
    (KernelConfig, hand-off, swizzled accumulator buffer) triple."""
    *a, cfg = args
    cfg, handoff, swz = (tuple(cfg) + (None,))[:3] if isinstance(cfg, tuple) else (
        cfg, "chunk", None)
    return fused_linear_update_ws(*a, cfg, seed=seed, skip_gemm=skip_gemm,
                                  skip_epilogue=skip_epilogue, handoff=handoff,
                                  acc_swizzled=swz)


# All spill-free at sm_90 (ptxas of Triton 3.6, local compile). Runs 1-3 (2026-11-23, H100)
# had MMA_REGS as a field: 208 and 168 measured equal within 1%, 208 is fixed now.
# Run 1 (09:04 UTC): W/state through registers ("regs", gl.load): the epilogue alone ran at
# 31-58% of copy bandwidth (AdamW), 60% (SGD-m), with 24 KB in flight per SM.
# Run 2 (09:17 UTC): W/state by TMA through a SLOTS-deep shared-memory ring fed by a 1-warp
# partition ("warp"), up to 96 KB in flight per SM: SGD-m's epilogue alone 85%, AdamW's 59-61%
# at 8 epilogue warps (34% at 4: the AdamW math needs warps; 16 do not fit, ptxas needs ≥ 90
# registers at 24 warps); fused AdamW T=512 4-8% faster than the Triton kernel, but BLOCK_T=32
# slowed the GEMM (T=8192: 0.69 vs 0.53 ms).
# Run 3 (09:27 UTC): the epilogue warps issue the ring's TMA loads themselves ("epi", no extra
# warpgroup), so 16 epilogue warps fit: AdamW's epilogue alone 75%; fused T=512 4-9% faster
# than the Triton kernel, T >= 2048 slower. The three "epi" ones ship (_GPU_WS_CONFIGS).
E = "epi"
# Run 4 (09:41 UTC): chunks of 32 columns (split 4) at 16 warps and more slots at BLOCK_T=32 /
# 3 stages lost everywhere; the GEMM alone (``skip_epilogue``) at T=2048 took 0.120 ms (cuBLAS
# 0.100) but the fused kernel 0.253 with an epilogue alone of 0.164-0.18: the two overlap
# badly. Run 5 (09:33 UTC): the accumulator handed over per column chunk (now the default) vs
# per tile: within 0-3% (per chunk ahead on 9 of 12 T=2048 rows).
# Run 6 (09:49 UTC, an H200): chunks of BLOCK_N/SPLIT whole rows ("epi_rows": 512 contiguous bytes per row and
# tensor instead of 64, for DRAM locality) vs the column chunks; (config, hand-off) pairs.
# Rows won every T <= 2048 row by 3-11% (AdamW 4096² T=512 0.123 vs 0.134 ms); three of them
# and the second column config ship.
KC = flu.KernelConfig
COL = (KC(128, 128, 64, 16, 3, EPI_SPLIT=8, maxnreg=96, WS="epi", WS_SLOTS=2),   # runs 3-6
       KC(128, 128, 32, 16, 4, EPI_SPLIT=8, maxnreg=96, WS="epi", WS_SLOTS=4),
       KC(128, 128, 64, 8, 3, EPI_SPLIT=8, maxnreg=168, WS="epi", WS_SLOTS=2))
CONFIGS = {
    "epi e16 split8 bt64 st3 sl2 (col 1)": (COL[0], "chunk"),
    "epi e16 split8 bt32 st4 sl4 (col 2)": (COL[1], "chunk"),
    "epi e8 split8 bt64 st3 sl2 (col 3)": (COL[2], "chunk"),
    "rows e16 split8 bt64 st3 sl2": KC(128, 128, 64, 16, 3, EPI_SPLIT=8, maxnreg=96,
                                       WS="epi_rows", WS_SLOTS=2),
    "rows e16 split8 bt32 st4 sl4": KC(128, 128, 32, 16, 4, EPI_SPLIT=8, maxnreg=96,
                                       WS="epi_rows", WS_SLOTS=4),
    "rows e8 split8 bt64 st3 sl2": KC(128, 128, 64, 8, 3, EPI_SPLIT=8, maxnreg=168,
                                      WS="epi_rows", WS_SLOTS=2),
}
# Run 7 (2026-11-23, H100): the row-chunk configs with the balanced tile walk ("epi_rows_bal":
# every CTA the same number of row chunks, a tile at a run's edge computed by both CTAs) vs the
# strided walk, in one run. Lost everywhere: epilogue alone AdamW 0.1746 vs 0.1713 ms, GEMM
# alone 19-27% slower (concurrent CTAs no longer share dY/X panels in L2), fused AdamW T=512
# 0.168 vs 0.159 ms (docs/kernels.md, run 7).
RUN7 = {**{k: v for k, v in CONFIGS.items() if k.startswith("rows")},
        **{k.replace("rows", "rows-bal"): dataclasses.replace(v, WS="epi_rows_bal")
           for k, v in CONFIGS.items() if k.startswith("rows")}}
# Run 8 (2026-11-23, H100): row chunks of 32 rows (split 4: 8 elements per thread and tensor
# at 16 epilogue warps instead of 4, more independent div/sqrt chains per thread) beside the
# shipped split-8 row configs. AdamW compiles with 8 bytes of stack (local sm_90 compile).
RUN8 = {
    "rows e16 split4 bt32 st4 sl2": KC(128, 128, 32, 16, 4, EPI_SPLIT=4, maxnreg=96,
                                       WS="epi_rows", WS_SLOTS=2),
    "rows e16 split4 bt64 st2 sl2": KC(128, 128, 64, 16, 2, EPI_SPLIT=4, maxnreg=96,
                                       WS="epi_rows", WS_SLOTS=2),
}
# Run 9 (2026-11-23, H100): the row configs' accumulator buffer with the NVMMA 128-byte swizzle
# (as shipped until then) vs the 32-byte-vector XOR swizzle (acc_layout): ncu had measured
# 4.6-5.2-way bank conflicts on the MMA warps' accumulator stores.
RUN9 = {k + " nvmma-acc": (v, "chunk", False)
        for k, v in CONFIGS.items() if k.startswith("rows")}
# Run 10 (2026-11-23 18:00 UTC, H100): within noise, fused AdamW T=512 0.1558-0.1575 vs
# 0.1567-0.1576 ms, and behind its twin in the next run (docs/kernels.md, run 10). The
# accumulator handed over in two halves of 64
# rows ("epi_rows_half"). ncu's warp-state sampling of the T=512 pick (17:25 UTC) had the
# epilogue warps waiting for the whole-tile hand-off (acc_ready) in ~14% of their samples and
# the MMA warps for acc_empty in ~22% of theirs: with halves, chunks 4-7 of a tile run while
# the MMA warps store the next tile's first half.
RUN10 = {k.replace("rows", "rows-half"): dataclasses.replace(v, WS="epi_rows_half")
         for k, v in CONFIGS.items() if k.startswith("rows")}
# Run 11 (2026-11-23, H100): 64×256 tiles ("wide": one m64n256 wgmma per k-step, W/state
# rows of 1 KB per tensor instead of 512 B, 10 KB of shared-memory operand reads per 64×256×16
# step instead of 12 KB for two m64n128). Only 8 epilogue warps fit: ptxas needs ≥ 154
# registers for the m64n256 wgmma, 96 is the cap at 16 epilogue warps (local sm_90 compile).
# Beside the 8-warp row config and the T=512 pick.
# Measured 18:44 UTC: the AdamW epilogue alone and fused T=512 the same, T=2048 6% slower, the
# GEMM alone 9-52% slower (docs/kernels.md, run 11). Not shipped.
RUN11 = {
    "rows e16 split8 bt32 st4 sl4": CONFIGS["rows e16 split8 bt32 st4 sl4"],
    "rows e8 split8 bt64 st3 sl2": CONFIGS["rows e8 split8 bt64 st3 sl2"],
    **{f"wide e8 split{sp} bt{bt} st{st} sl{sl}": KC(64, 256, bt, 8, st, EPI_SPLIT=sp,
                                                     maxnreg=168, WS="epi_rows", WS_SLOTS=sl)
       for sp, bt, st, sl in [(8, 32, 3, 3), (8, 64, 2, 3), (8, 32, 4, 2), (4, 32, 3, 2)]},
}
# Run 12 (2026-11-23, H100): the W/state ring refilled every second chunk ("epi_rows_pairs":
# one CTA barrier per two chunks; ncu had 9.3% of the T=512 pick's stall samples on barriers)
# beside its per-chunk twin, the T=512 pick. Measured 19:13 UTC: AdamW's epilogue alone 78% vs
# 75% of copy bandwidth, fused AdamW T=512 0.1614-0.1621 vs 0.1614 ms (docs/kernels.md, run 12).
RUN12 = {
    "rows e16 split8 bt32 st4 sl4": CONFIGS["rows e16 split8 bt32 st4 sl4"],
    **{f"pairs e{w} split8 bt32 st4 sl{sl}": KC(128, 128, 32, w, 4, EPI_SPLIT=8,
                                                maxnreg={16: 96, 8: 168}[w],
                                                WS="epi_rows_pairs", WS_SLOTS=sl)
       for w, sl in [(16, 4), (16, 3), (8, 4)]},
}
# Run 13 (ninth session): 64×128 tiles. Each CTA's first GEMM, before its first update, is
# half as long; the price is 1.5× the dY/X reads from L2 per W element. Chunks stay 16 rows;
# the smaller accumulator buffer (32 KiB) leaves room for more ring slots. sm_90 compiles
# (Triton 3.9 ptxas): 96 registers, no spills, 217-230 KB of shared memory. Measured 20:13
# UTC: fused AdamW T=512 0.1580 vs 0.1579 ms, T=2048 14% slower (0.2826 vs 0.2479): the
# first GEMM is not the loss (docs/kernels.md, run 13). Not shipped.
RUN13 = {
    f"rows64 e{w} split4 bt{bt} st{st} sl{sl}": KC(64, 128, bt, w, st, EPI_SPLIT=4,
                                                   maxnreg={16: 96, 8: 168}[w],
                                                   WS="epi_rows", WS_SLOTS=sl)
    for w, bt, st, sl in [(16, 64, 4, 4), (16, 32, 4, 6), (16, 64, 3, 5), (8, 64, 4, 4)]
}
# Run 15 (tenth session): L2 eviction priorities on the TMA loads (fused_linear_update_ws.L2_MODES:
# evict_last for dY/X, evict_first for W/state, or one of the two) on the T=512 and T=2048
# picks. ncu (ninth session) had dY/X read 2.8× (T=512) and 3.2× (T=2048) from DRAM beside the
# W/state stream. Triton 3.6 has no cache_policy on Gluon's TMA load: add_l2_hints rewrites
# the PTX (the same instruction Triton 3.9 emits).
RUN15 = {f"ws{i} {name} l2={mode or 'none'}": dataclasses.replace(CONFIGS[name], WS_L2=mode)
         for i, name in ((1, "rows e16 split8 bt32 st4 sl4"), (2, "rows e8 split8 bt64 st3 sl2"))
         for mode in ("", "both", "state_first", "gemm_last")}
# Run 16 (tenth session): two MMA warpgroups on 256×128 tiles (WS_MMA_WARPS=8, 128 accumulator
# registers per thread, MMA_REGS 160) beside 8 epilogue warps; 16-row chunks, the accumulator
# handed over in halves of 128 rows (epi_rows_half), 2 W/state slots. Per W element, 25% less
# dY/X traffic through L2 and shared memory than 128×128; the GEMM on two warpgroups, as
# cuBLAS runs it. Shared memory 225 KiB (the limit is 227). Beside the shipped ws0 and ws2.
# Measured 22:27 UTC (H100): exact (0 failures; 12 GPU tests) and slower everywhere. Fused AdamW
# T=512 0.342-0.352 ms (0.228 with state_first) vs 0.156; T=2048 0.393-0.433 vs 0.242. The
# epilogue's 8 warps at 96 registers run AdamW at 49% of copy (67% state_first; ws2's 8 warps
# at 168 registers: 90%), and the 48 KiB GEMM ring starves the GEMM (alone, T=2048: 0.140-0.196
# vs 0.118 ms). Two MMA warpgroups do not fit beside the epilogue on one SM; not shipped.
RUN16 = {
    **{f"wg2 e8 half16 bt{bt} st{st} sl2{' l2=state_first' if l2 else ''}":
       KC(256, 128, bt, 8, st, EPI_SPLIT=16, maxnreg=128, WS="epi_rows_half", WS_SLOTS=2,
          WS_MMA_WARPS=8, WS_L2=l2)
       for bt, st, l2 in [(32, 2, ""), (16, 4, ""), (32, 2, "state_first")]},
    "ws0 rows e16 split8 bt64 st3 sl2 l2=state_first": flu._GPU_WS_CONFIGS[0],
    "ws2 rows e8 split8 bt64 st3 sl2": flu._GPU_WS_CONFIGS[2],
}
# Run 17 (eleventh session): a deeper dY/X ring at T=2048. There the GEMM is the critical path:
# per tile, 15.5 µs alone (0.120 ms / 7.76 tiles) and ~30 µs fused (0.238 ms), while the ring
# keeps only STAGES-1 = 2 stages of 32 KiB (ws2) in flight: ~0.8 µs of the GEMM's appetite
# against DRAM latency under the stream's load, with dY/X re-read from DRAM (ncu, ninth
# session). 8-row chunks (split 16) halve the W/state ring to free the shared memory: 3-7 stages
# in flight (96-112 KiB). sm_90 compiles (Triton 3.6 ptxas): spill-free, 221-230 KB.
RUN17 = {
    **{f"rows e{w} split{sp} bt{bt} st{st} sl2{' l2=state_first' if l2 else ''}":
       KC(128, 128, bt, w, st, EPI_SPLIT=sp, maxnreg={16: 96, 8: 168}[w], WS="epi_rows",
          WS_SLOTS=2, WS_L2=l2)
       for w, sp, bt, st, l2 in [(8, 16, 64, 4, ""), (8, 16, 32, 8, ""), (8, 8, 32, 7, ""),
                                 (16, 8, 32, 7, ""), (8, 16, 64, 4, "state_first")]},
    "ws0 rows e16 split8 bt64 st3 sl2 l2=state_first": flu._GPU_WS_CONFIGS[0],
    "ws2 rows e8 split8 bt64 st3 sl2": flu._GPU_WS_CONFIGS[2],
}
# Run 18 (eleventh session), around run 17's winner (8 warps, 8-row chunks, 4-stage BLOCK_T=64
# ring): its tile order (GROUP_N 4, 16), 16 epilogue warps on 8-row chunks (2 columns per
# thread, the rows layout's new case); and for T=512, where the stream is the critical path,
# the other trade: a 2-stage GEMM ring and 96-120 KiB of W/state in flight.
RUN18 = {
    **{f"rows e8 split16 bt64 st4 sl2 g{g}": KC(128, 128, 64, 8, 4, GROUP_N=g, EPI_SPLIT=16,
                                                maxnreg=168, WS="epi_rows", WS_SLOTS=2)
       for g in (4, 8, 16)},
    "rows e16 split16 bt64 st4 sl2": KC(128, 128, 64, 16, 4, EPI_SPLIT=16, maxnreg=96,
                                        WS="epi_rows", WS_SLOTS=2),
    **{f"rows e16 split{sp} bt{bt} st2 sl{sl} l2=state_first":
       KC(128, 128, bt, 16, 2, EPI_SPLIT=sp, maxnreg=96, WS="epi_rows", WS_SLOTS=sl,
          WS_L2="state_first")
       for sp, bt, sl in [(8, 64, 4), (8, 32, 5), (16, 64, 8)]},
    "ws0 rows e16 split8 bt64 st3 sl2 l2=state_first": flu._GPU_WS_CONFIGS[0],
    "ws1 rows e16 split8 bt32 st4 sl4 l2=state_first": flu._GPU_WS_CONFIGS[1],
}
# Run 19 (eleventh session): the 4-stage ring with the accumulator handed over through one
# buffer of half a tile ("epi_rows_half1", 32 KiB instead of 64): the freed shared memory goes
# to the W/state ring (48-60 KiB in flight instead of 24), at the price of the MMA warps waiting
# for the epilogue's first half before they start the next GEMM. Beside ws4 and ws0.
RUN19 = {
    **{f"half1 e{w} split{sp} bt64 st4 sl{sl}": KC(128, 128, 64, w, 4, EPI_SPLIT=sp,
                                                   maxnreg={16: 96, 8: 168}[w],
                                                   WS="epi_rows_half1", WS_SLOTS=sl)
       for w, sp, sl in [(8, 16, 4), (8, 16, 5), (16, 8, 2), (8, 8, 2)]},
    "ws4 rows e8 split16 bt64 st4 sl2": flu._GPU_WS_CONFIGS[4],
    "ws0 rows e16 split8 bt64 st3 sl2 l2=state_first": flu._GPU_WS_CONFIGS[0],
}
# Run 20 (eleventh session): L2 priorities on ws4 (the T=2048 pick since run 17: its GEMM no
# longer starves, so evict_last on dY/X may now pay), and for SGD-momentum (8 bytes of state per
# element, not AdamW's 12: 16-row chunks fit beside the 4-stage ring) 32 KiB of W/state in
# flight instead of ws4's 16 KiB. The SGD-m-only configs do not hold AdamW's state (fits()).
RUN20 = {
    **{f"ws4 l2={m or 'none'}": dataclasses.replace(flu._GPU_WS_CONFIGS[4], WS_L2=m)
       for m in ("", "state_first", "gemm_last", "both")},
    **{f"sgd rows e{w} split{sp} bt64 st4 sl{sl}": KC(128, 128, 64, w, 4, EPI_SPLIT=sp,
                                                      maxnreg={16: 96, 8: 168}[w],
                                                      WS="epi_rows", WS_SLOTS=sl)
       for w, sp, sl in [(8, 8, 2), (16, 8, 2), (8, 16, 4)]},
}
# Run 21 (eleventh session): BLOCK_T=32 stages lost in run 17 (0.129-0.133 ms GEMM alone at
# T=2048 vs 0.101 for BLOCK_T=64) while holding as many bytes in flight: the MMA warps wait for
# the previous wgmma group after issuing each one, so with half-size steps the tensor cores may
# idle between them. Two groups in flight (WS_MMA_PENDING=2; the ring then holds STAGES - 2
# loads in flight). At BLOCK_T=32 the ring takes less shared memory per stage in flight, which
# leaves the W/state ring 36-48 KiB instead of ws4's 24. Beside ws4 and ws0.
RUN21 = {
    **{f"p2 e{w} split{sp} bt{bt} st{st} sl{sl}":
       KC(128, 128, bt, w, st, EPI_SPLIT=sp, maxnreg={16: 96, 8: 168}[w], WS="epi_rows",
          WS_SLOTS=sl, WS_MMA_PENDING=2)
       for w, sp, bt, st, sl in [(8, 16, 32, 7, 3), (8, 16, 32, 8, 2), (8, 8, 32, 6, 2),
                                 (16, 8, 32, 6, 2)]},
    "ws4 rows e8 split16 bt64 st4 sl2 l2=gemm_last": flu._GPU_WS_CONFIGS[4],
    "ws0 rows e16 split8 bt64 st3 sl2 l2=state_first": flu._GPU_WS_CONFIGS[0],
}
# Run 22 (eleventh session): the shipped row configs with EPI_PIPE (chunk h+1 read from its
# W/state slot into registers, and the slot refilled, before chunk h's math): one more chunk of
# W/state in flight without more shared memory, 16 more registers per thread (sm_90 compiles,
# Triton 3.6 ptxas: spill-free at 96 and 168 registers). For ws4, whose ring holds 2 chunks of
# 8 rows, the register copy is a third. Beside the plain ws0, ws4 and ws5.
RUN22 = {
    **{f"ws{i} pipe": dataclasses.replace(flu._GPU_WS_CONFIGS[i], EPI_PIPE=True)
       for i in (0, 1, 2, 4, 5)},
    **{f"ws{i}": flu._GPU_WS_CONFIGS[i] for i in (0, 4, 5)},
}
# Run 23 (eleventh session, measured at commit 870f981, the knob reverted after): WS_LDG took
# AdamW's m and v (or only v) off the W/state ring beside ws4's 4-stage GEMM ring: gl.load into
# registers, a chunk ahead with EPI_PIPE (16-row chunks with EPI_PIPE spill 344 B; 8-row ones do
# not). H100 00:10 UTC: the epilogue alone fell to 65-70% of copy (ws4 84%), fused AdamW T=2048
# 0.230-0.246 vs 0.212 ms, T=512 0.195-0.213 vs 0.156: register loads cannot hold the bytes in
# flight that the TMA ring does (the seventh session's finding, again).
# Run 24 (twelfth session): an L2 prefetch of W/state chunks beyond the shared-memory ring
# (WS_PREFETCH = chunks ahead of the ring). 24a (at f55a5b1): cp.async.bulk.prefetch.L2, one per
# row and tensor; 24b (at 5db860f): prefetch.global.L2 per 128-byte line, the tile recomputed per
# chunk; 24c (at b0fa709): per line, the tile named by the caller.
# ws4's ring holds 24 KiB beside its 4-stage GEMM ring, and its stream alone takes 169 µs
# against ws2's 152 with 48 KiB (ncu, eleventh session): more bytes in flight without shared
# memory, the ring's TMA loads then hitting L2. Beside the plain ws0, ws4 and ws5.
# H100 (24c, 01:02-01:06 UTC): ws4's stream alone 4-14% faster (SGD-m 78% → 91% of copy); fused
# unchanged or slower (AdamW T=2048 0.2126 → 0.2171-0.2287 ms). Not shipped.
RUN24 = {
    **{f"ws{i} pf{d}": dataclasses.replace(flu._GPU_WS_CONFIGS[i], WS_PREFETCH=d)
       for i, ds in ((4, (0, 1, 2, 4)), (0, (0, 1)), (2, (0, 1)), (5, (0, 2))) for d in ds},
}
# Run 25 (twelfth session): ncu (01:08 UTC, 4096² T=2048 AdamW, ws4) has the fused kernel at
# 217 µs = the stream alone (169 µs) + the time its dY/X re-reads take at the same DRAM rate
# (300 MB read vs the stream's 201; 65.8% DRAM throughput in both), and the prefetch (run 24)
# speeding the stream alone without moving the fused kernel. GROUP_N=8 reads all 32 X panels
# once per group of 8 dY rows (4 groups: 67 MB at least), and evict_last on both (33.5 MB)
# does not keep them. A walk that reuses one operand in every round of 132 tiles, that operand
# alone evict_last (16.8 MB): GROUP_N=1024 (all N rows in one group: each round reads every dY
# panel and ~4 X panels, each X panel by 32 CTAs at once) with "dy_last", GROUP_N=1 with
# "x_last"; the walk alone for comparison. H100 (01:11-01:15 UTC): fused AdamW T=2048
# 0.2169-0.2238 against 0.2182; ncu: 330 MB read with dy_last (the shipped walk 300): the hint
# does not keep 16.8 MB. (Run 27: fewer reads do not make it faster either.)
RUN25 = {
    **{f"ws{i} g{g} {m or 'none'}": dataclasses.replace(flu._GPU_WS_CONFIGS[i], GROUP_N=g, WS_L2=m)
       for i, g, m in [(4, 8, "gemm_last"), (4, 1024, "dy_last"), (4, 1024, ""), (4, 1, "x_last"),
                       (4, 1024, "gemm_last"), (5, 8, ""), (5, 1024, "dy_last"),
                       (0, 8, "state_first"), (0, 1024, "dy_last")]},
}
# Run 26 (twelfth session): run 25's ncu had GROUP_N=1024 with dY evict_last read more from DRAM
# (330 MB) than the shipped walk (295-300 MB, whatever the L2 mode): L2 priorities do not keep
# dY/X beside the stream at T=2048. What the 4-stage ring showed (run 17: 3 → 4 stages, 12%)
# is that the GEMM waits on those loads; a 5th stage has no shared memory left. So an L2
# prefetch of the GEMM's dY/X, WS_PREFETCH_GEMM steps past the ring, by the MMA warps.
# H100 (01:21-01:25 UTC): the GEMM alone 0.1009 → 0.138-0.140 ms at T=2048 (the MMA warps are
# its critical path); fused slower everywhere. Not shipped.
RUN26 = {
    **{f"ws{i} pfg{g}{' pf' + str(p) if p else ''}":
       dataclasses.replace(flu._GPU_WS_CONFIGS[i], WS_PREFETCH_GEMM=g, WS_PREFETCH=p)
       for i, g, p in [(4, 0, 0), (4, 1, 0), (4, 2, 0), (4, 4, 0), (4, 2, 1), (5, 0, 0),
                       (5, 2, 0), (0, 0, 0), (0, 2, 0)]},
}
# Run 27 (twelfth session): what the walk sets is a floor on the dY/X DRAM reads: with GROUP_N=8
# the 4 groups of 8 dY row panels each read all 32 X panels, 4 × 16.8 + 16.8 = 84 MB at 4096²
# T=2048, and ncu measured 98 (run 24c). Evict_last kept 8.4 MB of dY/X at T=512 (tenth
# session) but not 16.8 MB of dY at T=2048 (run 25). So a middle: groups of 12-24 dY row
# panels (6-12 MB, only dY evict_last), each group reading the X panels once: 16 rows → 2 × 16.8
# + 16.8 = 50 MB if the group's dY panels stay. H100 (01:32-01:37 UTC): ncu 272-276 MB read
# (300 shipped) in 217-219 µs (217): DRAM less busy, the time the same; fused AdamW T=2048
# 0.2094-0.2153 against 0.2104. Not shipped.
RUN27 = {
    **{f"ws{i} g{g} {m or 'none'}": dataclasses.replace(flu._GPU_WS_CONFIGS[i], GROUP_N=g, WS_L2=m)
       for i, g, m in [(4, 8, "gemm_last"), (4, 8, "dy_last"), (4, 12, "dy_last"),
                       (4, 16, "dy_last"), (4, 24, "dy_last"), (4, 16, "gemm_last"),
                       (5, 8, ""), (5, 16, "dy_last"), (0, 16, "dy_last")]},
}
# Run 33 (thirteenth session): runs 30-32 found the fused kernel at T=2048 at the H100's 700 W
# limit under back-to-back CUDA-graph replays, the timer of every run above: fused AdamW 0.2145
# ms at a median 1665 MHz, 0.203 with dY = X = 0 (same instructions and bytes, no cap); under
# the benchmark's do_bench (a memset between calls) 0.2103 vs 0.2098. A capped kernel's time
# follows its energy, so runs 24 and 27 (more W/state in flight; fewer dY/X DRAM reads) may
# have hidden a gain. Their best configs, and the two combined, timed with --do-bench.
RUN33 = {
    **{k: v for k, v in RUN24.items() if k in ("ws4 pf0", "ws4 pf1", "ws4 pf2", "ws5 pf0",
                                               "ws5 pf2")},
    **{k: v for k, v in RUN27.items() if k in ("ws4 g12 dy_last", "ws4 g16 dy_last",
                                               "ws5 g16 dy_last")},
    # ws1: the T=512 AdamW pick of the bench (4 slots: a prefetch of up to 4 fits)
    **{f"ws1 pf{d}": dataclasses.replace(flu._GPU_WS_CONFIGS[1], WS_PREFETCH=d)
       for d in (0, 1, 2)},
    **{f"ws{i} g16 dy_last pf{d}": dataclasses.replace(
        flu._GPU_WS_CONFIGS[i], GROUP_N=16, WS_L2="dy_last", WS_PREFETCH=d)
       for i, d in ((4, 1), (4, 2), (5, 2))},
}
# Run 36 (fourteenth session): what thirteen sessions left is the GEMM's dY/X traffic beside the
# stream, 1 MiB per tile from L2 at T=2048 (runs 28-29, 32). Clusters of 2 CTAs on row-adjacent
# tiles share X's tile, which TMA multicast reads from L2 once for both (WS_CLUSTER=2, Triton
# >= 3.9: carried to the device as a stripped wheel, scripts/gpu_kernels.sh TRITON_TARBALL):
# a quarter less dY/X traffic per W element. Each shipped row config and its cluster twin.
RUN36 = {f"ws{i}{' cl2' if c == 2 else ''}": dataclasses.replace(flu._GPU_WS_CONFIGS[i],
                                                                 WS_CLUSTER=c)
         for i in (0, 1, 2, 4, 5) for c in (1, 2)}
# Run 37 (fourteenth session): run 36's pairs lost most where the ring runs fewest tokens ahead
# of the wgmma (ws1, 4 × 32: GEMM alone +22% at T=2048; ws4, 4 × 64: +8%), as if each X refill's
# wait for both CTAs were exposed latency. The same 128 KiB ring as ws4 cut into 8 stages of 32
# tokens runs 7 steps (224 tokens) ahead instead of 3 (192): a little more slack, in finer steps.
RUN37 = {f"ws{i}{' bt32 st8' if bt else ''}{' cl2' if c == 2 else ''}": dataclasses.replace(
    flu._GPU_WS_CONFIGS[i], WS_CLUSTER=c, **({"BLOCK_T": 32, "num_stages": 8} if bt else {}))
    for i in (4, 5) for bt in (False, True) for c in (1, 2)}
# Run 38 (fourteenth session): run 37 refuted the slack reading of run 36 (finer steps with more
# slack lost more: the pair's GEMM alone +31% instead of +8%), which points at a cost per
# refill. In this kernel the MMA warps issue the ring's loads themselves, so in a pair CTA 0's
# wait for both releases stalls its next wgmma. A 1-warp load partition (WS_LOAD_WARP) takes
# the loads and the waits off the MMA warps; it costs the epilogue registers (8 epilogue warps
# at maxnreg 128 beside 4 + 1 worker warps, instead of 168).
RUN38 = {f"ws{i}{' lw' if lw else ''}{' cl2' if c == 2 else ''}": dataclasses.replace(
    flu._GPU_WS_CONFIGS[i], WS_CLUSTER=c, WS_LOAD_WARP=lw, **({"maxnreg": 128} if lw else {}))
    for i in (4, 5) for lw in (0, 1) for c in (1, 2)}
# Run 39 (fourteenth session): the load warp on the T=512 picks. At T=512 the GEMM's loads cost
# the fused kernel 6.4 µs over its stream (run 32), and run 38's load warp made the GEMM alone
# 11% faster there. Only ws2 (8 epilogue warps, then 128 registers) can take it: Triton
# launches the 1-warp partition as a warpgroup, so ws0/ws1's 16 epilogue warps would be 24
# warps, 73728 registers at 96 (H100: "out of resource: threads, Required: 768, Hardware
# limit: 640"). ws0/ws1 as references.
RUN39 = {**{f"ws{i}": flu._GPU_WS_CONFIGS[i] for i in (1, 0, 2)},
         "ws2 lw": dataclasses.replace(flu._GPU_WS_CONFIGS[2], WS_LOAD_WARP=1, maxnreg=128)}
# Run 43 (sixteenth session): the load-warp candidate (ws6, the T >= 2048 pick) in its
# neighbourhood, for the rows just over 0.6x (AdamW 4096² T=2048 0.632x, SGD-m 0.619x): the
# same 128 KiB ring in 8 finer steps (run 37 lost with them only when the MMA warps issued the
# loads themselves), the tile-group height (GROUP_N 4 and 16), and W/state loads evict_first
# beside dY/X evict_last ("both").
_WS6 = flu._GPU_WS_CONFIGS[6]
RUN43 = {"ws6": _WS6,
         "ws6 bt32 st8": dataclasses.replace(_WS6, BLOCK_T=32, num_stages=8),
         "ws6 g4": dataclasses.replace(_WS6, GROUP_N=4),
         "ws6 g16": dataclasses.replace(_WS6, GROUP_N=16),
         "ws6 both": dataclasses.replace(_WS6, WS_L2="both")}
# Run 44 (sixteenth session): around run 43's winner (ws7: ws6's ring in 8 stages of 32 tokens,
# now shipped). With the load warp refilling 16 KiB stages as they free up, does the GEMM still
# need all 128 KiB? Trade ring stages for W/state slots (AdamW's stream had 24 KiB in flight:
# 7 stages + 3 slots, 6 + 4), finer still (16 stages of 16 tokens), and the group height.
_WS7 = flu._GPU_WS_CONFIGS[7]
RUN44 = {"ws7": _WS7,
         "ws7 st7 sl3": dataclasses.replace(_WS7, num_stages=7, WS_SLOTS=3),
         "ws7 st6 sl4": dataclasses.replace(_WS7, num_stages=6, WS_SLOTS=4),
         "ws7 bt16 st16": dataclasses.replace(_WS7, BLOCK_T=16, num_stages=16),
         "ws7 g4": dataclasses.replace(_WS7, GROUP_N=4)}
# Run 45 (seventeenth session): run 44 found the GEMM the critical path at T=2048 and every
# shared-memory byte taken from its ring a loss; the ring got faster with each step of depth so
# far (3 → 4 stages of 64 tokens: fused AdamW T=2048 -11%, run 17). The 64 KiB hand-off buffer is
# the one block left to shrink. Run 19's half-size buffer ("epi_rows_half1") made the MMA warps
# wait for half a tile's stream before storing the second half; "epi_rows_grab" reads a half
# into the epilogue's registers at once (32 per thread at 8 warps, spill-free at maxnreg 128)
# and releases the buffer, so the MMA warps wait only for that read. The 32 KiB freed: two more
# GEMM stages (10 × 32 tokens = 160 KiB in flight), one more and 2 more W/state slots, or (one
# state tensor, SGD-m) three more stages; the BLOCK_T 64 twin (ws6's, 5 stages).
RUN45 = {"ws7": _WS7,
         "ws7 grab": dataclasses.replace(_WS7, WS="epi_rows_grab"),
         "ws7 grab st10": dataclasses.replace(_WS7, WS="epi_rows_grab", num_stages=10),
         "ws7 grab st9 sl4": dataclasses.replace(_WS7, WS="epi_rows_grab", num_stages=9,
                                                 WS_SLOTS=4),
         "ws7 grab st11": dataclasses.replace(_WS7, WS="epi_rows_grab", num_stages=11),
         "ws6 grab st5": dataclasses.replace(_WS6, WS="epi_rows_grab", num_stages=5)}
# Run 46 (seventeenth session): run 45's deeper GEMM ring made the GEMM alone faster at T=2048
# (0.0987 → 0.0963 ms) and the fused kernel slower (AdamW 0.1991 → 0.2026, SGD-m 0.1539 →
# 0.1607); but 9 stages beside 4 W/state slots (48 KiB in flight, not 24) took AdamW 4096²
# T=512 to 0.1605 ms against the tuned pick's 0.1629, and kept T=2048 (0.1988). Where the
# grab's 32 KiB go at T=512, where the stream is the critical path: W/state slots in 8-row
# (12 KiB) or 16-row (24 KiB) chunks against GEMM stages, beside the T=512 picks ws0-ws2.
_GRAB7 = dataclasses.replace(_WS7, WS="epi_rows_grab")
_GRAB6 = dataclasses.replace(_WS6, WS="epi_rows_grab")
RUN46 = {**{f"ws{i}": flu._GPU_WS_CONFIGS[i] for i in (0, 1, 2, 7)},
         **{f"ws7 grab st{st} sl{sl}": dataclasses.replace(_GRAB7, num_stages=st, WS_SLOTS=sl)
            for st, sl in ((9, 4), (8, 5), (6, 8), (4, 10))},
         **{f"ws7 grab split8 st{st} sl{sl}": dataclasses.replace(
             _GRAB7, EPI_SPLIT=8, num_stages=st, WS_SLOTS=sl) for st, sl in ((8, 2), (6, 4))},
         **{f"ws6 grab st{st} sl{sl}": dataclasses.replace(_GRAB6, num_stages=st, WS_SLOTS=sl)
            for st, sl in ((4, 4), (3, 6))}}
# Run 47 (seventeenth session): run 46's best at T=512 is the load-warp kernel on 16-row chunks
# with 4 W/state slots (96 KiB in flight) beside a 6-stage ring of 32 tokens: AdamW 4096²
# 0.1549 ms against the tuned pick's 0.1625 (epilogue alone 88% of copy), possible only with
# the grab's 32 KiB. Around it: stages against slots, 32-row chunks, BLOCK_T 64; and the
# 16-warp T=512 picks (no load warp) with the grab's 32 KiB as one or two more slots.
_GRAB0 = dataclasses.replace(flu._GPU_WS_CONFIGS[0], WS="epi_rows_grab")
RUN47 = {"ws0": flu._GPU_WS_CONFIGS[0],
         **{f"ws7 grab split{sp} st{st} sl{sl}": dataclasses.replace(
             _GRAB7, EPI_SPLIT=sp, num_stages=st, WS_SLOTS=sl)
            for sp, st, sl in ((8, 6, 4), (8, 5, 4), (8, 4, 5), (8, 7, 3), (4, 6, 2))},
         "ws6 grab split8 st3 sl4": dataclasses.replace(_GRAB6, EPI_SPLIT=8, num_stages=3,
                                                        WS_SLOTS=4),
         "ws0 grab sl4": dataclasses.replace(_GRAB0, WS_SLOTS=4),
         "ws1 grab sl5": dataclasses.replace(flu._GPU_WS_CONFIGS[1], WS="epi_rows_grab",
                                             WS_SLOTS=5)}
# Run 48 (seventeenth session): the ninth candidate (run 47's best, shipped) with the other L2
# priorities (W/state evict_first as the 16-warp T=512 picks have it; with dY/X evict_last:
# "both"; none) and tile-group heights 4 and 16.
_WS8 = flu._GPU_WS_CONFIGS[8]
RUN48 = {"ws8": _WS8,
         **{f"ws8 {m or 'none'}": dataclasses.replace(_WS8, WS_L2=m)
            for m in ("state_first", "both", "")},
         **{f"ws8 g{g}": dataclasses.replace(_WS8, GROUP_N=g) for g in (4, 16)}}
# Run 49 (seventeenth session): the W/state stores by TMA from the ring slot they were loaded
# into (WS_TMA_STORE), not 16-byte stores from registers: a slot is then refilled one chunk
# later, so each config with TMA stores gets its twin without. Under Triton 3.9 the TMA stores
# are evict_first like the register stores (3.6's TMA store has no cache_policy).
_TMA = dict(WS_TMA_STORE=1)
_GRAB7_SL4 = dataclasses.replace(_GRAB7, WS_SLOTS=4)
RUN49 = {"ws8": _WS8, "ws8 tma": dataclasses.replace(_WS8, **_TMA),
         "ws8 st4 sl5": dataclasses.replace(_WS8, num_stages=4, WS_SLOTS=5),
         "ws8 st4 sl5 tma": dataclasses.replace(_WS8, num_stages=4, WS_SLOTS=5, **_TMA),
         "ws7": _WS7, "ws7 grab sl4": _GRAB7_SL4,
         "ws7 grab sl4 tma": dataclasses.replace(_GRAB7_SL4, **_TMA)}
RUN5 = {
    "epi e16 split8 bt64 st3 sl2 tile-handoff": (COL[0], "tile"),
    "epi e16 split8 bt32 st4 sl4 tile-handoff": (COL[1], "tile"),
    "epi e8 split8 bt64 st3 sl2 tile-handoff": (COL[2], "tile"),
}
RUN4 = {
    "epi e16 split4 bt32 st3 sl2": W(128, 128, 32, 4, 3, 16, 96, SLOTS=2, STATE_ISSUER=E),
    "epi e16 split8 bt32 st3 sl4": W(128, 128, 32, 8, 3, 16, 96, SLOTS=4, STATE_ISSUER=E),
    "epi e16 split4 bt64 st2 sl2": W(128, 128, 64, 4, 2, 16, 96, SLOTS=2, STATE_ISSUER=E),
}
RUN3 = {
    "regs e16 split8": W(128, 128, 64, 8, 4, 16, 96),
    "warp e8 split8 bt32 st4 sl4 pipe": W(128, 128, 32, 8, 4, 8, 128, PIPE=True, SLOTS=4),
}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [512, 2048, 8192]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096² rows only")
    ap.add_argument("--host-only", action="store_true", help="only phase 4 (host time)")
    ap.add_argument("--configs", default="",
                    help="comma-separated config names, or RUNn for a run's (default: CONFIGS)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "fused_linear_update_ws.jsonl"))
    add_timer_arg(ap)
    a = set_timer(ap.parse_args())
    known = {**CONFIGS, **RUN3, **RUN4, **RUN5, **RUN7, **RUN8, **RUN9, **RUN10, **RUN11,
             **RUN12, **RUN13, **RUN15, **RUN16, **RUN17, **RUN18, **RUN19, **RUN20, **RUN21,
             **RUN22, **RUN24, **RUN25, **RUN26, **RUN27, **RUN33, **RUN36, **RUN37, **RUN38, **RUN39,
             **RUN43, **RUN44, **RUN45, **RUN46, **RUN47, **RUN48, **RUN49}
    names = [n for c in a.configs.split(",") if c
             for n in (globals()[c] if c.startswith("RUN") else [c])]
    configs = (CONFIGS if not names else     # earlier runs' configs by name, too
               {k: v for k, v in known.items() if k in names})
    t0 = time.time()
    rows, emit, bw = study_setup(
        [] if a.host_only else check_correctness(configs, launch, fits), t0)
    # the epilogue's traffic alone and the fused kernel, 4096² T=512
    for opt in () if a.host_only else ("adamw", "sgd_momentum"):
        c = make_case(4096, 4096, 512, opt)
        nbytes = forge_bytes(4096, 4096, 0, len(c["state"]))
        # the gradient is 0 here: keep AdamW's m normal (zero_grad_adamw_scalars)
        sc = zero_grad_adamw_scalars() if opt == "adamw" else c["scalars"]
        for name, wc in configs.items():
            # (a cluster's stream alone is its WS_CLUSTER=1 twin's)
            if not fits(wc, len(c["state"])) or getattr(wc, "WS_CLUSTER", 1) == 2:
                continue
            args = (c["dy"], c["x"], c["p"].clone(), [s.clone() for s in c["state"]], sc,
                    c["prog"])
            ms = _ms(lambda: launch(*args, wc, skip_gemm=True))
            emit(study="epilogue only", program=opt, config=name, ms=round(ms, 4),
                 frac_copy_bw=round(nbytes / (ms * 1e-3) / 1e9 / bw, 3))
    # the GEMM and the accumulator hand-off alone (nothing written), 4096², vs cuBLAS mm
    for T in () if a.host_only else TOKENS:
        c = make_case(4096, 4096, T, "adamw")
        args = (c["dy"], c["x"], c["p"], c["state"], c["scalars"], c["prog"])
        row = {"cublas_mm": round(_ms(lambda: torch.mm(c["dy"].t(), c["x"])), 4)}
        for name, wc in configs.items():
            if fits(wc, len(c["state"])):
                row[name] = round(_ms(lambda: launch(*args, wc, skip_epilogue=True)), 4)
        emit(study="gemm only", N=4096, K=4096, T=T, **row)
    shapes = [] if a.host_only else SHAPES[:1] if a.quick else SHAPES
    fused_rows(emit, shapes, configs, launch, "tuned", fits)
    # host time per launch (a tiny shape: the GPU waits on the host), the Triton kernel vs WS
    for name, cfg in (("triton", flu._GPU_CONFIGS[0]), ("ws", flu._GPU_WS_CONFIGS[0])):
        emit(study="host us per launch", kernel=name, us=round(host_us_per_launch(cfg), 1))
    save_rows(rows, a.out, t0)


if __name__ == "__main__":
    main()
