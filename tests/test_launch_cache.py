"""Tests of the launch cache in front of Triton's dispatch (forge_compile/kernels/launch_cache.py)
and of the warp-specialised kernel's cached TensorDescriptors.

* CPU: a descriptor built on an address (``_DescBase``) specialises exactly like one built on
  the tensor, is cached, and does not keep a freed tensor alive; the option fails fast.
* GPU (``-m gpu``): every launch through the cache equals, bit for bit, the same launch through
  ``JITFunction.run``, over a sequence whose arguments change Triton's specialisation (T = 1, a
  T that is not a multiple of 16, scalars by value and by pointer) and come back, so a cached
  kernel is never used for arguments it was not specialised for (both kernels launch through
  the cache). A launch plan (a repeated call on the same tensors) writes what the full path
  writes, bit for bit, and takes a new by-value learning rate; CPU tensors get none.
"""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from forge_compile import rules
from forge_compile.kernels import fused_linear_update as flu
from forge_compile.kernels import launch_cache

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _ws():
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from forge_compile.kernels import fused_linear_update_ws
    return fused_linear_update_ws


def test_desc_specialises_like_a_tensor_descriptor():
    ws = _ws()
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    for dtype, block in [(torch.bfloat16, (64, 128)), (torch.float32, (16, 128))]:
        t = torch.zeros(256, 512, dtype=dtype)
        ours = ws.desc(t, block)
        theirs = TensorDescriptor(t, list(t.shape), list(t.stride()), list(block),
                                  ws._nvmma_layout(block, dtype))
        assert ours.base.data_ptr() == t.data_ptr() and ours.base.dtype == dtype
        assert (ours.shape, ours.strides, ours.block_shape, ours.layout, ours.padding) == (
            theirs.shape, theirs.strides, theirs.block_shape, theirs.layout, theirs.padding)
        spec = [native_specialize_impl(BaseBackend, d, False, True, True) for d in (ours, theirs)]
        assert spec[0] == spec[1] and spec[0][0].startswith("tensordesc"), spec


def test_desc_is_cached_and_holds_no_tensor():
    ws = _ws()
    t = torch.zeros(128, 256, dtype=torch.bfloat16)
    d = ws.desc(t, (64, 128))
    assert ws.desc(t, (64, 128)) is d                  # a weight's second step: a hit
    assert ws.desc(t, (64, 64)) is not d                # another block, another descriptor
    assert ws.desc(t[:, :128], (64, 128)) is not d      # another shape at the same address
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None, "the descriptor cache keeps a freed tensor alive"


def test_descriptor_encodings_cached_per_descriptor_and_kernel():
    """Triton's launcher encodes each TensorDescriptor on every launch; the WS module's own
    (immutable, built on an address) are encoded once per kernel metadata and then reused, as
    copies; any other descriptor, or one without metadata, goes through unchanged every time.
    (A counting stand-in for the driver's encoder: the real one needs the CUDA driver.)"""
    ws = _ws()
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    calls = []

    def encode(arg, meta, *rest):
        calls.append((arg, meta))
        return [("tensormap", arg.base.data_ptr(), None if meta is None else meta["swizzle"]),
                *arg.shape, *arg.strides]
    cached = ws._cache_encodings(encode)
    t = torch.zeros(128, 256, dtype=torch.bfloat16)
    d = ws.desc(t, (64, 128))
    k1, k2 = {"swizzle": 128}, {"swizzle": 64}      # two kernels' metadata for this argument
    first = cached(d, k1, None)
    again = cached(d, k1, None)
    assert again == first == encode(d, k1) and again is not first
    del calls[-1]
    assert len(calls) == 1                            # encoded once for kernel 1
    assert cached(d, k2, None)[0][2] == 64 and len(calls) == 2
    theirs = TensorDescriptor(t, list(t.shape), list(t.stride()), [64, 128],
                              ws._nvmma_layout((64, 128), t.dtype))
    cached(theirs, k1, None)
    cached(theirs, k1, None)
    cached(d, None, None)
    assert len(calls) == 5                            # not ours, or no metadata: every time
    assert ws._cache_encodings(encode)._forge_cached


