"""How far each way of running tests/test_hf_models.py's tiny GPT-2 ends from its float64 run,
per parameter, after 4 AdamW steps: eager fp32, stock torch.compile (Inductor), forge under
aot_eager and under Inductor. Tells a forge deviation from Inductor's own.
    python scripts/diag_hf_numerics.py [--device cuda] [--only ln_1]
"""
import argparse
import copy
import os
import sys

import torch
import transformers

import forge_compile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="parameters whose name contains this")
    a = p.parse_args()
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).to(a.device)
    runs = {"f64": copy.deepcopy(base).double(), "eager": copy.deepcopy(base),
            "stock_inductor": copy.deepcopy(base), "forge_aot_eager": copy.deepcopy(base),
            "forge_inductor": copy.deepcopy(base)}
    steps = {}
    for name, m in runs.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        step = B.plain_step(m, opt)
        if name == "stock_inductor":
            step = torch.compile(step, backend="inductor")
        elif name.startswith("forge_"):
            step = forge_compile.compile(step, inner=name[len("forge_"):])
        steps[name] = step
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 64, (2, 8), generator=g).to(a.device)
        for name, step in steps.items():
            step(idx)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {a.device}")
    names = [n for n, _ in runs["f64"].named_parameters() if a.only in n]
    cols = [k for k in runs if k != "f64"]
    print("relative error from float64 (norm), max |Δ| / lr:")
    print(f"{'parameter':40s} " + " ".join(f"{c:>26s}" for c in cols))
    ref = dict(runs["f64"].named_parameters())
    for n in names:
        x = ref[n].detach()
        row = []
        for c in cols:
            q = dict(runs[c].named_parameters())[n].detach().double()
            row.append(f"{((q - x).norm() / x.norm()).item():.2e} {((q - x).abs().max() / 1e-3).item():.1e}")
        print(f"{n:40s} " + " ".join(f"{r:>26s}" for r in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
