"""A small Llama-style decoder in plain PyTorch, the model of the forge examples.

Llama's layer list without the transformers dependency: RMSNorm, rotary position embeddings,
causal SDPA attention with q/k/v/o Linear layers, a SwiGLU MLP (gate/up/down), tied or untied
lm_head, ``bias=False`` everywhere. Every 2-D Linear weight is a candidate for forge's fused
weight-gradient + optimizer update; the RMSNorm scales and the embedding are not (explain() says
why), and a tied lm_head has a second gradient consumer (the embedding) so it stays unfused.
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LlamaConfig", "TinyLlama", "RMSNorm", "load_corpus", "batches", "DATA"]

DATA = pathlib.Path(__file__).resolve().parent / "data" / "python_stdlib_docs.txt"


@dataclasses.dataclass
class LlamaConfig:
    """Shape of the model; defaults train in well under two minutes on a 2-core CPU."""

    vocab_size: int = 256          # byte-level tokens
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 352          # ~8/3 * dim rounded up to a multiple of 32, as Llama does
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope_tables(cfg: LlamaConfig):
    """cos/sin tables [max_seq_len, head_dim/2] of the rotary embedding."""
    hd = cfg.dim // cfg.n_heads
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _apply_rope(x, cos, sin):
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x [B, H, T, hd] (Llama/HF's half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """tokens [B, T] (int64) -> logits [B, T, vocab]."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.lm_head(self.norm(x))


def load_corpus(path: pathlib.Path = DATA) -> torch.Tensor:
    """The shipped text as byte tokens (uint8 -> int64), vocab 256."""
    raw = pathlib.Path(path).read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless (x, y) next-byte batches at random offsets; the same seed gives the same stream."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[i: i + seq] for i in ix.tolist()])
        y = torch.stack([data[i + 1: i + seq + 1] for i in ix.tolist()])
        yield x, y
