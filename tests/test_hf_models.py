"""Hugging Face models (built from a config: no download) trained with forge against eager:
what users run. GPT-2 (Conv1D layers, ``x·W`` with W [in, out]; a head tied to the token
embedding; a loss whose code warns through a logger at every trace) and Llama (Linear layers,
untied head). AdamW, 4 steps, relative error ≤ 1e-5 (the e2e tests' bound for fp32)."""
import copy
import importlib.util
import os
import pathlib
import re

import pytest
import torch

import forge_compile
from forge_compile.explain import listen

transformers = pytest.importorskip("transformers")

# the benchmark's Hugging Face step (input_ids as labels; backward, step, zero_grad)
_spec = importlib.util.spec_from_file_location(
    "bench_e2e", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)

RTOL = 1e-5
VOCAB, B, T = 64, 2, 8
# FORGE_TEST_CUDA=1 on the GPU device: the same tests through the fused CUDA kernels
DEVICE = "cuda" if os.environ.get("FORGE_TEST_CUDA") == "1" and torch.cuda.is_available() else "cpu"


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _train(make, inner, exact=False):
    """4 AdamW steps of forge and of eager from one init; with ``exact``, eager's in float64
    too (the exact trajectory both fp32 runs are measured against), returned last."""
    torch.manual_seed(0)
    model = make().to(DEVICE)
    ref = copy.deepcopy(model)
    f64 = copy.deepcopy(model).double() if exact else None
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, ref))
    f64_step = None
    step_fn = _bench.plain_step
    compiled = forge_compile.compile(step_fn(model, opt), inner=inner)
    eager = step_fn(ref, ref_opt)
    if exact:
        f64_step = step_fn(f64, torch.optim.AdamW(f64.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(1)
    with listen() as reports:
        for i in range(4):
            idx = torch.randint(0, VOCAB, (B, T), generator=g).to(DEVICE)
            if i == 0:
                report = forge_compile.explain(compiled, idx)
            else:
                compiled(idx)
            eager(idx)
            if f64_step is not None:
                f64_step(idx)
    fused = {k for r in reports for k in r.fused}
    unfused = {k: v for r in reports for k, v in r.unfused.items() if k not in fused}
    return model, ref, report, fused, unfused, f64


def _assert_as_exact_as_eager(model, ref, f64):
    """Every 2-D weight of forge's fp32 run (``model``) is as close to the float64 run as
    eager's fp32 run (``ref``) is, to RTOL."""
    for (n, p), q, x in zip(model.named_parameters(), ref.parameters(), f64.parameters()):
        if p.dim() == 2:
            assert _rel(p, x) <= _rel(q, x) + RTOL, (n, _rel(p, x), _rel(q, x))


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gpt2_conv1d_weights_fuse_and_the_tied_head_says_why(inner):
    model, ref, report, fused, unfused, _ = _train(_gpt2, inner)
    # one graph: the loss's logger.warning_once is deferred, not a split before the backward
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    conv1d = sorted(n + ".weight" for n, m in model.named_modules()
                    if isinstance(m, transformers.pytorch_utils.Conv1D))
    assert len(conv1d) == 8 and sorted(fused) == conv1d, (sorted(fused), unfused)
    assert unfused["transformer.wte.weight"].startswith("GEMM plus another gradient")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if re.fullmatch(r"transformer\.h\.\d\.attn\.c_attn\.bias", n):
            # its key third has a zero gradient in exact arithmetic (softmax ignores a shift
            # of every key by one vector), so AdamW turns the rounding noise of each run
            # into lr-sized steps (stock torch.compile: 4.5e-4 from eager on the whole bias);
            # the query and value thirds are compared
            p, q = torch.cat([p[:32], p[64:]]), torch.cat([q[:32], q[64:]])
        assert _rel(p, q) <= RTOL, (n, _rel(p, q))


def test_llama_linear_weights_all_fuse():
    model, ref, report, fused, unfused, _ = _train(_llama, "aot_eager")
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    linear = sorted(n + ".weight" for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    assert "lm_head.weight" in linear and sorted(fused) == linear, (sorted(fused), unfused)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel(p, q) <= RTOL, (n, _rel(p, q))


# More Hugging Face causal LMs, two layers each: (config class, config keywords, tied head).
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
_NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
ARCHS = {
    "Mistral": ("MistralConfig", _SMALL),
    "Qwen2": ("Qwen2Config", _SMALL),
    "Qwen3": ("Qwen3Config", dict(_SMALL, head_dim=16)),
    "Gemma": ("GemmaConfig", dict(_SMALL, head_dim=16)),
    "Gemma2": ("Gemma2Config", dict(_SMALL, head_dim=16)),
    "Phi3": ("Phi3Config", _SMALL),
    "Phi": ("PhiConfig", dict(_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "OPT": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=32,
                              word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                              bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    "GPTNeoX": ("GPTNeoXConfig", dict(_SMALL, **_NO_DROPOUT)),
    "Falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, bos_token_id=0, eos_token_id=0,
                                    **_NO_DROPOUT)),
    "Olmo2": ("Olmo2Config", _SMALL),
    "GPTJ": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=0, eos_token_id=0)),
    "Bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, **_NO_DROPOUT)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_causal_lm_is_one_graph_with_every_untied_linear_fused(arch):
    """Each architecture's step is one graph; every Linear weight is fused except a head tied
    to the embedding, which says so; and every 2-D weight is as close to the float64
    trajectory as eager's fp32 one, to 1e-5. Against float64, not eager: in fp32 some weights
    of these tiny models are ill-conditioned under AdamW (Phi's layer-1 v_proj: eager ends
    3.3e-5 from float64, forge 1.5e-5, 1.7e-5 apart), so eager is no 1e-5 reference there.
    (Biases are not compared: a key projection's bias has a zero gradient in exact
    arithmetic, see the GPT-2 test.)"""
    name, kw = ARCHS[arch]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    make = lambda: transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kw))
    model, ref, report, fused, unfused, f64 = _train(make, "aot_eager", exact=True)
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    emb = model.get_input_embeddings().weight
    linear = {n + ".weight": m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    want = sorted(n for n, w in linear.items() if w is not emb)
    assert sorted(fused) == want, (sorted(fused), unfused)
    if any(w is emb for w in linear.values()):
        emb_name = next(n for n, p in model.named_parameters() if p is emb)
        assert unfused[emb_name].startswith("GEMM plus another gradient"), unfused[emb_name]
    _assert_as_exact_as_eager(model, ref, f64)


def _checkpointed(make):
    def made():
        m = make()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m
    return made


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_gradient_checkpointing_keeps_one_fused_graph(make):
    """HF's ``gradient_checkpointing_enable()`` (torch.utils.checkpoint, non-reentrant): the
    checkpointed step is still one graph with every untied weight fused, and each 2-D weight
    as close to the float64 run as eager's fp32, to 1e-5."""
    model, ref, report, fused, unfused, f64 = _train(_checkpointed(make), "aot_eager", exact=True)
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    emb = model.get_input_embeddings().weight
    gemm = {n + ".weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))}
    assert sorted(fused) == sorted(n for n, w in gemm.items() if w is not emb), unfused
    _assert_as_exact_as_eager(model, ref, f64)
