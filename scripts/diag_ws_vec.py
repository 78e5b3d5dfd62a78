"""Where a warp-specialised config's update differs, bit for bit, from another's or from a second
run of itself (the GPU device; twenty-eighth session: WS_VEC=8 against 4 on bf16 W, ragged
shape). For each rule and dtype mix: mismatching elements per tensor, their row and column
range, the largest difference in units of the stored dtype's last place, and whether each
config repeats its own bits.
    python3 scripts/diag_ws_vec.py [--ws 9] [--knob WS_VEC=8] [--shape 1000,3000,333]
"""
import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def describe(a, b) -> str:
    import torch
    ia = a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32).long()
    ib = b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32).long()
    bad = ia != ib
    n = int(bad.sum())
    if n == 0:
        return "equal"
    idx = bad.nonzero()
    ulps = (ia - ib).abs()[bad]
    return (f"{n} differ, rows {int(idx[:, 0].min())}-{int(idx[:, 0].max())}, cols "
            f"{int(idx[:, 1].min())}-{int(idx[:, 1].max())}, max {int(ulps.max())} ulp, "
            f"first {tuple(idx[0].tolist())}: {a[tuple(idx[0])].item()!r} vs "
            f"{b[tuple(idx[0])].item()!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ws", type=int, default=9)
    p.add_argument("--knob", default="WS_VEC=8", help="NAME=INT for the other config")
    p.add_argument("--shape", default="1000,3000,333", help="N,K,T")
    p.add_argument("--rules", default="sgd_momentum,adam,adamw")
    a = p.parse_args()
    import torch
    import test_fused_linear_update as T
    from forge_compile.kernels import fused_linear_update as flu
    base = flu._GPU_WS_CONFIGS[a.ws]
    name, val = a.knob.split("=")
    other = dataclasses.replace(base, **{name: int(val)})
    shape = tuple(map(int, a.shape.split(",")))
    for rule in a.rules.split(","):
        for mix, pdt, sdt, rounding in (
                ("bf16 W, fp32 state, stochastic", torch.bfloat16, torch.float32, "stochastic"),
                ("bf16 W, fp32 state, nearest", torch.bfloat16, torch.float32, "nearest"),
                ("bf16 W and state, stochastic", torch.bfloat16, torch.bfloat16, "stochastic"),
                ("fp32 W and state", torch.float32, torch.float32, "stochastic")):
            prog, sc = T._rules("cuda")[rule]
            prog = dataclasses.replace(prog, param_rounding=rounding)
            dy, x, w, st = T._inputs(prog, *shape, torch.bfloat16, "cuda", pdt,
                                     state_dtype=sdt, seed=T._seed(rule, shape))
            outs = {}
            for tag, cfg in (("base", base), ("base2", base), ("other", other),
                             ("other2", other)):
                w1, s1 = w.clone(), [t.clone() for t in st]
                flu.fused_linear_update_triton(dy, x, w1, s1, sc, prog, config=cfg, seed=5)
                outs[tag] = [w1, *s1]
            torch.cuda.synchronize()
            print(f"== {rule}, {mix}, shape {shape}")
            for i, tname in enumerate(["W", *prog.state]):
                print(f"  {tname}: base vs {a.knob}: {describe(outs['base'][i], outs['other'][i])}"
                      f"; base twice: {describe(outs['base'][i], outs['base2'][i])}; "
                      f"{a.knob} twice: {describe(outs['other'][i], outs['other2'][i])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
