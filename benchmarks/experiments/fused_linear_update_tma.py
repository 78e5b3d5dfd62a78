"""Experiment (measured, not shipped): a persistent, TMA-fed Gluon kernel for Hopper.

The question (docs/kernels.md, "TMA / Gluon experiment"): does feeding the weight and optimizer
state through TMA into a shared-memory ring, issued ahead of use and across tile boundaries of a
persistent grid, let their HBM traffic overlap the weight-gradient GEMM? It computes what
``forge_compile::fused_linear_update_`` computes (same epilogue program, same generated math,
same stochastic rounding) and is checked against the fp64 reference at 1e-5 by
``bench_fused_linear_update_tma.py``.

Design: grid = #SMs; each CTA walks tiles pid, pid + #SMs, ... in the shipped kernel's grouped
order. Per tile: a STAGES-deep TMA ring of dY[BLOCK_T, BLOCK_N] / x[BLOCK_T, BLOCK_K] feeds
``warpgroup_mma`` (one BLOCK_N × BLOCK_K fp32 accumulator, m64nBLOCK_Kk16 instructions); the
next tile's first GEMM steps are issued before this tile's epilogue. The weight/state stream is
a separate ring of SLOTS chunks (BLOCK_N × BLOCK_K/SPLIT per tensor), numbered across tiles, so
loads for the next tile fly during this tile's GEMM. The epilogue splits the accumulator into
SPLIT column chunks in registers (reshape/permute/split: register renaming, the halved column
bit is inside each thread in the wgmma layout), reads the chunk's W/state from shared memory,
refills the slot, and stores with ``gl.store``.

Needs Triton with Gluon's Hopper API (3.6 on the device), bf16/fp16 operands with unit last
stride and 16-byte aligned strides (TMA), a CUDA sm_90 device.
"""
from __future__ import annotations

import dataclasses

import torch

from forge_compile.kernels.fused_linear_update import (
    PARAM, _Epilogue, _import_generated, column_split, load_program)
from forge_compile.kernels.fused_linear_update_ws import (
    _gl, _gl_dtype, arg_names, issue_state_source, module_head, scalar_loads)


