"""``forge_compile::fused_linear_update_``: weight-gradient GEMM fused with the optimizer update.

``grad = dyᵀ · x`` (dy: [T, N], x: [T, K], grad: [N, K] like the weight) is produced one tile at a
time and consumed at once by the epilogue program (forge_compile.epilogue), which overwrites the
weight and its optimizer state in place. The full gradient never exists: at most one
``BLOCK_N × BLOCK_K`` tile of it is live, in registers (GPU) or in a small tile (CPU).

This file holds:

* ``_fused_linear_update_kernel``: the Triton kernel. Its source is GENERATED per epilogue program
  (``kernel_source``) and written to a module in the cache dir, so every rule the rewrite accepts
  gets its own compiled variant (one per distinct ``program`` string, cached in-process and by
  Triton on disk), and so the ``@triton.jit`` decoration happens lazily, after the caller had the
  chance to set ``TRITON_INTERPRET=1`` (Triton reads it at decoration time). Per-step scalars are
  kernel arguments (a pointer to the 0-d tensor when it lives on the GPU, a float otherwise), so
  an LR change never recompiles.
* ``fused_linear_update_triton``: the launcher (autotuned per (N, K, T-bucket, dtypes, program),
  tuned once per process and remembered on disk).
* the op, its fake (meta) implementation, the CPU implementation (tiles computed with torch.mm,
  epilogue run by torch ops) and ``fused_linear_update_reference`` (the unfused update).

Dispatch: CUDA tensors run the Triton kernel when ``triton_unsupported_reason`` is None (else the
tiled torch path); CPU tensors run the tiled torch path, or the Triton kernel through the
interpreter when ``FORGE_CPU_TRITON=1`` and ``TRITON_INTERPRET=1`` are both set (tests).

Precision (docs/kernels.md): the fp32 accumulator feeds the epilogue directly (the gradient is
never rounded to the operand dtype). fp32 operands use IEEE fp32 dots unless tf32 is allowed
(``FORGE_FP32_DOT`` or ``torch.backends.cuda.matmul.allow_tf32``). bf16 weights are written back
with stochastic rounding. div and sqrt are the IEEE-rounded ``div_rn``/``sqrt_rn`` (Triton's
``/`` is the approximate ``div.full.f32``), matching torch's fp32 arithmetic.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import textwrap
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from forge_compile.epilogue import GRAD, PARAM, EpilogueProgram, run_epilogue
from forge_compile.kernels import launch_cache

__all__ = [
    "fused_linear_update_", "fused_linear_update_reference", "fused_linear_update_triton",
    "triton_unsupported_reason", "kernel_source", "load_program", "KernelConfig",
    "tuned_config", "candidate_configs", "split_gemm_unsupported_reason",
    "round_bf16_stochastic", "stochastic_rounding",
]

# A 256×256 fp32 tile is 256 KiB: it stays in L2 on the CPU, and the T-long reduction per tile
# keeps torch.mm efficient (measured, 2-core CPU, torch 2.13, 1024x1024 weight: 16 tile mms
# 1.74 ms vs one mm 2.31 ms at T=64; 10.4 ms vs 9.4 ms at T=512).
TILE_N = 256
TILE_K = 256

ENV_CACHE_DIR = "FORGE_COMPILE_CACHE_DIR"   # generated kernels + tuning results (default ~/.cache)
ENV_CPU_TRITON = "FORGE_CPU_TRITON"        # "1": the op runs the interpreted kernel on CPU
ENV_FP32_DOT = "FORGE_FP32_DOT"            # ieee | tf32 | tf32x3 for fp32 operands
ENV_NO_TUNE = "FORGE_NO_AUTOTUNE"          # "1": use the first candidate config, never time
ENV_SPLIT_GEMM = "FORGE_SPLIT_GEMM_MB"     # split-GEMM block cap in MiB (default 64); 0: never
ENV_TUNE_LOG = "FORGE_AUTOTUNE_LOG"        # "1": print every candidate's time to stderr

_PROGRAMS: dict = {}


def load_program(program: Union[str, EpilogueProgram]) -> EpilogueProgram:
    """Parse (and cache) a serialised epilogue program."""
    if isinstance(program, EpilogueProgram):
        return program
    p = _PROGRAMS.get(program)
    if p is None:
        p = _PROGRAMS[program] = EpilogueProgram.loads(program)
    return p


def _compute_dtype(param: Tensor) -> torch.dtype:
    # fp32 accumulation always; float64 weights keep float64 (as eager would).
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _check(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor], prog: EpilogueProgram):
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"fused_linear_update_: dy [T, N] and x [T, K] expected, "
                         f"got {tuple(dy.shape)} and {tuple(x.shape)}")
    if tuple(param.shape) != (dy.shape[1], x.shape[1]):
        raise ValueError(f"fused_linear_update_: weight {tuple(param.shape)} does not match "
                         f"dyᵀ·x = {(dy.shape[1], x.shape[1])}")
    if len(state) != len(prog.state):
        raise ValueError(f"fused_linear_update_: program expects state {prog.state}, "
                         f"got {len(state)} tensors")
    for name, s in zip(prog.state, state):
        if s.shape != param.shape:
            raise ValueError(f"fused_linear_update_: state {name!r} has shape {tuple(s.shape)}, "
                             f"weight has {tuple(param.shape)}")


# ============================================================================ code generation
# The epilogue is emitted as straight-line Triton code over fp32 [BLOCK_N, BLOCK_K] tiles (per-
# element tensors) and fp32 scalars (per-step inputs; ops on scalars only stay scalar).
def _const(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "float('nan')"
    if math.isinf(v):
        return "float('inf')" if v > 0 else "float('-inf')"
    return repr(v)


_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
           "div": "tl.math.div_rn({0}, {1})",
           "maximum": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
           "minimum": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
           "lt": "({0} < {1})", "le": "({0} <= {1})", "gt": "({0} > {1})", "ge": "({0} >= {1})",
           "eq": "({0} == {1})", "ne": "({0} != {1})"}
_UNARY = {"neg": "(-{0})", "sqrt": "tl.sqrt_rn({0})",
          "rsqrt": "tl.math.div_rn(1.0, tl.sqrt_rn({0}))",
          "reciprocal": "tl.math.div_rn(1.0, {0})", "abs": "tl.abs({0})",
          "sign": "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))",
          "exp": "tl.exp({0})", "log": "tl.log({0})"}


def _emit(op: str, args: List[str], const_args: List[Optional[float]]) -> str:
    if op in _BINARY:
        return _BINARY[op].format(*args)
    if op in _UNARY:
        return _UNARY[op].format(*args)
    if op == "where":
        # a condition that arrived as a per-step scalar was loaded as fp32 (0.0 / 1.0): compare,
        # tl.where on a non-bool condition is deprecated (a warning on Triton 3.6, later an error)
        return "tl.where({0} != 0, {1}, {2})".format(*args)
    if op == "fma":
        return "({0} * {1} + {2})".format(*args)
    if op == "lerp":
        # torch.lerp's two-sided formula (ATen Lerp.h), as epilogue._lerp.
        a, b, w = args
        return (f"tl.where(tl.abs({w}) < 0.5, {a} + {w} * ({b} - {a}), "
                f"{b} - ({b} - {a}) * (1.0 - {w}))")
    if op == "pow":
        e = const_args[1]
        if e == 2.0:
            return "({0} * {0})".format(args[0])
        if e == 1.0:
            return "({0} + 0.0)".format(args[0])
        if e == 0.5:
            return "tl.sqrt_rn({0})".format(args[0])
        if e == -0.5:
            return "tl.math.div_rn(1.0, tl.sqrt_rn({0}))".format(args[0])
        if e == -1.0:
            return "tl.math.div_rn(1.0, {0})".format(args[0])
        if _interpreting():
            # libdevice.pow fails in Triton 3.9's interpreter; positive bases only there.
            return "tl.exp2({1} * tl.log2({0}))".format(*args)
        return "libdevice.pow({0}, {1})".format(*args)
    raise NotImplementedError(op)  # pragma: no cover - validate() rejects unknown ops


def _fold(op: str, consts: List[float]):
    """Evaluate an op whose arguments are all constants, as run_epilogue would (fp32)."""
    from forge_compile.epilogue import _TORCH_OPS
    vals = [torch.tensor(c, dtype=torch.float32) for c in consts]
    return _TORCH_OPS[op](*vals).item()


class _Epilogue:
    """Straight-line Triton code for one program over one tile (or one column chunk of it)."""

    def __init__(self, prog: EpilogueProgram, interpreted: bool = False):
        self.prog = prog
        self.interpreted = interpreted      # stores round to bf16 through _TO_STORED
        self.tensor_names = [PARAM] + list(prog.state)
        self.ptr = {PARAM: "p_ptr", **{n: f"s{i}_ptr" for i, n in enumerate(prog.state)}}
        self.strides = {PARAM: ("s_p_n", "s_p_k"),
                        **{n: (f"s_s{i}_n", f"s_s{i}_k") for i, n in enumerate(prog.state)}}
        self.var = {PARAM: "t_param", **{n: f"t_s{i}" for i, n in enumerate(prog.state)}}
        # name -> (expression template with {sfx} for the chunk, is_tile, constant or None)
        env: Dict[str, Tuple[str, bool, Optional[float]]] = {GRAD: ("acc{sfx}", True, None)}
        for n in self.tensor_names:
            env[n] = (self.var[n] + "{sfx}", True, None)
        for i, n in enumerate(prog.scalars):
            env[n] = (f"c{i}", False, None)
        used = set()
        self.body: List[Tuple[str, str]] = []
        for j, ins in enumerate(prog.ops):
            exprs, tiles, consts = [], [], []
            for arg in ins.args:
                if isinstance(arg, str):
                    e, t, c = env[arg]
                    used.add(arg)
                    exprs.append(e), tiles.append(t), consts.append(c)
                else:
                    exprs.append(_const(arg)), tiles.append(False), consts.append(float(arg))
            if all(c is not None for c in consts):
                v = _fold(ins.op, consts)
                env[ins.out] = (_const(v), False, float(v))
                continue
            is_tile = any(tiles)
            name = f"v{j}" + ("{sfx}" if is_tile else "")
            self.body.append((name, _emit(ins.op, exprs, consts)))
            env[ins.out] = (name, is_tile, None)
        used.update(val for _, val in prog.outputs)
        self.env, self.used = env, used
        # the stochastic rounding's seed: the launch's, XOR a device-drawn scalar's value
        # (EpilogueProgram.seed_scalar: a float in [0, 2^24), exact as an int32)
        self.seed = ("seed" if prog.seed_scalar is None else
                     f"(seed ^ c{prog.scalars.index(prog.seed_scalar)}.to(tl.int32))")

    def loads(self, ind: str, sfx: str, rk: str, mask: str) -> List[str]:
        out = []
        for n in self.tensor_names:
            if n not in self.used:
                continue
            sn, sk = self.strides[n]
            v = self.var[n] + sfx
            out += self._offset(ind, v, sn, sk, sfx, rk)
            out += [f"{ind}if EVEN_NK:",
                    f"{ind}    {v} = tl.load({self.ptr[n]} + off_{v}, "
                    f"eviction_policy=\"evict_first\").to(tl.float32)",
                    f"{ind}else:",
                    f"{ind}    {v} = tl.load({self.ptr[n]} + off_{v}, mask={mask}, "
                    f"other=0.0, eviction_policy=\"evict_first\").to(tl.float32)"]
        return out

    @staticmethod
    def _offset(ind, v, sn, sk, sfx, rk) -> List[str]:
        # SAME_STRIDES (the usual case: weight and state all contiguous): one offset tile
        # for every tensor instead of one each, which saves registers.
        return [f"{ind}if SAME_STRIDES:",
                f"{ind}    off_{v} = off{sfx}",
                f"{ind}else:",
                f"{ind}    off_{v} = rn[:, None] * {sn} + {rk}[None, :] * {sk}"]

    @staticmethod
    def shared_offset(ind, sfx, rk) -> List[str]:
        return [f"{ind}off{sfx} = rn[:, None] * s_p_n + {rk}[None, :] * s_p_k"]

    def statements(self, ind: str, sfx: str, conv=None, tile_conv=None) -> List[str]:
        """The update's straight-line statements for one chunk (names suffixed ``sfx``);
        ``conv`` rewrites each expression (``fused_linear_update_ws._gl``: Gluon's names), then
        ``tile_conv`` those with a tile result (``fused_linear_update_ws._fast_ieee``)."""
        out = []
        for name, expr in self.body:
            e = (conv or str)(expr.format(sfx=sfx))
            if tile_conv is not None and "{sfx}" in name:    # (a scalar result has no suffix)
                e = tile_conv(e)
            out.append(f"{ind}{name.format(sfx=sfx)} = {e}")
        return out

    def new_values(self, sfx: str, zeros: str) -> List[Tuple[str, str]]:
        """(tensor name, expression of its new value) per program output, for one chunk; a
        value that is not a tile (a scalar-only result) is broadcast by adding ``zeros``, a
        zero tile of the chunk's shape and layout."""
        out = []
        for dst, val in self.prog.outputs:
            e, is_tile, _ = self.env[val]
            e = e.format(sfx=sfx)
            out.append((dst, e if is_tile else f"({e} + {zeros})"))
        return out

    def compute_store(self, ind: str, sfx: str, rk: str, mask: str, shape: str) -> List[str]:
        out = self.statements(ind, sfx)
        for dst, e in self.new_values(sfx, f"tl.zeros({shape}, dtype=tl.float32)"):
            sn, sk = self.strides[dst]
            v = self.var[dst] + sfx
            if dst not in self.used:
                out += self._offset(ind, v, sn, sk, sfx, rk)
            out.append(f"{ind}o_{v} = {e}")
            if dst == PARAM:
                out += [f"{ind}if STOCHASTIC_ROUND:",
                        f"{ind}    o_{v} = _round_bf16_stochastic(o_{v}, {self.seed}, "
                        f"rn[:, None] * K + {rk}[None, :])"]
            ptr = self.ptr[dst]
            val = (f"_to_stored(o_{v}, {ptr})" if self.interpreted else
                   f"o_{v}.to({ptr}.dtype.element_ty)")
            out += [f"{ind}if EVEN_NK:",
                    f"{ind}    tl.store({ptr} + off_{v}, {val}, "
                    f"eviction_policy=\"evict_first\")",
                    f"{ind}else:",
                    f"{ind}    tl.store({ptr} + off_{v}, {val}, "
                    f"mask={mask}, eviction_policy=\"evict_first\")"]
        return out


def column_split(split: int, ind: str, lang: str = "tl") -> Tuple[List[str], List[str]]:
    """Code splitting ``acc`` [BLOCK_N, BLOCK_K] into ``split`` column chunks by halving every
    chunk (reshape/permute/split: register renaming, the halved column bit is held inside each
    thread); returns (code lines, chunk names in column order). ``lang``: tl, or gl (Gluon)."""
    lines, chunks, width = [], ["acc"], 1
    while len(chunks) < split:
        width *= 2
        nxt = []
        for c in chunks:
            lo, hi = f"{c}_{width}l", f"{c}_{width}h"
            lines.append(f"{ind}{lo}, {hi} = {lang}.split({lang}.permute({lang}.reshape("
                         f"{c}, [BLOCK_N, 2, BLOCK_K // {width}]), [0, 2, 1]))")
            nxt += [lo, hi]
        chunks = nxt
    return lines, chunks


# The noise is Wellons' "lowbias32" integer hash of (element index ^ seed): 9 integer
# operations an element. tl.randint (Philox, 10 rounds) cost so much that a pure-bf16 AdamW
# row took 0.157 ms stochastically rounded against 0.107 to nearest (4096², T=512, H100, torch
# 2.11, Triton 3.6, 04:12 UTC). The hash is a bijection of 32-bit words, so the elements of one
# call get distinct noise, and a fresh seed per call makes each element's noise differ from
# step to step. round_bf16_stochastic computes the same bits with torch (the CPU path).
_ROUND_BF16_STOCHASTIC = '''@triton.jit
def _round_bf16_stochastic(x, seed, offs):
    # x + uniform 16-bit noise below the bf16 lsb, then truncate: E[result] = x (unbiased).
    h = (offs ^ seed).to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + (h & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, x)
'''


# Triton's interpreter casts fp32 to bf16 by truncation (Triton 3.9, runtime/interpreter.py:
# cast_impl passes no rounding mode to _convert_float), where the GPU rounds to nearest even
# (cvt.rn.bf16.f32): an interpreted kernel's bf16 weight or state was up to 1 ulp off, always
# toward zero. Interpreted sources round here first, so the truncating cast is exact.
_TO_STORED = '''@triton.jit
def _to_stored(x, ptr):
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x == x, rne, x)
    return x.to(ptr.dtype.element_ty)
'''


# The T loop of the weight-gradient GEMM over one BLOCK_N × BLOCK_K tile (rt, rn, rk, mask_n,
# mask_k in scope): acc = dy[:, rn]ᵀ · x[:, rk] in fp32.
_GEMM_T_LOOP = """\
dy_ptrs = dy_ptr + rt[:, None] * s_dy_t + rn[None, :] * s_dy_n
x_ptrs = x_ptr + rt[:, None] * s_x_t + rk[None, :] * s_x_k
acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
for t0 in range(0, T, BLOCK_T):
    if EVEN_T and EVEN_NK:
        a = tl.load(dy_ptrs, eviction_policy="evict_last")
        b = tl.load(x_ptrs, eviction_policy="evict_last")
    else:
        mask_t = (t0 + rt) < T
        a = tl.load(dy_ptrs, mask=mask_t[:, None] & mask_n[None, :], other=0.0,
                    eviction_policy="evict_last")
        b = tl.load(x_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0,
                    eviction_policy="evict_last")
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    dy_ptrs += BLOCK_T * s_dy_t
    x_ptrs += BLOCK_T * s_x_t"""


# One program's BLOCK_N × BLOCK_K tile (pid, pid_n, pid_k, rn, rk, mask_n, mask_k, mask_nk) in
# grouped order: GROUP_N consecutive row-blocks sweep the K tiles together, so the dy columns
# and x columns they share are read from L2, not HBM.
_TILE_ORDER = """\
pid = tl.program_id(0)
num_n = tl.cdiv(N, BLOCK_N)
num_k = tl.cdiv(K, BLOCK_K)
per_group = GROUP_N * num_k
first_n = (pid // per_group) * GROUP_N
group_n = tl.minimum(num_n - first_n, GROUP_N)
pid_n = first_n + (pid % per_group) % group_n
pid_k = (pid % per_group) // group_n
rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
mask_n = rn < N
mask_k = rk < K
mask_nk = mask_n[:, None] & mask_k[None, :]"""


def tile_order(indent: str) -> str:
    """``_TILE_ORDER`` indented for a kernel template."""
    return textwrap.indent(_TILE_ORDER, indent)


def gemm_t_loop(indent: str) -> str:
    """``_GEMM_T_LOOP`` indented for a kernel template."""
    return textwrap.indent(_GEMM_T_LOOP, indent)


def signature_parts(n_state: int, n_scalar: int, indent: str):
    """Template pieces for a kernel over ``n_state`` state tensors and ``n_scalar`` scalars:
    (scalar-load lines at ``indent``, state pointers, state strides, scalar arguments, their
    SCALAR_PTR_i flags)."""
    scal_load = []
    for i in range(n_scalar):
        scal_load += [f"{indent}if SCALAR_PTR_{i}:",
                      f"{indent}    c{i} = tl.load(sc{i}).to(tl.float32)",
                      f"{indent}else:",
                      f"{indent}    c{i} = sc{i}"]
    return (scal_load, "".join(f"s{i}_ptr, " for i in range(n_state)),
            "".join(f"s_s{i}_n, s_s{i}_k, " for i in range(n_state)),
            "".join(f"sc{i}, " for i in range(n_scalar)),
            "".join(f"SCALAR_PTR_{i}: tl.constexpr, " for i in range(n_scalar)))


def kernel_source(program: Union[str, EpilogueProgram]) -> str:
    """The Triton module source of the fused kernel for one epilogue program."""
    prog = load_program(program)
    n_state = len(prog.state)
    n_scalar = len(prog.scalars)
    ep = _Epilogue(prog, interpreted=_interpreting())
    full = ("", "rk", "mask_nk", "[BLOCK_N, BLOCK_K]")
    prefetch = ep.shared_offset("        ", "", "rk") + ep.loads("        ", "", "rk", "mask_nk")
    epi = ["    if PREFETCH:"] + ep.compute_store("        ", *full)
    epi += ["    elif EPI_SPLIT == 1:"] + ep.shared_offset("        ", "", "rk")
    epi += ep.loads("        ", "", "rk", "mask_nk") + ep.compute_store("        ", *full)
    # EPI_SPLIT > 1: the epilogue runs on column chunks of the accumulator, one after the
    # other, so only one chunk of the weight/state tiles is live in registers at a time.
    # Each split halves every chunk: acc[:, :w/2] and acc[:, w/2:] via reshape/permute/split.
    for split in (2, 4, 8):
        epi.append(f"    elif EPI_SPLIT == {split}:")
        lines, chunks = column_split(split, "        ")
        epi += lines
        w = f"BLOCK_K // {split}"

        def prep(h, ind):
            sfx = f"_{h}"
            return ([f"{ind}acc{sfx} = {chunks[h]}",
                     f"{ind}rk{sfx} = pid_k * BLOCK_K + {h} * ({w}) + tl.arange(0, {w})",
                     f"{ind}mask{sfx} = mask_n[:, None] & (rk{sfx} < K)[None, :]"]
                    + ep.shared_offset(ind, sfx, f"rk{sfx}")
                    + ep.loads(ind, sfx, f"rk{sfx}", f"mask{sfx}"))

        def finish(h, ind):
            sfx = f"_{h}"
            return ep.compute_store(ind, sfx, f"rk{sfx}", f"mask{sfx}", f"[BLOCK_N, {w}]")
        # EPI_PIPE: chunk h+1's loads are issued before chunk h's math and stores (twice the
        # bytes in flight; the compiler cannot hoist them itself, the stores may alias).
        epi.append("        if EPI_PIPE:")
        epi += prep(0, "            ")
        for h in range(split):
            if h + 1 < split:
                epi += prep(h + 1, "            ")
            epi += finish(h, "            ")
        epi.append("        else:")
        for h in range(split):
            epi += prep(h, "            ") + finish(h, "            ")

    scal_load, state_ptrs, state_strides, scal_args, scal_flags = signature_parts(
        n_state, n_scalar, "    ")
    prog_lines = "\n".join("# " + line for line in str(prog).splitlines())

    src = f'''"""Generated by forge_compile.kernels.fused_linear_update.kernel_source; do not edit."""
import triton
import triton.language as tl
from triton.language.extra import libdevice

{prog_lines}
PROGRAM = {prog.dumps()!r}


{_ROUND_BF16_STOCHASTIC}
{_TO_STORED if ep.interpreted else ""}
@triton.jit(do_not_specialize=["seed"])
def _fused_linear_update_kernel(
    dy_ptr, x_ptr, g_ptr, p_ptr, {state_ptrs}{scal_args}seed,
    T, N, K,
    s_dy_t, s_dy_n, s_x_t, s_x_k, s_g_n, s_g_k, s_p_n, s_p_k, {state_strides}
    {scal_flags}
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_NK: tl.constexpr, EVEN_T: tl.constexpr, PREFETCH: tl.constexpr, EPI_SPLIT: tl.constexpr,
    EPI_PIPE: tl.constexpr, SAME_STRIDES: tl.constexpr, GRAD_IN: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, STOCHASTIC_ROUND: tl.constexpr,
):
    # dy/x loads are evict_last, the once-touched weight/state streams evict_first: at T=2048
    # dy and x are 32 MB of the 50 MB L2 and must not be flushed by the 400 MB of state traffic.
{tile_order("    ")}

    # PREFETCH issues the weight/state loads before the T loop, so their HBM latency overlaps
    # the GEMM (costs registers: one fp32 tile per tensor).
    if PREFETCH:
{chr(10).join(prefetch)}

    if GRAD_IN:
        # split-GEMM mode: cuBLAS wrote this row block's gradient (fp32) to g_ptr; only the
        # epilogue runs here.
        off_g = rn[:, None] * s_g_n + rk[None, :] * s_g_k
        if EVEN_NK:
            acc = tl.load(g_ptr + off_g, eviction_policy="evict_first")
        else:
            acc = tl.load(g_ptr + off_g, mask=mask_nk, other=0.0, eviction_policy="evict_first")
    else:
        rt = tl.arange(0, BLOCK_T)
{gemm_t_loop("        ")}

{chr(10).join(scal_load)}
{chr(10).join(epi)}
'''
    return src


# ============================================================================ module loading
def _cache_dir() -> str:
    d = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.path.expanduser("~"), ".cache", "forge_compile")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:      # read-only home (CI sandboxes): fall back to the temp dir
        d = os.path.join(tempfile.gettempdir(), f"forge_compile_{os.getuid()}")
        os.makedirs(d, exist_ok=True)
    return d


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def interpreter_numpy_compat() -> bool:
    """Make Triton's interpreter take a scalar argument as a loop bound under NumPy ≥ 2.4.

    Triton ≤ 3.6 turns a scalar into an index with ``int()`` of a one-element array, which
    NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``for t0 in range(0, T, BLOCK_T)`` failed under ``TRITON_INTERPRET=1`` with torch 2.11's
    Triton 3.6 (the GPU device's CPU suite, 2026-11-25: 26 interpreter cases failed, 5
    errored). This is upstream's one-line fix (triton-lang/triton#9171, PR #9172:
    ``squeeze()`` first), applied only where the installed interpreter still has the old line,
    once per process. Returns whether it was applied."""
    import inspect
    from triton.runtime import interpreter
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None:
        return False
    try:
        old = "int(self.handle.data))" in inspect.getsource(orig)
    except (OSError, TypeError):
        return False
    if not old:
        return False

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


