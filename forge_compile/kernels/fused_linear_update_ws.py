"""``forge_compile::fused_linear_update_`` on Hopper: a warp-specialised Gluon kernel.

Why it exists: the Triton kernel (fused_linear_update.py) runs the weight-gradient GEMM and
then the optimizer epilogue in the same warps, and at T ≤ 2048 its epilogue runs on the 8-16
warps that a 128×128 fp32 accumulator leaves room for, streaming W/state through registers
(docs/kernels.md, "What limits it"). Here the work is split between warps (``gl.warp_specialize``):

* the MMA partition, one warpgroup (4 warps, ``MMA_REGS`` registers each), runs the T loop on
  wgmma from a STAGES-deep TMA ring of dY/X tiles, hands the finished accumulator to the
  epilogue through shared memory (``acc_smem``, the whole tile for the row paths or EPI_SPLIT
  column chunks; its layout: ``acc_layout``), then starts the next tile while the epilogue
  works;
* the epilogue partition, ``num_warps`` warps with few registers each, reads the gradient chunk
  from shared memory and W/state from a WS_SLOTS-deep TMA ring that it refills itself, WS_SLOTS
  chunks ahead ("epi"), runs the generated update and stores W/state.

Measured (H100, torch 2.11, Triton 3.6; docs/kernels.md, "Warp-specialised kernel" and "Ninth
session"): the W/state stream alone runs at 90-93% of a copy of its bytes, AdamW's as fast as
a 3-multiply rule; fused with the GEMM, 85-87%. The fused kernel beats the Triton kernel at
T=512 by 4-9%. At T ≥ 2048 its single MMA warpgroup on 128×128 tiles was slower than the
Triton kernel's 128×256 tiles until the eleventh session: with a 4-stage dY/X ring (8-row
W/state chunks to make room) its GEMM alone runs at cuBLAS speed and it wins those rows too
(AdamW 4096² T=2048 0.205 ms, docs/kernels.md "Eleventh session"). The autotuner times it
beside the Triton configs where it applies (``ws_unsupported_reason``) and its shared memory
holds the rule's state (``ws_fits``). Three measured alternatives stay selectable for the study
script (``benchmarks/experiments/bench_fused_linear_update_ws.py``): W/state through registers
("regs", 31-58%), the ring fed by a separate 1-warp partition ("warp", which leaves no
room for 16 epilogue warps), and the row chunks with a balanced tile walk ("epi_rows_bal",
``tile_walk``: 3-24% slower fused). Two more: the accumulator handed over in two halves of
rows ("epi_rows_half", within noise of the whole-tile hand-off, study run 10; through one
half-size buffer, "epi_rows_half1", 4% slower at T=2048, run 19) and one CTA
barrier per two chunks ("epi_rows_pairs": the fused kernel unchanged, study run 12; its
"epilogue alone" gain was timed with m subnormal, docs/kernels.md "Ninth session").

L2 priorities (``KernelConfig.WS_L2``, ``L2_MODES``; docs/kernels.md "Tenth session"): the TMA
loads of W/state can be evict_first (and dY/X evict_last) so the stream does not flush the
GEMM's operands from L2. Triton ≥ 3.9 expresses it as Gluon's ``cache_policy``; on Triton 3.6
``add_l2_hints`` rewrites the PTX through Triton's ``add_stages_inspection_hook`` (process-wide,
chained after any earlier hook, touching only this module's kernels that carry an L2 mode in
their entry name). Measured: dY/X come from DRAM once instead of 2.7 times at T=512, the kernel
0.4-2.3% faster; the 16-warp row candidates ship with W/state evict_first. If another hook
replaces this one, the kernels compile without the hint: slower by that much, never different.

Study knobs of the twelfth session (docs/kernels.md "Twelfth session"; off by default, which
leaves the generated source unchanged): ``WS_PREFETCH`` (an L2 prefetch of W/state chunks a few
chunks past the ring: the stream alone 4-14% faster, the fused kernel not), ``WS_PREFETCH_GEMM``
(the MMA warps prefetch dY/X steps past the GEMM ring: the GEMM 37% slower) and the per-operand
L2 modes ``dy_last``/``x_last`` for tile walks that reuse one operand (with groups of 12-16 dY
rows, 24-28 MB fewer DRAM reads at T=2048, in the same time).

Fourteenth session: ``WS_LOAD_WARP=1`` gives the GEMM ring's TMA loads to a 1-warp partition,
so the MMA warps never stop to refill it (H100, study run 38: the GEMM alone 3-11% faster,
fused AdamW T=2048/8192 1-2%); it ships on two autotune candidates, the second with the same
ring in 8 stages of 32 tokens (sixteenth session, run 43: the GEMM alone at T=2048 5% faster).
Seventeenth session: ``WS="epi_rows_grab"`` hands the accumulator over through one buffer of
half a tile, which the epilogue reads into registers at once (32 per thread at 8 warps) and
releases before streaming it; the 32 KiB that frees hold more W/state in flight. A ninth
candidate for T=512 (study runs 45-47: fused AdamW 4096² T=512 0.1545 ms against 0.1616).
``WS_TMA_STORE=1`` (a study knob) writes the new W/state back into their ring slot and stores
them by TMA: 2-3% slower at T=512 (run 49).
Eighteenth session: ``WS_FAST_IEEE=1`` computes the epilogue's tile divisions and square roots
with ``fast_ieee_source``'s inline PTX, still correctly rounded (bit for bit ``div.rn.f32`` /
``sqrt.rn.f32``) but without one branch and convergence region per element and op. Unrolled
it is slower (run 51: the code outruns the instruction cache); with ``WS_ROLL=2`` (the grab
path's two halves in a runtime loop) it pays, and the tenth candidate has both (run 52).
Nineteenth session: ``WS_ROLL=r`` also rolls the "epi_rows" path (r passes over a runtime-indexed
view of the hand-off buffer); the T=2048 pick with 4 passes and the fast path is the eleventh
candidate (run 53: 0.1979 against 0.1994 ms, AdamW 4096² T=2048).
``WS_CLUSTER=2`` (Triton >= 3.9; ``cluster_helpers``, a study knob) launches clusters of 2 CTAs
on row-adjacent tiles and multicasts X's tile, read from L2 once per pair, into both. Exact, and slower on every fused
row measured (runs 36-38: without the load warp the GEMM alone 3-22%, with it 0-3%): each X
refill waits for both CTAs.

Same math as the Triton kernel: the same generated epilogue (``_Epilogue``), the fp32
accumulator used directly, bf16 weights stochastically rounded with the same noise (the same hash of seed and index).
Needs an sm_90 GPU, Triton with Gluon's Hopper API, bf16/fp16 operands and TMA-compatible
tensors (unit last stride, 16-byte aligned rows and base pointers).
"""
from __future__ import annotations

import collections
import functools
import importlib
import inspect
import re
from typing import List, Optional

import torch
from torch import Tensor

from forge_compile.epilogue import PARAM
from forge_compile.kernels import launch_cache
from forge_compile.kernels.fused_linear_update import (
    _ROUND_BF16_STOCHASTIC, _Epilogue, _import_generated, column_split, load_program,
    scalar_args, stochastic_rounding)

__all__ = ["kernel_source", "ws_unsupported_reason", "fused_linear_update_ws",
           "ws_shared_memory_bytes", "ws_fits"]

# Registers of each MMA thread (setmaxnreg): the 128×128 fp32 accumulator is 128 per thread of
# the warpgroup. 208 and 168 measured equal within 1% (H100, AdamW 4096², T=512-8192).
MMA_REGS = 208
# Two MMA warpgroups (KernelConfig.WS_MMA_WARPS = 8, the study's 256×128 tiles: 128 accumulator
# registers per thread): 160 compiles spill-free for sm_90 beside 8 epilogue warps at 128;
# 168 needs 8 bytes of stack, 208 80 bytes (local compile, Triton 3.6's ptxas).
_MMA_REGS = {4: MMA_REGS, 8: 160}
# H100/H200: 227 KiB of shared memory per CTA.
_SMEM_LIMIT = 232448
# The W/state paths whose chunks are BLOCK_N/EPI_SPLIT whole rows (the accumulator changes hands
# a whole tile at a time, or in two halves: "epi_rows_half"; "epi_rows_half1": both halves
# through one buffer of half a tile); "epi_rows_bal" walks the tiles balanced (tile_walk);
# "epi_rows_pairs" refills the W/state ring every second chunk.
# "epi_rows_grab": one half-size buffer too, but the epilogue loads a whole half into registers
# as soon as it is stored and releases the buffer at once (seventeenth session).
_ROW_PATHS = ("epi_rows", "epi_rows_bal", "epi_rows_half", "epi_rows_half1", "epi_rows_pairs",
              "epi_rows_grab")
# the paths that hand the accumulator over through one buffer of half a tile
_HALF_BUFFER_PATHS = ("epi_rows_half1", "epi_rows_grab")


@functools.lru_cache(maxsize=None)
def _tma_load() -> str:
    # Triton 3.6 names the TMA load async_copy_global_to_shared; 3.9 removed that name.
    from triton.experimental.gluon.language.nvidia.hopper import tma
    return "async_load" if hasattr(tma, "async_load") else "async_copy_global_to_shared"


@functools.lru_cache(maxsize=None)
def _tma_store() -> str:
    # Triton 3.6 names the TMA store async_copy_shared_to_global; 3.9 removed that name
    from triton.experimental.gluon.language.nvidia.hopper import tma
    return "async_store" if hasattr(tma, "async_store") else "async_copy_shared_to_global"


def _store_policy_kw() -> str:
    # the W/state stores' L2 priority, evict_first as the register stores have it (run 42);
    # Triton 3.6's TMA store has no cache_policy, so there they go out with the normal one
    return ", cache_policy=L2_EVICT_FIRST" if _tma_takes("cache_policy", "store") else ""


@functools.lru_cache(maxsize=None)
def _reinterpret() -> str:
    # a shared-memory view with another shape and layout: Triton 3.6 names it _reinterpret,
    # 3.9 reinterpret
    gl = importlib.import_module("triton.experimental.gluon.language")
    return "reinterpret" if hasattr(gl.shared_memory_descriptor, "reinterpret") else "_reinterpret"


@functools.lru_cache(maxsize=None)
def _thread_barrier() -> str:
    # Triton 3.6: gl.thread_barrier(); 3.9 renamed it gl.barrier()
    gl = importlib.import_module("triton.experimental.gluon.language")
    return "barrier" if hasattr(gl, "barrier") else "thread_barrier"


# L2 eviction priorities of the TMA loads: (dY, X, W/state). Beside the W/state stream the GEMM's
# dY/X are evicted from the 50 MB L2 and read again from DRAM, 2.8× at T=512 (+23 MB) and 3.2×
# at T=2048 (107 MB, 22% of the kernel's DRAM traffic; ncu, H100, ninth session). W/state are
# read once: evict_first for them, evict_last for dY/X keeps the operands resident. Measured
# (H100, study run 15): "state_first" ships; evict_last on dY/X cost 2-6% at T ≥ 2048.
# "dy_last"/"x_last" (twelfth session, study runs 25 and 27): one operand resident, for a tile
# walk that reuses it (GROUP_N ≥ the N tiles: every round reads all dY panels; GROUP_N = 1: all
# X panels). Measured at 4096² T=2048 (ncu): 16.8 MB of dY evict_last is not kept beside the
# stream (330 MB read, the shipped walk 300); groups of 12-16 dY rows (6-8 MB) read 272-276 MB,
# in the same time. Study modes.
L2_MODES = {"": (None, None, None), "gemm_last": ("evict_last", "evict_last", None),
            "state_first": (None, None, "evict_first"),
            "both": ("evict_last", "evict_last", "evict_first"),
            "dy_last": ("evict_last", None, "evict_first"),
            "x_last": (None, "evict_last", "evict_first")}
# The kernel's entry name carries the mode (and this tag: a change to the PTX rewrite below must
# not reuse Triton's on-disk cubins, whose key is the source).
_L2_TAG = "_l2v1_"
_KERNEL_NAME = "_fused_linear_update_ws_kernel"


@functools.lru_cache(maxsize=None)
def _tma_takes(param: str, op: str = "load") -> bool:
    """Whether Gluon's TMA ``op`` ("load" or "store") takes ``param``: "cache_policy" (Triton
    ≥ 3.9; for loads on older Tritons the PTX rewrite below) or "multicast" (loads, Triton ≥
    3.9; the CTA pairs of ``cluster_helpers``)."""
    from triton.experimental.gluon.language.nvidia.hopper import tma
    fn = {"load": _tma_load, "store": _tma_store}[op]()
    return param in inspect.signature(getattr(tma, fn)).parameters


_PTX_ENTRY = re.compile(r"\.visible \.entry (\w+)\(")
_PTX_TMA_LOAD = re.compile(
    r"^(\s*)(@%p\d+ )?(cp\.async\.bulk\.tensor\.\dd\.shared::(?:cluster|cta)\.global\."
    r"mbarrier::complete_tx::bytes)( \[[^\]]+\], \[(%rd\d+), \{[^}]*\}\], \[[^\]]+\]);$")
