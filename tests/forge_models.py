"""Small models and optimizers shared by the forge end-to-end tests (CPU-sized), the bf16 ulp
their tolerances are stated in, and the Triton-interpreter subprocess of the kernel tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MLP", "Block", "TinyLM", "Lion", "LambLike", "make_optimizer", "OPTIMIZERS", "bf16_ulp",
           "interpreted_json"]


def interpreted_json(script: str, timeout: int) -> dict:
    """Run ``python script --interpreter`` with TRITON_INTERPRET=1 and FORGE_CPU_TRITON=1 (Triton
    reads the first when a kernel is decorated, so it needs a fresh process) and return the
    JSON object its last stdout line prints."""
    import pytest
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    env = dict(os.environ, TRITON_INTERPRET="1", FORGE_CPU_TRITON="1")
    env.setdefault("FORGE_COMPILE_CACHE_DIR", os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"forge_compile_test_{os.getuid()}"))
    proc = subprocess.run([sys.executable, script, "--interpreter"], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bf16_ulp(ref: torch.Tensor) -> torch.Tensor:
    """bf16's ulp at each element of fp64 ``ref``: 2^(exponent - 7) (8 significant bits)."""
    return torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)


class MLP(nn.Module):
    """2-layer MLP, no biases: both weights are fusable."""

    def __init__(self, d_in=24, d_hidden=40, d_out=12):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=False)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)   # k's bias has an exactly-zero gradient
        self.proj = nn.Linear(d, d, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) * (D // self.heads) ** -0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class GatedMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=True)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = GatedMLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding, one transformer block (attention + gated MLP, 3-D activations), LM head."""

    def __init__(self, vocab=29, d=16, heads=2, hidden=36, tie=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, hidden)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:     # GPT-2's and Llama 3.2's tie_word_embeddings: one table, two uses
            self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))

    def randomize_(self, scale=0.1):
        """Non-zero biases/norm shifts, so relative errors are not relative to ~0."""
        with torch.no_grad():
            for n, p in self.named_parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * scale)
        return self

    def linear_weights(self):
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear) for n in [n + ".weight"]]


class LoRALinear(nn.Module):
    """A frozen Linear (weight and bias) plus a trainable low-rank update B·A, scaled by alpha/r
    (Hu et al. 2021): the adapters' gradients are GEMMs through the rank-r bottleneck."""

    def __init__(self, d_in, d_out, r=4, alpha=8.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=True).requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, d_in) * 0.1)
        self.B = nn.Parameter(torch.randn(d_out, r) * 0.1)   # non-zero: both adapters move
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale


class LoRAMLP(nn.Module):
    """MLP's shape with both layers frozen and adapted (LoRA fine-tuning)."""

    def __init__(self, d_in=24, d_hidden=40, d_out=12):
        super().__init__()
        self.up = LoRALinear(d_in, d_hidden)
        self.down = LoRALinear(d_hidden, d_out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Lion(torch.optim.Optimizer):
    """A user-written optimizer in plain torch ops (Chen et al. 2023); nothing registered."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(b1).add(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class LambLike(torch.optim.Optimizer):
    """Adam direction scaled by a per-tensor trust ratio ‖W‖/‖u‖: NOT elementwise (refused)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                m.mul_(0.9).add_(p.grad, alpha=0.1)
                ratio = p.norm() / (m.norm() + 1e-6)
                p.sub_(m * ratio * group["lr"])


def make_optimizer(name: str, params, foreach=None):
    """The optimizers of issue #3 by short name, hyper-parameters chosen so every term matters."""
    O = torch.optim
    params = list(params)
    kw = {} if foreach is None else {"foreach": foreach}
    if name == "sgd":
        return O.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-2, **kw)
    if name == "sgd_nesterov":
        return O.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2, **kw)
    if name == "adam":
        return O.Adam(params, lr=1e-3, **kw)
    if name == "adamw":
        return O.AdamW(params, lr=1e-3, weight_decay=0.1, **kw)
    if name == "adamw_amsgrad":     # a third state tensor, max_exp_avg_sq, read by the update
        return O.AdamW(params, lr=1e-3, weight_decay=0.1, amsgrad=True, **kw)
    if name == "adam_maximize":     # the gradient negated in the rule
        return O.Adam(params, lr=1e-3, maximize=True, **kw)
    if name == "adamw_fused":
        return O.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True)
    if name == "adagrad":
        return O.Adagrad(params, lr=1e-2, **kw)
    if name == "rmsprop":
        return O.RMSprop(params, lr=1e-3, momentum=0.5, **kw)
    if name == "adamax":
        return O.Adamax(params, lr=1e-3, **kw)
    if name == "nadam":
        return O.NAdam(params, lr=1e-3, **kw)
    if name == "lion":
        return Lion(params, lr=1e-3, weight_decay=0.1)
    if name == "lamb_like":
        return LambLike(params)
    raise KeyError(name)


OPTIMIZERS = ["sgd", "sgd_nesterov", "adam", "adamw", "adagrad", "rmsprop", "adamax", "nadam", "lion",
              "adamw_amsgrad", "adam_maximize"]
