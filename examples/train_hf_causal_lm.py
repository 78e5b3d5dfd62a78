"""Train a Hugging Face causal LM (built from its config: no download) on the shipped text
with forge, and see what was fused.

    python examples/train_hf_causal_lm.py                     # GPT-2, CPU (GPU when present)
    python examples/train_hf_causal_lm.py --arch llama --steps 20

The model is used as Hugging Face ships it: no layer swaps. The step is the plain PyTorch one
(``model(input_ids=..., labels=...).loss``, backward, AdamW step, zero_grad) compiled with
``torch.compile(step, backend="forge")``; ``forge_compile.explain`` runs the first step and
lists the weights whose gradient GEMM was fused with the update, and why the others were not
(GPT-2's head is tied to its token embedding, so that table stays unfused). Compile the step,
not the model: ``torch.compile(model, backend="forge")`` sees the forward only and can fuse
nothing (forge warns). Exits non-zero on an error or a non-finite loss.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from tiny_llama import batches, load_corpus  # noqa: E402  (byte tokens of the shipped text)

import forge_compile  # noqa: E402,F401  (registers the "forge" backend)

# small configs of two architectures, vocab 256 (byte tokens), MAX_SEQ positions; dropout off,
# so forge and eager compute the same step
MAX_SEQ = 128
ARCHS = {
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_positions=MAX_SEQ, n_embd=128, n_layer=2,
                                n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=128, intermediate_size=352,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=MAX_SEQ,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="gpt2", choices=sorted(ARCHS))
    p.add_argument("--steps", type=int, default=30, help="training steps (explain() does the first)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when present)")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager"],
                   help="forge's inner compiler (aot_eager: no code generation, quicker on a CPU)")
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args(argv)
    if a.seq > MAX_SEQ:
        p.error(f"--seq {a.seq} is longer than the configs' {MAX_SEQ} positions: use --seq ≤ {MAX_SEQ}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    name, kw = ARCHS[args.arch]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kw))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def train_step(ids):
        loss = model(input_ids=ids, labels=ids).loss    # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step = torch.compile(train_step, backend="forge", options={"inner": args.inner})
    data = batches(load_corpus(), args.batch, args.seq, seed=0)
    print(f"{args.arch}: {sum(p.numel() for p in model.parameters()):,} parameters, device "
          f"{device}, torch {torch.__version__}, transformers {transformers.__version__}")
    loss = None
    for i in range(args.steps):
        ids = next(data)[0].to(device)
        if i == 0:
            report = forge_compile.explain(step, ids)
            print(report)
            loss = report.result
        else:
            loss = step(ids)
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            print(f"[forge] step {i + 1}/{args.steps} loss {loss.item():.4f}")
    final = loss.item()
    if not math.isfinite(final):
        print(f"non-finite loss {final}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