# the moves that take a tensor-map parameter's address into the register a TMA load names
# (Triton 3.6: mov.b64 + cvta.param.u64; 3.9: mov.b32 + cvt.u64.u32 + cvta.param.u64)
_PTX_MOVE = re.compile(r"^\s*(?:mov\.b64|mov\.b32|mov\.u64|cvt\.u64\.u32|cvta\.param\.u64)"
                       r"\s+(%\w+), (%?\w+);$", re.M)


def add_l2_hints(ptx: str) -> str:
    """PTX rewrite for Triton < 3.9 (no ``cache_policy`` in Gluon): in this module's kernels
    whose entry name carries an L2 mode, each TMA load of dY/X (the first two tensor-map
    parameters) or of W/state (the others) gets ``.L2::cache_hint`` with a
    ``createpolicy.fractional`` policy, as Triton 3.9 emits for ``cache_policy``. Other PTX
    is returned unchanged."""
    m = _PTX_ENTRY.search(ptx)
    if m is None or not m.group(1).startswith(_KERNEL_NAME + _L2_TAG):
        return ptx
    name = m.group(1)
    prios = L2_MODES[name[len(_KERNEL_NAME + _L2_TAG):]]
    # the i-th 128-byte tensor-map parameter is the i-th descriptor argument: dy, x, W, state
    maps = re.findall(rf"\.param \.align 64 \.b8 ({name}_param_\d+)\[128\]", ptx)
    policy = {p: prios[min(i, 2)] for i, p in enumerate(maps)}
    src = dict(_PTX_MOVE.findall(ptx))

    def origin(reg):             # follow the moves back to a parameter (None: not one)
        for _ in range(8):
            if reg in policy or reg not in src:
                return reg
            reg = src[reg]
        return None
    out, n = [], 0
    for line in ptx.split("\n"):
        t = _PTX_TMA_LOAD.match(line)
        if t is None:
            out.append(line)
            continue
        param = origin(t.group(5))
        if param not in policy:
            raise RuntimeError(f"add_l2_hints: TMA load from an unknown descriptor: {line}")
        if policy[param] is None:
            out.append(line)
            continue
        out.append(f"{t.group(1)}createpolicy.fractional.L2::{policy[param]}.b64 %l2pol{n}, 1.0;")
        out.append(f"{t.group(1)}{t.group(2) or ''}{t.group(3)}.L2::cache_hint{t.group(4)}, "
                   f"%l2pol{n};")
        n += 1
    if n == 0:
        return ptx
    body = "\n".join(out)
    # declare the policy registers first thing in the entry's body
    i = body.index("{", body.index(f".visible .entry {name}("))
    return body[:i + 1] + f"\n\t.reg .b64 \t%l2pol<{n}>;" + body[i + 1:]


@functools.lru_cache(maxsize=None)
def _install_l2_hint_hook() -> None:
    """Wrap Triton's "ptx" stage with ``add_l2_hints`` (Triton 3.6's
    ``knobs.runtime.add_stages_inspection_hook``; an earlier hook is chained)."""
    from triton import knobs
    prev = knobs.runtime.add_stages_inspection_hook

    def hook(backend, stages, options, language, capability):
        if prev is not None:
            prev(backend, stages, options, language, capability)
        make_ptx = stages.get("ptx")
        if make_ptx is not None:
            stages["ptx"] = lambda src, metadata: add_l2_hints(make_ptx(src, metadata))
    knobs.runtime.add_stages_inspection_hook = hook


# Triton's launcher encodes every host-side TensorDescriptor into a CUtensorMap on every launch
# (nvidia driver.py's make_tensordesc_arg: fill_tma_descriptor), 5 per WS launch, 245 a step of
# the 953M Llama at 1×512 (profile: benchmarks/results/diag_e2e_step_L16_1x512_bf16_b.txt). This
# module's descriptors are immutable functions of (address, shape, strides, dtype, block)
# (_desc_of), so their encoding for one kernel's metadata never changes: keep it. Keyed by the
# descriptor's and the metadata's identity, both held by the entry (no id reuse while cached);
# any other descriptor (Inductor's, a user's) goes through Triton's function unchanged.
_ENCODED: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_ENCODED_MAX = 8192


def _cache_encodings(encode):
    def make_tensordesc_arg(arg, metadata, *rest):
        if metadata is None or not isinstance(getattr(arg, "base", None), _DescBase):
            return encode(arg, metadata, *rest)
        key = (id(arg), id(metadata))
        hit = _ENCODED.get(key)
        if hit is None or hit[0] is not arg or hit[1] is not metadata:
            hit = _ENCODED[key] = (arg, metadata, encode(arg, metadata, *rest))
            while len(_ENCODED) > _ENCODED_MAX:
                _ENCODED.popitem(last=False)
        return list(hit[2])
    make_tensordesc_arg._forge_cached = True
    return make_tensordesc_arg


@functools.lru_cache(maxsize=None)
def _install_encoding_cache() -> None:
    """Wrap the NVIDIA driver's ``make_tensordesc_arg`` with ``_cache_encodings`` (before this
    module's first launcher is built: a launcher may bind the function when it is made)."""
    try:
        from triton.backends.nvidia import driver
    except ImportError:
        return
    encode = getattr(driver, "make_tensordesc_arg", None)
    if encode is None or getattr(encode, "_forge_cached", False):
        return
    driver.make_tensordesc_arg = _cache_encodings(encode)


def _gl(expr: str) -> str:
    """A Triton epilogue expression in Gluon's namespace."""
    return (expr.replace("tl.math.div_rn(", "gl.div_rn(").replace("tl.", "gl.")
            .replace("gl.PropagateNan", "tl.PropagateNan"))


def _gl_dtype(t: torch.dtype):
    from triton.experimental.gluon import language as gl
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
            torch.float32: gl.float32}[t]


def _policy_kw(prio: Optional[str]) -> str:
    """The ``cache_policy=`` argument of a TMA load in generated source (Triton ≥ 3.9; on older
    Tritons ``add_l2_hints`` rewrites the PTX instead)."""
    if prio is None or not _tma_takes("cache_policy"):
        return ""
    return f", cache_policy=L2_{prio.upper()}"


def gemm_helpers(l2: str = "", cluster: int = 1) -> str:
    """Gluon source of the grouped tile order and of one GEMM ring step's TMA loads.
    ``cluster`` = 2 (``cluster_helpers``): a tile is a pair of row-adjacent tiles, one per CTA
    of the cluster, and X's tile is multicast."""
    kw_dy, kw_x = (_policy_kw(p) for p in L2_MODES[l2][:2])
    if cluster == 2:
        return cluster_helpers(kw_dy, kw_x)
    return tile_coords_source() + f"""

@gluon.jit
def _issue_gemm(step, gstep, off_n, off_k, dy_desc, x_desc, dy_smem, x_smem, ld_bar,
                STAGES: gl.constexpr, BLOCK_T: gl.constexpr):
    slot = gstep % STAGES
    bar = ld_bar.index(slot)
    mbarrier.expect(bar, dy_desc.block_type.nbytes + x_desc.block_type.nbytes)
    tma.{_tma_load()}(dy_desc, [step * BLOCK_T, off_n], bar, dy_smem.index(slot){kw_dy})
    tma.{_tma_load()}(x_desc, [step * BLOCK_T, off_k], bar, x_smem.index(slot){kw_x})
"""


# A store of 4 contiguous fp32 elements (16 bytes) with evict-first priorities in L1 and L2, as
# gl.store(..., eviction_policy="evict_first") emits: $0-$3 dummy results, $4-$7 the elements'
# addresses (the first is used), $8-$11 their bits, $12 the first element's mask (the 4 share a
# row, and K is a multiple of 4 for TMA-compatible fp32 rows, so they share the mask too).
_ST4_EF_ASM = ("{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $12, 0; "
               "createpolicy.fractional.L2::evict_first.b64 pol, 1.0; "
               "@p st.global.L1::evict_first.L2::cache_hint.v4.b32 [$4], {$8, $9, $10, $11}, pol; "
               "mov.u32 $0, 0; mov.u32 $1, 0; mov.u32 $2, 0; mov.u32 $3, 0; }")


def tile_coords_source(cluster: int = 1) -> str:
    """``_tile_coords(tile, ...)``: the (row, column) corner of the tile-walk's tile ``tile`` in
    GROUP_N-row grouped order; with a cluster of 2 a tile is a pair of row-adjacent tiles, and
    this CTA's corner is offset by its rank (``cluster_helpers``)."""
    pair = cluster == 2
    note = ("    # tiles of pairs: rows [2 BLOCK_N p, 2 BLOCK_N (p + 1)), this CTA's half by its "
            "rank\n" if pair else "")
    return f"""
@gluon.jit
def _tile_coords(tile, N, K, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_N: gl.constexpr):
{note}    num_n = gl.cdiv(N, {'2 * ' if pair else ''}BLOCK_N)
    num_k = gl.cdiv(K, BLOCK_K)
    per_group = GROUP_N * num_k
    first_n = (tile // per_group) * GROUP_N
    group_n = num_n - first_n
    if group_n > GROUP_N:
        group_n = GROUP_N
    pid_n = first_n + (tile % per_group) % group_n
    pid_k = (tile % per_group) // group_n
    return {'(2 * pid_n + _cta_rank(tile))' if pair else 'pid_n'} * BLOCK_N, pid_k * BLOCK_K
"""


def cluster_helpers(kw_dy: str, kw_x: str) -> str:
    """Gluon source for clusters of 2 CTAs (Triton >= 3.9's multi-CTA Gluon; study). The
    kernel is written per CTA, as without a cluster: every layout is replicated over the cluster
    (``cga_layout`` [[0, ...]]), and each CTA offsets its rows by its rank (``_cta_rank``).
    Three things follow from Gluon's cluster model:
    * X's tile is the same for both CTAs (their tiles share K columns), so its TMA load into a
      replicated buffer with ``multicast=True`` is issued by CTA 0 alone and lands in both CTAs'
      shared memory: X is read from L2 once per pair. dY's load (multicast off) is issued by
      each CTA for its own rows.
    * CTA 0 must not refill a ring slot of X before both CTAs' wgmma have read it: ``x_empty``
      is one barrier per slot in CTA 0 (``MBarrierLayout([[0]])``, arrival count 2), both CTAs
      arrive on it, and only CTA 0's wait is real (Gluon predicates it on the rank).
    * a gl.store of a replicated tensor is issued by CTA 0 alone; the W/state stores go through
      ``_st4_ef`` (inline PTX, issued by every CTA) instead."""
    return """
@gluon.jit
def _cta_rank(x):
    return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)

""" + tile_coords_source(2) + f"""

@gluon.jit
def _issue_gemm(step, gstep, off_n, off_k, dy_desc, x_desc, dy_smem, x_smem, ld_bar, x_empty,
                STAGES: gl.constexpr, BLOCK_T: gl.constexpr):
    slot = gstep % STAGES
    # CTA 0 (the only CTA whose wait is real) waits until both CTAs read the slot's last X
    mbarrier.wait(x_empty.index(slot), ((gstep // STAGES) & 1) ^ 1, pred=gstep >= STAGES)
    bar = ld_bar.index(slot)
    mbarrier.expect(bar, dy_desc.block_type.nbytes + x_desc.block_type.nbytes)
    tma.async_load(dy_desc, [step * BLOCK_T, off_n], bar, dy_smem.index(slot){kw_dy})
    tma.async_load(x_desc, [step * BLOCK_T, off_k], bar, x_smem.index(slot), multicast=True{kw_x})


@gluon.jit
def _st4_ef(ptr, val, mask):
    return gl.inline_asm_elementwise(
        "{_ST4_EF_ASM}",
        "=r,=r,=r,=r,l,l,l,l,r,r,r,r,r,r,r,r",
        [ptr, val.to(gl.int32, bitcast=True), mask.to(gl.int32)], dtype=gl.int32,
        is_pure=False, pack=4)
"""


def arg_names(n_state: int):
    """Names of the W/state TMA descriptors, ring buffers, pointers and row strides."""
    idx = [""] + [str(i) for i in range(n_state)]
    return ([f"s{i}_desc" if i else "p_desc" for i in idx],
            [f"s{i}_smem" if i else "p_smem" for i in idx],
            [f"s{i}_ptr" if i else "p_ptr" for i in idx],
            [f"s_s{i}_n" if i else "s_p_n" for i in idx])


def scalar_loads(n_scalar: int) -> list:
    """Kernel-prologue lines: each per-step scalar read through its pointer or taken by value."""
    out = []
    for i in range(n_scalar):
        out += [f"    if SCALAR_PTR_{i}:", f"        c{i} = gl.load(sc{i}).to(gl.float32)",
                "    else:", f"        c{i} = sc{i}"]
    return out


