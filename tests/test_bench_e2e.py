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