def kernel_source(program, split: int) -> str:
    """The Gluon module source for one epilogue program and one SPLIT."""
    prog = load_program(program)
    ep = _Epilogue(prog)
    n_state = len(prog.state)
    descs, smems, ptrs, strides = arg_names(n_state)
    n_scalar = len(prog.scalars)
    L = []
    a = L.append
    L.extend(module_head(prog, "benchmarks/experiments/fused_linear_update_tma.py"))
    L.extend(issue_state_source(descs, smems))
    scal_args = "".join(f"sc{i}, " for i in range(n_scalar))
    scal_flags = "".join(f"SCALAR_PTR_{i}: gl.constexpr, " for i in range(n_scalar))
    a("@gluon.jit(do_not_specialize=['seed'])")
    a(f"def _flu_tma_kernel(dy_desc, x_desc, {', '.join(descs)}, {', '.join(ptrs)}, {scal_args}seed,")
    a(f"                    T, N, K, {', '.join(strides)}, {scal_flags}")
    a("                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_T: gl.constexpr,")
    a("                    SPLIT: gl.constexpr, STAGES: gl.constexpr, SLOTS: gl.constexpr,")
    a("                    GROUP_N: gl.constexpr, EVEN_NK: gl.constexpr,")
    a("                    STOCHASTIC_ROUND: gl.constexpr, SKIP_GEMM: gl.constexpr,")
    a("                    TMA_STORE: gl.constexpr, num_warps: gl.constexpr):")
    a("    CW: gl.constexpr = BLOCK_K // SPLIT")
    a("    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],")
    a("                                                  instr_shape=[16, BLOCK_K, 16])")
    a("    dy_smem = gl.allocate_shared_memory(dy_desc.dtype, [STAGES, BLOCK_T, BLOCK_N], dy_desc.layout)")
    a("    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_T, BLOCK_K], x_desc.layout)")
    a("    ld_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())")
    for d, s in zip(descs, smems):
        a(f"    {s} = gl.allocate_shared_memory({d}.dtype, [SLOTS, BLOCK_N, CW], {d}.layout)")
    a("    st_bar = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())")
    a("    for s in gl.static_range(STAGES):")
    a("        mbarrier.init(ld_bar.index(s), count=1)")
    a("    for s in gl.static_range(SLOTS):")
    a("        mbarrier.init(st_bar.index(s), count=1)")
    a("    fence_async_shared()")
    L.extend(scalar_loads(n_scalar))
    a("    pid = gl.program_id(0)")
    a("    nprog = gl.num_programs(0)")
    a("    num_tiles = gl.cdiv(N, BLOCK_N) * gl.cdiv(K, BLOCK_K)")
    a("    my_tiles = gl.cdiv(num_tiles - pid, nprog)")
    a("    n_chunks = my_tiles * SPLIT")
    st_call = (f"pid, nprog, {', '.join(descs)}, {', '.join(smems)}, st_bar, N, K, "
               "BLOCK_N, BLOCK_K, SPLIT, SLOTS, GROUP_N, CW)")
    a("    for j in gl.static_range(SLOTS):")
    a("        if j < n_chunks:")
    a(f"            _issue_state(j, {st_call}")
    a("    num_t = gl.cdiv(T, BLOCK_T)")
    a("    if SKIP_GEMM:")
    a("        num_t = 0")
    a("    gbase = 0")
    g_call = "off_n, off_k, dy_desc, x_desc, dy_smem, x_smem, ld_bar, STAGES, BLOCK_T)"
    a("    off_n, off_k = _tile_coords(pid, N, K, BLOCK_N, BLOCK_K, GROUP_N)")
    a("    for s in gl.static_range(STAGES - 1):")
    a("        if s < num_t:")
    a(f"            _issue_gemm(s, s, {g_call}")
    a("    for i in range(my_tiles):")
    a("        off_n, off_k = _tile_coords(pid + i * nprog, N, K, BLOCK_N, BLOCK_K, GROUP_N)")
    # (the accumulator's column chunks are Python-level names: one source per SPLIT)
    a("        acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, mma)")
    a("        for t in range(num_t):")
    a("            gs = gbase + t")
    a("            slot = gs % STAGES")
    a("            mbarrier.wait(ld_bar.index(slot), (gs // STAGES) & 1)")
    a("            acc = warpgroup_mma(dy_smem.index(slot).permute((1, 0)), x_smem.index(slot), acc, is_async=True)")
    a("            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))")
    a("            gl.thread_barrier()")
    a("            if t + STAGES - 1 < num_t:")
    a(f"                _issue_gemm(t + STAGES - 1, gs + STAGES - 1, {g_call}")
    a("        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))")
    a("        gbase += num_t")
    # the ring is free: the next tile's first steps load during this tile's epilogue
    a("        gl.thread_barrier()")
    a("        if i + 1 < my_tiles:")
    a("            nn, nk = _tile_coords(pid + (i + 1) * nprog, N, K, BLOCK_N, BLOCK_K, GROUP_N)")
    a("            for s in gl.static_range(STAGES - 1):")
    a("                if s < num_t:")
    a("                    _issue_gemm(s, gbase + s, nn, nk, dy_desc, x_desc, dy_smem, x_smem, ld_bar, STAGES, BLOCK_T)")
    # column chunks of the accumulator: halve each chunk split-1 times (register renaming only:
    # the halved column bit is held inside each thread in the wgmma layout)
    lines, chunks = column_split(split, "        ", "gl")
    L.extend(lines)
    a(f"        cl: gl.constexpr = {chunks[0]}.type.layout")
    a("        rn = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, cl))")
    a("        mask_n = rn < N")
    for h in range(split):
        sfx = f"_{h}"
        a(f"        acc{sfx} = {chunks[h]}")
        a(f"        seq = i * SPLIT + {h}")
        a("        slot = seq % SLOTS")
        a("        mbarrier.wait(st_bar.index(slot), (seq // SLOTS) & 1)")
        for n, s in zip(ep.tensor_names, smems):
            if n in ep.used:
                a(f"        {ep.var[n]}{sfx} = {s}.index(slot).load(cl).to(gl.float32)")
        a("        gl.thread_barrier()")
        a("        if not TMA_STORE:")       # the slot is free once read: refill it now
        a("            if seq + SLOTS < n_chunks:")
        a(f"                _issue_state(seq + SLOTS, {st_call}")
        a(f"        rk{sfx} = off_k + {h} * CW + gl.arange(0, CW, gl.SliceLayout(0, cl))")
        a(f"        mask{sfx} = mask_n[:, None] & (rk{sfx} < K)[None, :]")
        a(f"        off{sfx} = rn[:, None] * s_p_n + rk{sfx}[None, :]")
        L.extend(ep.statements("        ", sfx, _gl))
        for dst, e in ep.new_values(sfx, "gl.zeros([BLOCK_N, CW], gl.float32, cl)"):
            idx = ep.tensor_names.index(dst)
            ptr, st = ptrs[idx], strides[idx]
            a(f"        o{sfx} = {e}")
            if dst == PARAM:
                a("        if STOCHASTIC_ROUND:")
                a(f"            o{sfx} = _round_bf16_stochastic(o{sfx}, seed, "
                  f"rn[:, None] * K + rk{sfx}[None, :])")
            offe = f"off{sfx}" if idx == 0 else f"rn[:, None] * {st} + rk{sfx}[None, :]"
            a("        if TMA_STORE:")
            a(f"            {smems[idx]}.index(slot).store(o{sfx}.to({ptr}.dtype.element_ty))")
            a("        elif EVEN_NK:")
            a(f"            gl.store({ptr} + {offe}, o{sfx}.to({ptr}.dtype.element_ty))")
            a("        else:")
            a(f"            gl.store({ptr} + {offe}, o{sfx}.to({ptr}.dtype.element_ty), mask=mask{sfx})")
        # TMA_STORE: the outputs leave from the slot by bulk copy (clipped at the edges, not
        # through the load/store queue); the slot of the previous chunk is refilled once its
        # stores have read it (at most this chunk's stores still pending)
        n_out = len(prog.outputs)
        a("        if TMA_STORE:")
        a("            fence_async_shared()")
        a("            gl.thread_barrier()")
        for dst, _ in prog.outputs:
            idx = ep.tensor_names.index(dst)
            a(f"            tma.async_copy_shared_to_global({descs[idx]}, [off_n, off_k + {h} * CW], "
              f"{smems[idx]}.index(slot))")
        a(f"            tma.store_wait(pendings={n_out})")
        a("            if seq >= 1:")
        a("                if seq - 1 + SLOTS < n_chunks:")
        a(f"                    _issue_state(seq - 1 + SLOTS, {st_call}")
    a("    if TMA_STORE:")
    a("        tma.store_wait(pendings=0)")
    a("")
    return "\n".join(L)


