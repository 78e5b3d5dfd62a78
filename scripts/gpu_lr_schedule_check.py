"""Device diagnostic for the CUDA-graph LR-schedule test: how far the compiled step drifts from
eager fp32, and how far eager fp32 itself drifts from an fp64 eager run, per mode and initial lr.
A stale (capture-time) lr shows as a drift orders of magnitude above the fp32 noise.
    python3 scripts/gpu_lr_schedule_check.py [mlp|lm]"""
import copy
import sys

import torch
import torch._dynamo

sys.path.insert(0, "tests")
import forge_compile  # noqa: F401,E402  (registers the backend)
import test_fused_linear_update_e2e as t  # noqa: E402
from forge_models import make_optimizer  # noqa: E402


def worst(model, ref, opt, ref_opt):
    out = t._rel_errors(model, ref, opt, ref_opt)
    k = max(out, key=out.get)
    return f"{out[k]:.2e} ({k})"


def run(kind, mode, lr0, steps=12, stale=False):
    torch._dynamo.reset()
    model, ref, _, _, loss_fn, data = t._setup(kind, "adamw")
    model, ref = model.cuda(), ref.cuda()
    ref64 = copy.deepcopy(ref).double()
    opts = [make_optimizer("adamw", m.parameters()) for m in (model, ref, ref64)]
    for o in opts:
        o.param_groups[0]["lr"] = lr0
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 0.7 ** i) for o in opts]
    # "inductor-reduce-overhead": stock torch.compile, the drift users already get
    backend = "inductor" if mode.startswith("inductor") else "forge"
    mode = mode.replace("inductor-", "")
    kw = {} if mode == "default" else {"mode": mode}
    compiled = torch.compile(t._make_step(model, opts[0], loss_fn), backend=backend, **kw)
    eager = t._make_step(ref, opts[1], loss_fn)
    eager64 = t._make_step(ref64, opts[2], loss_fn)
    for i in range(steps):
        batch = [x.cuda() for x in data(i)]
        compiled(*batch)
        eager(*batch)
        eager64(*[x.double() if x.is_floating_point() else x for x in batch])
        for j, s in enumerate(scheds):
            if not (stale and j == 0):
                s.step()
    print(f"{kind} {backend} mode={mode} lr0={lr0} stale={stale}: compiled vs eager32 "
          f"{worst(model, ref, opts[0], opts[1])}; eager32 vs eager64 "
          f"{worst(ref, ref64, opts[1], opts[2])}; compiled vs eager64 "
          f"{worst(model, ref64, opts[0], opts[2])}", flush=True)


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "mlp"
    for mode in (("default",) if not torch.cuda.is_available() else ("default", "reduce-overhead")):
        for lr0 in (3e-2, 1e-3):
            run(kind, mode, lr0)
    for lr0 in (3e-2, 1e-3):
        run(kind, "reduce-overhead", lr0, stale=True)
    run(kind, "inductor-reduce-overhead", 3e-2)
