"""Which checkpointed nodes does the forward-loss-backward remat pass recompute, and which does
it keep from the forward?  (triage of activations kept under gradient checkpointing)

Compiles benchmarks/bench_e2e.py's Llama (default 2 layers, 4x1024, checkpointing) with forge
and, around torch's remat pass, prints every attention op with its recompute tag, the tags of its
getitem users, and whether the forward copy survives (read by the backward).
    python scripts/diag_remat.py [--layers 2] [--config 4x1024+ckpt] [--device cuda]
"""
import argparse
import collections
import os
import sys

from torch._functorch._activation_checkpointing import (
    remat_using_tags_for_fwd_loss_bwd_graph_pass as remat)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as B                                        # noqa: E402

orig = remat.remat_using_tags_for_fwd_loss_bwd_graph


def tag(n):
    r = n.meta.get("recompute")
    return getattr(r, "name", r)


def wrapped(gm):
    nodes = list(gm.graph.nodes)
    print(f"remat input: {len(nodes)} nodes; recompute tags:",
          dict(collections.Counter(tag(n) for n in nodes if n.op == "call_function")))
    bwd = [n for n in nodes if n.meta.get("custom", {}).get("remat_pass_tag") == "is_backward"
           or n.meta.get("autograd_backward")]
    print(f"  backward-marked nodes: {len(bwd)} (first: {bwd[0].name if bwd else None})")
    for n in nodes:
        if "attention" in str(n.target) and "backward" not in str(n.target):
            print(f"  {n.name} {n.target} recompute={tag(n)} ac_graph_id={n.meta.get('ac_graph_id')}"
                  f" users={[(u.name, tag(u)) for u in n.users]}")
    out = orig(gm)
    after = list(out.graph.nodes)
    rec = collections.Counter(str(n.target) for n in after if n.name.endswith("_recomputed"))
    print(f"remat output: {len(after)} nodes; recomputed by op: {dict(rec)}")
    return out


remat.remat_using_tags_for_fwd_loss_bwd_graph = wrapped
p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=2)
p.add_argument("--config", default="4x1024+ckpt")
p.add_argument("--device", default="cuda")
p.add_argument("--inner", default="inductor")
a = p.parse_args()
batch, seq, ckpt = B.parse_config(a.config)
cfg = B.llama_config(False, a.layers)
model = B.build_model(cfg, a.device, ckpt)
step, keep = B.make_method("forge", model, a.inner)
step(B.make_batches(cfg, batch, seq, 1, a.device)[0])