def test_plan_key_sees_every_option_change(monkeypatch):
    """The plan key's cheap reads (the environment's mapping, torch's TF32 getter) change
    whenever an option does, through os.environ or torch.backends, so a plan made under one
    value is never used under another."""
    names = (flu.ENV_SPLIT_GEMM, flu.ENV_NO_TUNE, flu.ENV_FP32_DOT)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    before = flu._plan_env()
    for name in names:
        monkeypatch.setenv(name, "1")
        assert flu._plan_env() != before, name
        monkeypatch.delenv(name)
        assert flu._plan_env() == before, name
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        for value in (not flag, flag):
            torch.backends.cuda.matmul.allow_tf32 = value
            assert flu._mm_tf32() is value
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_launch_cache_option_fails_fast(monkeypatch):
    monkeypatch.setenv(launch_cache.ENV_LAUNCH_CACHE, "yes")
    with pytest.raises(ValueError, match="FORGE_LAUNCH_CACHE must be 0 or 1"):
        launch_cache.launch(None, (1,))
    with pytest.raises(ValueError, match="FORGE_LAUNCH_CACHE must be 0 or 1"):
        flu.check_env()         # what the backend calls when it compiles a step


def test_no_launch_plan_off_the_gpu():
    """CPU tensors (the tiled torch path, or the interpreter) never get a plan: every call
    runs its checks."""
    prog = rules.adamw_program()
    p = torch.zeros(8, 8)
    key = flu._plan_key(torch.zeros(4, 8), torch.zeros(4, 8), p, [torch.zeros_like(p)] * 2,
                        rules.adamw_scalars(1e-3, step=1), prog.dumps(), None, None)
    assert key is None and flu._plan(key) is None


def test_plan_operand_slots_find_dy_and_x():
    """A plan passes each call's dY and X (their addresses are not in its key): the Triton
    kernel's launch arguments hold them at the positions _operand_slots finds; one tensor in
    both roles fills both."""
    prog = rules.adamw_program()
    cfg = flu._GPU_CONFIGS[0]
    dy, x, p = torch.zeros(4, 8), torch.zeros(4, 6), torch.zeros(8, 6)
    s = [torch.zeros_like(p), torch.zeros_like(p)]
    sc = rules.adamw_scalars(1e-3, step=1)
    _, _, args, _ = flu._launch_args(dy, x, p, s, sc, prog, cfg, "ieee", 0)
    assert flu._operand_slots(dy, x, args, cfg) == ((0, 0, None), (1, 1, None))
    sq = torch.zeros(4, 8)
    _, _, args, _ = flu._launch_args(sq, sq, torch.zeros(8, 8), s, sc, prog, cfg, "ieee", 0)
    assert {w for _, w, _ in flu._operand_slots(sq, sq, args, cfg)} == {0, 1}