_KERNELS: dict = {}
_LOCK = threading.Lock()


def _import_generated(src: str, stem: str):
    """Write a generated kernel module to the cache dir and import it (``@triton.jit`` and
    ``@gluon.jit`` need a real source file)."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    d = os.path.join(_cache_dir(), "kernels")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{stem}_{digest}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(src)
        os.replace(tmp, path)      # atomic: concurrent processes never see half a file
    name = f"forge_compile_generated.{stem}_{digest}_{int(_interpreting())}"
    if _interpreting():
        interpreter_numpy_compat()
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def generated_kernel(key: tuple, source: Callable[[], str], stem: str, name: str):
    """The jitted kernel ``name`` of the module ``source()`` generates: written to the cache
    dir and imported once per (``stem``, ``key``, interpreter or not), then cached in-process
    (thread-safe)."""
    key = (stem, *key, _interpreting())
    k = _KERNELS.get(key)
    if k is not None:
        return k
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            k = _KERNELS[key] = getattr(_import_generated(source(), stem), name)
        return k


def _kernel(prog: EpilogueProgram):
    """The jitted kernel for ``prog``: generated, written to the cache dir, imported (cached)."""
    return generated_kernel((prog.dumps(),), lambda: kernel_source(prog), "flu",
                            "_fused_linear_update_kernel")


# ============================================================================ configs + tuning
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel variant."""

    BLOCK_N: int
    BLOCK_K: int
    BLOCK_T: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_N: int = 8
    PREFETCH: bool = False
    EPI_SPLIT: int = 1
    EPI_PIPE: bool = False          # with EPI_SPLIT > 1: load chunk h+1 before storing chunk h
    maxnreg: Optional[int] = None   # register cap (ptxas): 128 at 8 warps = 2 CTAs per SM
    # > 0: split-GEMM mode. cuBLAS computes the gradient of one block of W's rows (at most
    # SPLIT_GEMM_MB MiB of fp32) and the kernel runs only the epilogue on it (GRAD_IN); one
    # block is live at a time. For GEMM-bound shapes where cuBLAS beats Triton's dot (fp32
    # IEEE operands at large T); the block tiles are then BLOCK_N × BLOCK_K.
    SPLIT_GEMM_MB: float = 0.0
    # "epi_rows"/"epi" (or the study's "warp"/"regs"): the warp-specialised Gluon kernel for
    # sm_90 (fused_linear_update_ws.py). num_warps are then its epilogue warps (beside one MMA
    # warpgroup), num_stages its GEMM ring depth, WS_SLOTS its W/state ring depth in chunks of
    # BLOCK_N / EPI_SPLIT rows ("epi_rows") or BLOCK_K / EPI_SPLIT columns, maxnreg = 64K
    # registers / all its warps / 32.
    WS: str = ""
    WS_SLOTS: int = 0
    # The warp-specialised kernel's L2 eviction priorities on its TMA loads (dY, X, W/state): a
    # key of fused_linear_update_ws.L2_MODES ("" = none, "state_first", ...).
    WS_L2: str = ""
    # Warps of its MMA partition: 4 (one warpgroup, shipped) or 8 (the study's 256×128 tiles).
    WS_MMA_WARPS: int = 4
    # wgmma groups it leaves in flight before refilling a ring slot: 1 (shipped) or 2 (study).
    WS_MMA_PENDING: int = 1
    # W/state chunks it prefetches into L2 beyond its shared-memory ring (0: none; study).
    WS_PREFETCH: int = 0
    # GEMM ring steps whose dY/X it prefetches into L2 beyond the ring (0: none; study).
    WS_PREFETCH_GEMM: int = 0
    # CTAs per cluster: 1, or 2 (Triton >= 3.9, study): two CTAs update the row-adjacent tiles
    # (n, k) and (n + BLOCK_N, k), and X's tile, which both need, is read from L2 once per step
    # and multicast into both CTAs' shared memory by TMA. Measured slower (H100, study run 36).
    WS_CLUSTER: int = 1
    # 1: a 1-warp partition issues the GEMM ring's TMA loads instead of the MMA warps (study).
    WS_LOAD_WARP: int = 0
    # 1: the new W/state go out by TMA stores from their ring slot, not from registers (study).
    WS_TMA_STORE: int = 0
    # 1: the update's tile divisions and square roots in inline PTX, correctly rounded without
    # a branch per element (fused_linear_update_ws.fast_ieee_source; eighteenth session)
    WS_FAST_IEEE: int = 0
    # 0: the epilogue's chunks of a tile unrolled; r >= 2: a runtime loop of r passes over
    # EPI_SPLIT / r chunks each, less code (the instruction cache, run 51). "epi_rows_grab": 2,
    # its halves (eighteenth session); "epi_rows": any divisor of EPI_SPLIT (nineteenth)
    WS_ROLL: int = 0
    # Row paths: elements per thread along a row in the epilogue's layout. 4 (0 = the default):
    # 16-byte fp32 accesses, but only 8-byte ones on bf16/fp16 W/state (LDS.64, STG.E.EF.64:
    # scripts/sass_counts.py, twenty-seventh session); 8: 16-byte accesses on 2-byte W/state,
    # a warp on 256 // BLOCK_K rows. A study knob: on ws9 no faster on the Llama's bf16 rows
    # (within 1% on 10 rows; H100, twenty-eighth session, docs/kernels.md).
    WS_VEC: int = 0


