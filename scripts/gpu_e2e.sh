#!/usr/bin/env bash
# On the GPU device: the end-to-end benchmark (953M HF Llama + AdamW, forge vs eager / fused /
# optimizer-in-backward / torch.compile / floor), forge-vs-eager correctness, and the docs table.
#   bash scripts/gpu_e2e.sh [all|bench|eager|compiled|correctness|render|diag|clip]   (default all)
# eager = the cheap methods for every config, compiled = compile_inductor + forge (each compile of
# the 16-layer model takes a minute or two); bench = both. Run the stages as separate commands
# when one command may last at most 10 minutes. Rows are appended to
# benchmarks/results/e2e.jsonl and copied to $OUT after each stage; `--render` also runs on a
# CPU, so the docs can be remade from a fetched e2e.jsonl.
# Files under $OUT (flat, at most 8, the device's limit): info.txt e2e.jsonl bench.log
# e2e_correctness{,_bf16}.json correctness.log e2e{,_bf16}.md (render writes a precision's table
# only where e2e.jsonl has its rows; the charts stay on the device: `--render` remakes them here
# from the fetched e2e.jsonl)
# Env: BENCH_BUDGET (s, per bench stage, default 480), BENCH_ARGS (extra driver args, e.g.
# "--configs 1x512", "--amp bf16" for bf16 autocast), EAGER_METHODS (default
# eager_foreach,eager_fused,opt_in_backward,floor), COMPILED_METHODS (default
# forge,compile_inductor), CORR_ARGS (default "--layers 16"; add "--amp bf16"), CORR_TIMEOUT (s,
# default 540).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
WHAT=${1:-all}
export PYTHONUNBUFFERED=1
RES=benchmarks/results

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 \
    || echo "pip install failed"
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton",
  triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
  $PY -c 'import matplotlib' 2>/dev/null || echo "matplotlib missing: --render will fail here (render on the CPU side)"
} >> "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

rc=0
bench() {   # $1: methods
  timeout $(( ${BENCH_BUDGET:-480} + 100 )) $PY benchmarks/bench_e2e.py --methods "$1" \
    --budget-s "${BENCH_BUDGET:-480}" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
  rc=$(( rc | $? ))
  cp "$RES/e2e.jsonl" "$OUT/" 2>/dev/null || true
}
case $WHAT in all|bench|eager) bench "${EAGER_METHODS:-eager_foreach,eager_fused,opt_in_backward,floor}" ;; esac
case $WHAT in all|bench|compiled) bench "${COMPILED_METHODS:-forge,compile_inductor}" ;; esac

if [[ $WHAT == all || $WHAT == correctness ]]; then
  timeout "${CORR_TIMEOUT:-540}" $PY benchmarks/bench_e2e.py --correctness ${CORR_ARGS:---layers 16} \
    2>&1 | tee "$OUT/correctness.log" | tail -60
  rc=$(( rc | $? ))
  cp "$RES"/e2e_correctness*.json "$OUT/" 2>/dev/null || true
fi
# where one step's time goes (scripts/diag_e2e_step.py: GPU kernel time per step and the top
# kernels, under torch.profiler), e.g. DIAG_ARGS="--layers 16 --amp bf16w"; not in all
if [[ $WHAT == diag ]]; then
  timeout "${DIAG_TIMEOUT:-540}" $PY scripts/diag_e2e_step.py --out "$OUT" ${DIAG_ARGS:-} 2>&1 \
    | tee "$OUT/diag.log" | tail -120
  rc=$(( rc | $? ))
fi
# what clip_grad_norm_ costs per method (scripts/diag_clip.py), e.g. CLIP_ARGS="--amp bf16w";
# not in all
if [[ $WHAT == clip ]]; then
  timeout "${DIAG_TIMEOUT:-540}" $PY scripts/diag_clip.py --out "$OUT" ${CLIP_ARGS:-} 2>&1 \
    | tee "$OUT/clip.log" | tail -40
  rc=$(( rc | $? ))
fi
if [[ $WHAT == all || $WHAT == render ]]; then
  for amp in none bf16; do
    # rows without "amp" predate the flag and are fp32
    if [[ $amp == none ]] || grep -q "\"amp\": \"$amp\"" "$RES/e2e.jsonl"; then
      $PY benchmarks/bench_e2e.py --render --amp $amp 2>&1 | tee -a "$OUT/bench.log"
      rc=$(( rc | $? ))
    fi
  done
  cp docs/e2e*.md "$OUT/" 2>/dev/null || true
fi
exit $rc