# IEEE division and square root without a branch per element (WS_FAST_IEEE). ptxas expands
# each div.rn.f32 / sqrt.rn.f32 into a fast path, a range check (FCHK; for sqrt an integer
# compare) and a call of a slow path; each is a convergence region (BSSY/BSYNC) that nothing is
# scheduled across: 128 FCHK and 192 calls per AdamW chunk walk of the T=512 candidate (sm_90
# SASS, Triton 3.6). With 8 epilogue warps that costs AdamW 3.9 µs of 0.158 ms at 4096²
# T=512 and 5.0 of 0.199 at T=2048 against the same program with products in their place
# (H100, stream_ceiling.py --math, eighteenth session). Here each of P elements runs ptxas's own
# fast-path sequence, read off its sm_90 SASS:
#   a / b:   r = rcp(b); r = fma(r, fma(-b, r, 1), r); q = a·r; q = fma(fma(-b, q, a), r, q)
#   sqrt(x): y = rsqrt(x); s = x·y (ftz); h = y·0.5 (ftz); s = fma(fma(-s, s, x), h, s)
# The results are exact (equal to div.rn / sqrt.rn bit for bit) where the operands lie in a
# range where the sequence is:
# - sqrt: ptxas's own test, bits in [0x0d000000, 0x7f7fffff] (2^-101 ≤ x < inf);
# - a / b: a, b and the quotient with biased exponents in [32, 222], |·| in [2^-95, 2^96). That
#   keeps every intermediate normal and the residual fma(-b, q, a) exact (its granularity is
#   2^(E_a - 46) ≥ 2^-141, above the subnormal 2^-149). In this range the Newton step and the
#   final correction give the correctly rounded quotient, as in ptxas's fast path.
# A warp whose P·32 elements all lie in range takes no branch. Otherwise (a zero, a subnormal,
# an inf or NaN anywhere in it) it recomputes all P of each thread with div.rn / sqrt.rn. That
# branch is warp-uniform (vote.all + bra.uni), so no convergence region is needed. The results
# go to the outputs only at the end: an output may share a register with an input. Every local
# register is named %fi_*: LLVM names its own %r<n>, %f<n>, %p<n>, %rd<n>, %h<n>, and a local
# %r1 shadows the operand LLVM passes in its %r1 (the fourth session's version declared %r<4>
# and disagreed with torch; so did this one's first GPU run at pack 2, on 1.0 / b). Tests: bit
# for bit against torch on the GPU (tests/test_fused_linear_update.py, "fast_ieee").
# Measured (run 51): exact, and slower, 0.1725 against 0.1576 ms at T=512 and 0.353 against
# 0.198 at T=2048. The unrolled epilogue's code grows 31% and outruns the instruction cache
# (ncu: "no instruction" stalls 5% → 34%). With WS_ROLL (the grab path's halves in a loop,
# 40% less code) it pays: 0.1549 against 0.1566 ms (run 52); the tenth candidate has both, and
# the eleventh (the T=2048 pick in 4 passes: 0.1979 against 0.1994 ms, run 53).
_FAST_IEEE_PACKS = (1, 2, 4, 8)


def _fast_div_ptx(n: int) -> str:
    """PTX for ``n`` quotients: outputs $0..$n-1, dividends $n.., divisors $2n.."""
    body = [f".reg .pred %ok<{n}>, %all;", f".reg .f32 %r<{n}>, %nb<{n}>, %e<{n}>, %q<{n}>;",
            f".reg .b32 %ea<{n}>, %eb<{n}>, %t<{n}>;"]
    for i in range(n):
        a, b = f"${n + i}", f"${2 * n + i}"
        body += [f"rcp.approx.ftz.f32 %r{i}, {b};", f"neg.f32 %nb{i}, {b};",
                 f"fma.rn.f32 %e{i}, %nb{i}, %r{i}, 0f3F800000;",
                 f"fma.rn.f32 %r{i}, %r{i}, %e{i}, %r{i};",
                 f"mul.rn.f32 %q{i}, {a}, %r{i};",
                 f"fma.rn.f32 %e{i}, %nb{i}, %q{i}, {a};",
                 f"fma.rn.f32 %q{i}, %e{i}, %r{i}, %q{i};",
                 # biased exponents of a, b in [32, 222], and of a/b: e(a) - e(b) + 127 ±1
                 f"mov.b32 %ea{i}, {a};", f"bfe.u32 %ea{i}, %ea{i}, 23, 8;",
                 f"mov.b32 %eb{i}, {b};", f"bfe.u32 %eb{i}, %eb{i}, 23, 8;",
                 f"sub.u32 %t{i}, %ea{i}, 32;", f"setp.le.u32 %ok{i}, %t{i}, 190;",
                 f"sub.u32 %t{i}, %eb{i}, 32;", f"setp.le.and.u32 %ok{i}, %t{i}, 190, %ok{i};",
                 f"sub.s32 %t{i}, %ea{i}, %eb{i};", f"add.s32 %t{i}, %t{i}, 95;",
                 f"setp.le.and.u32 %ok{i}, %t{i}, 190, %ok{i};"]
    slow = [f"div.rn.f32 %q{i}, ${n + i}, ${2 * n + i};" for i in range(n)]
    return _uniform_fallback(body, n, slow, "FLU_DIV")


def _fast_sqrt_ptx(n: int) -> str:
    """PTX for ``n`` square roots: outputs $0..$n-1, arguments $n.."""
    body = [f".reg .pred %ok<{n}>, %all;",
            f".reg .f32 %y<{n}>, %q<{n}>, %h<{n}>, %ns<{n}>, %e<{n}>;", f".reg .b32 %u<{n}>;"]
    for i in range(n):
        x = f"${n + i}"
        body += [f"rsqrt.approx.ftz.f32 %y{i}, {x};", f"mul.rn.ftz.f32 %q{i}, {x}, %y{i};",
                 f"mul.rn.ftz.f32 %h{i}, %y{i}, 0f3F000000;", f"neg.f32 %ns{i}, %q{i};",
                 f"fma.rn.f32 %e{i}, %ns{i}, %q{i}, {x};",
                 f"fma.rn.f32 %q{i}, %e{i}, %h{i}, %q{i};",
                 f"mov.b32 %u{i}, {x};", f"sub.u32 %u{i}, %u{i}, 0x0D000000;",
                 f"setp.le.u32 %ok{i}, %u{i}, 0x727FFFFF;"]
    slow = [f"sqrt.rn.f32 %q{i}, ${n + i};" for i in range(n)]
    return _uniform_fallback(body, n, slow, "FLU_SQRT")


def _uniform_fallback(body, n, slow, label) -> str:
    # every lane's range flags into one, voted over the warp: the branch is uniform; the
    # results (%q) go to the outputs after the last read of an input
    body = body + [f"and.pred %all, %all, %ok{i};" if i else "mov.pred %all, %ok0;" for i in range(n)]
    body += ["vote.sync.all.pred %all, %all, 0xffffffff;",
             f"@%all bra.uni {label}_${{:uid}};", *slow, f"{label}_${{:uid}}:"]
    body += [f"mov.f32 ${i}, %q{i};" for i in range(n)]
    # every local register as %fi_*: LLVM names its own %r<i>, %f<i>, %p<i>, %h<i>, ...
    return "{\n" + re.sub(r"%([a-z]+)", r"%fi_\1", "\n".join(body)) + "\n}"


def fast_ieee_source() -> str:
    """Gluon source of ``_div_rn_fast(P, a, b)`` and ``_sqrt_rn_fast(P, x)`` (see above): P
    elements of each thread per inline-PTX instance, P a constexpr in _FAST_IEEE_PACKS that
    divides the thread's element count (the epilogue's FAST_PACK). inline_asm_elementwise
    broadcasts a scalar operand (a per-step scalar, 1.0) to the tile."""
    out = []
    for n in _FAST_IEEE_PACKS:
        out += [f"_DIV_PTX_{n} = gl.constexpr({_fast_div_ptx(n)!r})",
                f"_SQRT_PTX_{n} = gl.constexpr({_fast_sqrt_ptx(n)!r})"]
    for name, ptx, args in (("_div_rn_fast", "_DIV_PTX", "a, b"),
                            ("_sqrt_rn_fast", "_SQRT_PTX", "x")):
        k = len(args.split(", "))
        out += ["", "", "@gluon.jit", f"def {name}(P: gl.constexpr, {args}):"]
        for j, n in enumerate(_FAST_IEEE_PACKS):
            cons = ",".join(["=f"] * n + ["f"] * (k * n))
            out += [f"    {'if' if j == 0 else 'elif'} P == {n}:",
                    f"        r = gl.inline_asm_elementwise({ptx}_{n}, {cons!r}, [{args}], "
                    f"gl.float32, True, {n})"]
        out.append("    return r")
    return "\n".join(out) + "\n"


def _fast_ieee(expr: str) -> str:
    """A Gluon tile expression with its IEEE divisions and square roots on fast_ieee_source's
    helpers (FAST_PACK: the epilogue's constexpr)."""
    return (expr.replace("gl.div_rn(", "_div_rn_fast(FAST_PACK, ")
            .replace("gl.sqrt_rn(", "_sqrt_rn_fast(FAST_PACK, "))


def module_head(prog, generator: str, l2: str = "", cluster: int = 1,
                tma_store: bool = False, fast_ieee: bool = False) -> list:
    """The generated Gluon module's imports, its program, the shipped kernel's stochastic
    rounding (Philox from triton.language), the L2 policies (those of ``l2``, and evict_first
    for ``tma_store``) and the GEMM helpers."""
    policies = []
    # the loads' priorities are source only where the TMA load takes a cache_policy (older
    # Tritons get them by add_l2_hints' PTX rewrite); the stores' only where the store does
    prios = {p for p in L2_MODES[l2] if p} if _tma_takes("cache_policy") else set()
    if tma_store and _tma_takes("cache_policy", "store"):
        prios.add("evict_first")
    if prios:
        policies = ["from triton.experimental.gluon.language.nvidia.ampere import (",
                    "    CachePolicy, FractionalEvictionPolicy)"]
        policies += [f"L2_{p.upper()} = gl.constexpr(CachePolicy(l2=FractionalEvictionPolicy("
                     f"{p!r}, 1.0)))" for p in sorted(prios)]
    # pow with an exponent other than 2, 1, ±0.5, -1 is libdevice.pow (_emit); without the
    # import such a program's WS candidates failed to compile and the tuner skipped them
    libdevice = (["from triton.language.extra import libdevice"]
                 if any("libdevice." in e for _, e in _Epilogue(prog).body) else [])
    return ['"""Generated by ' + generator + '; do not edit."""',
            "import triton", "import triton.language as tl",
            "from triton.experimental import gluon",
            "from triton.experimental.gluon import language as gl",
            "from triton.experimental.gluon.language.nvidia.hopper import (",
            "    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)",
            *policies, *libdevice, "",
            f"PROGRAM = {prog.dumps()!r}", "",
            _gl(_ROUND_BF16_STOCHASTIC).replace("@triton.jit", "@gluon.jit"),
            gemm_helpers(l2, cluster)] + ([fast_ieee_source()] if fast_ieee else [])


def issue_state_source(descs, smems, rows: bool = False, l2: str = "") -> list:
    """``_issue_state(seq, walk_u0, walk_t0, walk_step, ...)``: TMA loads of this CTA's
    W/state chunk ``seq`` (see ``tile_walk``: global chunk u = walk_u0 + seq, i.e. chunk
    u % SPLIT, CW columns or with ``rows`` CW rows, of the CTA's tile number
    u // SPLIT - walk_u0 // SPLIT) into ring slot seq % SLOTS (arity depends on the program)."""
    out = ["@gluon.jit",
           f"def _issue_state(seq, walk_u0, walk_t0, walk_step, {', '.join(descs)}, "
           f"{', '.join(smems)}, st_bar, N, K,",
           "                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,",
           "                 SLOTS: gl.constexpr, GROUP_N: gl.constexpr, CW: gl.constexpr):",
           "    u = walk_u0 + seq     # this CTA's chunk seq: global chunk u of the tile walk",
           "    off_n, off_k = _tile_coords(walk_t0 + (u // SPLIT - walk_u0 // SPLIT) * walk_step,",
           "                                N, K, BLOCK_N, BLOCK_K, GROUP_N)",
           f"    off_{'n' if rows else 'k'} += (u % SPLIT) * CW",
           "    slot = seq % SLOTS",
           "    bar = st_bar.index(slot)",
           "    mbarrier.expect(bar, " + " + ".join(f"{d}.block_type.nbytes" for d in descs) + ")"]
    kw = _policy_kw(L2_MODES[l2][2])
    out += [f"    tma.{_tma_load()}({d}, [off_n, off_k], bar, {m}.index(slot){kw})"
            for d, m in zip(descs, smems)]
    return out + ["", ""]


# One L2 prefetch of the line at address $2 where the predicate $1 is non-zero ($0: a dummy
# result; the asm is impure, so it is kept). Inline PTX: Gluon has no L2 prefetch on sm_90.
_L2_PREFETCH_ASM = ("{ .reg .pred p; setp.ne.b32 p, $1, 0; @p prefetch.global.L2 [$2]; "
                    "mov.u32 $0, 0; }")