# ============================================================================ GPU
def _case(T, N=512, K=768, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(T, N, generator=g).to("cuda", torch.bfloat16)
    x = torch.randn(T, K, generator=g).div_(T ** 0.5).to("cuda", torch.bfloat16)
    p = torch.randn(N, K, generator=g).cuda()
    s = [torch.randn(N, K, generator=g).cuda(), torch.rand(N, K, generator=g).cuda()]
    return dy, x, p, s


@pytest.fixture
def no_plans(monkeypatch):
    """An empty plan table for the test: the tests count the plans they make and use, and a
    plan an earlier test in the process left for a freed weight of the same layout, at the
    address the allocator hands this test's weight, is (rightly) taken by its first call."""
    monkeypatch.setattr(flu, "_PLANS", type(flu._PLANS)())


# (T, scalars on): T=1 is specialised as a constant, 65 is not a multiple of 16, and the
# scalars switch between values (CPU tensors) and pointers (GPU tensors); then it comes back
SEQUENCE = [(64, "cuda"), (1, "cuda"), (65, "cuda"), (64, "cpu"), (1, "cuda"), (65, "cpu"),
            (64, "cuda")]


def _sequence_matches_uncached(monkeypatch, config):
    """SEQUENCE through Triton's dispatch, then through the cache twice: equal bit for bit."""
    prog = rules.adamw_program()
    hits0, plan_hits0 = launch_cache.STATS["hits"], flu.PLAN_STATS["hits"]
    keep = []       # every weight stays alive: no address comes back, so no plan applies
    for i, (T, dev) in enumerate(SEQUENCE):
        dy, x, p, s = _case(T, seed=i)
        sc = rules.adamw_scalars(1e-2 * (i + 1), step=i + 1, device=dev)
        if config.WS:
            why = _ws().ws_unsupported_reason(dy, x, p, s)
            if why:
                pytest.skip(why)
        out = []
        for cached in ("0", "1", "1"):      # Triton's dispatch, then the cache's miss and hit
            monkeypatch.setenv(launch_cache.ENV_LAUNCH_CACHE, cached)
            p1, s1 = p.clone(), [t.clone() for t in s]
            flu.fused_linear_update_triton(dy, x, p1, s1, sc, prog, config=config)
            out.append([p1, *s1])
        keep.append(out)
        for a, b, c in zip(*out):
            assert torch.equal(a, b) and torch.equal(a, c), (T, dev, (a - c).abs().max())
        # and the update is the right one (fp64 reference; bf16 products are exact)
        p2, s2 = p.double(), [t.double() for t in s]
        flu.fused_linear_update_reference(dy.double(), x.double(), p2, s2, sc, prog.dumps())
        for a, b in zip(out[2], [p2, *s2]):
            assert ((a.double() - b).norm() / b.norm()).item() <= 1e-5, (T, dev)
    # every case after the first ran twice through the cache; each repeat is a hit
    assert launch_cache.STATS["hits"] - hits0 >= len(SEQUENCE)
    assert flu.PLAN_STATS["hits"] == plan_hits0


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_cache_ws_kernel(monkeypatch):
    _sequence_matches_uncached(monkeypatch, flu._GPU_WS_CONFIGS[0])


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_launch_cache_triton_kernel(monkeypatch):
    # the Triton kernel launches through the cache too (since the launch plans)
    _sequence_matches_uncached(monkeypatch, flu._GPU_CONFIGS[0])


# ============================================================================ launch plans
def _reset(p, s, p0, s0):
    # same addresses, same values: what a plan is keyed by (a training step's weights)
    p.copy_(p0)
    for t, u in zip(s, s0):
        t.copy_(u)


def _plan_case(kind, seed):
    """The config of kernel ``kind`` ("ws", "triton" or "split": cuBLAS and the epilogue
    kernel, in 4 row blocks of the 512-row weight), AdamW's program and a 64-token case
    (dY, X, W, state); skipped where the WS kernel does not apply."""
    dy, x, p, s = _case(64, seed=seed)
    cfg = {"ws": flu._GPU_WS_CONFIGS[0], "triton": flu._GPU_CONFIGS[0],
           "split": _split_cfg(160, x.shape[1])}[kind]
    if cfg.WS:
        why = _ws().ws_unsupported_reason(dy, x, p, s)
        if why:
            pytest.skip(why)
    return cfg, rules.adamw_program(), dy, x, p, s


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ws", "triton", "split"])
def test_gpu_launch_plan_repeats_the_checked_launch(monkeypatch, kind):
    """A repeated call on the same tensors goes through its plan and writes, bit for bit, what
    the full path (checks, config, launch cache) writes; a learning rate passed by value that
    changes takes effect; a tensor with other strides gets a plan of its own; with
    FORGE_LAUNCH_CACHE=0 no plan is made or used."""
    cfg, prog, dy, x, p, s = _plan_case(kind, seed=3)
    p0, s0 = p.clone(), [t.clone() for t in s]
    made0, hits0 = flu.PLAN_STATS["made"], flu.PLAN_STATS["hits"]
    outs = []
    for lr in (1e-2, 1e-2, 3e-2):       # scalars by value (CPU tensors): the third changes lr
        sc = rules.adamw_scalars(lr, step=5, device="cpu")
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(dy, x, p, s, sc, prog, config=cfg, seed=0)
        outs.append([t.clone() for t in (p, *s)])
    assert flu.PLAN_STATS["made"] - made0 == 1 and flu.PLAN_STATS["hits"] - hits0 == 2
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    # the third call's update, through the full path with the cache (and plans) off
    monkeypatch.setenv(launch_cache.ENV_LAUNCH_CACHE, "0")
    _reset(p, s, p0, s0)
    flu.fused_linear_update_triton(dy, x, p, s, rules.adamw_scalars(3e-2, step=5, device="cpu"),
                                   prog, config=cfg, seed=0)
    for a, b in zip(outs[2], (p, *s)):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][0], outs[2][0])       # the lr change did take effect
    assert flu.PLAN_STATS["made"] - made0 == 1 and flu.PLAN_STATS["hits"] - hits0 == 2
    monkeypatch.delenv(launch_cache.ENV_LAUNCH_CACHE)
    # a weight with other strides (column-major): its own plan, which repeats its own first
    # call (another specialisation of the kernel: equal to the row-major update only to fp32
    # rounding, as the compiler may contract a different mul + add into an FMA)
    pt = torch.empty(p.shape[1], p.shape[0], device="cuda").t()
    sc = rules.adamw_scalars(1e-2, step=5, device="cpu")
    if cfg.WS and _ws().ws_unsupported_reason(dy, x, pt, s) is not None:
        return          # a column-major weight is not TMA-readable: the WS config refuses it
    outs_t = []
    for _ in range(2):
        _reset(pt, s, p0, s0)
        flu.fused_linear_update_triton(dy, x, pt, s, sc, prog, config=cfg, seed=0)
        outs_t.append([t.clone() for t in (pt, *s)])
    assert flu.PLAN_STATS["made"] - made0 == 2 and flu.PLAN_STATS["hits"] - hits0 == 3
    for a, b, c in zip(outs_t[0], outs_t[1], outs[0]):
        assert torch.equal(a, b)
        assert ((a - c).norm() / c.norm()).item() <= 1e-6


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_op_plan_equals_the_first_call(monkeypatch):
    """The op (what a compiled step calls, scalars as GPU tensors read by pointer): the second
    call on the same tensors runs its plan and writes what the first wrote."""
    monkeypatch.setenv(flu.ENV_NO_TUNE, "1")     # the first candidate, no timing in a test
    prog = rules.adamw_program().dumps()
    dy, x, p, s = _case(64, seed=4)
    p0, s0 = p.clone(), [t.clone() for t in s]
    sc = rules.adamw_scalars(1e-2, step=5, device="cuda")
    hits0 = flu.PLAN_STATS["hits"]
    outs = []
    for _ in range(2):
        _reset(p, s, p0, s0)
        torch.ops.forge_compile.fused_linear_update_(dy, x, p, s, sc, prog)
        outs.append([t.clone() for t in (p, *s)])
    assert flu.PLAN_STATS["hits"] - hits0 == 1
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][0], p0)


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ws", "triton", "split"])
def test_gpu_launch_plan_takes_each_calls_activations(monkeypatch, kind):
    """Activations at other addresses (a step whose dY and X the allocator placed elsewhere) run
    the plan made for the first ones, and the plan reads theirs: bit for bit what the full path
    writes for them, not what it wrote for the first."""
    cfg, prog, dy, x, p, s = _plan_case(kind, seed=5)
    dy2, x2, _, _ = _case(64, seed=6)            # same layout, other values and addresses
    assert dy2.data_ptr() != dy.data_ptr() and x2.data_ptr() != x.data_ptr()
    if cfg.WS:
        why = _ws().ws_unsupported_reason(dy2, x2, p, s)
        if why:
            pytest.skip(why)
    p0, s0 = p.clone(), [t.clone() for t in s]
    sc = rules.adamw_scalars(1e-2, step=5, device="cpu")
    made0, hits0 = flu.PLAN_STATS["made"], flu.PLAN_STATS["hits"]
    outs = []
    for a, b in ((dy, x), (dy2, x2), (dy, x), (dy2, x)):
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(a, b, p, s, sc, prog, config=cfg, seed=0)
        outs.append([t.clone() for t in (p, *s)])
    assert flu.PLAN_STATS["made"] - made0 == 1 and flu.PLAN_STATS["hits"] - hits0 == 3
    monkeypatch.setenv(launch_cache.ENV_LAUNCH_CACHE, "0")      # the full path, no plans
    for i, (a, b) in enumerate(((dy, x), (dy2, x2), (dy, x), (dy2, x))):
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(a, b, p, s, sc, prog, config=cfg, seed=0)
        for u, v in zip(outs[i], (p, *s)):
            assert torch.equal(u, v), (kind, i)
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[1][0], outs[3][0])