# Candidates for H100/H200 (sm_90), each with its ptxas register count (sm_90, AdamW, bf16
# operands; no spills unless noted). Kept: 9 of 26 measured candidates that came within 5% of the best
# on some row of the benchmark (H100, docs/kernels.md has every candidate's time); fewer
# candidates = shorter first-call tuning (one compile each, ~3 s). What decides the
# memory-bound rows (T ≤ 2048) is how many W/state bytes are in flight per SM, i.e. registers
# the fp32 accumulator leaves free. Knobs: EPI_SPLIT (epilogue on column chunks: 128×128 / 8
# warps spills 536 B at once, 193 registers at EPI_SPLIT=4, 128 at 8), EPI_PIPE (next chunk's
# loads in flight during this chunk's stores), PREFETCH (W/state loads issued before the T
# loop, under the GEMM). Measured and dropped: 2-CTA/SM variants of 128×128 (128 registers):
# 0.242 ms vs 0.194 ms at 4096², T=512 — smaller chunks lose more than the overlap gains. The
# 4-warp 128×128 one (half the registers and shared memory of the 8-warp one) won 2 SGD-momentum
# rows by 1-3% and lost every AdamW row (0.254 vs 0.195 ms at 4096², T=512); its split-8 and
# pipelined twins lost everywhere.
_GPU_CONFIGS = (
    KernelConfig(128, 256, 64, 8, 4, EPI_SPLIT=8),                  # 242; best on 13/18 rows
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=4, EPI_PIPE=True),   # 250; T=512 AdamW
    KernelConfig(64, 64, 64, 8, 4, PREFETCH=True),                  # 128; T=512 SGD
    KernelConfig(64, 64, 64, 4, 4, PREFETCH=True),                  # 227
    KernelConfig(128, 256, 64, 8, 3, EPI_SPLIT=8),                  # 242
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=4),                  # 193
    KernelConfig(128, 128, 64, 4, 3, EPI_SPLIT=4),                  # 255, 90 B spilled;
    #                                         SGD-m: 252, no spill, T=512 -1..3%
    # 16 warps (≤ 128 registers each): twice the warps to hide the epilogue's latency. Best
    # at T=512 (CUDA-graph medians vs the tuned 8-warp choice): AdamW 4096² 0.184 vs 0.191 ms,
    # 11008×4096 0.474 vs 0.503; SGD-m 4096² 0.117 vs 0.124 (split 1), 11008×4096 0.303 vs
    # 0.315; slower on every T ≥ 2048 row (docs/kernels.md, "16 warps").
    KernelConfig(128, 128, 64, 16, 4, EPI_SPLIT=2),                 # 128, AdamW 20 B spilled
    KernelConfig(128, 128, 64, 16, 4, EPI_SPLIT=1),                 # SGD-m 128; AdamW 72 B
)
# The warp-specialised Gluon kernel (sm_90, bf16/fp16 operands, TMA-compatible tensors):
# timed beside the configs above where ws_unsupported_reason allows. Measured (CUDA-graph
# medians; docs/kernels.md, "Warp-specialised kernel"): on the H100, column chunks vs the tuned
# Triton kernel: AdamW T=512 4096² 0.170 vs 0.182 ms, 11008×4096 0.451 vs 0.472, 4096×11008
# 0.462 vs 0.502; slower at T ≥ 2048 (one MMA warpgroup on 128×128 tiles). On the H200, row
# chunks ("epi_rows", 512 contiguous bytes per row and tensor) beat column chunks on every
# T ≤ 2048 row by 2-14% (best of each: AdamW 4096² T=512 0.123 vs 0.134 ms, T=2048 0.210 vs
# 0.220). Final bench (H100): every T=512 row picks one of them (docs/kernels.md).
# The two 16-warp row configs load W/state evict_first in L2 (WS_L2, tenth session: beside the
# stream the GEMM's dY/X were re-read from DRAM; ncu, AdamW 4096² T=512: DRAM reads 224 → 210
# MB). In the autotuner's do_bench timings (H100, 21:53 UTC) a hinted one was the fastest on
# every AdamW T=512 row, ahead of the unhinted first config by 0.4% (4096²), 1.7% (11008×4096:
# 0.4159 vs 0.4229 ms) and 2.3% (4096×11008). The 8-warp one, best on T=2048 and SGD-momentum,
# ran 0.5-2% slower hinted in the study (run 15) and stays unhinted.
_GPU_WS_CONFIGS = (
    KernelConfig(128, 128, 64, 16, 3, EPI_SPLIT=8, maxnreg=96, WS="epi_rows", WS_SLOTS=2,
                 WS_L2="state_first"),
    KernelConfig(128, 128, 32, 16, 4, EPI_SPLIT=8, maxnreg=96, WS="epi_rows", WS_SLOTS=4,
                 WS_L2="state_first"),
    KernelConfig(128, 128, 64, 8, 3, EPI_SPLIT=8, maxnreg=168, WS="epi_rows", WS_SLOTS=2),
    KernelConfig(128, 128, 32, 16, 4, EPI_SPLIT=8, maxnreg=96, WS="epi", WS_SLOTS=4),
    # For T >= 2048 (eleventh session, study runs 17-20): there the GEMM is the critical path,
    # and with 2 stages of dY/X in flight it waits on loads that, beside the stream, come from
    # DRAM. A 4-stage ring (96 KiB in flight) needs the shared memory of the W/state ring, so
    # 8-row chunks, 2 slots (24 KiB). GEMM alone at T=2048 0.102-0.104 ms (cuBLAS 0.100-0.102;
    # ws2 0.118); fused AdamW 4096² T=2048 0.215-0.218 vs 0.240-0.242 ms (CUDA-graph medians,
    # H100), 0.210 with dY/X evict_last (run 20; T=8192 1.4% slower, still under the anchor);
    # at T=512, where the stream is the critical path, 0.167 vs 0.156 (the smaller ring).
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=16, maxnreg=168, WS="epi_rows", WS_SLOTS=2,
                 WS_L2="gemm_last"),
    # One state tensor (SGD-momentum: 8 bytes per element beside fp32 W, not AdamW's 12): the
    # 4-stage ring and 16-row chunks fit (230400 B; with AdamW's two states 246784, over the
    # 227 KiB, so candidate_configs leaves it out there). Run 20: SGD-m 4096² T=512 0.1024 vs
    # 0.1061 ms (the tuned choice), T=2048 0.1666 vs 0.1700.
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=8, maxnreg=168, WS="epi_rows", WS_SLOTS=2),
    # The fifth with a 1-warp partition that issues the GEMM ring's loads (fourteenth session,
    # study run 38; the epilogue then has 128 registers, not 168, and stays spill-free): the MMA
    # warps no longer stop to refill the ring. 4096², Triton 3.9, do_bench: the GEMM alone
    # 0.1068 → 0.1031 ms at T=2048 and 0.0356 → 0.0316 at T=512 (cuBLAS 0.0337); fused AdamW
    # T=2048 0.2060 → 0.2036, T=8192 0.5099 → 0.4975; SGD-m T=2048 0.1674 → 0.1635.
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=16, maxnreg=128, WS="epi_rows", WS_SLOTS=2,
                 WS_L2="gemm_last", WS_LOAD_WARP=1),
    # The same 128 KiB ring in 8 stages of 32 tokens (sixteenth session, study run 43): with the
    # load warp the ring is refilled a 16 KiB stage at a time as soon as its wgmma is done, 7
    # stages (224 tokens) ahead instead of 3 (192). 4096², do_bench: the GEMM alone at T=2048
    # 0.1037 → 0.0981 ms (cuBLAS 0.0956); fused SGD-m T=2048 0.1641 → 0.1532, AdamW 0.2012 →
    # 0.1985; T=8192 equal (run 37 lost with these steps only without the load warp, where the
    # MMA warps issued the refills themselves).
    KernelConfig(128, 128, 32, 8, 8, EPI_SPLIT=16, maxnreg=128, WS="epi_rows", WS_SLOTS=2,
                 WS_L2="gemm_last", WS_LOAD_WARP=1),
    # For T=512, where the W/state stream is the critical path (seventeenth session, study runs
    # 45-47): the load-warp kernel with the accumulator handed over through a half-size buffer
    # that the epilogue reads into registers at once ("epi_rows_grab"); the 32 KiB that frees
    # hold 4 W/state slots of 16-row chunks (96 KiB in flight, not 24) beside a 6-stage ring.
    # 4096², do_bench, H100: fused AdamW T=512 0.1545-0.1549 ms against 0.1616-0.1625 for the
    # tuned pick of the other candidates (epilogue alone 87-89% of copy, not 81%); SGD-m T=512
    # 0.1050 against 0.1069-0.1076. Slower at T=2048 (0.213 vs 0.198), where ws7 stays the pick.
    KernelConfig(128, 128, 32, 8, 6, EPI_SPLIT=8, maxnreg=128, WS="epi_rows_grab", WS_SLOTS=4,
                 WS_L2="gemm_last", WS_LOAD_WARP=1),
    # The ninth with its two halves in a runtime loop (WS_ROLL) and the update's IEEE divisions
    # and square roots as exact inline-PTX fast paths (WS_FAST_IEEE; bit-identical results).
    # With 8 epilogue warps ptxas's own div.rn / sqrt.rn cost AdamW 2.5-3% at T=512 (a branch
    # and convergence region per element and op); the fast paths alone lose to the instruction
    # cache of the 8 unrolled chunks, rolled they fit (SASS 5344 instructions against 6856).
    # Eighteenth session, run 52, H100, 4096² AdamW T=512, one process: 0.1549 ms against 0.1566
    # for the ninth (products in place of the IEEE operations: 0.1536).
    KernelConfig(128, 128, 32, 8, 6, EPI_SPLIT=8, maxnreg=128, WS="epi_rows_grab", WS_SLOTS=4,
                 WS_L2="gemm_last", WS_LOAD_WARP=1, WS_ROLL=2, WS_FAST_IEEE=1),
    # The seventh (the T=2048 pick) the same way (nineteenth session): its 16 chunks of 8 rows
    # in a runtime loop of 4 passes (SASS 3744 instructions with the fast paths, against 10360
    # unrolled) and WS_FAST_IEEE. H100, 4096² AdamW T=2048, stream_ceiling.py --roll, one
    # process, 4 interleaved rounds: 0.1979 ms against 0.1994 for the seventh (2 passes 0.1990,
    # 8 passes 0.1980, 16 passes 0.1998; products in place of the IEEE operations: 0.1946).
    KernelConfig(128, 128, 32, 8, 8, EPI_SPLIT=16, maxnreg=128, WS="epi_rows", WS_SLOTS=2,
                 WS_L2="gemm_last", WS_LOAD_WARP=1, WS_ROLL=4, WS_FAST_IEEE=1),
)
# fp32 operands (an fp32 model): Triton's IEEE fp32 dot runs on FMA units, not tensor cores,
# and needs twice the shared memory per tile (128×256 / 4 stages asks 288 KiB of the 227 KiB).
# Measured (H100, AdamW, 4096×4096): the best fused config is 14-16% slower than cuBLAS SGEMM
# alone at T ≥ 4096 (3.07 vs 2.65 ms at T=4096). Kept: the fused configs best at T=512 and at
# T ≥ 4096 among the six above (docs/kernels.md, "fp32 operands").
_GPU_F32_CONFIGS = (
    KernelConfig(64, 64, 64, 4, 4, PREFETCH=True),                  # T=512: 0.549 ms
    KernelConfig(128, 128, 64, 8, 4, EPI_SPLIT=4),                  # T≥4096: 3.07 ms
)
# Split-GEMM (cuBLAS per block of W's rows + the epilogue-only kernel): the fastest candidate on
# 8 of 9 fp32 rows (the same run: 2.81 ms at T=4096, the anchor "mm then fused AdamW" 2.82).
# Blocks of at most 64 MiB of fp32 gradient (16 MiB blocks: up to 1.7x slower at T=512, the
# per-block GEMMs too small); 64 MiB is the most that lives at once.
_GPU_SPLIT_CONFIGS = (KernelConfig(32, 128, 64, 4, 1, SPLIT_GEMM_MB=64),)
# The interpreter's cost grows with the number of programs: large blocks (NOTES.md).
_INTERPRETER_CONFIG = KernelConfig(128, 128, 128, 4, 1)


