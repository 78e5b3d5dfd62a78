"""Train a tiny Llama on the shipped text with forge: the README's first command.

    python examples/train_tiny_llama.py                  # CPU (or the GPU when present)
    python examples/train_tiny_llama.py --compare-eager  # also the eager baseline, same seed

The training step is a plain PyTorch step (forward, backward, AdamW step, zero_grad) compiled
with ``forge_compile.compile``; ``forge_compile.explain`` runs its first real step and says which
weights had their gradient GEMM fused with the AdamW update. Prints the loss, time per step and
peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU).
Exits non-zero on any error or a non-finite loss.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_llama import LlamaConfig, TinyLlama, batches, load_corpus  # noqa: E402

import forge_compile  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:      # tqdm comes with the "examples" extra; plain prints without it
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps (explain() does the first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                   help="compiler forge hands the rewritten graph to")
    p.add_argument("--no-fuse", action="store_true", help="capture the step but fuse nothing")
    p.add_argument("--mode", default=None,
                   choices=["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode, passed to Inductor (needs --inner inductor; the CUDA "
                        "graph modes replay the step from CUDA graphs on a GPU)")
    p.add_argument("--compare-eager", action="store_true",
                   help="also train the eager baseline (same seed, same batches) and compare")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the token embedding")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build(args, device):
    """Model and AdamW from the seed: the forge run and the eager run start identical."""
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      ffn_hidden=32 * math.ceil(8 * args.dim / 3 / 32),
                      max_seq_len=max(args.seq, 64), tie_embeddings=args.tie)
    model = TinyLlama(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    return cfg, model, opt


def make_train_step(model, opt):
    def train_step(x, y):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return train_step


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (torch.cuda.max_memory_allocated)"
    # ru_maxrss is in KiB on Linux, bytes on macOS; it is the whole process (compiler included)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return f"{kib / 1024:.1f} MiB (process peak RSS so far, compilation included)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(label, args, device, compiled: bool) -> dict:
    """Run args.steps steps; return losses, timing and peak memory."""
    cfg, model, opt = build(args, device)
    data = load_corpus()
    stream = batches(data, args.batch, args.seq, args.seed)
    step = make_train_step(model, opt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    t0 = time.perf_counter()
    first = None
    if compiled:
        step = forge_compile.compile(step, fuse=not args.no_fuse, inner=args.inner, mode=args.mode)
        x, y = (t.to(device) for t in next(stream))
        report = forge_compile.explain(step, x, y)        # compiles, runs step 1 for real
        sync(device)
        first = time.perf_counter() - t0
        losses.append(float(report.result))
        print(report, flush=True)
    bar = range(len(losses), args.steps)
    if tqdm is not None:
        # disable=None: a bar on a terminal, nothing when piped (the step lines are printed anyway)
        bar = tqdm(bar, desc=label, initial=len(losses), total=args.steps, dynamic_ncols=True,
                   file=sys.stdout, disable=None)
    say = tqdm.write if tqdm is not None else print
    for i in bar:
        x, y = (t.to(device) for t in next(stream))
        t = time.perf_counter()
        loss = step(x, y)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        if tqdm is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            say(f"[{label}] step {i + 1}/{args.steps} loss {losses[-1]:.4f}")
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"[{label}] non-finite loss {losses[-1]} at step {i + 1}")
    if tqdm is not None:
        bar.close()
    n_params = sum(p.numel() for p in model.parameters())
    return dict(label=label, losses=losses, step_ms=1e3 * statistics.median(times) if times else float("nan"),
                first_s=first, total_s=time.perf_counter() - t0, peak=peak_memory(device),
                n_params=n_params, cfg=cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("highest")
    print(f"device {device}, torch {torch.__version__}, forge_compile {forge_compile.__version__}, "
          f"threads {torch.get_num_threads()}")
    runs = []
    if args.compare_eager:
        # eager first: on the CPU the peak RSS is monotonic, so the eager number stays clean
        runs.append(train("eager", args, device, compiled=False))
    runs.append(train("forge", args, device, compiled=True))
    fr = runs[-1]
    cfg = dataclasses.asdict(fr["cfg"])
    print(f"model: {fr['n_params']:,} parameters, {cfg}")
    print(f"batch {args.batch} x seq {args.seq}, {args.steps} steps, AdamW lr {args.lr}, "
          f"inner={args.inner}, fuse={not args.no_fuse}, mode={args.mode or 'default'}")
    for r in runs:
        print(f"final loss ({r['label']}): {r['losses'][-1]:.4f} "
              f"(first {r['losses'][0]:.4f}, mean of last 10 {statistics.fmean(r['losses'][-10:]):.4f})")
        extra = f", compile + first step {r['first_s']:.1f} s" if r["first_s"] is not None else ""
        print(f"time per step ({r['label']}): {r['step_ms']:.1f} ms (median){extra}, "
              f"total {r['total_s']:.1f} s")
        print(f"peak memory ({r['label']}): {r['peak']}")
    if args.compare_eager:
        e, f = runs[0]["losses"][-1], fr["losses"][-1]
        print(f"forge vs eager final loss: relative difference {abs(f - e) / abs(e):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