@pytest.mark.usefixtures("no_plans")
@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ws", "triton", "split"])
def test_gpu_launch_plan_takes_each_calls_scalar_pointers(monkeypatch, kind):
    """GPU scalars at other addresses (a compiled step's bias corrections, fresh temporaries
    each step) run the plan made for the first ones, and the plan reads theirs: bit for bit
    what the full path writes for them."""
    cfg, prog, dy, x, p, s = _plan_case(kind, seed=9)
    p0, s0 = p.clone(), [t.clone() for t in s]
    sca = rules.adamw_scalars(1e-2, step=5, device="cuda")
    scb = rules.adamw_scalars(3e-2, step=6, device="cuda")
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(sca, scb))
    made0, hits0 = flu.PLAN_STATS["made"], flu.PLAN_STATS["hits"]
    outs = []
    for sc in (sca, scb, sca):
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(dy, x, p, s, sc, prog, config=cfg, seed=0)
        outs.append([t.clone() for t in (p, *s)])
    assert flu.PLAN_STATS["made"] - made0 == 1 and flu.PLAN_STATS["hits"] - hits0 == 2
    monkeypatch.setenv(launch_cache.ENV_LAUNCH_CACHE, "0")      # the full path, no plans
    for i, sc in enumerate((sca, scb, sca)):
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(dy, x, p, s, sc, prog, config=cfg, seed=0)
        for u, v in zip(outs[i], (p, *s)):
            assert torch.equal(u, v), (kind, i)
    assert not torch.equal(outs[0][0], outs[1][0])


