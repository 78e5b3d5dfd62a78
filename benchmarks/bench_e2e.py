"""End-to-end benchmark: a 953M Llama (Hugging Face LlamaForCausalLM) trained with AdamW, forge
against what users run instead (/work/shared/bench/ANCHORS.md, workload A).

Model: ``LlamaForCausalLM(LlamaConfig(...))``, no download: hidden 2048, 16 layers, 16 heads,
ffn 5632, vocab 32000, sdpa attention, untied lm_head; fp32 weights, AdamW(lr=1e-4); random token
ids, labels = inputs. ``--amp bf16``: every method's forward runs under
``torch.autocast("cuda", torch.bfloat16)`` (fp32 master weights and AdamW state, bf16 GEMMs: the
usual mixed-precision recipe, and the one whose weight-gradient GEMMs take bf16 operands, i.e.
forge's tensor-core kernels). ``--amp bf16w``: a pure-bf16 model instead (weights, gradients and
AdamW state in bf16, no autocast; forge rounds the weights stochastically). Configs (batch x seq): 1x512; 4x1024 and 8x2048 with HF gradient
checkpointing (``use_reentrant=False``, which Dynamo can trace). Methods:
  eager_foreach     AdamW(foreach=True)
  eager_fused       AdamW(fused=True)
  opt_in_backward   one fused AdamW per parameter, stepped in a post-accumulate-grad hook that
                    then drops the gradient (the PyTorch "optimizer in backward" recipe)
  compile_inductor  torch.compile(model) + a torch.compile'd opt.step() (default AdamW)
  forge             torch.compile(train_step, backend="forge") (default AdamW: foreach on CUDA)
  compile_reduce_overhead, forge_reduce_overhead
                    the same two with mode="reduce-overhead": Inductor replays each compiled
                    graph from a CUDA graph (torch.compiler.cudagraph_mark_step_begin() per step;
                    forge reads the fused updates' per-step scalars on the GPU there)
  floor             frozen weights (no weight gradient, no step), the embedding output requires
                    grad so backward still runs through every layer; AdamW's m and v are kept
                    resident as zeros, so the floor holds the same bytes as every other method
Each (config, method) runs in its OWN process (``--one``): 2 warm-up steps, then 6 timed steps;
peak = torch.cuda.max_memory_allocated over the timed steps (reset after warm-up; *_reduce_overhead
rows: plus the bytes reserved, less those allocated, in the CUDA graphs' private pools, where a
replay's intermediates live unseen by that counter), step = median wall time with
torch.cuda.synchronize(). A failing method (OOM, compile error, timeout) becomes a
row with an "error" field. One JSON object per row is appended to benchmarks/results/e2e.jsonl.

    python benchmarks/bench_e2e.py                        # every config x method (driver)
    python benchmarks/bench_e2e.py --configs 1x512 --methods forge,eager_fused
    python benchmarks/bench_e2e.py --correctness [--layers 4]   # forge vs eager, 50 steps
    python benchmarks/bench_e2e.py --render               # docs/e2e.md + docs/e2e.png
    python benchmarks/bench_e2e.py --amp bf16 ...         # the same under bf16 autocast
    python benchmarks/bench_e2e.py --tiny --device cpu    # smoke test of the logic on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "e2e.jsonl"
CORRECTNESS_OUT = RESULTS / "e2e_correctness.json"
AMPS = ("none", "bf16", "bf16w")      # fp32; bf16 autocast; bf16 weights and state
DOCS = ROOT / "docs"

# the driver's default: every method
METHODS = ["eager_foreach", "eager_fused", "opt_in_backward", "compile_inductor", "forge",
           "floor", "compile_reduce_overhead", "forge_reduce_overhead"]
# (batch, seq, gradient checkpointing)
CONFIGS = [(1, 512, False), (4, 1024, True), (8, 2048, True)]
TINY_CONFIGS = [(1, 32, False), (2, 64, True), (4, 64, True)]
# --warmup / --timed change them (a row records its own); forge's launch plans are keyed by the
# activations' addresses, which the allocator may still move after 2 steps (docs/README.md,
# "Under bf16 autocast": timed steps of 60-61 then 41-44 ms at 1x512)
WARMUP, TIMED = 2, 6
LR = 1e-4
# Compiling a 16-layer model (Dynamo + Inductor, fwd + bwd (+ optimizer)) dominates the run;
# these methods get the longer per-process limit and run after the cheap ones.
COMPILED = ("forge", "compile_inductor", "forge_reduce_overhead", "compile_reduce_overhead")


def config_name(batch: int, seq: int, ckpt: bool) -> str:
    return f"{batch}x{seq}" + ("+ckpt" if ckpt else "")


def parse_config(s: str, shorthand: bool = False):
    """'4x1024+ckpt' -> (4, 1024, True). With shorthand (the driver's --configs), a bare '4x1024'
    takes the checkpointing of the listed config of that shape."""
    ckpt = s.endswith("+ckpt")
    b, t = s.removesuffix("+ckpt").split("x")
    b, t = int(b), int(t)
    known = {(c[0], c[1]): c[2] for c in CONFIGS + TINY_CONFIGS} if shorthand else {}
    return b, t, ckpt or known.get((b, t), False)


# --- model and steps (run inside the --one / --correctness process) -----------------------------

def llama_config(tiny: bool, layers=None):
    from transformers import LlamaConfig
    if tiny:
        kw = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512)
    else:
        kw = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, max_position_embeddings=4096, tie_word_embeddings=False,
                      use_cache=False, attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    return cfg


def model_name(cfg, amp: str = "none") -> str:
    return (f"LlamaForCausalLM h{cfg.hidden_size} L{cfg.num_hidden_layers} "
            f"heads{cfg.num_attention_heads} ffn{cfg.intermediate_size} V{cfg.vocab_size} sdpa "
            + ("bf16 weights and state" if amp == "bf16w" else "fp32")
            + (" + bf16 autocast" if amp == "bf16" else ""))


def amp_suffix(amp: str) -> str:
    """File-name suffix of a precision's outputs: '' for fp32, '_bf16' under bf16 autocast,
    '_bf16w' for bf16 weights."""
    return "" if amp == "none" else f"_{amp}"


def forward_context(amp: str, device_type: str):
    """The context every method's forward runs in: bf16 autocast, or nothing."""
    import torch
    if amp == "bf16":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def add_model_args(p, layers: int, amp: str) -> None:
    """The triage scripts' options for this benchmark's Llama (scripts/diag_*.py); ``layers``
    and ``amp`` their defaults. ``model_setup`` reads them."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--config", default="1x512", help="BxS[+ckpt]")
    p.add_argument("--amp", default=amp, choices=AMPS)
    p.add_argument("--tiny", action="store_true", help="the 2-layer h64 model (smoke test)")
    p.add_argument("--device", default="cuda")


def line_writer(out_dir, name: str, header: str):
    """say(line) for the triage scripts: prints the line and, with ``out_dir``, rewrites
    ``out_dir/name`` with every line so far (a run cut short keeps what it measured); says
    ``header`` first."""
    lines, path = [], None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, name)

    def say(s=""):
        print(s, flush=True)
        lines.append(s)
        if path:
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
    say(header)
    return say


def warm_and_time(step, warm_batches, timed_batches, device):
    """Run ``step`` on the warm-up batches, reset the peak memory, then time each timed batch
    (synchronised). -> (warm-up s, [step s], [step outputs], peak GiB over the timed steps;
    nan off CUDA)."""
    import torch
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for ids in warm_batches:
        step(ids)
    sync()
    warm = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, outs = [], []
    for ids in timed_batches:
        sync()
        t = time.perf_counter()
        outs.append(step(ids))
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return warm, times, outs, peak


def model_setup(a):
    """(cfg, batch, seq, device, build) of ``add_model_args``' options: ``build()`` makes a fresh
    model in the config's checkpointing and ``--amp``'s dtype."""
    import torch
    batch, seq, ckpt = parse_config(a.config)
    cfg = llama_config(a.tiny, a.layers)
    dev = torch.device(a.device)
    return cfg, batch, seq, dev, lambda: build_model(cfg, dev, ckpt, amp=a.amp)


def build_model(cfg, device, ckpt: bool, seed: int = 0, amp: str = "none"):
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    dtype = torch.bfloat16 if amp == "bf16w" else torch.float32
    model = model.to(device=device, dtype=dtype).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_batches(cfg, batch, seq, n, device, seed=1):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n)]


def plain_step(model, opt, fwd=contextlib.nullcontext):
    def train_step(ids):
        with fwd():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step


def make_method(method: str, model, inner: str, fwd=contextlib.nullcontext):
    """-> (step function, objects to keep alive); ``fwd``: the forward's context (autocast)."""
    import torch
    params = [p for p in model.parameters()]
    if method == "eager_foreach":
        opt = torch.optim.AdamW(params, lr=LR, foreach=True)
        return plain_step(model, opt, fwd), opt
    if method == "eager_fused":
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
        return plain_step(model, opt, fwd), opt
    if method == "opt_in_backward":
        opts = {p: torch.optim.AdamW([p], lr=LR, fused=True) for p in params}

        def hook(p):
            opts[p].step()
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

        def step(ids):
            with fwd():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()
        return step, (opts, handles)
    # mode="reduce-overhead": CUDA graphs; a new step tells Inductor's graph trees that the
    # previous step's outputs are dead (its loss has been read by then)
    mode = "reduce-overhead" if method.endswith("_reduce_overhead") else None
    mark_step = torch.compiler.cudagraph_mark_step_begin if mode else (lambda: None)
    if method in ("compile_inductor", "compile_reduce_overhead"):
        opt = torch.optim.AdamW(params, lr=LR)
        cmodel = torch.compile(model, mode=mode)

        @torch.compile(mode=mode)
        def opt_step():
            opt.step()

        def step(ids):
            mark_step()
            with fwd():
                loss = cmodel(input_ids=ids, labels=ids).loss
            loss.backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step, (opt, cmodel)
    if method in ("forge", "forge_reduce_overhead"):
        opt = torch.optim.AdamW(params, lr=LR)
        options = {} if inner == "inductor" else {"inner": inner}
        compiled = torch.compile(plain_step(model, opt, fwd), backend="forge", mode=mode,
                                 options=options or None)

        def step(ids):
            mark_step()
            return compiled(ids)
        return step, (opt, compiled)
    if method == "floor":
        # m and v of AdamW stay resident (zeros): the floor differs from the others only by the
        # weight gradients and the update it never makes
        states = [torch.zeros_like(p) for p in params for _ in range(2)]
        for p in params:
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True))

        def step(ids):
            with fwd():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()
        return step, (states, handle)
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def graph_pool_bytes() -> tuple:
    """(reserved, allocated) bytes of the CUDA caching allocator's private pools (the CUDA
    graphs'): every segment outside the default pool (0, 0)."""
    import torch
    segs = [s for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) != (0, 0)]
    return sum(s["total_size"] for s in segs), sum(s["allocated_size"] for s in segs)