def check_env() -> None:
    """Validate the kernel's environment options now (the backend calls it at compile time),
    not at the first launch in the middle of a training step."""
    split_gemm_mb()
    _fp32_dot_option()
    launch_cache.enabled()


def split_gemm_mb() -> float:
    """The split-GEMM block cap (MiB) the autotuner may use: ``FORGE_SPLIT_GEMM_MB``, default
    64; 0 keeps every weight in the fused kernel (no gradient block is ever materialised)."""
    env = os.environ.get(ENV_SPLIT_GEMM)
    if env is None or env == "":
        return _GPU_SPLIT_CONFIGS[0].SPLIT_GEMM_MB
    try:
        mb = float(env)
    except ValueError:
        mb = -1.0
    if not (mb >= 0 and math.isfinite(mb)):
        raise ValueError(f"{ENV_SPLIT_GEMM} must be a number of MiB ≥ 0 (0 turns the "
                         f"split-GEMM mode off), got {env!r}")
    return mb


def candidate_configs(dy: Tensor, x: Optional[Tensor] = None, param: Optional[Tensor] = None,
                      state: Optional[List[Tensor]] = None) -> Tuple[KernelConfig, ...]:
    """The configs the autotuner times for this device, the likely best first (what
    ``FORGE_NO_AUTOTUNE=1`` takes). Split-GEMM ones only when ``x`` is given and they apply,
    warp-specialised ones only when ``param`` and ``state`` are given too and they apply."""
    if dy.device.type != "cuda":
        return (_INTERPRETER_CONFIG,)
    f32 = dy.dtype == torch.float32 or (x is not None and x.dtype == torch.float32)
    mb = split_gemm_mb()
    split = ()
    if mb > 0 and x is not None and split_gemm_unsupported_reason(dy, x) is None:
        split = tuple(dataclasses.replace(c, SPLIT_GEMM_MB=mb) for c in _GPU_SPLIT_CONFIGS)
    if f32:
        return split + _GPU_F32_CONFIGS
    ws = ()
    if param is not None and _ws_ok(dy, x, param, state or []):
        from forge_compile.kernels.fused_linear_update_ws import state_dtype, ws_fits
        # bf16 state takes half the slots' bytes: more configs fit (ws5 with AdamW's two
        # states, for one). Twice the slots for bf16 W/state measured no faster (0.111 against
        # 0.110 ms at 4096² AdamW T=512; 0.165 against 0.163 at T=2048; H100, 04:27 UTC).
        sdt = state_dtype(state or [])
        ws = tuple(c for c in _GPU_WS_CONFIGS if ws_fits(c, param.dtype, len(state or []), sdt))
    return _GPU_CONFIGS + split + ws


