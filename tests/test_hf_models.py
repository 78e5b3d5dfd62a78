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


# A gradient element whose fp32 value (eager's) is off the float64 one by more than this, at any
# step, is ill-conditioned: its terms cancel (Phi's layer-1 v_proj holds one of 512 at 7.8e-8,
# the median 1.2e-2, that fp32 rounding moves by 13%), and AdamW turns that rounding into a
# step of a fraction of lr on the element, whichever fp32 run makes it. One such element moves
# a weight by ~1e-5 relative, so no fp32 run is a 1e-5 reference on it. Below, the well-
# conditioned elements are held to RTOL and the ill-conditioned ones (at most ILL_MAX of a
# tensor: the most seen is Gemma's layer-0 q_proj, 11 of 1024) only to what AdamW's steps can
# move an element. The mask comes from eager's and the float64 run's gradients alone.
ILL_REL = 1e-3
ILL_MAX = 0.05
LR, STEPS = 1e-3, 4


def _record_grads(model):
    """name -> the list of the gradients each backward accumulated into that parameter."""
    grads = {}
    for n, p in model.named_parameters():
        grads[n] = []
        p.register_post_accumulate_grad_hook(
            lambda p, out=grads[n]: out.append(p.grad.detach().double().clone()))
    return grads


def _train(make, inner, exact=False, stock=False):
    """4 AdamW steps of forge and of eager from one init; with ``exact``, eager's in float64
    too (the exact trajectory both fp32 runs are measured against), returned last, with the
    ill-conditioned gradient elements of each parameter (a bool mask: ILL_REL, any step) and,
    with ``stock``, the model stock torch.compile (backend ``inner``) trained.
    Gradients are recorded on eager's and the float64 model only: a hook on forge's model
    would (rightly) keep its weights unfused."""
    torch.manual_seed(0)
    model = make().to(DEVICE)
    ref = copy.deepcopy(model)
    f64 = copy.deepcopy(model).double() if exact else None
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=LR) for m in (model, ref))
    f64_step = None
    step_fn = _bench.plain_step
    compiled = forge_compile.compile(step_fn(model, opt), inner=inner)
    eager = step_fn(ref, ref_opt)
    stock_model = copy.deepcopy(model) if stock else None
    stock_step = None
    if stock:
        stock_step = torch.compile(step_fn(stock_model, torch.optim.AdamW(
            stock_model.parameters(), lr=LR)), backend=inner)
    if exact:
        f64_step = step_fn(f64, torch.optim.AdamW(f64.parameters(), lr=LR))
        g32, g64 = _record_grads(ref), _record_grads(f64)
    g = torch.Generator().manual_seed(1)
    with listen() as reports:
        for i in range(STEPS):
            idx = torch.randint(0, VOCAB, (B, T), generator=g).to(DEVICE)
            if i == 0:
                report = forge_compile.explain(compiled, idx)
            else:
                compiled(idx)
            eager(idx)
            if f64_step is not None:
                f64_step(idx)
            if stock_step is not None:
                stock_step(idx)
    fused = {k for r in reports for k in r.fused}
    unfused = {k: v for r in reports for k, v in r.unfused.items() if k not in fused}
    exact_run = None
    if exact:
        ill = {}
        for n, p in f64.named_parameters():
            ill[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            for a, b in zip(g32[n], g64[n]):
                ill[n] |= (a - b).abs() > ILL_REL * b.abs()
        exact_run = (f64, ill, stock_model)
    return model, ref, report, fused, unfused, exact_run


def _assert_as_exact_as_eager(model, ref, exact_run, dims=(2,), skip=None, fused=None):
    """Every parameter with ``dims`` dimensions of forge's fp32 run (``model``) is as close to
    the float64 run as eager's fp32 run (``ref``) is, to RTOL, on its well-conditioned
    elements; at most ILL_MAX of its elements are ill-conditioned, and those stay within what
    STEPS AdamW steps of two runs can move an element apart (each step moves it by at most
    ~3 lr, the bias-corrected ratio of the first steps, in either direction) of the float64
    run. ``skip``: name -> a bool mask of elements left out (a gradient zero in exact
    arithmetic). With a stock torch.compile run in ``exact_run``, the parameters not in
    ``fused`` are held to it instead of eager: they run the compiled graph's kernels, not
    eager's, as stock's do."""
    f64, ill, stock = exact_run
    stock_params = {} if stock is None else dict(stock.named_parameters())
    for (n, p), q, x in zip(model.named_parameters(), ref.parameters(), f64.parameters()):
        if p.dim() not in dims:
            continue
        if stock is not None and n not in fused:
            q = stock_params[n]
        keep = ~(skip or {}).get(n, torch.zeros_like(ill[n]))
        p, q, x, bad = p[keep], q[keep], x[keep], ill[n][keep]
        assert bad.float().mean().item() <= ILL_MAX, (n, int(bad.sum()), bad.numel())
        ok = ~bad
        assert _rel(p[ok], x[ok]) <= _rel(q[ok], x[ok]) + RTOL, \
            (n, _rel(p[ok], x[ok]), _rel(q[ok], x[ok]), int(bad.sum()))
        if bad.any():
            assert (p.detach().double() - x.detach())[bad].abs().max().item() <= 2 * 3 * LR * STEPS, n


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gpt2_conv1d_weights_fuse_and_the_tied_head_says_why(inner):
    """One graph, the 8 Conv1D weights fused, the tied head refused with its reason. Under
    aot_eager every parameter stays within RTOL of eager. Under Inductor every parameter is
    held to the float64 run: a fused weight as close as eager's, an unfused one (biases,
    LayerNorms: the compiled graph's kernels) as close as stock torch.compile's. A LayerNorm
    bias of any compiled run ends further from float64 than eager's (ln_1.bias of layer 0,
    CPU: eager 2.2e-7, stock Inductor 6.9e-6, forge 6.9e-6 under aot_eager and Inductor;
    scripts/diag_hf_numerics.py), and forge's crossed 1e-5 from eager on the H100 (1.13e-5,
    its values ~2e-3, so 3e-5 lr at most per element)."""
    model, ref, report, fused, unfused, exact_run = _train(_gpt2, inner,
                                                           exact=inner == "inductor",
                                                           stock=inner == "inductor")
    # one graph: the loss's logger.warning_once is deferred, not a split before the backward
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    conv1d = sorted(n + ".weight" for n, m in model.named_modules()
                    if isinstance(m, transformers.pytorch_utils.Conv1D))
    assert len(conv1d) == 8 and sorted(fused) == conv1d, (sorted(fused), unfused)
    assert unfused["transformer.wte.weight"].startswith("GEMM plus another gradient")
    # a c_attn bias's key third has a zero gradient in exact arithmetic (softmax ignores a
    # shift of every key by one vector), so AdamW turns the rounding noise of each run into
    # lr-sized steps (stock torch.compile: 4.5e-4 from eager on the whole bias); the query
    # and value thirds are compared
    key_third = {}
    for n, p in model.named_parameters():
        if re.fullmatch(r"transformer\.h\.\d\.attn\.c_attn\.bias", n):
            key_third[n] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            key_third[n][32:64] = True
    if exact_run is not None:
        _assert_as_exact_as_eager(model, ref, exact_run, dims=(1, 2), skip=key_third,
                                  fused=fused)
        return
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n in key_third:
            p, q = p[~key_third[n]], q[~key_third[n]]
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
    trajectory as eager's fp32 one, to 1e-5, on its well-conditioned elements. Against
    float64, not eager: in fp32 a weight with one ill-conditioned gradient element is no 1e-5
    reference (Phi's layer-1 v_proj: on the CPU eager ends 3.3e-5 from float64 and forge
    1.5e-5; on the H100 eager 1.3e-5 and forge 2.8e-5), see ILL_REL. (Biases are not
    compared: a key projection's bias has a zero gradient in exact arithmetic, see the GPT-2
    test.)"""
    name, kw = ARCHS[arch]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    make = lambda: transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kw))
    model, ref, report, fused, unfused, exact_run = _train(make, "aot_eager", exact=True)
    if arch == "OPT" and _opt_layerdrop_branches():
        # the step splits at OPT's LayerDrop, for any backend: forge names the break
        assert report.graph_count > 1, report
        assert any(b.startswith("Data-dependent branching") for b in report.graph_breaks), \
            report.graph_breaks
        pytest.xfail(f"transformers {transformers.__version__}: OPTDecoder draws torch.rand([]) "
                     "and branches on it in training even with layerdrop=0 (a graph break "
                     "for stock torch.compile too; transformers 5.24 checks layerdrop > 0 first)")
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    emb = model.get_input_embeddings().weight
    linear = {n + ".weight": m.weight for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    want = sorted(n for n, w in linear.items() if w is not emb)
    assert sorted(fused) == want, (sorted(fused), unfused)
    if any(w is emb for w in linear.values()):
        emb_name = next(n for n, p in model.named_parameters() if p is emb)
        assert unfused[emb_name].startswith("GEMM plus another gradient"), unfused[emb_name]
    _assert_as_exact_as_eager(model, ref, exact_run)


def _opt_layerdrop_branches() -> bool:
    """Whether this transformers' OPT decoder branches on a random tensor in training whatever
    its layerdrop (transformers 5.17: ``if self.training: if torch.rand([]) < self.layerdrop``),
    so that Dynamo splits the step there."""
    import inspect
    src = inspect.getsource(transformers.models.opt.modeling_opt.OPTDecoder.forward)
    return "torch.rand([])" in src and "layerdrop > 0" not in src


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
    model, ref, report, fused, unfused, exact_run = _train(_checkpointed(make), "aot_eager",
                                                           exact=True)
    assert report.graph_count == 1 and report.graph_breaks == [], report.graph_breaks
    emb = model.get_input_embeddings().weight
    gemm = {n + ".weight": m.weight for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))}
    assert sorted(fused) == sorted(n for n, w in gemm.items() if w is not emb), unfused
    _assert_as_exact_as_eager(model, ref, exact_run)