_K = {}


def kernel(program, split):
    pk = (load_program(program).dumps(), split)
    if pk not in _K:
        _K[pk] = _import_generated(kernel_source(program, split), "flu_tma")._flu_tma_kernel
    return _K[pk]


@dataclasses.dataclass(frozen=True)
class TmaConfig:
    """Tile shape, GEMM ring depth (STAGES), state ring depth (SLOTS of BLOCK_K/SPLIT columns)."""

    BLOCK_N: int
    BLOCK_K: int
    BLOCK_T: int
    SPLIT: int
    STAGES: int
    SLOTS: int
    num_warps: int = 8
    GROUP_N: int = 8
    TMA_STORE: bool = False   # W/state written back by TMA from the ring slot (else gl.store)


def launch(dy, x, param, state, scalars, program, cfg: TmaConfig, seed=0, skip_gemm=False):
    """W, state ← epilogue(dyᵀ·x, W, state, scalars) in place; ``skip_gemm``: grad = 0 (the
    epilogue's traffic alone, for the study)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    prog = load_program(program)
    T, N = dy.shape
    K = x.shape[1]
    BLOCK_N, BLOCK_K, BLOCK_T, SPLIT = cfg.BLOCK_N, cfg.BLOCK_K, cfg.BLOCK_T, cfg.SPLIT
    if cfg.TMA_STORE and cfg.SLOTS < 2:
        raise ValueError("TMA_STORE refills the previous chunk's slot: SLOTS must be ≥ 2")
    CW = BLOCK_K // SPLIT

    def desc(t, block):
        lay = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, lay)
    dyd = desc(dy, [BLOCK_T, BLOCK_N])
    xd = desc(x, [BLOCK_T, BLOCK_K])
    sds = [desc(t, [BLOCK_N, CW]) for t in [param] + list(state)]
    flags = {}
    scal = []
    for i, s in enumerate(scalars):
        if isinstance(s, torch.Tensor) and s.is_cuda:
            scal.append(s)
            flags[f"SCALAR_PTR_{i}"] = True
        else:
            scal.append(float(s))
            flags[f"SCALAR_PTR_{i}"] = False
    tiles = -(-N // BLOCK_N) * -(-K // BLOCK_K)
    nsm = torch.cuda.get_device_properties(dy.device).multi_processor_count
    grid = (min(tiles, nsm),)
    k = kernel(prog, SPLIT)
    return k[grid](dyd, xd, *sds, param, *state, *scal, seed, T, N, K,
                   param.stride(0), *[s.stride(0) for s in state], **flags,
                   BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_T=BLOCK_T, SPLIT=SPLIT,
                   STAGES=cfg.STAGES, SLOTS=cfg.SLOTS, GROUP_N=cfg.GROUP_N,
                   EVEN_NK=(N % BLOCK_N == 0 and K % BLOCK_K == 0),
                   STOCHASTIC_ROUND=(param.dtype == torch.bfloat16), SKIP_GEMM=skip_gemm,
                   TMA_STORE=cfg.TMA_STORE,
                   num_warps=cfg.num_warps)