def _ws_ok(dy, x, param, state) -> bool:
    from forge_compile.kernels.fused_linear_update_ws import ws_unsupported_reason
    return ws_unsupported_reason(dy, x, param, state) is None


def _t_bucket(T: int) -> int:
    return 1 << max(6, (max(T, 1) - 1).bit_length())


_TUNED: Dict[str, KernelConfig] = {}
_FAST: Dict[tuple, KernelConfig] = {}
_TUNED_LOADED = False


def _tuning_file() -> str:
    return os.path.join(_cache_dir(), "tuning.json")


def _load_tuned() -> None:
    global _TUNED_LOADED
    if _TUNED_LOADED:
        return
    _TUNED_LOADED = True
    try:
        with open(_tuning_file()) as f:
            for k, v in json.load(f).items():
                _TUNED.setdefault(k, KernelConfig(**v))
    except (OSError, ValueError, TypeError):
        pass


def _save_tuned() -> None:
    try:
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_cache_dir(), suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({k: dataclasses.asdict(v) for k, v in _TUNED.items()}, f, indent=0)
        os.replace(tmp, _tuning_file())
    except OSError:
        pass


def _tune_key(dy, x, param, state, prog, precision, cands) -> str:
    import triton
    dev = torch.cuda.get_device_name(dy.device) if dy.is_cuda else "cpu"
    T, N = dy.shape
    K = x.shape[1]
    # the candidate list is in the key: a new candidate set (a new release, or the
    # warp-specialised kernel applying or not to these tensors) re-tunes
    return "|".join(map(str, (
        dev, triton.__version__, N, K, _t_bucket(T), dy.dtype, x.dtype, param.dtype,
        tuple(s.dtype for s in state), precision, split_gemm_mb(), _mm_tf32(),
        hashlib.sha256(prog.dumps().encode()).hexdigest()[:16],
        hashlib.sha256(repr(cands).encode()).hexdigest()[:8])))


# what torch.backends.cuda.matmul.allow_tf32 reads (torch/backends/cuda/__init__.py), without
# the attribute machinery: 0.10 against 0.76 µs a call on the development CPU, read on every
# launch by the plan key
_GET_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def _mm_tf32() -> bool:
    # In both tuning keys: whether a split-GEMM config applies (split_gemm_unsupported_reason)
    # depends on torch's TF32 flag, not only on the promised precision, so a config tuned under
    # one flag value is not reused after it flips.
    if _GET_TF32 is not None:
        return bool(_GET_TF32())
    return bool(torch.backends.cuda.matmul.allow_tf32)


# The plan key reads the three environment options on every launch. os.environ.get costs 1.1 µs
# a read on the development CPU (it encodes the name each time); on POSIX the mapping behind
# os.environ (its _data, bytes to bytes, which every os.environ write updates) answers in 0.04.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_PLAN_ENV = (ENV_SPLIT_GEMM, ENV_NO_TUNE, ENV_FP32_DOT)
_PLAN_ENV_B = tuple(os.fsencode(k) for k in _PLAN_ENV)


def _plan_env() -> tuple:
    if isinstance(_ENV_DATA, dict):
        return tuple(_ENV_DATA.get(k) for k in _PLAN_ENV_B)
    return tuple(os.environ.get(k) for k in _PLAN_ENV)


# The final round of tuning: the three fastest of the first pass again, in _FINAL_ROUNDS
# interleaved rounds. One 25 ms pass once picked a config 6% slower than the best (H100,
# AdamW 4096², T=512: 0.182 vs 0.172 ms), an outlier in the winner's pass. And at T >= 2048 the
# H100 reaches its 700 W limit within a timing (thirteenth session: the SM clock falls from
# 1980 to 1500-1700 MHz), so timings taken one candidate after another drift with the power
# limiter: before, the final round timed each finalist for 100 ms in turn, and an AdamW
# 11008x4096 T=8192 finalist read 1.278 ms in the first pass and 1.433 in the final one.
# Interleaved, the finalists' timings lie one 25 ms slot apart instead of one 100 ms block, and
# a change of the limiter's state mid-round reaches all of them.
_FINAL_ROUNDS = 4


def _final_pick(finals: Sequence[KernelConfig], time_ms, log=None) -> KernelConfig:
    """The config of ``finals`` with the lowest median of _FINAL_ROUNDS timings
    ``time_ms(config)``, taken round by round (every finalist once per round, in order);
    ``log(message)`` gets each finalist's timings. Ties go to the earlier finalist."""
    times = [[] for _ in finals]
    for _ in range(_FINAL_ROUNDS):
        for t, c in zip(times, finals):
            t.append(time_ms(c))
    med = [statistics.median(t) for t in times]
    if log is not None:
        for c, m, t in zip(finals, med, times):
            log(f"{c} {m:.4f} ms (final, median of {', '.join(f'{v:.4f}' for v in t)})")
    return finals[min(range(len(finals)), key=med.__getitem__)]


# The autotuner's clock reads the GPU's time of a launch, never the host's. triton's do_bench
# records its start event right after the L2 flush, then the host enqueues the launch: a launch
# whose host path outlasts the flush (~85 µs for the 256 MB flush on an H100) is timed with its
# host time in it. The tuner times each candidate through its full launch path (no plan yet),
# which for a warp-specialised launch took longer than a small shape's kernel. H100, torch 2.11,
# 2026-11-25 (benchmarks/results/tuner_clock_2048sq_bf16w.txt, tuner_log_L16_*):
# - in one 16-layer bf16 Llama step, every WS candidate for 2048² AdamW T=512 read 0.12-0.14 ms
#   and Triton's kernels 0.07, and 112 of the 113 weights got a Triton kernel; with a GPU-only
#   clock (the idle-spin variant below) the same step picked WS everywhere, 0.0356 ms there;
# - with fp32 W (bf16 operands), do_bench read 0.087-0.14 ms for the WS candidates and picked a
#   Triton kernel at 0.053; this clock reads the WS pick at 0.047.
# Here the flush is repeated until it outlasts twice the host time a call takes, plus
# _FLUSH_MARGIN_S, so the start event is reached only once the launch is queued; where the host
# kept up (AdamW 4096² T=512), both clocks agree: 0.1552 against the bench's 0.1547 ms. The GPU
# stays busy meanwhile, as under do_bench and in a training step: with an idle spin
# (torch.cuda._sleep) there instead, the tuner read 5632×2048 bf16 AdamW T=512 at 0.093 ms
# where the bench's do_bench read 0.084 for the same config (on an earlier lease).
_FLUSH_MARGIN_S = 50e-6
# The host time is the median of the warm-up calls: one garbage-collector pause among them
# (tens of ms in a process holding a compiled 16-layer model) would otherwise set hundreds of
# flushes per sample for that candidate. A call slower than the window is one sample high, and
# the median takes care of it. At most _MAX_FLUSHES (~5.4 ms at ~85 µs a flush).
_MAX_FLUSHES = 64
_TUNE_SAMPLES = (10, 200)   # fewest and most timed launches per candidate


def gpu_time_ms(fn, rep_ms: float = 25.0, warmup: int = 5) -> float:
    """Median GPU time of ``fn()`` (one launch) in ms, L2 flushed before each, with the host's
    launch time kept out of it (see above). ``rep_ms``: about how much GPU time of ``fn`` to
    sample, as do_bench's ``rep``."""
    import time

    from triton import runtime
    driver = runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    fn()
    torch.cuda.synchronize()
    hosts = []
    for _ in range(warmup):
        t = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t)
    host = statistics.median(hosts)
    f0, f1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    f0.record()
    for _ in range(5):
        driver.clear_cache(cache)
    f1.record()
    torch.cuda.synchronize()
    flush_s = max(f0.elapsed_time(f1) / 5e3, 1e-6)
    flushes = min(max(1, math.ceil((2 * host + _FLUSH_MARGIN_S) / flush_s)), _MAX_FLUSHES)

    def sample(n: int) -> List[float]:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for start, end in ev:
            for _ in range(flushes):
                driver.clear_cache(cache)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in ev]

    estimate = statistics.median(sample(_TUNE_SAMPLES[0]))
    n = min(max(int(rep_ms / max(estimate, 1e-3)), _TUNE_SAMPLES[0]), _TUNE_SAMPLES[1])
    return statistics.median(sample(n))