class _NoEncodingCache(dict):
    """Stands in for the WS module's encoding cache: never hits, keeps nothing."""

    def __setitem__(self, key, value):
        pass


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_cached_descriptor_encodings_write_what_fresh_ones_do(monkeypatch):
    """The WS launches reuse each descriptor's encoding (Triton's launcher would encode it on
    every call): over activations that move and come back, the updates are bit for bit those of
    launches whose descriptors are all encoded afresh."""
    ws = _ws()
    from triton.backends.nvidia import driver
    cfg = flu._GPU_WS_CONFIGS[0]
    prog = rules.adamw_program()
    dy, x, p, s = _case(64, seed=7)
    dy2, x2, _, _ = _case(64, seed=8)
    why = ws.ws_unsupported_reason(dy, x, p, s)
    if why:
        pytest.skip(why)
    p0, s0 = p.clone(), [t.clone() for t in s]
    sc = rules.adamw_scalars(1e-2, step=5, device="cpu")
    seq = ((dy, x), (dy2, x2), (dy, x), (dy2, x))
    outs = []
    for a, b in seq:
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(a, b, p, s, sc, prog, config=cfg, seed=0)
        outs.append([t.clone() for t in (p, *s)])
    assert getattr(driver.make_tensordesc_arg, "_forge_cached", False)
    assert len(ws._ENCODED) >= 5
    monkeypatch.setattr(ws, "_ENCODED", _NoEncodingCache())
    for i, (a, b) in enumerate(seq):
        _reset(p, s, p0, s0)
        flu.fused_linear_update_triton(a, b, p, s, sc, prog, config=cfg, seed=0)
        for u, v in zip(outs[i], (p, *s)):
            assert torch.equal(u, v), i


