"""CPU-side logic of benchmarks/bench_e2e.py (the GPU run itself happens on the device)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_e2e.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_config():
    b = load()
    assert b.parse_config("1x512") == (1, 512, False)
    assert b.parse_config("4x1024+ckpt") == (4, 1024, True)
    assert b.parse_config("4x1024") == (4, 1024, False)
    assert b.parse_config("4x1024", shorthand=True) == (4, 1024, True)   # the listed config


def _row(method, batch, seq, ckpt, **kw):
    return dict(date="2026-11-23T00:00:00+00:00", gpu="NVIDIA H100 80GB HBM3", torch="2.11.0",
                triton="3.5", transformers="5.17.0", python="3.11", model="LlamaForCausalLM ...",
                params=953_000_000, resident_GB=10.65, batch=batch, seq=seq, ckpt=ckpt,
                method=method, tiny=False, **kw)


def test_render_table_latest_row_wins_and_errors_listed(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("eager_fused", 1, 512, False, peak_GB=99.0, step_ms=1.0),      # superseded
            _row("eager_fused", 1, 512, False, peak_GB=14.46, step_ms=82.5),
            _row("forge", 1, 512, False, peak_GB=12.1, step_ms=70.0),
            _row("forge", 4, 1024, True, error="BackendCompilerFailed: RNG ops in recompute"),
            _row("forge", 4, 1024, True, error="skipped: the driver's --budget-s 480 s was spent"),
            _row("floor", 4, 1024, True, peak_GB=13.2, step_ms=600.0)]
    jsonl = tmp_path / "e2e.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, png = tmp_path / "e2e.md", tmp_path / "e2e.png"
    out = subprocess.run([sys.executable, str(SCRIPT), "--render", "--out", str(jsonl), "--md", str(md),
                          "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = md.read_text()
    assert "| eager_fused | 14.46 | 82.5 | – | – |" in text
    assert "| forge | 12.10 | 70.0 | error (below) | error (below) |" in text   # skip hides nothing
    assert "4x1024+ckpt forge: BackendCompilerFailed: RNG ops in recompute" in text
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0, triton 3.5, transformers 5.17.0" in text
    assert png.stat().st_size > 10_000


def test_render_amp_rows_apart(tmp_path):
    """bf16-autocast rows get their own table; the fp32 table (rows without "amp" included: they
    predate the flag) never shows them."""
    pytest.importorskip("matplotlib")
    rows = [_row("forge", 1, 512, False, peak_GB=11.92, step_ms=76.7),                 # no "amp"
            _row("forge", 1, 512, False, amp="bf16", peak_GB=7.5, step_ms=40.0, warmup=5, timed=6),
            _row("eager_fused", 1, 512, False, amp="none", peak_GB=14.27, step_ms=83.0)]
    jsonl = tmp_path / "e2e.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = {}
    for amp in ("none", "bf16"):
        md, png = tmp_path / f"{amp}.md", tmp_path / f"{amp}.png"
        out = subprocess.run([sys.executable, str(SCRIPT), "--render", "--amp", amp, "--out", str(jsonl),
                              "--md", str(md), "--png", str(png)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        texts[amp] = md.read_text()
    assert "| forge | 11.92 | 76.7 |" in texts["none"] and "| eager_fused | 14.27 | 83.0 |" in texts["none"]
    assert "40.0" not in texts["none"]
    assert "| forge | 7.50 | 40.0 |" in texts["bf16"] and "eager_fused" not in texts["bf16"]
    assert "(bf16 autocast)" in texts["bf16"] and "--render --amp bf16" in texts["bf16"]
    assert "5 warm-up steps, then 6 timed steps" in texts["bf16"]
    # rows without "warmup"/"timed" (before --warmup/--timed) ran the defaults
    assert "2 warm-up steps, then 6 timed steps" in texts["none"]


def test_forward_context_autocasts_only_with_amp():
    import torch
    b = load()
    with b.forward_context("bf16", "cpu")():
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with b.forward_context("none", "cpu")():
        assert not torch.is_autocast_enabled("cpu")
    assert b.amp_suffix("none") == "" and b.amp_suffix("bf16") == "_bf16"