def tuned_config(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                 scalars: Sequence, program: Union[str, EpilogueProgram]) -> KernelConfig:
    """The config the launcher uses for these arguments (tuning it now if not known yet)."""
    prog = load_program(program)
    precision = _input_precision(dy, x)
    # Per-launch fast path: a plain tuple key, no hashing or device queries (host overhead
    # matters at ~0.1 ms per launch).
    # whether the warp-specialised kernel applies depends on strides and alignment too
    ws = dy.is_cuda and dy.dtype != torch.float32 and _ws_ok(dy, x, param, state)
    fast = (dy.shape, x.shape[1], dy.dtype, x.dtype, param.dtype,
            tuple(s.dtype for s in state), precision, os.environ.get(ENV_SPLIT_GEMM),
            _mm_tf32(), dy.device, ws, program)   # the op's string, or a (hashable) program
    cfg = _FAST.get(fast)
    if cfg is not None:
        return cfg
    cands = candidate_configs(dy, x, param, state)
    if len(cands) == 1 or os.environ.get(ENV_NO_TUNE) == "1":
        return cands[0]
    _load_tuned()
    key = _tune_key(dy, x, param, state, prog, precision, cands)
    cfg = _TUNED.get(key)
    if cfg is not None:
        _FAST[fast] = cfg
        return cfg
    # Time each candidate on scratch copies of the mutated tensors: tuning never touches the
    # caller's weight or state. Happens once per key per machine (in memory + tuning.json).
    p2 = param.clone()
    s2 = [s.clone() for s in state]
    log = os.environ.get(ENV_TUNE_LOG) == "1"
    if log and dy.is_cuda and dy.dtype != torch.float32 and not ws:
        from forge_compile.kernels.fused_linear_update_ws import ws_unsupported_reason
        print(f"[forge autotune] {key} warp-specialised kernel left out: "
              f"{ws_unsupported_reason(dy, x, param, state)}", file=sys.stderr)

    def time_ms(c: KernelConfig) -> float:
        return gpu_time_ms(lambda: _run(dy, x, p2, s2, scalars, prog, c, precision, 0))
    timed = []
    for c in cands:
        try:
            ms = time_ms(c)
        except Exception as e:   # noqa: BLE001 - e.g. out of shared memory / registers: skip it
            if log:
                print(f"[forge autotune] {key} {c} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
            continue
        if log:
            print(f"[forge autotune] {key} {c} {ms:.4f} ms", file=sys.stderr)
        timed.append((ms, len(timed), c))
    if not timed:
        raise RuntimeError("fused_linear_update: no kernel config compiled for this device")
    best = _final_pick([c for _, _, c in sorted(timed)[:3]], time_ms,
                       (lambda m: print(f"[forge autotune] {key} {m}", file=sys.stderr))
                       if log else None)
    _TUNED[key] = _FAST[fast] = best
    _save_tuned()
    return best


# ============================================================================ launcher
def _fp32_dot_option() -> Optional[str]:
    """``FORGE_FP32_DOT`` (ieee | tf32 | tf32x3), None when unset."""
    env = os.environ.get(ENV_FP32_DOT)
    if env and env not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"{ENV_FP32_DOT} must be ieee, tf32 or tf32x3, got {env!r}")
    return env or None


def _input_precision(dy: Tensor, x: Tensor) -> str:
    if dy.dtype != torch.float32 and x.dtype != torch.float32:
        return "ieee"        # bf16/fp16 products are exact in fp32; the flag is irrelevant
    return _fp32_dot_option() or ("tf32" if _mm_tf32() else "ieee")


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MM_OUT_DTYPE: Dict[tuple, bool] = {}


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation for bf16/fp16 operands too)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


def split_gemm_unsupported_reason(dy: Tensor, x: Tensor) -> Optional[str]:
    """Why the split-GEMM mode cannot run these operands (None: it can)."""
    if dy.dtype != x.dtype:
        return f"dy is {dy.dtype}, x is {x.dtype} (torch.mm needs one dtype)"
    if dy.dtype == torch.float32:
        # torch.mm follows torch's TF32 flag; the kernel's promise (_input_precision) may differ.
        mm = "tf32" if dy.is_cuda and _mm_tf32() else "ieee"
        want = _input_precision(dy, x)
        if want != mm:
            return f"fp32 dots are {want}, torch.mm would use {mm}"
        return None
    key = (dy.device.type, dy.dtype)
    if key not in _MM_OUT_DTYPE:
        try:       # torch.mm(..., out_dtype=float32): torch ≥ 2.8, and not on every backend
            a = torch.zeros(2, 2, dtype=dy.dtype, device=dy.device)
            _MM_OUT_DTYPE[key] = _mm_fp32(a, a).dtype == torch.float32
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE[key] = False
    if not _MM_OUT_DTYPE[key]:
        return f"torch.mm cannot write fp32 from {dy.dtype} on {dy.device.type}"
    return None


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    # find_spec walks sys.path: once per process, not per launch
    return importlib.util.find_spec("triton") is not None


def triton_unsupported_reason(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                              scalars: Sequence, program) -> Optional[str]:
    """Why the Triton kernel cannot run these arguments (None: it can)."""
    if not _has_triton():
        return "triton is not installed"
    dev = param.device
    if dev.type == "cpu" and not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1"
    if dev.type not in ("cuda", "cpu"):
        return f"device {dev.type} is not supported"
    for name, t in [("dy", dy), ("x", x)] + [(f"state[{i}]", s) for i, s in enumerate(state)]:
        if t.device != dev:
            return f"{name} is on {t.device}, the weight on {dev}"
    for name, t in [("dy", dy), ("x", x), ("param", param)] + [
            (f"state[{i}]", s) for i, s in enumerate(state)]:
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} has dtype {t.dtype} (fp32/bf16/fp16 only)"
        # 32-bit offsets in the kernel.
        span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
        if span >= 2 ** 31:
            return f"{name} spans {span} elements (≥ 2**31)"
    for i, s in enumerate(scalars):
        if isinstance(s, Tensor):
            if s.numel() != 1:
                return f"scalar {i} is not a single value"
            if s.device.type not in ("cpu", dev.type) or (s.is_cuda and s.device != dev):
                return f"scalar {i} is on {s.device}"
    return None


def _run(dy, x, param, state, scalars, prog, cfg: KernelConfig, precision: str, seed: int,
         scalar_pointers: Optional[bool] = None, plan_key: Optional[tuple] = None):
    if cfg.SPLIT_GEMM_MB:       # cuBLAS and a launch per block (_SplitPlan)
        return _launch_split_gemm(dy, x, param, state, scalars, prog, cfg, precision, seed,
                                  scalar_pointers, plan_key)
    if cfg.WS:
        from forge_compile.kernels.fused_linear_update_ws import ws_launch_args
        k, grid, args, kwargs = ws_launch_args(dy, x, param, state, scalars, prog, cfg, seed,
                                               scalar_pointers)
    else:
        k, grid, args, kwargs = _launch_args(dy, x, param, state, scalars, prog, cfg,
                                             precision, seed, scalar_pointers)
    ck = launch_cache.launch(k, grid, *args, **kwargs)
    if plan_key is not None:        # the launch a repeated call makes again (_Plan)
        _remember_plan(plan_key, _new_plan(k, ck, grid, args, kwargs, scalars,
                                           stochastic_rounding(param, prog),
                                           _operand_slots(dy, x, args, cfg)))
    return ck


def _operand_slots(dy, x, args, cfg: KernelConfig, grad: Optional[Tensor] = None) -> tuple:
    """Where a launch's arguments hold dY and X (and ``grad``, a split-GEMM block's gradient),
    so that a plan can take each call's own: ``(position, 0 for dY / 1 for X / 2 for the
    gradient, None for a pointer or the function that makes the descriptor of an address)``.
    Found by identity among the arguments the launch was built with (the Triton kernel's
    pointers; the WS kernel's TMA descriptors, and its pointers with WS_PREFETCH_GEMM)."""
    slots = [(at, 2, None) for at, a in enumerate(args) if grad is not None and a is grad]
    descs = {}
    if cfg.WS:
        from forge_compile.kernels.fused_linear_update_ws import desc
        for which, (t, cols) in enumerate(((dy, cfg.BLOCK_N), (x, cfg.BLOCK_K))):
            block, shape, strides = (cfg.BLOCK_T, cols), tuple(t.shape), t.stride()
            d = desc(t, list(block), cfg.WS_CLUSTER)
            descs[id(d)] = (which, functools.partial(_ws_desc_at, shape=shape, strides=strides,
                                                     dtype=t.dtype, block=block,
                                                     cluster=cfg.WS_CLUSTER))
    for at, a in enumerate(args):
        if a is dy or a is x:
            slots.append((at, 0 if a is dy else 1, None))
        elif id(a) in descs:
            slots.append((at, *descs[id(a)]))
    if dy is x:         # one tensor in both roles: its slots are X's too
        slots += [(at, 1, make) for at, which, make in slots if which == 0]
    return tuple(slots)


def _ws_desc_at(ptr: int, *, shape, strides, dtype, block, cluster):
    # positional: _desc_of's lru_cache keys keyword and positional calls apart, and the full
    # path (desc) calls it positionally, so a plan back at a full path's address reuses its entry
    from forge_compile.kernels.fused_linear_update_ws import _desc_of
    return _desc_of(ptr, shape, strides, dtype, block, cluster)


def _split_rows(cfg: KernelConfig, N: int, K: int) -> int:
    """Rows per split-GEMM block: as many as fit in SPLIT_GEMM_MB, a multiple of BLOCK_N; the
    last block takes the rest. Measured (H100, fp32 AdamW, T=4096): 11008×4096 in
    4096/4096/2816 rows 7.54 ms, in equal 3680/3680/3648-row blocks 7.87 ms; 4096×11008
    1504/1504/1088 7.77 ms, equal 7.86 ms."""
    rows = int(cfg.SPLIT_GEMM_MB * 2 ** 20) // (4 * max(K, 1)) // cfg.BLOCK_N * cfg.BLOCK_N
    return min(N, max(cfg.BLOCK_N, rows))


# (N, K) of a weight -> bytes of the largest fp32 gradient block a split-GEMM launch of the op
# materialised (autotuner trials excluded); explain() reports it.
SPLIT_GEMM_BLOCKS: Dict[Tuple[int, int], int] = {}