class _RecordingKernel:
    """Stands in for a CompiledKernel: ``ck[grid](*vals)`` records the values a plan passes."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *vals: self.calls.append(vals)


def test_plan_ws_slots_rebuild_each_calls_descriptors(monkeypatch):
    """The WS kernel's launch: _operand_slots finds dY's and X's TMA descriptors, and a plan made
    from it hands a call at other addresses descriptors of those addresses (the same block,
    layout, shape and strides as the full path builds for them), and the first call's own
    values when the addresses are the first call's. Built on CPU tensors (no launch)."""
    ws = _ws()
    if ws._gluon_hopper():
        pytest.skip(ws._gluon_hopper())
    monkeypatch.setattr(ws, "_num_sms", lambda index: 132)
    cfg = flu._GPU_WS_CONFIGS[0]
    prog = rules.adamw_program()
    T, N, K = 64, 256, 384
    dy, x = torch.zeros(T, N, dtype=torch.bfloat16), torch.zeros(T, K, dtype=torch.bfloat16)
    dy2, x2 = torch.zeros(T, N, dtype=torch.bfloat16), torch.zeros(T, K, dtype=torch.bfloat16)
    p = torch.zeros(N, K)
    s = [torch.zeros(N, K), torch.zeros(N, K)]
    sc = rules.adamw_scalars(1e-3, step=1)
    k, grid, args, kwargs = ws.ws_launch_args(dy, x, p, s, sc, prog, cfg)
    slots = flu._operand_slots(dy, x, args, cfg)
    assert sorted((at, which) for at, which, _ in slots) == [(0, 0), (1, 1)]
    full = ws.ws_launch_args(dy2, x2, p, s, sc, prog, cfg)[2]      # the full path's, for dy2/x2
    for at, which, make in slots:
        d, want = make((dy2, x2)[which].data_ptr()), full[at]
        assert d.base.data_ptr() == want.base.data_ptr() and d.base.dtype == want.base.dtype
        assert (list(d.shape), list(d.strides), list(d.block_shape), d.layout) == \
            (list(want.shape), list(want.strides), list(want.block_shape), want.layout)
    # a plan over these values: other addresses get their descriptors, the first ones the
    # remembered values themselves
    # (one more value at the end stands for the seed a plan sets per call)
    vals = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in args) + (None,)
    ptrs = tuple(vals[at].base.data_ptr() for at, _, _ in sorted(slots, key=lambda t: t[1]))
    ck = _RecordingKernel()
    plan = flu._Plan(ck, (1, 1, 1), vals, len(vals) - 1, [], False, slots, ptrs)
    plan.run([], 0, dy2, x2)
    plan.run([], 0, dy, x)
    moved, same = (c[:-1] for c in ck.calls)
    vals = vals[:-1]
    assert moved[0].base.data_ptr() == dy2.data_ptr() and moved[1].base.data_ptr() == x2.data_ptr()
    assert same[0] is vals[0] and same[1] is vals[1]
    assert moved[2:] == same[2:] == vals[2:]