def prefetch_state_source(ptrs, strides) -> list:
    """``_prefetch_state(row0, col0, ...)``: an L2 prefetch of the W/state row chunk at
    (row0, col0), one ``prefetch.global.L2`` per 128-byte line, at most one line per epilogue
    thread and tensor (``prefetch_lanes``). Why: the W/state ring in shared memory is what
    bounds the stream's bytes in flight (ws4's 24 KiB beside the 4-stage GEMM ring: the stream
    alone 169 µs instead of 152 with 48 KiB, ncu, eleventh session); a prefetch puts more bytes
    in flight without shared memory, and the ring's later TMA load then hits L2. Per line, through the load/store
    unit, not ``cp.async.bulk.prefetch.L2``: study run 24a, those 512-byte bulk prefetches share
    the TMA unit with the rings' loads, and fused AdamW T=2048 took 0.436 ms instead of 0.217.
    The caller names the chunk's tile and row, so that no chunk pays ``_tile_coords``' integer
    divisions (run 24b did, per chunk: +100 SASS instructions per chunk and thread, fused AdamW
    on 8 epilogue warps 1.7× slower). Rows past N and lines past K are not prefetched (a hint
    only: the TMA load zero-fills them)."""
    out = ["@gluon.jit",
           f"def _prefetch_state(row0, col0, {', '.join(ptrs)}, {', '.join(strides)}, N, K, pfe,",
           "                    BLOCK_K: gl.constexpr, CW: gl.constexpr, EVEN_NK: gl.constexpr):"]
    for d, (ptr, stride) in enumerate(zip(ptrs, strides)):
        le = f"LE{d}"          # elements per 128-byte line (constexprs cannot be reassigned)
        out += [f"    {le}: gl.constexpr = 1024 // {ptr}.dtype.element_ty.primitive_bitwidth",
                f"    r = pfe // (BLOCK_K // {le})",
                f"    c = pfe % (BLOCK_K // {le}) * {le}",
                f"    ok = pfe < CW * (BLOCK_K // {le})",
                "    if not EVEN_NK:",
                "        ok = ok & (row0 + r < N) & (col0 + c < K)",
                "    gl.inline_asm_elementwise(",
                f'        "{_L2_PREFETCH_ASM}",',
                f"        \"=r,r,l\", [ok.to(gl.int32), {ptr} + (row0 + r) * {stride} + col0 + c],",
                "        dtype=gl.int32, is_pure=False, pack=1)"]
    return out + ["", ""]


def prefetch_gemm_source(mma_warps: int) -> str:
    """``_prefetch_gemm(t0, off_n, off_k, ...)``: an L2 prefetch of one GEMM ring step's dY/X
    slabs (rows t0..t0+BLOCK_T of dY's BLOCK_N columns at off_n and of X's BLOCK_K at off_k),
    one ``prefetch.global.L2`` per 128-byte line, spread over the MMA warps. Why: at T=2048
    the GEMM's loads come from DRAM beside the stream (dY/X re-read ~3×, ncu) and a deeper ring
    was worth 12% (3 → 4 stages, study run 17), but a 5th stage has no shared memory left; a
    prefetch a few steps ahead makes the ring's TMA loads hit L2 without one."""
    return f"""
@gluon.jit
def _prefetch_gemm_one(ptr, stride, t0, off, T, W, BLOCK_T: gl.constexpr, BLOCK: gl.constexpr):
    pl: gl.constexpr = gl.BlockedLayout([1], [32], [{mma_warps}], [0])
    e = gl.arange(0, 32 * {mma_warps}, pl)
    LE: gl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth
    for e0 in gl.static_range(0, BLOCK_T * (BLOCK // LE), 32 * {mma_warps}):
        r = t0 + (e0 + e) // (BLOCK // LE)
        c = off + (e0 + e) % (BLOCK // LE) * LE
        ok = (r < T) & (c < W)
        gl.inline_asm_elementwise(
            "{_L2_PREFETCH_ASM}",
            "=r,r,l", [ok.to(gl.int32), ptr + r.to(gl.int64) * stride + c],
            dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _prefetch_gemm(t0, off_n, off_k, dy_ptr, x_ptr, s_dy_t, s_x_t, T, N, K,
                   BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    _prefetch_gemm_one(dy_ptr, s_dy_t, t0, off_n, T, N, BLOCK_T, BLOCK_N)
    _prefetch_gemm_one(x_ptr, s_x_t, t0, off_k, T, K, BLOCK_T, BLOCK_K)
"""


def prefetch_lanes() -> list:
    """Epilogue-prologue lines: each thread's index among the lines of a W/state row chunk (CW
    rows of BLOCK_K elements: CW·BLOCK_K·bytes/128 lines, at most one per thread; row and
    column are shifts of it, so no more registers stay live across the tile loop: with three
    per tensor, ws0's 96 registers spilled 16 bytes)."""
    return ["    pl: gl.constexpr = gl.BlockedLayout([1], [32], [EPI_WARPS], [0])",
            "    pfe = gl.arange(0, 32 * EPI_WARPS, pl)"]


def tile_walk(balanced: bool, cluster: int = 1) -> list:
    """Kernel lines (both partitions) naming this CTA's share of the work: ``my_tiles`` tiles
    walk_t0, walk_t0 + walk_step, ... (in ``_tile_coords`` order), and within them
    ``n_chunks`` chunks of SPLIT per tile, the first being chunk walk_c0 of tile walk_t0
    (global chunk walk_u0). The walk_ prefix keeps clear of the generated program's names
    (its scalars are c0, c1, ...).

    Strided (every tile to one CTA): tile pid + i·nprog, all its chunks. 4096² has 1024
    tiles of 128×128 on 132 SMs: 100 CTAs run 8 tiles, 32 run 7, and in the last round a
    quarter of the SMs idle while the rest stream, ~3% of a memory-bound kernel.
    ``balanced``: the num_tiles·SPLIT chunks are cut into nprog contiguous runs that differ by at
    most one chunk; a tile cut between two CTAs has its GEMM computed by both, and each updates
    its own rows (only the row-chunk path: a chunk is whole rows, the hand-off the whole tile).
    Measured slower (H100, study run 7): the epilogue alone gains nothing (AdamW 0.175 vs 0.171
    ms, both with m subnormal), the GEMM alone loses 19-27% (concurrent CTAs no longer share
    dY/X panels in L2); kept for the study, not a candidate."""
    # with a cluster, program_id is the cluster's and a tile is a pair (cluster_helpers)
    out = ["    pid = gl.program_id(0)",
           "    nprog = gl.num_programs(0)",
           f"    num_tiles = gl.cdiv(N, {'2 * ' if cluster == 2 else ''}BLOCK_N) * gl.cdiv(K, BLOCK_K)"]
    if balanced:
        return out + ["    walk_units = num_tiles * SPLIT",
                      "    walk_u0 = pid * walk_units // nprog",
                      "    n_chunks = (pid + 1) * walk_units // nprog - walk_u0",
                      "    walk_t0 = walk_u0 // SPLIT",
                      "    walk_step = 1",
                      "    walk_c0 = walk_u0 % SPLIT",
                      "    my_tiles = (walk_u0 + n_chunks - 1) // SPLIT - walk_t0 + 1"]
    return out + ["    walk_t0 = pid",
                  "    walk_step = nprog",
                  "    my_tiles = gl.cdiv(num_tiles - pid, nprog)",
                  "    walk_u0 = 0",
                  "    walk_c0 = 0",
                  "    n_chunks = my_tiles * SPLIT"]


