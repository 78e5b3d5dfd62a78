"""What clip_grad_norm_ costs per method: benchmarks/bench_e2e.py's Llama (default 16 layers,
1x512, bf16 autocast), AdamW with ``clip_grad_norm_(max_norm)`` between the backward and the
step. Per method: step time (median of --steps after 2 warm-up steps), peak memory over the timed
steps, the clip's total norm at the last step; for forge, how many weights were fused and how
many of them had their norm computed from dY and X (forge_compile/passes/grad_norm.py).
    python3 scripts/diag_clip.py [--layers 16] [--config 1x512] [--amp bf16] [--max-norm 1.0]
        [--methods forge,compile_inductor,eager_fused] [--out DIR]
Methods: forge = torch.compile(step, backend="forge"); compile_inductor = torch.compile(step)
(stock, the backward in its own graph); eager_fused = AdamW(fused=True) without compiling;
forge_reduce_overhead, compile_reduce_overhead: the first two with mode="reduce-overhead"
(CUDA graphs: the step's GPU time, without the host's launch time).
Writes DIR/diag_clip_CONFIG_AMP.txt when --out is given. --tiny --device cpu: a smoke test.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402


def clipped_step(model, opt, max_norm, fwd):
    # the total norm is returned, not appended to a list: Dynamo guards on a list's length, so
    # an append recompiles the step every step
    def step(ids):
        with fwd():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm
    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_model_args(p, layers=16, amp="bf16")
    p.add_argument("--max-norm", type=float, default=1.0)
    p.add_argument("--methods", default="forge,compile_inductor,eager_fused")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out")
    a = p.parse_args()
    from forge_compile.explain import listen
    cfg, batch, seq, dev, build = B.model_setup(a)
    say = B.line_writer(a.out, f"diag_clip_{a.config.replace('+', '_')}_{a.amp}.txt",
                        f"{B.model_name(cfg, a.amp)}, {a.config}, clip_grad_norm_({a.max_norm}), "
                        f"torch {torch.__version__}, {B.device_name(dev)}")
    for method in a.methods.split(","):
        torch._dynamo.reset()
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=B.LR, fused=method == "eager_fused")
        step = clipped_step(model, opt, a.max_norm, B.forward_context(a.amp, dev.type))
        mode = "reduce-overhead" if method.endswith("_reduce_overhead") else None
        if method in ("forge", "forge_reduce_overhead"):
            step = torch.compile(step, backend="forge", mode=mode)
        elif method in ("compile_inductor", "compile_reduce_overhead"):
            step = torch.compile(step, mode=mode)
        elif method != "eager_fused":
            raise SystemExit(f"unknown method {method!r}")
        if mode:     # a new step tells the CUDA graph trees the last step's outputs are dead
            step = (lambda f: lambda ids: (torch.compiler.cudagraph_mark_step_begin(), f(ids))[1])(step)
        data = B.make_batches(cfg, batch, seq, 2 + a.steps, dev)
        with listen() as reports:        # the compiles happen in the warm-up steps
            warm, times, outs, peak = B.warm_and_time(step, data[:2], data[2:], dev)
        norm = outs[-1][1]
        pool = ""
        if mode and dev.type == "cuda":
            # the CUDA graphs' private pools: what a replay's intermediates hold there is not in
            # max_memory_allocated; count the pools' reserved bytes, as bench_e2e's rows do
            reserved, allocated = B.graph_pool_bytes()
            peak += (reserved - allocated) / 2**30
            pool = f" (with the graph pools' {reserved / 2**30:.2f} GiB reserved)"
        fused = {k: f for r in reports for k, f in r.fused.items()}
        unfused = {k: w for r in reports for k, w in r.unfused.items() if k not in fused}
        say(f"\n== {method}: {1e3 * statistics.median(times):.2f} ms/step (median of {a.steps}; "
            f"all {[round(1e3 * t, 1) for t in times]}), peak {peak:.2f} GiB over the timed "
            f"steps{pool}, warm-up {warm:.0f} s, last total norm {float(norm):.4f}, compiles {len(reports)}")
        if method.startswith("forge"):
            from_ops = sum(f.norm_from_operands for f in fused.values())
            say(f"  fused {len(fused)} weights ({from_ops} with their norm from dY and X); "
                f"not fused {len(unfused)}")
            for name, why in list(unfused.items())[:6]:
                say(f"    {name}: {why[:160]}")
        del step, opt, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
