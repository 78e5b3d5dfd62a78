"""What is live at the peak of one training step? (CUDA caching-allocator history)

Builds benchmarks/bench_e2e.py's Llama and method, runs 2 warm-up steps, then records the
allocator history over one step and replays it: prints the peak, and the largest blocks live
at that moment with the frame that allocated them (Inductor's generated code: the source line).
    python scripts/mem_peak.py --method forge --config 4x1024+ckpt --layers 4
"""
import argparse
import linecache
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402

KEEP = ("torchinductor", "forge_compile", "transformers", "bench_e2e", "torch/_tensor",
        "torch/autograd", "torch/optim", "torch/nn/functional")


def frame_text(frames):
    for f in frames:
        fn = f.get("filename", "")
        if any(k in fn for k in KEEP) and "mem_peak" not in fn:
            src = linecache.getline(fn, f.get("line", 0)).strip()
            return f"{os.path.basename(fn)}:{f.get('line')} {f.get('name')} | {src[:110]}"
    return "?"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="forge")
    p.add_argument("--config", default="4x1024+ckpt")
    p.add_argument("--layers", type=int)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--inductor", action="append", default=[],
                   help="torch._inductor.config override, e.g. reorder_for_peak_memory=False")
    a = p.parse_args()
    for kv in a.inductor:
        k, v = kv.split("=")
        setattr(torch._inductor.config, k, {"True": True, "False": False}.get(v, v))
    batch, seq, ckpt = B.parse_config(a.config)
    cfg = B.llama_config(False, a.layers)
    model = B.build_model(cfg, "cuda", ckpt)
    step, keep = B.make_method(a.method, model, "inductor")
    data = B.make_batches(cfg, batch, seq, 3, "cuda")
    for i in range(2):
        step(data[i])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(data[2])
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    live, cur, best, best_set, best_i = {}, 0, -1, None, 0
    events = snap["device_traces"][0]
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []), i)
            cur += e["size"]
            if cur > best:
                best, best_set, best_i = cur, dict(live), i
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    print(f"{a.method} {a.config} layers={cfg.num_hidden_layers} {' '.join(a.inductor)}: allocated before the step "
          f"{base / 2**30:.3f} GiB, peak {peak / 2**30:.3f} GiB; replayed step-local peak "
          f"{best / 2**30:.3f} GiB at event {best_i}/{len(events)}: {len(best_set)} blocks")
    at = events[best_i]
    print(f"  peak reached allocating {at['size'] / 2**20:.1f} MiB at {frame_text(at.get('frames', []))}")
    for addr, (size, frames, i) in sorted(best_set.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"  {size / 2**20:9.1f} MiB  ev {i:7d}  {frame_text(frames)}")


if __name__ == "__main__":
    main()
