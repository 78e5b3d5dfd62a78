"""Where does forge's fused=True AdamW differ from eager fused=True AdamW on CUDA?

Runs tests/test_capture.py's MLP and batches for 20 steps four ways and prints, per step, the
norm-wise relative difference of every parameter and state tensor from a float64 eager AdamW
(the exact answer): eager fused=True fp32, eager foreach fp32, forge (fuse=True: Triton kernel)
and forge with fuse=False (the captured graph without the rewrite).
    FORGE_TEST_CUDA=1 python scripts/diag_fused_true_adamw.py
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import forge_compile                                        # noqa: E402
from test_capture import DEVICE, STEPS, _mlp, batch, rel, train_step_fn   # noqa: E402

torch.manual_seed(0)
base = _mlp().to(DEVICE)


def run(kind):
    torch._dynamo.reset()
    dtype = torch.float64 if kind == "fp64" else torch.float32
    m = copy.deepcopy(base).to(dtype)
    kw = dict(lr=1e-3, weight_decay=1e-2)
    kw.update({"fused": True} if kind in ("eager_fused", "forge", "forge_nofuse", "fp64") else {"foreach": True})
    o = torch.optim.AdamW(m.parameters(), **kw)
    step = train_step_fn(m, o)
    if kind == "forge":
        step = forge_compile.compile(step, inner="aot_eager")
    elif kind == "forge_nofuse":
        step = forge_compile.compile(step, inner="aot_eager", fuse=False)
    snaps = []
    for i in range(STEPS):
        x, y = batch(i)
        step(x.to(dtype), y.to(dtype))
        snaps.append({**{n: p.detach().clone() for n, p in m.named_parameters()},
                      **{f"{n}.{k}": v.clone() for (n, p) in m.named_parameters()
                         for k, v in o.state[p].items() if k != "step"}})
    return snaps


ref = run("fp64")
print(f"device {DEVICE}, torch {torch.__version__}; norm-wise relative difference from fp64 eager")
results = {k: run(k) for k in ("eager_fused", "eager_foreach", "forge", "forge_nofuse")}
for i in (0, 4, 9, STEPS - 1):
    print(f"step {i + 1}")
    for name in ref[i]:
        row = "  ".join(f"{k}={rel(r[i][name], ref[i][name]):.2e}" for k, r in results.items())
        print(f"  {name:16s} {row}")
print("forge vs eager_fused (the test's comparison), last step:")
for name in ref[-1]:
    print(f"  {name:16s} {rel(results['forge'][-1][name], results['eager_fused'][-1][name]):.2e}")