def test_plan_passes_each_calls_scalar_pointers():
    """Scalars read by pointer (GPU tensors: under torch.compile the optimizer is capturable and
    its bias corrections are a step's temporaries, at other addresses from step to step) are
    keyed by address mod 16 only, and a plan passes each call's addresses at their slots and
    the values of the scalars passed by value. Built on CPU tensors (no launch)."""
    prog = rules.adamw_program()
    cfg = flu._GPU_CONFIGS[0]
    dy, x, p = torch.zeros(4, 8), torch.zeros(4, 6), torch.zeros(8, 6)
    s = [torch.zeros_like(p), torch.zeros_like(p)]
    sc = [torch.tensor(float(v)) for v in rules.adamw_scalars(1e-3, step=1)]
    for pointers in (True, False):
        k, _, args, kwargs = flu._launch_args(dy, x, p, s, sc, prog, cfg, "ieee", 0,
                                              scalar_pointers=pointers)
        names = list(k.arg_names)
        by_value, by_pointer = flu._scalar_slots(names, kwargs, len(sc))
        at = [names.index(f"sc{i}") for i in range(len(sc))]
        assert (by_pointer, by_value)[not pointers] == tuple(zip(at, range(len(sc))))
        assert not (by_value, by_pointer)[not pointers]
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        vals = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in vals)
        ck = _RecordingKernel()
        plan = flu._Plan(ck, (1, 1, 1), vals, names.index("seed"), by_value, False,
                         flu._operand_slots(dy, x, args, cfg), (dy.data_ptr(), x.data_ptr()),
                         by_pointer)
        sc2 = [t * 2 for t in sc]
        plan.run(sc2, 0, dy, x)
        plan.run(sc, 0, dy, x)
        moved, same = ck.calls
        if pointers:
            assert [moved[a] for a in at] == [t.data_ptr() for t in sc2]
            assert [same[a] for a in at] == [t.data_ptr() for t in sc]
        else:
            assert [moved[a] for a in at] == [float(t) for t in sc2]
            assert [same[a] for a in at] == [float(t) for t in sc]
        assert all(moved[a] != same[a] for a in at)
        assert [v for i, v in enumerate(moved) if i not in at] == \
            [v for i, v in enumerate(same) if i not in at]


def test_plan_triton_slots_take_each_calls_pointers():
    """The Triton kernel's launch: a plan passes each call's dY and X addresses at their slots."""
    prog = rules.adamw_program()
    cfg = flu._GPU_CONFIGS[0]
    dy, x, p = torch.zeros(4, 8), torch.zeros(4, 6), torch.zeros(8, 6)
    s = [torch.zeros_like(p), torch.zeros_like(p)]
    _, _, args, _ = flu._launch_args(dy, x, p, s, rules.adamw_scalars(1e-3, step=1), prog, cfg,
                                     "ieee", 0)
    slots = flu._operand_slots(dy, x, args, cfg)
    vals = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in args) + (None,)
    ck = _RecordingKernel()
    plan = flu._Plan(ck, (1, 1, 1), vals, len(vals) - 1, [], False, slots,
                     (dy.data_ptr(), x.data_ptr()))
    dy2, x2 = torch.zeros(4, 8), torch.zeros(4, 6)
    plan.run([], 0, dy2, x2)
    moved, vals = ck.calls[0][:-1], vals[:-1]
    assert moved[:2] == (dy2.data_ptr(), x2.data_ptr()) and moved[2:] == vals[2:]


def _split_cfg(rows: int, K: int):
    """The split-GEMM config with a block cap of ``rows`` rows of fp32 gradient (a multiple of
    its BLOCK_N): several blocks on a small weight."""
    cfg = flu._GPU_SPLIT_CONFIGS[0]
    return dataclasses.replace(cfg, SPLIT_GEMM_MB=rows * 4 * K / 2 ** 20)


