"""Which kernel each fused weight of a compiled step runs, and why (benchmarks/bench_e2e.py's
Llama): for every distinct fused call that took the full path (no launch plan yet), the weight's
shape and dtype, T, dY's and X's strides and dtype, whether the warp-specialised kernel applies
(else its reason), and the config the autotuner chose; then, per step, how many calls took the
full path and which kernels the launch plans ran.
    python scripts/diag_fused_calls.py [--layers 2] [--config 1x512] [--amp bf16w] [--out DIR]
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    B.add_model_args(p, layers=2, amp="bf16w")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    from forge_compile.kernels import fused_linear_update as flu
    cfg, batch, seq, dev, build = B.model_setup(a)
    model = build()
    names = {p.data_ptr(): n for n, p in model.named_parameters()}
    calls = collections.OrderedDict()
    full, tiled = flu._triton_checked, flu._fused_linear_update_tiled

    def record(dy, x, param, ws, chosen):
        key = (tuple(param.shape), dy.shape[0], dy.stride(), x.stride(), dy.dtype, param.dtype)
        rec = calls.setdefault(key, {"names": [], "ws": ws, "cfg": chosen})
        rec["names"].append(names.get(param.data_ptr(), "?"))

    def recorded(dy, x, param, state, scalars, program, prog, config=None, *args, **kw):
        from forge_compile.kernels.fused_linear_update_ws import ws_unsupported_reason
        ws = ws_unsupported_reason(dy, x, param, state) or "applies"
        out = full(dy, x, param, state, scalars, program, prog, config, *args, **kw)
        record(dy, x, param, ws, config or flu.tuned_config(dy, x, param, state, scalars, program))
        return out

    def recorded_tiled(dy, x, param, *args, **kw):       # CPU (no interpreter): the torch path
        record(dy, x, param, "n/a (torch path)", "n/a")
        return tiled(dy, x, param, *args, **kw)
    flu._triton_checked, flu._fused_linear_update_tiled = recorded, recorded_tiled
    per_step = collections.Counter()          # (kind, kernel name) of this step's calls
    plan_run = flu._Plan.run

    def counted_plan_run(self, *args, **kw):
        per_step["plan", getattr(self.ck, "name", "?")] += 1
        return plan_run(self, *args, **kw)
    flu._Plan.run = counted_plan_run
    step, keep = B.make_method("forge", model, "inductor", B.forward_context(a.amp, dev.type))
    steps = []
    for ids in B.make_batches(cfg, batch, seq, a.steps, dev):
        before = sum(len(r["names"]) for r in calls.values())
        per_step.clear()
        step(ids)
        per_step["full path", ""] = sum(len(r["names"]) for r in calls.values()) - before
        steps.append(dict(per_step))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    lines = [f"{B.model_name(cfg, a.amp)}, {a.config}, torch {torch.__version__}, "
             f"{B.device_name(dev)}: {sum(len(r['names']) for r in calls.values())} fused "
             f"calls through the full path, {len(calls)} distinct"]
    for (shape, T, dys, xs, ddt, pdt), r in calls.items():
        lines.append(f"W {shape[0]}x{shape[1]} {str(pdt)[6:]}, T={T}, dY {str(ddt)[6:]} "
                     f"stride {dys}, X stride {xs}: WS {r['ws']}; config {r['cfg']}; "
                     f"{len(r['names'])} calls, e.g. {r['names'][0]}")
    for i, st in enumerate(steps):
        lines.append(f"step {i}: " + ", ".join(f"{n} {k}{' ' + name if name else ''}"
                                               for (k, name), n in sorted(st.items())))
    print("\n".join(lines))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"diag_fused_calls_{a.config}_{a.amp}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
