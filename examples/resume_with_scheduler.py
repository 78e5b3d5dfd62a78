"""Warm-up + cosine LR schedule and a checkpoint resume, with the step compiled by forge.

    python examples/resume_with_scheduler.py

Trains the tiny Llama of train_tiny_llama.py on a fixed sequence of batches:
  1. for --steps steps without stopping, saving model + optimizer + scheduler state_dicts to a
     temporary directory at step --save-at on the way (as a long job checkpoints);
  2. then, as a restarted job would, builds a fresh model / AdamW / LambdaLR (different initial
     weights), loads that checkpoint, compiles the step again and finishes steps
     --save-at+1 .. --steps.
The scheduler is stepped every iteration outside the compiled step, as in any training loop;
forge turns the lr into a tensor so the changing lr does not recompile. The resumed run's final
loss must equal the uninterrupted run's within 1e-5 relative (exit code 1 otherwise).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_llama import batches, load_corpus  # noqa: E402
from train_tiny_llama import build, make_train_step, pick_device  # noqa: E402
import train_tiny_llama  # noqa: E402

import forge_compile  # noqa: E402

RTOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-at", type=int, default=None, help="checkpoint step (default steps // 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps // 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--no-fuse", action="store_true")
    args = p.parse_args(argv)
    model_defaults = train_tiny_llama.parse_args([])      # dim, layers, batch, seq, lr, ...
    for k, v in vars(model_defaults).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    args.save_at = args.steps // 2 if args.save_at is None else args.save_at
    args.warmup = max(1, args.steps // 5) if args.warmup is None else args.warmup
    if not 0 < args.save_at < args.steps:
        p.error(f"--save-at must be between 1 and --steps - 1, got {args.save_at}")
    return args


def warmup_cosine(total: int, warmup: int):
    """LambdaLR factor: linear warm-up to 1, then cosine decay to 0 at `total`."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))
    return factor


def fresh(args, device, seed):
    _, model, opt = build(argparse.Namespace(**{**vars(args), "seed": seed}), device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, args.warmup))
    step = forge_compile.compile(make_train_step(model, opt), fuse=not args.no_fuse, inner=args.inner)
    return model, opt, sched, step


def run(step, sched, data, start, stop, label):
    loss = None
    for i in range(start, stop):
        x, y = data[i]
        loss = float(step(x, y))
        sched.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{label}] non-finite loss {loss} at step {i + 1}")
        if (i + 1) % 10 == 0 or i + 1 == stop:
            print(f"[{label}] step {i + 1}/{len(data)} loss {loss:.6f} "
                  f"lr {float(sched.get_last_lr()[0]):.2e}", flush=True)
    return loss


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("highest")
    print(f"device {device}, torch {torch.__version__}, forge_compile {forge_compile.__version__}; "
          f"{args.steps} steps, warm-up {args.warmup}, checkpoint at step {args.save_at}")
    stream = batches(load_corpus(), args.batch, args.seq, args.seed)
    data = [tuple(t.to(device) for t in next(stream)) for _ in range(args.steps)]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = pathlib.Path(tmp) / "checkpoint.pt"
        t0 = time.perf_counter()
        model, opt, sched, step = fresh(args, device, args.seed)
        run(step, sched, data, 0, args.save_at, "uninterrupted")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "step": args.save_at}, ckpt)
        print(f"saved model + optimizer + scheduler at step {args.save_at} "
              f"({ckpt.stat().st_size / 2**20:.1f} MiB)")
        ref = run(step, sched, data, args.save_at, args.steps, "uninterrupted")
        print(f"uninterrupted run: {time.perf_counter() - t0:.1f} s")
        del model, opt, sched, step

        t0 = time.perf_counter()
        # a different seed: the resumed run owes nothing to the initial weights it was built with
        model, opt, sched, step = fresh(args, device, args.seed + 1)
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        print(f"resumed at step {state['step']} into a fresh model/optimizer/scheduler, "
              f"lr {float(sched.get_last_lr()[0]):.2e}")
        resumed = run(step, sched, data, state["step"], args.steps, "resumed")
        print(f"resumed run: {time.perf_counter() - t0:.1f} s")

    rel = abs(resumed - ref) / abs(ref)
    ok = rel <= RTOL
    print(f"final loss: resumed {resumed:.6f} vs uninterrupted {ref:.6f}, relative difference "
          f"{rel:.2e} -> {'EQUAL' if ok else 'DIFFERENT'} (tolerance {RTOL:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