def kernel_source(program, split: int, pipe: bool, state: str, epilogue: bool = True,
                  handoff: str = "chunk", l2: str = "", mma_warps: int = 4,
                  mma_pending: int = 1, prefetch: int = 0, prefetch_gemm: int = 0,
                  mma: bool = True, cluster: int = 1, load_warp: bool = False,
                  tma_store: bool = False, fast_ieee: bool = False, roll: int = 0,
                  vec: int = 4) -> str:
    """The Gluon module source for one epilogue program, SPLIT, PIPE and the W/state path
    (``state``: "regs" = gl.load; "warp" = TMA ring fed by a 1-warp partition; "epi" = TMA ring
    fed by the epilogue warps themselves, SLOTS chunks ahead). ``epilogue=False`` (the study's
    GEMM-alone measurement): the epilogue warps only take the accumulator over and drop it.
    ``handoff``: "chunk" = the accumulator changes hands one column chunk at a time (chunk h
    of tile i+1 is stored as soon as the epilogue has read chunk h of tile i); "tile" = the
    whole tile at once (the study's earlier variant: the epilogue idles during every hand-off).
    ``l2``: a key of L2_MODES, the L2 eviction priorities of the dY, X and W/state TMA loads.
    ``mma_warps``: 4 (one MMA warpgroup) or 8 (two, for BLOCK_N = 256 in the study).
    ``mma_pending``: wgmma groups left in flight before a ring slot is refilled (1 shipped; the
    ring then holds STAGES - mma_pending loads in flight).
    ``prefetch``: W/state chunks prefetched into L2 beyond the ring (``prefetch_state_source``;
    0: none, the source is then as before the knob; only the "epi_rows" path).
    ``prefetch_gemm``: GEMM ring steps whose dY/X the MMA warps prefetch into L2 beyond the ring
    (``prefetch_gemm_source``; 0: none; the kernel then also takes dY/X's pointers and
    strides). ``mma=False`` (study run 28): the MMA warps run the ring (wait for each step's
    loads, refill the slot) without the wgmma, so the accumulator handed over is 0.
    ``cluster``: CTAs per cluster, 1 or 2 (``cluster_helpers``; only "epi_rows" with one MMA
    warpgroup and none of the study knobs). ``load_warp`` (study run 38): a 1-warp partition
    issues the GEMM ring's TMA loads, STAGES steps ahead, and the MMA warps only wait for them
    and release each slot (``ld_empty``) once its wgmma is done; so a refill that waits (in a
    cluster: for both CTAs) no longer holds up the MMA warps' next wgmma.
    ``tma_store`` (study run 49): the new W/state go back into the ring slot they came from and
    out by TMA stores instead of 16-byte stores from registers; a slot is refilled one chunk
    later, once its stores have read it (row paths fed by the epilogue only).
    ``fast_ieee`` (eighteenth session): the update's tile divisions and square roots on
    ``fast_ieee_source``'s helpers, the same bits without a branch per element.
    ``roll``: 0, the tile's SPLIT chunks unrolled; r >= 2, a runtime loop of r iterations over
    SPLIT / r chunks each ("epi_rows_grab": r = 2, its halves; eighteenth session; "epi_rows":
    any divisor of SPLIT, the chunks read from a [SPLIT, CW, BLOCK_K] view of the hand-off
    buffer; nineteenth session): less code per tile, for the instruction cache (run 51).
    ``vec`` (row paths): elements per epilogue thread along a row, 4 or 8 (8: 16-byte accesses
    on 2-byte W/state; a warp then covers 256 // BLOCK_K rows, and every epilogue warp needs
    rows of its own in a chunk: ws_launch_args checks)."""
    if load_warp and (state == "warp" or prefetch_gemm or mma_pending != 1 or not mma):
        raise ValueError("WS_LOAD_WARP=1: not with WS='warp', WS_PREFETCH_GEMM, "
                         "WS_MMA_PENDING=2 or the ring without wgmma")
    if cluster not in (1, 2):
        raise ValueError(f"WS_CLUSTER={cluster}: 1 or 2")
    if cluster == 2 and (state != "epi_rows" or prefetch or prefetch_gemm or mma_warps != 4
                         or mma_pending != 1 or pipe or not mma):
        raise ValueError("WS_CLUSTER=2: only WS='epi_rows' with one MMA warpgroup, "
                         "WS_MMA_PENDING=1 and no prefetch")
    if tma_store and (state not in ("epi_rows", "epi_rows_grab") or cluster == 2 or pipe
                      or prefetch):
        raise ValueError("WS_TMA_STORE=1: only WS='epi_rows' or 'epi_rows_grab', without "
                         "EPI_PIPE, WS_PREFETCH or WS_CLUSTER=2")
    if prefetch and state != "epi_rows":
        raise ValueError(f"WS_PREFETCH={prefetch}: only with WS='epi_rows'")
    if roll and (state not in ("epi_rows", "epi_rows_grab") or pipe or tma_store or prefetch
                 or cluster != 1 or not epilogue):
        raise ValueError(f"WS_ROLL={roll}: only WS='epi_rows' or 'epi_rows_grab', without "
                         "EPI_PIPE, WS_TMA_STORE, WS_PREFETCH or WS_CLUSTER=2")
    if roll and (roll < 2 or split % roll or (state == "epi_rows_grab" and roll != 2)):
        raise ValueError(f"WS_ROLL={roll} with EPI_SPLIT={split}: 0 (unrolled) or the loop's "
                         "iterations per tile, a divisor of EPI_SPLIT >= 2 (2 with "
                         "WS='epi_rows_grab', its halves)")
    if vec not in (4, 8) or (vec == 8 and (state not in _ROW_PATHS or cluster == 2)):
        raise ValueError(f"WS_VEC={vec}: 4, or 8 on the row paths without WS_CLUSTER=2")
    if mma_warps not in _MMA_REGS:
        raise ValueError(f"mma_warps={mma_warps}: one of {sorted(_MMA_REGS)}")
    if mma_pending not in (1, 2):
        raise ValueError(f"WS_MMA_PENDING={mma_pending}: 1 or 2")
    rows = state in _ROW_PATHS
    balanced = state == "epi_rows_bal"             # see tile_walk
    # "epi_rows_half": the tile changes hands in two halves of BLOCK_N/2 rows (see the MMA
    # partition below), so the epilogue starts a tile without waiting for the whole store
    halves = state in ("epi_rows_half",) + _HALF_BUFFER_PATHS
    # "epi_rows_half1": both halves pass through one buffer of BLOCK_N/2 rows (32 KiB instead of
    # 64 at 128×128), which frees shared memory for the rings; the MMA warps then wait for the
    # epilogue to finish the first half before they store the second and start the next GEMM.
    # One barrier pair, two hand-offs per tile: the phase of hand-off h is h (i drops out).
    one_buf = state in _HALF_BUFFER_PATHS
    # "epi_rows_grab": the same buffer and barriers, but the epilogue reads a half's chunks all at
    # once into registers (8 chunks of 8 rows at 8 warps: 32 registers per thread) and releases
    # the buffer before it streams them. The MMA warps then wait only for that read, not for
    # half a tile's stream as with "epi_rows_half1" (run 19: 4% slower at T=2048). The 32 KiB
    # freed hold W/state slots in the ninth candidate (runs 46-47); as GEMM stages they lose
    # at T=2048 (run 45).
    grab = state == "epi_rows_grab"
    # "epi_rows_pairs": one CTA-wide barrier per two chunks instead of per chunk (ncu: 9.3% of
    # the T=512 pick's stall samples on barriers, 17:25 UTC); after the second chunk of a pair
    # both its slots are refilled, so the ring needs SLOTS >= 3 (ws_launch_args checks)
    pairs = state == "epi_rows_pairs"
    if (balanced or halves or pairs) and pipe:
        raise ValueError(f"the {state} path has no EPI_PIPE variant")
    if (halves or pairs) and split % 2:
        raise ValueError(f"{state} needs an even EPI_SPLIT (chunks of one half each, or pairs)")
    state = "epi" if rows else state
    per_chunk = handoff == "chunk" and not rows
    half = split // 2
    state_tma = state != "regs"
    warp_fed = state == "warp"
    prog = load_program(program)
    ep = _Epilogue(prog)
    n_state = len(prog.state)
    descs, smems, ptrs, strides = arg_names(n_state)
    n_scalar = len(prog.scalars)
    cs = [f"c{i}" for i in range(n_scalar)]
    L = []
    a = L.append
    L.extend(module_head(prog, "forge_compile/kernels/fused_linear_update_ws.py", l2, cluster,
                         tma_store, fast_ieee))
    if prefetch_gemm:
        L.append(prefetch_gemm_source(mma_warps))
    # ---- MMA partition (worker: 4 warps) ----
    # worker partitions share one signature (Gluon's rule): the GEMM and the state streams
    wsig = (f"dy_desc, x_desc, {''.join(d + ', ' for d in descs) if warp_fed else ''}"
            f"dy_smem, x_smem, {''.join(m + ', ' for m in smems) if warp_fed else ''}"
            f"ld_bar, {'x_empty, ' if cluster == 2 else ''}{'ld_empty, ' if load_warp else ''}"
            f"{'st_ready, st_empty, ' if warp_fed else ''}acc_smem, acc_ready, acc_empty, "
            f"T, N, K, {'dy_ptr, x_ptr, s_dy_t, s_x_t, ' if prefetch_gemm else ''}"
            "BLOCK_N, BLOCK_K, BLOCK_T, SPLIT, STAGES, SLOTS, GROUP_N, SKIP_GEMM")
    wparams = (wsig.replace("BLOCK_N,", "BLOCK_N: gl.constexpr,")
               .replace("BLOCK_K,", "BLOCK_K: gl.constexpr,")
               .replace("BLOCK_T,", "BLOCK_T: gl.constexpr,").replace("SPLIT,", "SPLIT: gl.constexpr,")
               .replace("STAGES,", "STAGES: gl.constexpr,").replace("SLOTS,", "SLOTS: gl.constexpr,")
               .replace("GROUP_N,", "GROUP_N: gl.constexpr,")
               .replace("SKIP_GEMM", "SKIP_GEMM: gl.constexpr"))
    if state == "epi":
        L.extend(issue_state_source(descs, smems, rows, l2))
    if prefetch:
        L.extend(prefetch_state_source(ptrs, strides))
    if warp_fed:
        a("@gluon.jit")
        a(f"def _state_partition({wparams}):")
        a("    # one warp: W/state column chunks by TMA into a SLOTS-deep ring, ahead of the epilogue")
        a("    CW: gl.constexpr = BLOCK_K // SPLIT")
        L.extend(tile_walk(False))
        a("    for seq in range(n_chunks):")
        a("        off_n, off_k = _tile_coords(walk_t0 + (seq // SPLIT) * walk_step, N, K, BLOCK_N, BLOCK_K, GROUP_N)")
        a("        slot = seq % SLOTS")
        a("        mbarrier.wait(st_empty.index(slot), ((seq // SLOTS) & 1) ^ 1)")
        a("        fence_async_shared()     # the epilogue's generic reads before TMA's writes")
        a("        bar = st_ready.index(slot)")
        a("        mbarrier.expect(bar, " + " + ".join(f"{d}.block_type.nbytes" for d in descs) + ")")
        for d, m in zip(descs, smems):
            a(f"        tma.{_tma_load()}({d}, [off_n, off_k + (seq % SPLIT) * CW], "
              f"bar, {m}.index(slot){_policy_kw(L2_MODES[l2][2])})")
        a("")
        a("")
    ldb = "ld_bar, x_empty" if cluster == 2 else "ld_bar"
    if load_warp:
        a("@gluon.jit")
        a(f"def _load_partition({wparams}):")
        a("    # one warp: the GEMM ring's TMA loads, each slot refilled once the MMA warps release it")
        L.extend(tile_walk(balanced, cluster))
        a(f"""    num_t = gl.cdiv(T, BLOCK_T)
    if SKIP_GEMM:
        num_t = 0
    gbase = 0
    for i in range(my_tiles):
        off_n, off_k = _tile_coords(walk_t0 + i * walk_step, N, K, BLOCK_N, BLOCK_K, GROUP_N)
        for t in range(num_t):
            gs = gbase + t
            if gs >= STAGES:
                mbarrier.wait(ld_empty.index(gs % STAGES), ((gs // STAGES) & 1) ^ 1)
            _issue_gemm(t, gs, off_n, off_k, dy_desc, x_desc, dy_smem, x_smem, {ldb}, STAGES, BLOCK_T)
        gbase += num_t
""")
        a("")
    a("@gluon.jit")
    a(f"def _mma_partition({wparams}):")
    # with a cluster every layout is replicated over its CTAs (cluster_helpers)
    cga = lambda rank: f", cga_layout=[[{', '.join(['0'] * rank)}]]" if cluster == 2 else ""  # noqa: E731
    a(f"""    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[{mma_warps}, 1],
                                                  instr_shape=[16, BLOCK_K, 16]{cga(2)})""")
    L.extend(tile_walk(balanced, cluster))
    # the GEMM's L2 prefetch (prefetch_gemm_source): before the first tile, its steps past the
    # ring; in the loop, step t + ahead, and near a tile's end the next tile's first steps
    pf_start = pf_tile = pf_loop = ""
    if prefetch_gemm:
        ahead = f"STAGES - {mma_pending} + {prefetch_gemm}"
        pfa = "dy_ptr, x_ptr, s_dy_t, s_x_t, T, N, K, BLOCK_T, BLOCK_N, BLOCK_K)"
        pf_start = (f"    for s in gl.static_range(STAGES - {mma_pending}, {ahead}):\n"
                    "        if s < num_t:\n"
                    f"            _prefetch_gemm(s * BLOCK_T, off_n, off_k, {pfa}\n")
        pf_tile = ("        pn, pk = _tile_coords(walk_t0 + (i + 1) * walk_step, N, K, "
                   "BLOCK_N, BLOCK_K, GROUP_N)\n")
        pf_loop = (f"            pq = t + {ahead}\n"
                   "            if pq < num_t:\n"
                   f"                _prefetch_gemm(pq * BLOCK_T, off_n, off_k, {pfa}\n"
                   "            elif i + 1 < my_tiles:\n"
                   f"                _prefetch_gemm((pq - num_t) * BLOCK_T, pn, pk, {pfa}\n")
    # the wgmma of each ring step and the drain after the T loop; mma=False (study): the ring
    # runs without them
    mma_step = mma_drain = ""
    if mma:
        mma_step = f"""            acc = warpgroup_mma(dy_smem.index(slot).permute((1, 0)), x_smem.index(slot), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding={mma_pending}, deps=(acc,))
"""
        mma_drain = "        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))\n"
    # step gs - 1's wgmma is done (one group left in flight): its slot is released to the load
    # warp (ld_empty) and, with a cluster, its X to CTA 0, which multicasts into it
    # (cluster_helpers)
    released = [b for b, on in (("ld_empty", load_warp), ("x_empty", cluster == 2)) if on]
    release = ("            if gs > 0:\n" + "".join(
        f"                mbarrier.arrive({b}.index((gs - 1) % STAGES), count=1)\n"
        for b in released) if released else "")
    # the MMA warps' own ring loads: the first tile's first steps before the loop, each step's
    # refill STAGES - mma_pending ahead, the next tile's first steps after a tile; with a load
    # warp all of them are the load partition's and the MMA warps only wait and release
    first = each_tile = refill = next_tile = ""
    if not load_warp:
        first = f"""    off_n, off_k = _tile_coords(walk_t0, N, K, BLOCK_N, BLOCK_K, GROUP_N)
    for s in gl.static_range(STAGES - {mma_pending}):
        if s < num_t:
            _issue_gemm(s, s, off_n, off_k, dy_desc, x_desc, dy_smem, x_smem, {ldb}, STAGES, BLOCK_T)
{pf_start}"""
        each_tile = ("        off_n, off_k = _tile_coords(walk_t0 + i * walk_step, N, K, BLOCK_N, "
                     f"BLOCK_K, GROUP_N)\n{pf_tile}")
        refill = f"""            if t + STAGES - {mma_pending} < num_t:
                _issue_gemm(t + STAGES - {mma_pending}, gs + STAGES - {mma_pending}, off_n, off_k, dy_desc, x_desc,
                            dy_smem, x_smem, {ldb}, STAGES, BLOCK_T)
{pf_loop}"""
        next_tile = f"""        if i + 1 < my_tiles:
            nn, nk = _tile_coords(walk_t0 + (i + 1) * walk_step, N, K, BLOCK_N, BLOCK_K, GROUP_N)
            for s in gl.static_range(STAGES - {mma_pending}):
                if s < num_t:
                    _issue_gemm(s, gbase + s, nn, nk, dy_desc, x_desc, dy_smem, x_smem, {ldb},
                                STAGES, BLOCK_T)
"""
    a(f"""    num_t = gl.cdiv(T, BLOCK_T)
    if SKIP_GEMM:
        num_t = 0
    gbase = 0
{first}    for i in range(my_tiles):
{each_tile}        acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, mma)
        for t in range(num_t):
            gs = gbase + t
            slot = gs % STAGES
            mbarrier.wait(ld_bar.index(slot), (gs // STAGES) & 1)
{mma_step}            gl.thread_barrier()
{release}{refill}{mma_drain}        gbase += num_t
        gl.thread_barrier()
{next_tile}""")
    if halves:
        # rows 0..BLOCK_N/2-1 and the rest: the wgmma layout holds both halves in each
        # thread's registers (4 warps × 16 rows cover 64), so the split moves no data
        L += ["        acc_lo, acc_hi = gl.split(gl.permute(gl.reshape(",
              "            acc, [2, BLOCK_N // 2, BLOCK_K]), (1, 2, 0)))"]
        for h, c in enumerate(("acc_lo", "acc_hi")):
            if one_buf:
                a(f"        mbarrier.wait(acc_empty.index(0), {h ^ 1})")
                a(f"        acc_smem.store({c})")
            else:
                a(f"        mbarrier.wait(acc_empty.index({h}), (i & 1) ^ 1)")
                a(f"        acc_smem.slice({h} * (BLOCK_N // 2), BLOCK_N // 2, dim=0).store({c})")
            a("        gl.thread_barrier()")
            a(f"        mbarrier.arrive(acc_ready.index({0 if one_buf else h}), count=1)")
    else:
        lines, chunks = column_split(split, "        ", "gl")
        if rows:     # one store of the whole tile; the epilogue reads row slices of it
            lines, chunks = [], ["acc"]
        L.extend(lines)
        if not per_chunk:
            a("        mbarrier.wait(acc_empty.index(0), (i & 1) ^ 1)")
        for h, c in enumerate(chunks):
            if per_chunk:
                a(f"        mbarrier.wait(acc_empty.index({h}), (i & 1) ^ 1)")
            a(f"        acc_smem.store({c})" if rows else f"        acc_smem.index({h}).store({c})")
            if per_chunk or h == len(chunks) - 1:
                a("        gl.thread_barrier()")
                a(f"        mbarrier.arrive(acc_ready.index({h if per_chunk else 0}), count=1)")
    a("")
    a("")
    # ---- epilogue partition (default: num_warps warps) ----
    a("@gluon.jit")
    st_params = {"regs": "", "warp": f"{', '.join(smems)}, st_ready, st_empty, ",
                 "epi": f"{', '.join(descs)}, {', '.join(smems)}, st_ready, "}[state]
    a(f"def _epilogue_partition(acc_smem, acc_ready, acc_empty, {st_params}{', '.join(ptrs)}, "
      f"{''.join(c + ', ' for c in cs)}seed, N, K, {', '.join(strides)},")
    a("                        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,")
    a("                        SLOTS: gl.constexpr, GROUP_N: gl.constexpr, EVEN_NK: gl.constexpr,")
    a("                        SAME_STRIDES: gl.constexpr, STOCHASTIC_ROUND: gl.constexpr,")
    a("                        EPI_WARPS: gl.constexpr):")
    if rows and vec == 8:
        # 8 elements (16 B of bf16) a thread: a warp on VR whole rows, the warps on
        # EPI_WARPS * VR rows of the chunk's CW (ws_launch_args checks that they fit)
        a("    CW: gl.constexpr = BLOCK_N // SPLIT")
        a("    VR: gl.constexpr = 256 // BLOCK_K")
        a("    cl: gl.constexpr = gl.BlockedLayout([1, 8], [VR, 32 // VR], [EPI_WARPS, 1], [1, 0])")
    elif rows:
        a("    CW: gl.constexpr = BLOCK_N // SPLIT")
        # a warp per row; with more warps than a chunk has rows (16 warps, 8-row chunks), the
        # rest split the row's 128 columns (2 per thread) rather than hold copies of it
        a("    RW: gl.constexpr = EPI_WARPS if EPI_WARPS <= CW else CW")
        a("    cl: gl.constexpr = gl.BlockedLayout([1, 4 * RW // EPI_WARPS], [1, 32], "
          f"[RW, EPI_WARPS // RW], [1, 0]{cga(2)})")
    else:
        a("    CW: gl.constexpr = BLOCK_K // SPLIT")
        a("    cl: gl.constexpr = gl.BlockedLayout([1, 4], [128 // CW, CW // 4], [EPI_WARPS, 1], [1, 0])")
    if fast_ieee:    # elements per inline-PTX instance: a thread's chunk, at most 8
        a(f"    EPT: gl.constexpr = {'CW * BLOCK_K' if rows else 'BLOCK_N * CW'} // (32 * EPI_WARPS)")
        a("    FAST_PACK: gl.constexpr = 8 if EPT >= 8 else EPT")
    L.extend(tile_walk(balanced, cluster))
    a("    for i in range(my_tiles):")
    a("        off_n, off_k = _tile_coords(walk_t0 + i * walk_step, N, K, BLOCK_N, BLOCK_K, GROUP_N)")
    a("        rn = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, cl))")
    a("        mask_n = rn < N")
    if not per_chunk and not halves:
        a("        mbarrier.wait(acc_ready.index(0), i & 1)")
    st_call = (f"walk_u0, walk_t0, walk_step, {', '.join(descs)}, {', '.join(smems)}, "
               "st_ready, N, K, "
               "BLOCK_N, BLOCK_K, SPLIT, SLOTS, GROUP_N, CW)")
    pf_args = f"{', '.join(ptrs)}, {', '.join(strides)}, N, K, pfe, BLOCK_K, CW, EVEN_NK)"
    if not epilogue:
        for h in range(split if per_chunk else 2 if halves else 1):
            if one_buf:
                a(f"        mbarrier.wait(acc_ready.index(0), {h})")
            elif per_chunk or halves:
                a(f"        mbarrier.wait(acc_ready.index({h}), i & 1)")
            L += ["        gl.thread_barrier()",
                  f"        mbarrier.arrive(acc_empty.index({0 if one_buf else h}), count=1)"]
    elif state == "epi":     # the first SLOTS chunks go out before the tile loop
        i_loop = L.index("    for i in range(my_tiles):")
        L[i_loop:i_loop] = ["    for j in gl.static_range(SLOTS):",
                            "        if j < n_chunks:",
                            f"            _issue_state(j, {st_call}"]
        if prefetch:         # and the next `prefetch` chunks into L2 (all in the first tile)
            L[i_loop + 3:i_loop + 3] = prefetch_lanes() + [
                "    pf_n, pf_k = _tile_coords(walk_t0, N, K, BLOCK_N, BLOCK_K, GROUP_N)",
                f"    for j in gl.static_range(SLOTS, SLOTS + {prefetch}):",
                "        if j < n_chunks:",
                f"            _prefetch_state(pf_n + j * CW, pf_k, {pf_args}"]

    def rn(sfx):
        return f"rn{sfx}" if rows else "rn"

    body = split // roll if roll else split     # chunks per copy of the code

    def loads(h, hx=None, phase=None):
        # h: the chunk's position (names, static conditions); hx: its index in the tile as an
        # expression (runtime with roll); phase: the half's hand-off phase with one buffer
        sfx = f"_{h}"
        hx = str(h) if hx is None else hx
        phase = str(h // half) if phase is None else phase
        # the tile's last chunk: static unrolled; with roll the body's last, on the last pass
        last = h == split - 1 or (roll and h == body - 1)
        if rows:
            out = [f"        rn{sfx} = off_n + {hx} * CW + gl.arange(0, CW, gl.SliceLayout(1, cl))",
                   f"        rk{sfx} = off_k + gl.arange(0, BLOCK_K, gl.SliceLayout(0, cl))"]
            masks = [f"        mask{sfx} = (rn{sfx} < N)[:, None] & (rk{sfx} < K)[None, :]",
                     f"        off{sfx} = rn{sfx}[:, None] * s_p_n + rk{sfx}[None, :]"]
        else:
            out = [f"        rk{sfx} = off_k + {hx} * CW + gl.arange(0, CW, gl.SliceLayout(0, cl))"]
            masks = [f"        mask{sfx} = mask_n[:, None] & (rk{sfx} < K)[None, :]",
                     f"        off{sfx} = rn[:, None] * s_p_n + rk{sfx}[None, :]"]
        # the register stores' masks and offsets; with tma_store W/state go in and out through
        # the slot, and only stochastic rounding's rn, rk are needed
        if not tma_store:
            out += masks
            for idx, n in enumerate(ep.tensor_names[1:], 1):
                v = f"{ep.var[n]}{sfx}"
                out += ["        if SAME_STRIDES:",
                        f"            off_{v} = off{sfx}",
                        "        else:",
                        f"            off_{v} = {rn(sfx)}[:, None] * {strides[idx]} + "
                        f"rk{sfx}[None, :]"]
        if state_tma:
            # the chunk's W/state are in ring slot `seq % SLOTS` (TMA zero-fills the edges)
            if not balanced:     # (balanced: set by the chunk's guard)
                out.append(f"        seq = i * SPLIT + {hx}")
            out += ["        slot = seq % SLOTS",
                    "        mbarrier.wait(st_ready.index(slot), (seq // SLOTS) & 1)"]
        for idx, n in enumerate(ep.tensor_names):
            if n not in ep.used:
                continue
            v = f"{ep.var[n]}{sfx}"
            offe = f"off{sfx}" if idx == 0 else f"off_{v}"
            if state_tma:
                out.append(f"        {v} = {smems[idx]}.index(slot).load(cl).to(gl.float32)")
                continue
            out += ["        if EVEN_NK:",
                    f"            {v} = gl.load({ptrs[idx]} + {offe}, "
                    "eviction_policy=\"evict_first\").to(gl.float32)",
                    "        else:",
                    f"            {v} = gl.load({ptrs[idx]} + {offe}, mask=mask{sfx}, other=0.0, "
                    "eviction_policy=\"evict_first\").to(gl.float32)"]
        if per_chunk:
            out.append(f"        mbarrier.wait(acc_ready.index({h}), i & 1)")
        elif one_buf and h % half == 0:
            out.append(f"        mbarrier.wait(acc_ready.index(0), {phase})")
        elif halves and h % half == 0:       # the half this chunk lies in has been stored
            out.append(f"        mbarrier.wait(acc_ready.index({h // half}), i & 1)")
        if grab:
            if h % half == 0:    # the whole half, chunk by chunk, into registers
                out += [f"        acc_{h + j} = acc_smem.slice({j} * CW, CW, dim=0).load(cl)"
                        for j in range(half)]
        elif rows and roll:         # chunk hx of the [SPLIT, CW, BLOCK_K] view (runtime index)
            out.append(f"        acc{sfx} = acc_chunks.index({hx}).load(cl)")
        elif rows:
            row0 = h % half if one_buf else h
            out.append(f"        acc{sfx} = acc_smem.slice({row0} * CW, CW, dim=0).load(cl)")
        else:
            out.append(f"        acc{sfx} = acc_smem.index({h}).load(cl)")
        if tma_store:               # (the barrier below publishes it to every warp)
            out.append("        tma.store_wait(0)")
        if ((state_tma and not (pairs and h % 2 == 0)) or per_chunk or last
                or (halves and h == half - 1)):
            out.append("        gl.thread_barrier()")
        if grab and h % half == 0:  # the half is in registers: the MMA may store the next
            out.append("        mbarrier.arrive(acc_empty.index(0), count=1)")
        if warp_fed:                # the slot is read: the state warp may refill it
            out.append("        mbarrier.arrive(st_empty.index(slot), count=1)")
        elif pairs and h % 2 == 1:  # both slots of the pair are read: refill them
            out.append("        fence_async_shared()")
            for d in (1, 0):
                out += [f"        if seq - {d} + SLOTS < n_chunks:",
                        f"            _issue_state(seq - {d} + SLOTS, {st_call}"]
        elif tma_store:             # the previous chunk's stores have read its slot: refill it
            out += ["        if (seq > 0) & (seq - 1 + SLOTS < n_chunks):",
                    f"            _issue_state(seq - 1 + SLOTS, {st_call}"]
        elif state == "epi" and not pairs:  # the slot is read: refill it with chunk seq + SLOTS
            out += ["        fence_async_shared()",
                    "        if seq + SLOTS < n_chunks:",
                    f"            _issue_state(seq + SLOTS, {st_call}"]
            if prefetch:    # chunk h + SLOTS + prefetch: this tile's or the next (constexpr)
                q = f"{h} + SLOTS + {prefetch}"
                # the next tile's corner, from the first chunk that prefetches into it on (so
                # that it is not live across the whole tile: ws0's 96 registers spill otherwise)
                out += [f"        if {q} == SPLIT:",
                        "            nx_n, nx_k = _tile_coords(walk_t0 + (i + 1) * walk_step, "
                        "N, K, BLOCK_N, BLOCK_K, GROUP_N)",
                        f"        if seq + SLOTS + {prefetch} < n_chunks:",
                        f"            if {q} < SPLIT:",
                        f"                _prefetch_state(off_n + ({q}) * CW, off_k, {pf_args}",
                        "            else:",
                        f"                _prefetch_state(nx_n + ({q} - SPLIT) * CW, nx_k, "
                        f"{pf_args}"]
        if per_chunk:               # chunk h read: the MMA warps may store the next tile's
            out.append(f"        mbarrier.arrive(acc_empty.index({h}), count=1)")
        elif grab:                  # (released right after the half's read, above)
            pass
        elif halves and (h + 1) % half == 0:    # this half read: the MMA may store the next
            out.append(f"        mbarrier.arrive(acc_empty.index({0 if one_buf else h // half}), "
                       "count=1)")
        elif last and roll:         # (the loop's last pass)
            out += [f"        if {hx} == SPLIT - 1:",
                    "            mbarrier.arrive(acc_empty.index(0), count=1)"]
        elif last:                  # every chunk's gradient read: the MMA warps may refill it
            out.append("        mbarrier.arrive(acc_empty.index(0), count=1)")
        return out

    def math_and_stores(h):
        sfx = f"_{h}"
        written = []
        out = ep.statements("        ", sfx, _gl, _fast_ieee if fast_ieee else None)
        shape = "[CW, BLOCK_K]" if rows else "[BLOCK_N, CW]"
        for dst, e in ep.new_values(sfx, f"gl.zeros({shape}, gl.float32, cl)"):
            idx = ep.tensor_names.index(dst)
            ptr = ptrs[idx]
            offe = f"off{sfx}" if idx == 0 else f"off_{ep.var[dst]}{sfx}"
            out.append(f"        o{sfx} = {e}")
            if dst == PARAM:
                out += ["        if STOCHASTIC_ROUND:",
                        f"            o{sfx} = _round_bf16_stochastic(o{sfx}, {_gl(ep.seed)}, "
                        f"{rn(sfx)}[:, None] * K + rk{sfx}[None, :])"]
            if tma_store:        # back into the slot; TMA writes it out below
                out.append(f"        {smems[idx]}.index(slot).store("
                           f"o{sfx}.to({ptr}.dtype.element_ty))")
                written.append(idx)
                continue
            if cluster == 2:     # every CTA stores its own rows (cluster_helpers)
                out.append(f"        _st4_ef({ptr} + {offe}, o{sfx}, mask{sfx})")
                continue
            out += ["        if EVEN_NK:",
                    f"            gl.store({ptr} + {offe}, o{sfx}.to({ptr}.dtype.element_ty), "
                    "eviction_policy=\"evict_first\")",
                    "        else:",
                    f"            gl.store({ptr} + {offe}, o{sfx}.to({ptr}.dtype.element_ty), "
                    f"mask=mask{sfx}, eviction_policy=\"evict_first\")"]
        if written:              # every warp's values are in the slot: one TMA store per tensor
            out += ["        fence_async_shared()", "        gl.thread_barrier()"]
            out += [f"        tma.{_tma_store()}({descs[idx]}, [off_n + {h} * CW, off_k], "
                    f"{smems[idx]}.index(slot){_store_policy_kw()})" for idx in written]
        return out

    if epilogue and pipe:
        L.extend(loads(0))
        for h in range(split):
            if h + 1 < split:
                L.extend(loads(h + 1))
            L.extend(math_and_stores(h))
    elif epilogue and balanced:     # chunks outside this CTA's run belong to its neighbour
        for h in range(split):
            L += [f"        seq = i * SPLIT + {h} - walk_c0",
                  "        if (seq >= 0) & (seq < n_chunks):"]
            L.extend("    " + line for line in loads(h) + math_and_stores(h))
    elif epilogue and roll:         # a runtime loop: one copy of `body` chunks' code
        if not grab:
            # the whole-tile buffer as SPLIT buffers of CW rows, to index at run time (Gluon's
            # slice takes a constant start), each with the buffer's own 2-D layout (as a ring's
            # slots). The same bytes: the XOR swizzle's phase is the row mod 8 (acc_layout),
            # and CW is a multiple of 8 (checked at launch)
            L.append(f"        acc_chunks = acc_smem.{_reinterpret()}(gl.float32, [SPLIT, CW, "
                     "BLOCK_K], acc_smem.layout)")
        L.append(f"        for hh in range({roll}):")
        for h in range(body):
            L.extend("    " + ln for ln in loads(h, f"(hh * {body} + {h})", "hh")
                     + math_and_stores(h))
    elif epilogue:
        for h in range(split):
            L.extend(loads(h))
            L.extend(math_and_stores(h))
    if epilogue and tma_store:
        a("    tma.store_wait(0)")
    a("")
    a("")
    # ---- the kernel: shared memory, barriers, scalars, then the two partitions ----
    scal_args = "".join(f"sc{i}, " for i in range(n_scalar))
    scal_flags = "".join(f"SCALAR_PTR_{i}: gl.constexpr, " for i in range(n_scalar))
    a("@gluon.jit(do_not_specialize=['seed'])")
    dparams = f"{', '.join(descs)}, " if state_tma else ""
    # the entry name carries the L2 mode for add_l2_hints (Triton < 3.9)
    name = _KERNEL_NAME + (_L2_TAG + l2 if l2 else "")
    a(f"def {name}(dy_desc, x_desc, {dparams}{', '.join(ptrs)}, {scal_args}seed,")
    a(f"                   T, N, K, {', '.join(strides)}, "
      f"{'dy_ptr, x_ptr, s_dy_t, s_x_t, ' if prefetch_gemm else ''}{scal_flags}")
    a("                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_T: gl.constexpr,")
    a("                   SPLIT: gl.constexpr, STAGES: gl.constexpr, SLOTS: gl.constexpr,")
    a("                   GROUP_N: gl.constexpr, EVEN_NK: gl.constexpr, SAME_STRIDES: gl.constexpr,")
    a("                   STOCHASTIC_ROUND: gl.constexpr,")
    a("                   SKIP_GEMM: gl.constexpr, ACC_LAYOUT: gl.constexpr,")
    a("                   MMA_REGS: gl.constexpr, num_warps: gl.constexpr):")
    a("    CW: gl.constexpr = BLOCK_K // SPLIT")
    a("    dy_smem = gl.allocate_shared_memory(dy_desc.dtype, [STAGES, BLOCK_T, BLOCK_N], dy_desc.layout)")
    a("    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_T, BLOCK_K], x_desc.layout)")
    if one_buf:
        a("    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N // 2, BLOCK_K], ACC_LAYOUT)")
    elif rows:
        a("    acc_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_N, BLOCK_K], ACC_LAYOUT)")
    else:
        a("    acc_smem = gl.allocate_shared_memory(gl.float32, [SPLIT, BLOCK_N, CW], ACC_LAYOUT)")
    # a barrier per CTA: with a cluster, [.., 2] barriers of which CTA r holds the r-th
    bar = ("2], mbarrier.MBarrierLayout([[1]]))" if cluster == 2
           else "1], mbarrier.MBarrierLayout())")
    a(f"    ld_bar = gl.allocate_shared_memory(gl.int64, [STAGES, {bar}")
    a(f"    acc_ready = gl.allocate_shared_memory(gl.int64, [SPLIT, {bar}")
    a(f"    acc_empty = gl.allocate_shared_memory(gl.int64, [SPLIT, {bar}")
    if cluster == 2:     # one per slot, in CTA 0 (cluster_helpers)
        a("    x_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], "
          "mbarrier.MBarrierLayout([[0]]))")
    if load_warp:
        a(f"    ld_empty = gl.allocate_shared_memory(gl.int64, [STAGES, {bar}")
    a("    for s in gl.static_range(STAGES):")
    a("        mbarrier.init(ld_bar.index(s), count=1)")
    if cluster == 2:     # count 1 per CTA: Gluon makes it 2 on the pair's barrier
        a("        mbarrier.init(x_empty.index(s), count=1)")
    if load_warp:
        a("        mbarrier.init(ld_empty.index(s), count=1)")
    a("    for h in gl.static_range(SPLIT):")
    a("        mbarrier.init(acc_ready.index(h), count=1)")
    a("        mbarrier.init(acc_empty.index(h), count=1)")
    if state_tma:
        for d, m in zip(descs, smems):
            shape = "[SLOTS, BLOCK_N // SPLIT, BLOCK_K]" if rows else "[SLOTS, BLOCK_N, CW]"
            a(f"    {m} = gl.allocate_shared_memory({d}.dtype, {shape}, {d}.layout)")
        a(f"    st_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, {bar}")
        a(f"    st_empty = gl.allocate_shared_memory(gl.int64, [SLOTS, {bar}")
        a("    for s in gl.static_range(SLOTS):")
        a("        mbarrier.init(st_ready.index(s), count=1)")
        a("        mbarrier.init(st_empty.index(s), count=1)")
    a("    fence_async_shared()")
    L.extend(scalar_loads(n_scalar))
    a("    gl.warp_specialize([")
    a(f"        (_epilogue_partition, (acc_smem, acc_ready, acc_empty, {st_params}{', '.join(ptrs)}, "
      f"{''.join(c + ', ' for c in cs)}seed, N, K, {', '.join(strides)}, BLOCK_N, BLOCK_K, SPLIT, "
      "SLOTS, GROUP_N, EVEN_NK, SAME_STRIDES, STOCHASTIC_ROUND, num_warps)),")
    a(f"        (_mma_partition, ({wsig})),")
    if warp_fed or load_warp:
        a(f"        ({'_state_partition' if warp_fed else '_load_partition'}, ({wsig})),")
        a(f"    ], [{mma_warps}, 1], [MMA_REGS, 40])")
    else:
        a(f"    ], [{mma_warps}], [MMA_REGS])")
    a("")
    if l2:
        a("")
        a(f"{_KERNEL_NAME} = {name}")
    return "\n".join(L).replace("gl.thread_barrier()", f"gl.{_thread_barrier()}()")


_KERNELS: dict = {}


def _kernel(prog, split: int, pipe: bool, state: str, epilogue: bool = True,
            handoff: str = "chunk", l2: str = "", mma_warps: int = 4, mma_pending: int = 1,
            prefetch: int = 0, prefetch_gemm: int = 0, mma: bool = True, cluster: int = 1,
            load_warp: bool = False, tma_store: bool = False, fast_ieee: bool = False,
            roll: int = 0, vec: int = 4):
    key = (prog.dumps(), split, pipe, state, epilogue, handoff, l2, mma_warps, mma_pending,
           prefetch, prefetch_gemm, mma, cluster, load_warp, tma_store, fast_ieee, roll, vec)
    k = _KERNELS.get(key)
    if k is None:
        if l2 and not _tma_takes("cache_policy"):
            _install_l2_hint_hook()
        _install_encoding_cache()
        src = kernel_source(prog, split, pipe, state, epilogue, handoff, l2, mma_warps,
                            mma_pending, prefetch, prefetch_gemm, mma, cluster, load_warp,
                            tma_store, fast_ieee, roll, vec)
        k = _KERNELS[key] = _import_generated(src, "flu_ws")._fused_linear_update_ws_kernel
    return k


def kernel_args(cfg, epilogue: bool = True, handoff: str = "chunk", mma: bool = True) -> tuple:
    """``kernel_source``'s and ``_kernel``'s arguments after the program for ``cfg`` (a
    KernelConfig): the one map from a config's knobs onto the generator, for the launcher, the
    tests and the study scripts. ``epilogue``, ``handoff``, ``mma``: as in ``kernel_source``."""
    return (cfg.EPI_SPLIT, cfg.EPI_PIPE, cfg.WS, epilogue, handoff, cfg.WS_L2, cfg.WS_MMA_WARPS,
            cfg.WS_MMA_PENDING, cfg.WS_PREFETCH, cfg.WS_PREFETCH_GEMM, mma, cfg.WS_CLUSTER,
            bool(cfg.WS_LOAD_WARP), bool(cfg.WS_TMA_STORE), bool(cfg.WS_FAST_IEEE),
            cfg.WS_ROLL, cfg.WS_VEC or 4)


def state_block(cfg) -> list:
    """The W/state chunk one TMA load brings in: BLOCK_N/EPI_SPLIT whole rows (the row paths)
    or BLOCK_K/EPI_SPLIT columns."""
    if cfg.WS in _ROW_PATHS:
        return [cfg.BLOCK_N // cfg.EPI_SPLIT, cfg.BLOCK_K]
    return [cfg.BLOCK_N, cfg.BLOCK_K // cfg.EPI_SPLIT]


def acc_block(cfg) -> list:
    """The accumulator hand-off buffer's block: the whole tile (row paths; half of it for
    "epi_rows_half1" and "epi_rows_grab") or one column chunk."""
    if cfg.WS in _HALF_BUFFER_PATHS:
        return [cfg.BLOCK_N // 2, cfg.BLOCK_K]
    if cfg.WS in _ROW_PATHS:
        return [cfg.BLOCK_N, cfg.BLOCK_K]
    return [cfg.BLOCK_N, cfg.BLOCK_K // cfg.EPI_SPLIT]


def ws_shared_memory_bytes(cfg, param_dtype: torch.dtype, n_state: int,
                           op_bytes: int = 2, state_dtype: torch.dtype = torch.float32) -> int:
    """Shared memory of one CTA (the GEMM ring, the accumulator hand-off, the W/state ring)."""
    ring = cfg.num_stages * cfg.BLOCK_T * (cfg.BLOCK_N + cfg.BLOCK_K) * op_bytes
    # the hand-off buffer: acc_block for the row paths, every column chunk at once otherwise
    acc = cfg.BLOCK_N * cfg.BLOCK_K * 4
    if cfg.WS in _ROW_PATHS:
        acc = acc_block(cfg)[0] * acc_block(cfg)[1] * 4
    st = 0
    if cfg.WS != "regs":
        rows, cols = state_block(cfg)
        st = cfg.WS_SLOTS * rows * cols * (param_dtype.itemsize + state_dtype.itemsize * n_state)
    return ring + acc + st + 1024      # + barriers and alignment


def state_dtype(state: List[Tensor]) -> torch.dtype:
    """The dtype of a weight's optimizer state (one dtype, the pass checks), as ws_fits takes
    it; fp32 when there is none."""
    return state[0].dtype if state else torch.float32


def ws_fits(cfg, param_dtype: torch.dtype, n_state: int,
            state_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the config's shared memory holds this W dtype and number of state tensors (the
    estimate is 0.5-8 KB above what Triton allocates, measured on the shipped configs)."""
    return ws_shared_memory_bytes(cfg, param_dtype, n_state,
                                  state_dtype=state_dtype) <= _SMEM_LIMIT


@functools.lru_cache(maxsize=None)
def _gluon_hopper() -> Optional[str]:
    try:
        gl = importlib.import_module("triton.experimental.gluon.language")
        for m in ("triton.experimental.gluon.language.nvidia.hopper",
                  "triton.experimental.gluon.nvidia.hopper"):   # wgmma/TMA, TensorDescriptor
            importlib.import_module(m)
    except ImportError as e:
        return f"this Triton has no Gluon Hopper API ({e})"
    if not hasattr(gl, "warp_specialize"):
        return "this Triton's Gluon has no warp_specialize"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


# host work per launch is cached: the layouts and the SM count do not change
@functools.lru_cache(maxsize=None)
def _nvmma_layout(block: tuple, dtype: torch.dtype, cluster: int = 1):
    from triton.experimental.gluon import language as gl
    if cluster == 1:
        return gl.NVMMASharedLayout.get_default_for(list(block), _gl_dtype(dtype))
    # replicated over the cluster's CTAs (fused_linear_update_ws.cluster_helpers)
    return gl.NVMMASharedLayout.get_default_for(list(block), _gl_dtype(dtype),
                                                cga_layout=[[0] * len(block)])


def acc_layout(cfg, swizzled: Optional[bool] = None):
    """The accumulator hand-off buffer's shared layout. Row paths: a 32-byte-vector XOR swizzle
    (``SwizzledSharedLayout(8, 1, 8)``): a wgmma-layout store writes 8 rows × 32 B, and with
    the rows' 512 B stride each row's vector lands in its own bank group: by design 2
    wavefronts per 256 B store (the minimum); an epilogue warp reads one whole row, 4
    wavefronts. The NVMMA 128-byte swizzle this replaced repeats every 2 rows of 512 B: ncu
    measured 4.6-5.2-way conflicts on 57-62% of the shared-store wavefronts (H100, AdamW
    4096², T=512 and 2048, 2026-11-23 17:04 UTC); with this one, 2.7 wavefronts per store
    request instead of 4.6, the GEMM alone 2-6% faster and the fused T=2048 rows 1.5-2% (study
    run 9, docs/kernels.md).
    Column paths keep the NVMMA layout. ``swizzled``: force either (the study)."""
    if swizzled is None:
        swizzled = cfg.WS in _ROW_PATHS
    if swizzled:
        return _swizzled_layout(cfg.WS_CLUSTER)
    return _nvmma_layout(tuple(acc_block(cfg)), torch.float32, cfg.WS_CLUSTER)


@functools.lru_cache(maxsize=None)
def _swizzled_layout(cluster: int = 1):
    from triton.experimental.gluon import language as gl
    if cluster == 1:
        return gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    return gl.SwizzledSharedLayout(8, 1, 8, [1, 0], cga_layout=[[0, 0]])


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(t: Tensor) -> bool:
    # TMA: unit last stride, 16-byte aligned base and row stride
    return (t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


class _DescBase:
    """What a TensorDescriptor's launch reads of its tensor: the address and the dtype. A cached
    descriptor built on it does not keep a freed tensor alive."""
    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


# A descriptor is a pure function of (address, shape, strides, dtype, block): one built for a
# freed tensor is still right for a new one at the same address, so the cache needs no
# invalidation. Weights and their state keep their storage across steps and hit every time, so
# TensorDescriptor's validation (its __post_init__: 19 ms of cProfile time over 1500 descriptors,
# 11% of the WS launch's profile, H100 host, 2026-11-23 14:45 UTC) is paid once per weight.
# 4096 entries: 5 per linear layer, ~800 layers.
@functools.lru_cache(maxsize=4096)
def _desc_of(ptr: int, shape: tuple, strides: tuple, dtype: torch.dtype, block: tuple,
             cluster: int = 1):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    return TensorDescriptor(_DescBase(ptr, dtype), list(shape), list(strides), list(block),
                            _nvmma_layout(block, dtype, cluster))


def desc(t: Tensor, block, cluster: int = 1) -> object:
    """The (cached) Gluon TensorDescriptor of ``t`` in ``block`` tiles (its layout replicated
    over a cluster of ``cluster`` CTAs)."""
    return _desc_of(t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, tuple(block), cluster)


def ws_unsupported_reason(dy: Tensor, x: Tensor, param: Tensor,
                          state: List[Tensor]) -> Optional[str]:
    """Why the warp-specialised kernel cannot run these arguments (None: it can)."""
    if not dy.is_cuda:
        return "not a CUDA tensor"
    if _capability(dy.device.index or 0) != (9, 0):
        return "needs an sm_90 GPU (wgmma, setmaxnreg)"
    why = _gluon_hopper()
    if why:
        return why
    if dy.dtype != x.dtype or dy.dtype not in (torch.bfloat16, torch.float16):
        return f"operands are {dy.dtype}/{x.dtype} (bf16 or fp16, one dtype)"
    for name, t in [("dy", dy), ("x", x), ("param", param)] + [
            (f"state[{i}]", s) for i, s in enumerate(state)]:
        if not _tma_ok(t):
            return f"{name} is not TMA-compatible (unit last stride, 16-byte aligned rows/base)"
    return None


def fused_linear_update_ws(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                           scalars, program, cfg, seed: int = 0,
                           scalar_pointers: Optional[bool] = None, skip_gemm: bool = False,
                           skip_epilogue: bool = False, handoff: str = "chunk",
                           acc_swizzled: Optional[bool] = None, skip_mma: bool = False):
    """W, state ← epilogue(dyᵀ·x, W, state, scalars) in place with the warp-specialised kernel;
    ``cfg`` a KernelConfig with WS set. For the study script: ``skip_gemm`` (grad = 0: the
    epilogue's traffic alone), ``skip_epilogue`` (the GEMM and the hand-off alone; nothing is
    written), ``handoff`` (see kernel_source), ``acc_swizzled`` (see acc_layout), ``skip_mma``
    (the dY/X ring runs without the wgmma: grad = 0, the GEMM's loads kept). The caller
    checked ``ws_unsupported_reason``."""
    k, grid, args, kwargs = ws_launch_args(dy, x, param, state, scalars, program, cfg, seed,
                                           scalar_pointers, skip_gemm, skip_epilogue, handoff,
                                           acc_swizzled, skip_mma)
    return launch_cache.launch(k, grid, *args, **kwargs)


def ws_launch_args(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor], scalars, program,
                   cfg, seed: int = 0, scalar_pointers: Optional[bool] = None,
                   skip_gemm: bool = False, skip_epilogue: bool = False, handoff: str = "chunk",
                   acc_swizzled: Optional[bool] = None, skip_mma: bool = False):
    """(jit function, grid, positional arguments, keyword arguments) of one launch
    (fused_linear_update_ws's parameters; scripts/profile_launch.py times the launch alone)."""
    if cfg.WS == "epi_rows_pairs" and cfg.WS_SLOTS < 3:
        raise ValueError("WS='epi_rows_pairs' needs WS_SLOTS >= 3 (a pair's two slots are "
                         "refilled together, and the next chunk must already be in flight)")
    if cfg.WS_L2 not in L2_MODES:
        raise ValueError(f"WS_L2={cfg.WS_L2!r}: not one of {sorted(L2_MODES)}")
    if cfg.WS_PREFETCH and cfg.WS_SLOTS + cfg.WS_PREFETCH > cfg.EPI_SPLIT:
        raise ValueError(f"WS_PREFETCH={cfg.WS_PREFETCH} with WS_SLOTS={cfg.WS_SLOTS} reaches past "
                         "the next tile's first chunks: keep WS_SLOTS + WS_PREFETCH <= EPI_SPLIT")
    lines = cfg.BLOCK_N // cfg.EPI_SPLIT * cfg.BLOCK_K * 4 // 128    # of a chunk, fp32 rows
    if cfg.WS_PREFETCH and lines > 32 * cfg.num_warps:
        raise ValueError(f"WS_PREFETCH: a chunk has {lines} 128-byte lines, more than the "
                         f"{32 * cfg.num_warps} epilogue threads: use a larger EPI_SPLIT")
    sdt = state_dtype(state)
    if not ws_fits(cfg, param.dtype, len(state), sdt):
        raise ValueError(
            f"this WS config needs "
            f"{ws_shared_memory_bytes(cfg, param.dtype, len(state), state_dtype=sdt)} B of "
            f"shared memory with {len(state)} state tensors, over the {_SMEM_LIMIT} B an "
            "sm_90 CTA has: use fewer WS_SLOTS, num_stages or a larger EPI_SPLIT")
    if cfg.WS_LOAD_WARP not in (0, 1):
        raise ValueError(f"WS_LOAD_WARP={cfg.WS_LOAD_WARP}: 0 or 1")
    if (cfg.WS_LOAD_WARP or cfg.WS == "warp") and cfg.maxnreg:
        # Triton launches a 1-warp partition as a whole warpgroup: 16 epilogue warps at 96
        # registers with a load warp are 24 warps, 73728 registers of the SM's 65536 (H100,
        # Triton 3.6: "out of resource: threads, Required: 768, Hardware limit: 640")
        warps = cfg.num_warps + cfg.WS_MMA_WARPS + 4
        if warps * 32 * cfg.maxnreg > 65536:
            raise ValueError(
                f"a 1-warp partition beside {cfg.num_warps} epilogue warps: {warps} warps at "
                f"maxnreg {cfg.maxnreg} need {warps * 32 * cfg.maxnreg} registers of 65536: use "
                f"maxnreg <= {65536 // (warps * 32) // 8 * 8} or fewer epilogue warps")
    if cfg.WS_ROLL and cfg.WS == "epi_rows" and (
            (cfg.BLOCK_N // cfg.EPI_SPLIT) % 8 or acc_swizzled is False):
        # the rolled loop's [SPLIT, CW, BLOCK_K] view of the buffer repeats its swizzle only
        # with whole 8-row phases per chunk (kernel_source)
        raise ValueError(f"WS_ROLL={cfg.WS_ROLL} with WS='epi_rows': the chunks need a multiple "
                         "of 8 rows (BLOCK_N // EPI_SPLIT) and the swizzled hand-off buffer")
    if (cfg.WS_VEC or 4) == 8 and (cfg.BLOCK_K not in (64, 128, 256) or cfg.num_warps * 256
                                   // cfg.BLOCK_K > cfg.BLOCK_N // cfg.EPI_SPLIT):
        # fewer rows in a chunk than the warps cover: Gluon would replicate, not split, them
        raise ValueError(f"WS_VEC=8: each of the {cfg.num_warps} epilogue warps covers "
                         f"{256 // max(cfg.BLOCK_K, 1)} of a chunk's rows (BLOCK_K in 64, 128, "
                         f"256), more than its {cfg.BLOCK_N // cfg.EPI_SPLIT}: use a smaller "
                         "EPI_SPLIT or WS_VEC=4")
    cl = cfg.WS_CLUSTER
    if cl == 2:
        if skip_gemm:
            # without the T loop x_empty has no use, and Triton refuses an mbarrier that is
            # initialised but never used; the stream alone is the WS_CLUSTER=1 twin's
            raise ValueError("WS_CLUSTER=2 with skip_gemm: time the config's WS_CLUSTER=1 twin")
        why = cluster_unsupported_reason(param, state, cfg)
        if why:
            raise ValueError(f"WS_CLUSTER=2: {why}")
    prog = load_program(program)
    T, N = dy.shape
    K = x.shape[1]
    scal, flags = scalar_args(scalars, scalar_pointers)
    sds = [desc(t, state_block(cfg), cl) for t in [param, *state]] if cfg.WS != "regs" else []
    tiles = -(-N // (cl * cfg.BLOCK_N)) * -(-K // cfg.BLOCK_K)     # pairs with a cluster
    nsm = _num_sms(dy.device.index or 0) // cl
    k = _kernel(prog, *kernel_args(cfg, not skip_epilogue, handoff, not skip_mma))
    work = tiles * cfg.EPI_SPLIT if cfg.WS == "epi_rows_bal" else tiles   # see tile_walk
    args = (desc(dy, [cfg.BLOCK_T, cfg.BLOCK_N], cl), desc(x, [cfg.BLOCK_T, cfg.BLOCK_K], cl),
            *sds,
            param, *state, *scal, seed, T, N, K, param.stride(0),
            *[s.stride(0) for s in state],
            *((dy, x, dy.stride(0), x.stride(0)) if cfg.WS_PREFETCH_GEMM else ()))
    kwargs = dict(
        **flags, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_T=cfg.BLOCK_T,
        SPLIT=cfg.EPI_SPLIT, STAGES=cfg.num_stages, SLOTS=max(cfg.WS_SLOTS, 1),
        GROUP_N=cfg.GROUP_N, EVEN_NK=(N % (cl * cfg.BLOCK_N) == 0 and K % cfg.BLOCK_K == 0),
        SAME_STRIDES=all(s.stride(0) == param.stride(0) for s in state),
        STOCHASTIC_ROUND=stochastic_rounding(param, prog), SKIP_GEMM=skip_gemm,
        ACC_LAYOUT=acc_layout(cfg, acc_swizzled),
        MMA_REGS=_MMA_REGS[cfg.WS_MMA_WARPS], num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
        **({"num_ctas": 2} if cl == 2 else {}))
    return k, (min(work, nsm),), args, kwargs


def cluster_unsupported_reason(param: Tensor, state: List[Tensor], cfg) -> Optional[str]:
    """Why a WS_CLUSTER=2 config cannot run these tensors (None: it can)."""
    if not _tma_takes("multicast"):
        return "this Triton's Gluon has no TMA multicast (Triton >= 3.9)"
    if param.dtype != torch.float32 or any(s.dtype != torch.float32 for s in state):
        return "W and the state must be fp32 (the cluster's stores are 16-byte fp32 vectors)"
    if cfg.num_warps > cfg.BLOCK_N // cfg.EPI_SPLIT:
        return ("more epilogue warps than rows per chunk (a thread must hold 4 contiguous "
                "elements for the 16-byte stores): use a smaller EPI_SPLIT")
    return None