def _launch_split_gemm(dy, x, param, state, scalars, prog, cfg: KernelConfig, precision: str,
                       seed: int, scalar_pointers: Optional[bool] = None,
                       plan_key: Optional[tuple] = None):
    """cuBLAS gradient of one row block of W at a time, each consumed by the epilogue kernel.
    ``plan_key``: remember the blocks' launches for repeated calls (_SplitPlan)."""
    T, N = dy.shape
    K = x.shape[1]
    rows = _split_rows(cfg, N, K)
    ck = None
    bf16 = stochastic_rounding(param, prog)
    blocks = []
    for i, n0 in enumerate(range(0, N, rows)):
        n1 = min(N, n0 + rows)
        dyb = dy[:, n0:n1]
        g = _mm_fp32(dyb.t(), x)
        k, grid, args, kwargs = _launch_args(dyb, x, param[n0:n1], [s[n0:n1] for s in state],
                                             scalars, prog, cfg, precision, _block_seed(seed, i),
                                             scalar_pointers, g)
        ck = launch_cache.launch(k, grid, *args, **kwargs)
        if plan_key is not None:
            blocks.append((n0, n1, _new_plan(k, ck, grid, args, kwargs, scalars, bf16,
                                             _operand_slots(dyb, x, args, cfg, g), kinds=3)))
        del g       # freed before the next block's GEMM: the allocator reuses its memory
    if plan_key is not None and all(b[2] is not None for b in blocks):
        _remember_plan(plan_key, _SplitPlan(tuple(blocks), bf16))
    return ck


def _block_seed(seed: int, i: int) -> int:
    # a different stochastic-rounding stream per split-GEMM block (the noise offsets restart at
    # 0 in each block)
    return (seed + 0x9E3779B1 * i) % (1 << 31)


def scalar_args(scalars, scalar_pointers: Optional[bool] = None):
    """The kernels' scalar arguments and their SCALAR_PTR_i flags: a GPU tensor by pointer (read
    on the GPU: no host sync, graph-safe), a CPU 0-d tensor or a number by value (free to read);
    ``scalar_pointers`` forces one way for tensors."""
    args, flags = [], {}
    for i, s in enumerate(scalars):
        on_device = isinstance(s, Tensor) and s.device.type == "cuda"
        ptr = isinstance(s, Tensor) and (on_device if scalar_pointers is None else scalar_pointers)
        args.append(s if ptr else float(s))
        flags[f"SCALAR_PTR_{i}"] = ptr
    return args, flags


def _launch_args(dy, x, param, state, scalars, prog, cfg: KernelConfig, precision: str,
                 seed: int, scalar_pointers: Optional[bool] = None,
                 grad: Optional[Tensor] = None):
    """(jit function, grid, positional arguments, keyword arguments) of one Triton-kernel
    launch."""
    T, N = dy.shape
    K = x.shape[1]
    kern = _kernel(prog)
    scal_args, flags = scalar_args(scalars, scalar_pointers)
    strides = []
    for s in state:
        strides += [s.stride(0), s.stride(1)]
    grid = (triton_cdiv(N, cfg.BLOCK_N) * triton_cdiv(K, cfg.BLOCK_K),)
    extra = {"maxnreg": cfg.maxnreg} if cfg.maxnreg and dy.device.type == "cuda" else {}
    g = param if grad is None else grad      # unread unless GRAD_IN
    args = (dy, x, g, param, *state, *scal_args, seed,
            T, N, K,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), g.stride(0), g.stride(1),
            param.stride(0), param.stride(1),
            *strides)
    return kern, grid, args, dict(
        **flags,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_T=cfg.BLOCK_T, GROUP_N=cfg.GROUP_N,
        EVEN_NK=(N % cfg.BLOCK_N == 0 and K % cfg.BLOCK_K == 0),
        EVEN_T=(T % cfg.BLOCK_T == 0), PREFETCH=cfg.PREFETCH, EPI_SPLIT=cfg.EPI_SPLIT,
        EPI_PIPE=cfg.EPI_PIPE and cfg.EPI_SPLIT > 1,
        SAME_STRIDES=all(s.stride() == param.stride() for s in state),
        GRAD_IN=grad is not None,
        # Triton 3.9's interpreter gets bf16 dots wrong (relative error 6e9 measured on a
        # 32×32 dot, fp16 fine): interpreted runs upcast the operands, which is exact.
        DOT_F32=(dy.dtype != x.dtype or dy.dtype == torch.float32 or dy.device.type == "cpu"),
        INPUT_PRECISION=precision,
        STOCHASTIC_ROUND=stochastic_rounding(param, prog),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_SEED = random.Random(0x5EED)


def stochastic_rounding(param: Tensor, prog: EpilogueProgram) -> bool:
    """Whether the weight's new value is stochastically rounded (a bf16 weight whose program
    asks for it; fp32/fp64 weights and the state are always rounded to nearest)."""
    return param.dtype == torch.bfloat16 and prog.param_rounding == "stochastic"


def _default_seed(stochastic: bool) -> int:
    # a fresh stochastic-rounding stream per call; a kernel that rounds to nearest never reads it
    return _SEED.getrandbits(31) if stochastic else 0


def fused_linear_update_triton(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                               scalars: Sequence[Union[Tensor, float]],
                               program: Union[str, EpilogueProgram], *,
                               config: Optional[KernelConfig] = None,
                               seed: Optional[int] = None,
                               scalar_pointers: Optional[bool] = None):
    """Launch the fused Triton kernel: W, state ← epilogue(dyᵀ·x, W, state, scalars), in place.

    ``config``: a fixed KernelConfig (default: autotuned, see ``tuned_config``). ``seed``: the
    stochastic-rounding seed for bf16 weights (default: a fresh one per call).
    ``scalar_pointers``: pass the scalar tensors to the kernel as pointers (default: those on the
    GPU; CPU ones as float arguments, which costs no sync); True forces pointers (interpreter
    tests). CPU tensors run under ``TRITON_INTERPRET=1``. Returns Triton's compiled kernel
    (registers, spills, SASS for inspection), or None when there was nothing to do.
    """
    key = _plan_key(dy, x, param, state, scalars, program, config, scalar_pointers)
    plan = _plan(key)
    if plan is not None:
        return plan.run(scalars, seed, dy, x)
    prog = load_program(program)
    _check(dy, x, param, state, prog)
    why = triton_unsupported_reason(dy, x, param, state, scalars, prog)
    if why is not None:
        raise ValueError(f"fused_linear_update_triton: {why}")
    return _triton_checked(dy, x, param, state, scalars, program, prog, config, seed,
                           scalar_pointers, key)


def _triton_checked(dy, x, param, state, scalars, program, prog: EpilogueProgram,
                    config: Optional[KernelConfig] = None, seed: Optional[int] = None,
                    scalar_pointers: Optional[bool] = None, plan_key: Optional[tuple] = None):
    """fused_linear_update_triton once its arguments were checked (the op checks them once: its
    host time was 0.17-0.24 ms per launch on the H100 host, torch 2.11, and adds up over a
    model's weights). ``plan_key``: remember the launch for repeated calls (_Plan)."""
    if len(scalars) != len(prog.scalars):
        raise ValueError(f"program expects scalars {prog.scalars}, got {len(scalars)}")
    if dy.shape[1] == 0 or x.shape[1] == 0:
        return None
    precision = _input_precision(dy, x)
    cfg = config or tuned_config(dy, x, param, state, scalars, program)
    if seed is None:
        seed = _default_seed(stochastic_rounding(param, prog))
    if cfg.SPLIT_GEMM_MB:
        why = split_gemm_unsupported_reason(dy, x)
        if why is not None:
            raise ValueError(f"fused_linear_update_triton: split-GEMM config: {why}")
        N, K = param.shape
        block = _split_rows(cfg, N, K) * K * 4
        SPLIT_GEMM_BLOCKS[(N, K)] = max(block, SPLIT_GEMM_BLOCKS.get((N, K), 0))
    if cfg.WS and config is not None:     # a tuned config was chosen among applicable ones
        from forge_compile.kernels.fused_linear_update_ws import ws_unsupported_reason
        why = ws_unsupported_reason(dy, x, param, state)
        if why is not None:
            raise ValueError(f"fused_linear_update_triton: warp-specialised config: {why}")
    return _run(dy, x, param, state, scalars, prog, cfg, precision, seed, scalar_pointers,
                plan_key)


# ============================================================================ launch plans
# Host time per launch of the warp-specialised kernel, by layer (scripts/profile_launch.py,
# 256×256×64 AdamW, H100 host, torch 2.11, Triton 3.6, 2026-11-23 18:28 UTC): Triton's own
# launcher with prepared arguments 33.9 µs; + the launch cache's key 65.8; + building the
# arguments 107.9; + the checks and the tuned-config lookup of fused_linear_update_triton 163.2.
# The anchor's mm + cast + fused AdamW takes 44.3. Under do_bench that leaked into the 4096²
# T=512 row: its GPU work per iteration (256 MB memset + 0.163 ms kernel) barely outlasts the
# host's, and the median came out 0.1825 ms (q20 0.1644) at 18:25 UTC. A plan remembers, for
# exactly these arguments, what all of that decided (the checks passed, the tuned config, the
# descriptors, the compiled kernel and its argument list), so a repeated call only sets the
# seed and the scalars passed by value and launches.
_PLANS: "collections.OrderedDict[tuple, Union[_Plan, _SplitPlan]]" = collections.OrderedDict()
# One plan per (weight, activation buffers) seen: a model's linear layers, times the
# activation addresses a step reuses. Least recently used ones go first.
_PLANS_MAX = 4096
PLAN_STATS = {"hits": 0, "made": 0}


class _Plan:
    """One launch's compiled kernel, grid and argument values (signature order); per call the
    seed (position ``seed_at``), the scalars passed by value (``by_value``: (position, scalar
    index)) and the addresses of those passed by pointer (``by_pointer``, the same pairs) are
    set."""
    __slots__ = ("ck", "grid", "vals", "seed_at", "by_value", "bf16", "operands", "ptrs",
                 "by_pointer")

    def __init__(self, ck, grid, vals, seed_at, by_value, bf16, operands, ptrs, by_pointer=()):
        self.ck, self.grid, self.vals, self.seed_at = ck, grid, vals, seed_at
        self.by_value, self.bf16 = by_value, bf16
        self.operands, self.ptrs = operands, ptrs
        self.by_pointer = by_pointer

    def run(self, scalars, seed: Optional[int], dy: Tensor, x: Tensor):
        PLAN_STATS["hits"] += 1
        return self.launch(scalars, seed if seed is not None else _default_seed(self.bf16),
                           (dy.data_ptr(), x.data_ptr()))

    def launch(self, scalars, seed: int, ptrs: tuple):
        """The launch with this call's seed, scalars and operand addresses ``ptrs`` (dY's, X's
        and, in a split-GEMM block, its gradient's)."""
        vals = list(self.vals)
        if ptrs != self.ptrs:       # the activations moved: this call's, same layout
            for at, which, make in self.operands:
                vals[at] = ptrs[which] if make is None else make(ptrs[which])
        vals[self.seed_at] = seed
        for at, i in self.by_value:
            vals[at] = float(scalars[i])
        for at, i in self.by_pointer:
            vals[at] = scalars[i].data_ptr()
        self.ck[self.grid](*vals)
        return self.ck


class _SplitPlan:
    """A split-GEMM launch's plan: per row block ``(n0, n1, plan)`` of W, cuBLAS's fp32
    gradient of the block, then the epilogue kernel's launch through the block's _Plan (its
    third operand the gradient, at this call's address). Without it every split call ran the
    full path: its checks, the tuned-config lookup and the launch arguments of each block's
    kernel (the 953M bf16 Llama at 4×1024 runs 64 such calls a step)."""
    __slots__ = ("blocks", "bf16")

    def __init__(self, blocks: tuple, bf16: bool):
        self.blocks, self.bf16 = blocks, bf16

    def run(self, scalars, seed: Optional[int], dy: Tensor, x: Tensor):
        PLAN_STATS["hits"] += 1
        seed = seed if seed is not None else _default_seed(self.bf16)
        ck, xp = None, x.data_ptr()
        for i, (n0, n1, plan) in enumerate(self.blocks):
            dyb = dy[:, n0:n1]
            g = _mm_fp32(dyb.t(), x)
            ck = plan.launch(scalars, _block_seed(seed, i), (dyb.data_ptr(), xp, g.data_ptr()))
            del g       # as _launch_split_gemm: the next block's GEMM reuses its memory
        return ck


def _plan_key(dy, x, param, state, scalars, program, config, scalar_pointers) -> Optional[tuple]:
    """Everything the checks, the tuned-config lookup and the launch arguments read: each
    tensor's address, shape, strides, dtype and device; each scalar's kind (a GPU tensor's
    address mod 16, dtype, shape and device; a CPU tensor's dtype and shape or a number's type:
    their values are read per call); the program, the config asked for, the options read from
    the environment and torch's TF32 flag. None (no plan) off the GPU.
    dY and X (activations: the caching allocator may hand a step other addresses than the last)
    and GPU scalars (a step's temporaries when the optimizer is capturable, as Dynamo makes it
    for GPU parameters: its bias corrections come from a GPU ``step``) are keyed by their
    address mod 16 only, what the checks (TMA's 16-byte base) and Triton's pointer
    specialisation read of it; the plan passes each call's own (``_Plan.run``)."""
    if not param.is_cuda:
        return None
    return (tuple((t.data_ptr() % 16, t.shape, t.stride(), t.dtype, t.get_device())
                  for t in (dy, x)),
            tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.get_device())
                  for t in (param, *state)),
            tuple(_scalar_key(s) for s in scalars),
            program, config, scalar_pointers, _plan_env(), _mm_tf32())