def test_split_plan_runs_each_block_with_its_gradient():
    """A split-GEMM plan: per row block of W, cuBLAS's gradient of that block, then the block's
    epilogue launch with this call's dY rows, X and gradient at their slots, the block's seed,
    and the block's W and state as remembered. Built on CPU tensors (recorded, no launch)."""
    prog = rules.adamw_program()
    T, N, K = 4, 96, 8
    cfg = _split_cfg(32, K)
    rows = flu._split_rows(cfg, N, K)
    assert rows == 32
    dy, x, p = torch.zeros(T, N), torch.zeros(T, K), torch.zeros(N, K)
    s = [torch.zeros_like(p), torch.zeros_like(p)]
    sc = rules.adamw_scalars(1e-3, step=1)
    ck = _RecordingKernel()
    blocks = []
    for i, n0 in enumerate(range(0, N, rows)):
        dyb, g = dy[:, n0:n0 + rows], torch.zeros(rows, K)
        k, _, args, kwargs = flu._launch_args(dyb, x, p[n0:n0 + rows], [t[n0:n0 + rows] for t in s],
                                              sc, prog, cfg, "ieee", flu._block_seed(0, i), None, g)
        slots = flu._operand_slots(dyb, x, args, cfg, g)
        assert sorted((at, which) for at, which, _ in slots) == [(0, 0), (1, 1), (2, 2)]
        names = list(k.arg_names)
        vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
        vals = tuple(v.data_ptr() if isinstance(v, torch.Tensor) else v for v in vals)
        blocks.append((n0, n0 + rows, flu._Plan(ck, (1, 1, 1), vals, names.index("seed"), (),
                                                False, slots, (dyb.data_ptr(), x.data_ptr(),
                                                               g.data_ptr()))))
    plan = flu._SplitPlan(tuple(blocks), False)
    dy2, x2 = torch.zeros(T, N), torch.zeros(T, K)
    hits0 = flu.PLAN_STATS["hits"]
    plan.run(sc, 7, dy2, x2)
    assert flu.PLAN_STATS["hits"] - hits0 == 1      # one call, however many blocks
    assert len(ck.calls) == 3
    seed_at = list(flu._kernel(prog).arg_names).index("seed")
    for i, (n0, n1, block) in enumerate(blocks):
        c = ck.calls[i]
        assert c[0] == dy2[:, n0:n1].data_ptr() and c[1] == x2.data_ptr()
        assert c[3] == p[n0:n1].data_ptr() and c[4] == s[0][n0:n1].data_ptr()
        assert c[seed_at] == flu._block_seed(7, i)
        assert c[2] not in (p.data_ptr(), dy2.data_ptr(), x2.data_ptr())    # a gradient block
        assert [v for j, v in enumerate(c) if j not in (0, 1, 2, seed_at)] == \
            [v for j, v in enumerate(block.vals) if j not in (0, 1, 2, seed_at)]



def test_split_block_plan_needs_a_gradient_slot():
    """A split-GEMM block's plan is made only where its launch's gradient argument was found:
    without that slot a repeated call would pass the first call's gradient block, long freed."""
    prog = rules.adamw_program()
    cfg = _split_cfg(32, 8)
    dy, x, p = torch.zeros(4, 32), torch.zeros(4, 8), torch.zeros(32, 8)
    s = [torch.zeros_like(p), torch.zeros_like(p)]
    sc = rules.adamw_scalars(1e-3, step=1)
    g = torch.zeros(32, 8)
    k, grid, args, kwargs = flu._launch_args(dy, x, p, s, sc, prog, cfg, "ieee", 0, None, g)
    assert {w for _, w, _ in flu._operand_slots(dy, x, args, cfg, g)} == {0, 1, 2}
    # the launch's slots found without the gradient (none is asked for): no block plan. (A
    # plan that is made needs the launch cache's binding, a GPU driver: the GPU plan tests.)
    assert flu._new_plan(k, _RecordingKernel(), grid, args, kwargs, sc, False,
                         flu._operand_slots(dy, x, args, cfg), kinds=3) is None
