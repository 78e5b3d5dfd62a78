"""The examples run end to end as a user runs them (subprocesses), with few steps.

``--inner aot_eager`` skips Inductor's C++ code generation, which takes ~30-50 s of a 2-core CPU;
the capture, the forge rewrite and explain() are the same as with the default Inductor.
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                         text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{name} exited {out.returncode}:\n{text[-4000:]}"
    return out.stdout


def test_train_tiny_llama_compare_eager():
    out = run_example("train_tiny_llama.py", "--steps", "8", "--inner", "aot_eager",
                      "--device", "cpu", "--compare-eager", "--log-every", "4",
                      "--layers", "1", "--dim", "64", "--seq", "32", "--batch", "4")
    # explain() summary: one graph, no break, named fused weights and named refusals
    assert "forge_compile.explain: 1 graph(s), 0 graph break(s)" in out, out
    m = re.search(r"^fused: (\d+) parameter\(s\), gradient bytes eliminated: ([\d,]+)", out, re.M)
    assert m and int(m.group(1)) >= 1, out
    assert re.search(r"^  layers\.0\.mlp\.down_proj\.weight \(64, 192\)", out, re.M), out
    assert re.search(r"^not fused: \d+ parameter\(s\)", out, re.M), out
    assert "[forge] step 8/8 loss" in out
    losses = {}
    for label in ("eager", "forge"):
        m = re.search(rf"^final loss \({label}\): (\d+\.\d+)", out, re.M)
        assert m, out
        losses[label] = float(m.group(1))
        assert re.search(rf"^time per step \({label}\): [\d.]+ ms", out, re.M), out
        assert re.search(rf"^peak memory \({label}\): [\d.]+ MiB", out, re.M), out
    assert 0 < losses["forge"] < 5.6, losses            # below ln(256) = 5.55 after 8 steps
    assert "forge vs eager final loss: relative difference" in out


def test_train_tiny_llama_rejects_bad_flag():
    out = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny_llama.py"), "--inner", "tvm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_train_tiny_llama_mode_without_inductor_fails_fast():
    out = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny_llama.py"), "--inner",
                          "aot_eager", "--mode", "max-autotune-no-cudagraphs", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "mode='max-autotune-no-cudagraphs' is an Inductor mode" in out.stderr, out.stderr[-2000:]


def test_resume_with_scheduler_matches_uninterrupted():
    out = run_example("resume_with_scheduler.py", "--steps", "8", "--inner", "aot_eager",
                      "--device", "cpu")
    assert "saved model + optimizer + scheduler at step 4" in out, out
    assert "resumed at step 4 into a fresh model/optimizer/scheduler" in out, out
    m = re.search(r"^final loss: resumed (\S+) vs uninterrupted (\S+), relative difference (\S+) "
                  r"-> EQUAL", out, re.M)
    assert m, out
    assert float(m.group(3)) <= 1e-5


def test_train_hf_causal_lm_gpt2_and_llama():
    """The Hugging Face example: GPT-2's 8 Conv1D weights fused and its tied head named with
    the reason; Llama's 15 Linear weights (lm_head included) fused; one graph each, and the
    loss falls below ln(256) = 5.55 (uniform over byte tokens)."""
    for arch, fused in (("gpt2", 8), ("llama", 15)):
        out = run_example("train_hf_causal_lm.py", "--arch", arch, "--steps", "6",
                          "--inner", "aot_eager", "--device", "cpu", "--log-every", "3")
        assert "forge_compile.explain: 1 graph(s), 0 graph break(s)" in out, out
        m = re.search(r"^fused: (\d+) parameter\(s\)", out, re.M)
        assert m and int(m.group(1)) == fused, out
        if arch == "gpt2":
            assert re.search(r"^  transformer\.wte\.weight \([\d,]+ B\): GEMM plus another "
                             r"gradient", out, re.M), out
        else:
            assert re.search(r"^  lm_head\.weight \(256, 128\)", out, re.M), out
        m = re.search(r"^\[forge\] step 6/6 loss (\d+\.\d+)", out, re.M)
        assert m and 0 < float(m.group(1)) < 5.55, out