def _scalar_key(s):
    # a GPU tensor is read through its address (each call's: _Plan.run), a CPU tensor or a
    # number by value, per call; a GPU address mod 16 is what Triton specialises a pointer on
    if isinstance(s, Tensor):
        return (s.data_ptr() % 16 if s.is_cuda else None, s.dtype, s.shape, s.get_device())
    return type(s)


def _plan(key: Optional[tuple]) -> "Optional[Union[_Plan, _SplitPlan]]":
    if key is None or not launch_cache.enabled():
        return None
    plan = _PLANS.get(key)
    if plan is not None:
        try:
            _PLANS.move_to_end(key)
        except KeyError:        # evicted by another thread in between: still a valid plan
            pass
    return plan


def _scalar_slots(names, kwargs, n: int) -> Tuple[tuple, tuple]:
    """(by_value, by_pointer) of a plan: the (position among ``names``, scalar index) of each
    scalar passed by value and of each passed by pointer (its SCALAR_PTR_i flag)."""
    slots = ([], [])
    for i in range(n):
        slots[bool(kwargs[f"SCALAR_PTR_{i}"])].append((names.index(f"sc{i}"), i))
    return tuple(slots[0]), tuple(slots[1])


def _new_plan(jit, ck, grid, args, kwargs, scalars, bf16: bool, operands: tuple,
              kinds: int = 2) -> "Optional[_Plan]":
    """The plan that repeats this launch, or None where it cannot be made. ``kinds``: the
    operands it must find a slot for, 2 (dY, X) or 3 (and a split-GEMM block's gradient)."""
    # a plan takes each call's dY and X (its key has no address of theirs), and a split-GEMM
    # block's gradient: without a slot for each, no plan (a call would read the first call's)
    covered = {which for _, which, _ in operands}
    if covered != set(range(kinds)):
        return None
    bound = launch_cache.bound(jit, args, kwargs)
    if bound is None or ck is None:
        return None
    names, vals = bound
    by_value, by_pointer = _scalar_slots(names, kwargs, len(scalars))
    # tensors by address (Triton's launcher takes an int for a pointer): a plan keeps no
    # weight or state alive, and one for a freed tensor is right for a new tensor the key
    # describes the same way (the descriptors, _desc_of, work the same way)
    vals = tuple(v.data_ptr() if isinstance(v, Tensor) else v for v in vals)
    # the operands' addresses this launch was made with: a call at the same ones passes vals
    # as they are
    ptrs = [0] * len(covered)
    for at, which, make in operands:
        ptrs[which] = vals[at] if make is None else vals[at].base.data_ptr()
    return _Plan(ck, launch_cache.grid3(grid), vals, names.index("seed"), by_value, bf16,
                 operands, tuple(ptrs), by_pointer)


def _remember_plan(key: tuple, plan) -> None:
    if plan is None:
        return
    _PLANS[key] = plan
    PLAN_STATS["made"] += 1
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)


# ============================================================================ the op
def _use_triton(dy, x, param, state, scalars, prog) -> bool:
    if param.device.type == "cpu" and os.environ.get(ENV_CPU_TRITON) != "1":
        return False
    return triton_unsupported_reason(dy, x, param, state, scalars, prog) is None


# The op is defined through torch.library.Library, not torch.library.custom_op: a compiled step
# calls it once per fused weight (113 times a step in the 953M Llama), and custom_op's Python
# layers (autograd, ADInplaceOrView, alias checks, argument defaults) cost 33 µs a call on the
# development CPU against 4.4 µs for the same schema defined here (a no-op body; docs/README.md,
# "Under bf16 autocast"). The schema is the one custom_op generated; the mutated tensors'
# version counters are bumped by the body, as custom_op's ADInplaceOrView layer did.
_LIB = torch.library.Library("forge_compile", "FRAGMENT")
_LIB.define("fused_linear_update_(Tensor dy, Tensor x, Tensor(a2!) param, Tensor(a3!)[] state, "
            "Tensor[] scalars, str program) -> ()")


def _fused_linear_update_impl(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                              scalars: List[Tensor], program: str) -> None:
    """W, state ← epilogue(dyᵀ·x, W, state, scalars), one gradient tile at a time."""
    _bump_versions(param, state)
    key = _plan_key(dy, x, param, state, scalars, program, None, None)
    plan = _plan(key)
    if plan is not None:
        plan.run(scalars, None, dy, x)
        return
    prog = load_program(program)
    _check(dy, x, param, state, prog)
    if _use_triton(dy, x, param, state, scalars, prog):
        _triton_checked(dy, x, param, state, scalars, program, prog, plan_key=key)
        return
    _fused_linear_update_tiled(dy, x, param, state, scalars, prog)


def _bump_versions(param: Tensor, state: List[Tensor]) -> None:
    # an in-place write: autograd must see it (a tensor saved for backward that aliases W or its
    # state fails loudly, as after eager's optimizer.step()). One call with the list: 0.6 µs on
    # the development CPU; torch._C._increment_version on each tensor alone took 7 µs a tensor.
    torch.autograd.graph.increment_version([param, *state])


_LIB.impl("fused_linear_update_", _fused_linear_update_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("forge_compile::fused_linear_update_", lib=_LIB)
def _(dy, x, param, state, scalars, program):
    return None


fused_linear_update_ = torch.ops.forge_compile.fused_linear_update_


def _fused_linear_update_tiled(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                               scalars: List[Tensor], prog: EpilogueProgram,
                               seed: Optional[int] = None) -> None:
    """The torch implementation: one gradient tile live at a time (``seed``: as the
    kernels', default a fresh one per call)."""
    cdt = _compute_dtype(param)
    names = prog.state
    N, K = param.shape
    # the kernels' stochastic rounding, bit for bit (their noise hash, their element indices)
    stochastic = stochastic_rounding(param, prog)
    if seed is None:
        seed = _default_seed(stochastic)
    if stochastic and prog.seed_scalar is not None:
        seed ^= int(float(scalars[prog.scalars.index(prog.seed_scalar)]))
    for n0 in range(0, N, TILE_N):
        n1 = min(n0 + TILE_N, N)
        dyt = dy[:, n0:n1].t().to(cdt)
        for k0 in range(0, K, TILE_K):
            k1 = min(k0 + TILE_K, K)
            g = torch.mm(dyt, x[:, k0:k1].to(cdt))
            tiles = {GRAD: g, PARAM: param[n0:n1, k0:k1].to(cdt)}
            for name, s in zip(names, state):
                tiles[name] = s[n0:n1, k0:k1].to(cdt)
            new = run_epilogue(prog, tiles, scalars)
            for name, val in new.items():
                dst = param if name == PARAM else state[names.index(name)]
                if name == PARAM and stochastic:
                    offs = (torch.arange(n0, n1, device=val.device)[:, None] * K
                            + torch.arange(k0, k1, device=val.device)[None, :])
                    val = round_bf16_stochastic(val.to(torch.float32), seed, offs)
                dst[n0:n1, k0:k1].copy_(val)


def round_bf16_stochastic(x: Tensor, seed: int, offs: Tensor) -> Tensor:
    """fp32 ``x`` rounded to bf16 stochastically, bit for bit as the kernels'
    ``_round_bf16_stochastic`` with the same ``seed`` and element indices ``offs`` (int64,
    row·K + column): uniform 16-bit noise below the bf16 lsb added, then truncated
    (E[result] = x; inf/NaN kept)."""
    m = 0xFFFFFFFF      # uint32 arithmetic in int64: a wrapped product keeps its low 32 bits
    h = (offs ^ seed) & m
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & m
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & m
    h = h ^ (h >> 16)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & m
    rounded = (((bits + (h & 0xFFFF)) & 0xFFFF0000) - ((bits >> 31) << 32)).to(torch.int32)
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x).to(torch.bfloat16)


def fused_linear_update_reference(dy: Tensor, x: Tensor, param: Tensor, state: List[Tensor],
                                  scalars: List[Tensor], program: str) -> None:
    """Unfused ground truth: the whole gradient materialised, then the epilogue, then writes
    (rounded to nearest: fp64 copies give the exact update a stochastically rounded one
    brackets)."""
    prog = load_program(program)
    _check(dy, x, param, state, prog)
    cdt = _compute_dtype(param)
    g = dy.to(cdt).t() @ x.to(cdt)
    tensors = {GRAD: g, PARAM: param.to(cdt)}
    tensors.update({n: s.to(cdt) for n, s in zip(prog.state, state)})
    for name, val in run_epilogue(prog, tensors, scalars).items():
        dst = param if name == PARAM else state[prog.state.index(name)]
        dst.copy_(val)