def versions() -> dict:
    import torch
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:       # noqa: BLE001 - a missing optional package is just reported
            out[mod] = None
    return out


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def run_one(args) -> dict:
    """One (config, method) in this process -> a row (with "error" on failure)."""
    import torch
    device = torch.device(args.device)
    batch, seq, ckpt = parse_config(args.config)
    cfg = llama_config(args.tiny, args.layers)
    row = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gpu=device_name(device), **versions(), model=model_name(cfg, args.amp), amp=args.amp,
               batch=batch, seq=seq, ckpt=ckpt, method=args.one, warmup=args.warmup, timed=args.timed, tiny=args.tiny)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        model = build_model(cfg, device, ckpt, amp=args.amp)
        n_params = sum(p.numel() for p in model.parameters())
        elt = next(model.parameters()).element_size()      # weights, m and v
        row.update(params=n_params, resident_GB=round(3 * elt * n_params / 2**30, 3))
        step, keep = make_method(args.one, model, args.inner, forward_context(args.amp, device.type))
        data = make_batches(cfg, batch, seq, args.warmup + args.timed, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        losses = []
        for i in range(args.warmup):
            losses.append(float(step(data[i])))
        sync()
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(args.warmup, args.warmup + args.timed):
            sync()
            t = time.perf_counter()
            loss = step(data[i])
            sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
        row["step_ms"] = round(1e3 * statistics.median(times), 2)
        row["step_ms_all"] = [round(1e3 * t, 2) for t in times]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            if args.one.endswith("_reduce_overhead"):
                # A CUDA-graph replay allocates nothing: its intermediates sit in the graphs'
                # private pool, reserved at recording (a warm-up step), so the timed steps'
                # max_memory_allocated is about the resident bytes alone (10.65 GiB for the 953M
                # model, 2026-11-24 19:31 UTC). Count the pools' reserved bytes instead of what
                # is allocated in them.
                reserved, allocated = graph_pool_bytes()
                row["graph_pool_GB"] = round(reserved / 2**30, 3)
                peak += reserved - allocated
            row["peak_GB"] = round(peak / 2**30, 3)
        else:
            row["peak_GB"] = None
            row["cpu_peak_rss_GB"] = round(rss_gib(), 3)
        row["losses"] = [round(x, 5) for x in losses]
        del keep
    except BaseException as e:  # noqa: BLE001 - OOM, compile errors: the row records it
        if isinstance(e, KeyboardInterrupt):
            raise
        # the whole message on one line: Dynamo's first line alone ("backend='forge' raised:")
        # says nothing
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        row["traceback"] = traceback.format_exc()[-3000:]
        if device.type == "cuda":
            row["peak_GB_at_error"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row


# --- driver: one subprocess per row --------------------------------------------------------------

def append_row(path: pathlib.Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def drive(args) -> int:
    configs = ([parse_config(c, shorthand=True) for c in args.configs.split(",")] if args.configs
               else (TINY_CONFIGS if args.tiny else CONFIGS))
    methods = args.methods.split(",") if args.methods else METHODS
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; one of {', '.join(METHODS)}")
    # cheap methods for every config first, then the compiled ones method by method (forge
    # first): a run cut short by the time budget still has every eager baseline and forge
    order = [(c, m) for c in configs for m in methods if m not in COMPILED]
    order += [(c, m) for m in sorted((m for m in methods if m in COMPILED), key=COMPILED.index)
              for c in configs]
    out = pathlib.Path(args.out)
    t_start = time.perf_counter()
    failures = 0
    print(f"bench_e2e: {len(order)} rows -> {out}" + (f" (autocast {args.amp})" if args.amp != "none" else ""),
          flush=True)
    for (b, s, ck), m in order:
        name = config_name(b, s, ck)
        elapsed = time.perf_counter() - t_start
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one", m, "--batch", str(b),
               "--seq", str(s), *(["--ckpt"] if ck else []), "--device", args.device,
               "--inner", args.inner, "--amp", args.amp, "--warmup", str(args.warmup),
               "--timed", str(args.timed)]
        if args.tiny:
            cmd.append("--tiny")
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        if args.budget_s and elapsed > args.budget_s:
            row = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       batch=b, seq=s, ckpt=ck, method=m, tiny=args.tiny, amp=args.amp,
                       error=f"skipped: the driver's --budget-s {args.budget_s} s was spent")
            print(f"  {name:14s} {m:17s} SKIPPED (budget)", flush=True)
            append_row(out, row)
            failures += 1
            continue
        timeout = args.timeout_compiled if m in COMPILED else args.timeout
        if args.budget_s:       # a child never runs more than 30 s past the budget
            timeout = int(min(timeout, max(60, args.budget_s - elapsed + 30)))
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                row = json.loads(lines[-1][len("RESULT "):])
            else:
                row = dict(batch=b, seq=s, ckpt=ck, method=m, tiny=args.tiny, amp=args.amp,
                           error=f"process exited {p.returncode} without a result: "
                                 f"{(p.stderr.strip().splitlines() or [''])[-1][:300]}",
                           traceback=p.stderr[-3000:])
        except subprocess.TimeoutExpired:
            row = dict(batch=b, seq=s, ckpt=ck, method=m, tiny=args.tiny, amp=args.amp,
                       error=f"timeout: no result after {timeout} s")
        wall = time.perf_counter() - t
        row["process_s"] = round(wall, 1)
        row.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        row["command"] = " ".join(shlex.quote(c) for c in ["python", "benchmarks/bench_e2e.py"] + cmd[2:])
        append_row(out, row)
        if "error" in row:
            failures += 1
            what = f"ERROR {row['error'][:160]}"
        else:
            peak = f"{row['peak_GB']:.2f} GB" if row.get("peak_GB") is not None else "peak n/a (cpu)"
            what = f"{peak}, {row['step_ms']:.1f} ms/step, warm-up {row['warmup_s']:.1f} s"
        print(f"  {name:14s} {m:17s} {what}  [process {wall:.0f} s, total "
              f"{time.perf_counter() - t_start:.0f} s]", flush=True)
    print(f"bench_e2e: done in {time.perf_counter() - t_start:.0f} s, {failures} failed/skipped row(s)")
    return 0


# --- correctness: forge vs eager AdamW, same seed, same batches ----------------------------------

def correctness(args) -> int:
    import torch
    import forge_compile
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    batch, seq, _ = parse_config(args.config)
    cfg = llama_config(args.tiny, args.layers)
    ref = build_model(cfg, device, ckpt=False)
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    fwd = forward_context(args.amp, device.type)
    ref_step = plain_step(ref, ref_opt, fwd)
    options = {} if args.inner == "inductor" else {"inner": args.inner}
    step = forge_compile.compile(plain_step(model, opt, fwd), **options)
    data = make_batches(cfg, batch, seq, args.steps, device)
    t0 = time.perf_counter()
    report = forge_compile.explain(step, data[0])          # forge's first real step
    explain_s = time.perf_counter() - t0
    print(report, flush=True)
    forge_losses = [float(report.result)]
    for ids in data[1:]:
        forge_losses.append(float(step(ids)))
    ref_losses = [float(ref_step(ids)) for ids in data]
    loss_rel = [abs(a - b) / abs(b) for a, b in zip(forge_losses, ref_losses)]
    names = [n for n, _ in model.named_parameters()]
    param_rel = {}
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        a, b = p.detach().double(), q.detach().double()
        param_rel[n] = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    worst = max(param_rel, key=param_rel.get)
    fused = report.fused
    linear_weights = [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gpu=device_name(device), **versions(), model=model_name(cfg, args.amp), amp=args.amp,
               batch=batch, seq=seq, steps=args.steps, lr=args.lr, inner=args.inner, optimizer="AdamW (default impl)",
               loss_forge=forge_losses, loss_eager=ref_losses,
               loss_max_rel_diff=max(loss_rel), loss_final_rel_diff=loss_rel[-1],
               param_rel_err_max=param_rel[worst], param_rel_err_worst=worst,
               param_rel_err_median=statistics.median(param_rel.values()),
               param_rel_err=param_rel,
               graph_count=report.graph_count, graph_breaks=report.graph_breaks,
               recompiles=report.recompiles, explain_first_step_s=round(explain_s, 1),
               fused={n: dict(shape=list(f.shape), gradient_bytes=f.gradient_bytes)
                      for n, f in fused.items()},
               unfused=report.unfused, gradient_bytes_eliminated=report.gradient_bytes_eliminated,
               linear_weights_not_fused=[n for n in linear_weights if n not in fused],
               lm_head_fused="lm_head.weight" in fused, explain=str(report))
    path = pathlib.Path(args.out if args.out != str(DEFAULT_OUT) else
                        CORRECTNESS_OUT.with_stem(CORRECTNESS_OUT.stem + amp_suffix(args.amp)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"correctness: {args.steps} steps, lr {args.lr}, {model_name(cfg, args.amp)}, {batch}x{seq}")
    print(f"  loss trajectory max relative diff {out['loss_max_rel_diff']:.3e} "
          f"(final {out['loss_final_rel_diff']:.3e}); final loss forge {forge_losses[-1]:.6f} "
          f"eager {ref_losses[-1]:.6f}")
    print(f"  parameters: max norm-wise relative error {param_rel[worst]:.3e} ({worst}), "
          f"median {out['param_rel_err_median']:.3e}")
    print(f"  fused {len(fused)}/{len(names)} parameters (lm_head fused: {out['lm_head_fused']}), "
          f"Linear weights not fused: {len(out['linear_weights_not_fused'])}, gradient bytes "
          f"eliminated {report.gradient_bytes_eliminated:,} B ({report.gradient_bytes_eliminated / 2**30:.3f} GiB)")
    print(f"-> {path}")
    return 0


# --- render: docs/e2e.md + docs/e2e.png ----------------------------------------------------------

def latest_rows(path: pathlib.Path, tiny: bool, amp: str = "none"):
    rows = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        # rows written before --amp existed have no "amp": they are fp32
        if bool(r.get("tiny")) != tiny or r.get("amp", "none") != amp:
            continue
        key = (r.get("gpu"), r["batch"], r["seq"], r["ckpt"], r["method"])
        if "error" in r and r["error"].startswith("skipped") and key in rows:
            continue            # a skipped row never hides a measured one
        rows[key] = r           # the file is in time order: the last row wins
    return list(rows.values())


def render(args) -> int:
    path = pathlib.Path(args.out)
    rows = latest_rows(path, args.tiny, args.amp)
    if not rows:
        sys.exit(f"no rows in {path}" + (f" with --amp {args.amp}" if args.amp != "none" else ""))
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    gpu = gpus[-1] if gpus else None
    if len(gpus) > 1:
        print(f"several devices in {path}: {gpus}; rendering {gpu!r}")
    rows = [r for r in rows if r.get("gpu") in (gpu, None)]
    meta = next((r for r in rows if "torch" in r), {})
    configs = sorted({(r["batch"], r["seq"], r["ckpt"]) for r in rows}, key=lambda c: (c[0] * c[1], c[2]))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    # by date: a driver's timeout row (no "gpu" key) must not hide a later measurement
    cell = {(r["batch"], r["seq"], r["ckpt"], r["method"]): r
            for r in sorted(rows, key=lambda r: r.get("date", ""))}

    def fmt(r, key):
        if r is None:
            return "–"
        if "error" in r:
            return "skipped" if r["error"].startswith("skipped") else "error (below)"
        v = r.get(key)
        if v is None:
            return "–"
        return f"{v:.2f}" if key == "peak_GB" else f"{v:.1f}"

    dates = sorted(r["date"] for r in rows if r.get("date"))
    graph_rows = any(m.endswith("_reduce_overhead") for m in methods)    # peaks include pools
    # the protocol of the rows shown (one value each unless --warmup / --timed varied)
    warm, timed = ("/".join(str(v) for v in sorted({r.get(k, d) for r in cell.values() if "error" not in r}))
                   for k, d in (("warmup", WARMUP), ("timed", TIMED)))
    title = "# End-to-end: 953M Llama, AdamW, forge vs the usual alternatives"
    if args.amp != "none":
        title += " (bf16 weights and AdamW state)" if args.amp == "bf16w" else f" ({args.amp} autocast)"
    lines = [title, "",
             f"Generated by `python benchmarks/bench_e2e.py --render{'' if args.amp == 'none' else ' --amp ' + args.amp}` from `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`.",
             "Measured with `python benchmarks/bench_e2e.py` (each row its own process; "
             "`scripts/gpu_e2e.sh` on the device).", "",
             f"- device: {gpu}",
             f"- torch {meta.get('torch')}, triton {meta.get('triton')}, transformers "
             f"{meta.get('transformers')}, Python {meta.get('python')}",
             f"- dates (UTC): {dates[0]} to {dates[-1]}" if dates else "- dates: ?",
             f"- model: {meta.get('model')}; {meta.get('params', 0):,} parameters; resident "
             f"weights + AdamW m, v = {meta.get('resident_GB', float('nan')):.2f} GiB",
             f"- per row: {warm} warm-up steps, then {timed} timed steps; peak = "
             "torch.cuda.max_memory_allocated over the timed steps (GiB, 2^30 B)"
             + ("; `*_reduce_overhead`: plus the bytes the CUDA graphs' private pools reserve "
                "beyond what is allocated in them (a replay's intermediates, which that counter "
                "does not see)" if graph_rows else "")
             + "; step = median wall time with torch.cuda.synchronize()",
             "- `+ckpt`: HF `model.gradient_checkpointing_enable(use_reentrant=False)`; floor: frozen "
             "weights, backward to the embedding output, no step (m, v kept resident)", "",
             "| method | " + " | ".join(f"{config_name(*c)} peak GB | {config_name(*c)} step ms"
                                        for c in configs) + " |",
             "|---|" + "---|---|" * len(configs)]
    for m in methods:
        cells = []
        for c in configs:
            r = cell.get((*c, m))
            cells += [fmt(r, "peak_GB"), fmt(r, "step_ms")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    errors = [r for r in cell.values() if "error" in r]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {config_name(r['batch'], r['seq'], r['ckpt'])} {r['method']}: "
                  f"{r['error'][:400]}" for r in errors]
    lines += ["", f"![peak memory and step time per method]({pathlib.Path(args.png).name})", ""]
    md = pathlib.Path(args.md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    print(f"wrote {md}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(methods))
    peak_label = "peak GiB (max_memory_allocated" + (
        "; *_reduce_overhead + graph pools)" if graph_rows else ")")
    for ax, key, label in ((axes[0], "peak_GB", peak_label),
                           (axes[1], "step_ms", "step ms (median)")):
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, c in enumerate(configs):
                r = cell.get((*c, m))
                x = i + (j - (len(methods) - 1) / 2) * width
                if r is not None and "error" not in r and r.get(key) is not None:
                    xs.append(x)
                    ys.append(r[key])
                elif r is not None and "error" in r:
                    ax.text(x, 0, " error" if not r["error"].startswith("skipped") else " skipped",
                            rotation=90, ha="center", va="bottom", fontsize=6, color="crimson")
            bars = ax.bar(xs, ys, width, label=m, color=f"C{METHODS.index(m)}")
            ax.bar_label(bars, fmt="%.1f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(configs)), [config_name(*c) for c in configs])
        ax.set_ylabel(label)
        ax.margins(y=0.15)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{meta.get('model', '')} AdamW on {gpu} (torch {meta.get('torch')})", fontsize=10)
    fig.tight_layout()
    png = pathlib.Path(args.png)
    fig.savefig(png, dpi=130)
    print(f"wrote {png}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--one", choices=METHODS, help="run one method in this process, print RESULT")
    p.add_argument("--config", default="1x512", help="with --one/--correctness: BxS[+ckpt]")
    p.add_argument("--batch", type=int, help="with --one: batch (alternative to --config)")
    p.add_argument("--seq", type=int, help="with --one: sequence length")
    p.add_argument("--ckpt", action="store_true", help="with --one: gradient checkpointing")
    p.add_argument("--configs", help="driver: comma-separated BxS[+ckpt], e.g. 1x512,4x1024+ckpt")
    p.add_argument("--methods", help=f"driver: comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer h64 model: CPU smoke test")
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                   help="forge's inner compiler (aot_eager: quick CPU smoke runs)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="jsonl to append to / render from")
    p.add_argument("--timeout", type=int, default=240, help="per-process limit, eager methods (s)")
    p.add_argument("--timeout-compiled", type=int, default=420,
                   help="per-process limit, compile_inductor and forge (s)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="driver: skip (and record) rows once this many seconds are spent (0: none)")
    p.add_argument("--correctness", action="store_true", help="forge vs eager AdamW trajectories")
    p.add_argument("--steps", type=int, default=50, help="--correctness steps")
    p.add_argument("--lr", type=float, default=1e-5, help="--correctness learning rate")
    p.add_argument("--render", action="store_true", help="write docs/e2e.md and docs/e2e.png")
    p.add_argument("--warmup", type=int, default=WARMUP, help="steps before the timed ones")
    p.add_argument("--timed", type=int, default=TIMED, help="timed steps (the row's median)")
    p.add_argument("--amp", default="none", choices=AMPS,
                   help="bf16: every method's forward under torch.autocast(bfloat16); bf16w: "
                        "bf16 weights and AdamW state; --render: the table of those rows "
                        "(docs/e2e_bf16.md, docs/e2e_bf16w.md, .png)")
    p.add_argument("--md", help="--render's table (default docs/e2e.md, docs/e2e_bf16.md with --amp bf16)")
    p.add_argument("--png", help="--render's chart (default docs/e2e.png, docs/e2e_bf16.png)")
    args = p.parse_args(argv)
    args.md = args.md or str(DOCS / f"e2e{amp_suffix(args.amp)}.md")
    args.png = args.png or str(DOCS / f"e2e{amp_suffix(args.amp)}.png")
    if args.batch is not None or args.seq is not None:
        args.config = f"{args.batch or 1}x{args.seq or 512}" + ("+ckpt" if args.ckpt else "")
    elif args.ckpt and not args.config.endswith("+ckpt"):
        args.config += "+ckpt"
    if args.render:
        return render(args)
    if args.correctness:
        if args.amp == "bf16w":
            p.error("--correctness compares fp32 trajectories; bf16 weights are checked step by "
                    "step in tests/test_fused_linear_update_e2e.py: drop --amp bf16w")
        return correctness(args)
    if args.one:
        row = run_one(args)
        print("RESULT " + json.dumps(row), flush=True)
        if "error" in row:
            print(row.get("traceback", ""), file=sys.stderr)
        return 0 if "error" not in row else 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
