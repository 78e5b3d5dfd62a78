#!/usr/bin/env bash
# On the GPU device: install forge_compile (editable, no deps), run the fused-kernel GPU tests and
# the benchmark. Logs and results go under $OUT (default ./gpu_out).
#   bash scripts/gpu_kernels.sh [tests|bench|profile|ncu|stream|ncu-stream|ws-study|pingpong|
#                                store-policy|bf16-weights|llama-shapes|ncu-bf16|grad-norm|
#                                device-seed|all]
#   (default all; stream, ncu-stream, ws-study, pingpong, store-policy, grad-norm and
#   device-seed: not in all)
# Env: TEST_TIMEOUT / BENCH_TIMEOUT (s), BENCH_ARGS (extra args for the benchmark).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
WHAT=${1:-all}
export PYTHONUNBUFFERED=1
export FORGE_COMPILE_CACHE_DIR=${FORGE_COMPILE_CACHE_DIR:-/tmp/forge_compile_cache}
# TRITON_TARBALL=.whl/triton39.tar.xz (carried: the device has Triton 3.6 and no network; made by
# scripts/pack_triton.sh on the development machine): a stripped Triton wheel's package,
# unpacked to /tmp/triton_alt and put first on PYTHONPATH, e.g. Triton 3.9 for Gluon's TMA
# multicast (docs/kernels.md, "Fourteenth session"). Its own cache dirs, so cubins of the two
# Tritons never mix.
if [[ -n ${TRITON_TARBALL:-} ]]; then
  mkdir -p /tmp/triton_alt && tar -C /tmp/triton_alt -xJf "$TRITON_TARBALL" || exit 1
  export PYTHONPATH=/tmp/triton_alt${PYTHONPATH:+:$PYTHONPATH}
  export TRITON_CACHE_DIR=/tmp/triton_alt_cache
  export FORGE_COMPILE_CACHE_DIR=/tmp/forge_compile_cache_alt
fi

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
  torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
} 2>&1 | tee "$OUT/info.txt"

$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 \
  || { echo "pip install failed"; tail -20 "$OUT/pip.log"; }

rc=0
if [[ $WHAT == all || $WHAT == tests ]]; then
  XDIST=""
  $PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -m gpu $XDIST -q -rfE -p no:cacheprovider \
    tests/test_fused_linear_update.py tests/test_launch_cache.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  rc=$?
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  FORGE_AUTOTUNE_LOG=1 timeout "${BENCH_TIMEOUT:-300}" $PY benchmarks/bench_fused_linear_update.py \
    --out "$OUT/fused_linear_update.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
    | grep -v -e '^{' -e 'forge autotune' 
  rc=$(( rc | $? ))
  cp "$FORGE_COMPILE_CACHE_DIR/tuning.json" "$OUT/" 2>/dev/null || true
fi
# a pure-bf16 model's fused update (W and state in bf16): the kernels' and the compiled step's
# GPU tests, then the 4096² rows against eager's fused optimizer on bf16 tensors
if [[ $WHAT == bf16-weights ]]; then
  XDIST=""
  $PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -m gpu $XDIST -q -rfE -p no:cacheprovider \
    -k "bf16_model or bf16_weights" tests/test_fused_linear_update.py \
    tests/test_fused_linear_update_e2e.py 2>&1 | tee "$OUT/gpu_bf16_tests.log" | tail -15
  rc=$?
  for rounding in ${BF16_ROUNDINGS:-stochastic nearest}; do
    FORGE_AUTOTUNE_LOG=1 timeout "${BENCH_TIMEOUT:-300}" $PY \
      benchmarks/bench_fused_linear_update.py --quick --weights bfloat16 \
      --bf16-rounding "$rounding" --out "$OUT/fused_linear_update.jsonl" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_bf16_weights_$rounding.log" | grep -v -e '^{' -e 'forge autotune' \
      -e '^precompile'
    rc=$(( rc | $? ))
  done
fi
# the 953M Llama's weight shapes (benchmarks/bench_e2e.py: q/k/v/o 2048², gate/up 5632×2048,
# down 2048×5632, lm_head 32000×2048) at its 1×512 step's T, AdamW: bf16 weights and state
# (stochastic rounding), then fp32 weights (bf16 autocast's operands); LLAMA_TOKENS (default 512)
if [[ $WHAT == llama-shapes ]]; then
  for w in bfloat16 float32; do
    FORGE_AUTOTUNE_LOG=1 timeout "${BENCH_TIMEOUT:-300}" $PY \
      benchmarks/bench_fused_linear_update.py --weights $w --optimizers adamw \
      --shapes 2048x2048,5632x2048,2048x5632,32000x2048 --tokens "${LLAMA_TOKENS:-512}" \
      --out "$OUT/fused_linear_update.jsonl" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_llama_shapes_$w.log" | grep -v -e '^{' -e 'forge autotune' -e '^precompile'
    rc=$(( rc | $? ))
  done
fi
# one study script: study NAME SCRIPT TIMEOUT [ARGS...]: its rows in $OUT/NAME.jsonl, its log in
# $OUT/NAME.log, shown without the JSON rows and the tuner's log lines
study() {
  local name=$1 script=$2 limit=$3
  shift 3
  timeout "$limit" $PY "benchmarks/experiments/$script" --out "$OUT/$name.jsonl" "$@" 2>&1 \
    | tee "$OUT/$name.log" | grep -v -e '^{' -e 'forge autotune'
  rc=$(( rc | $? ))
}
# the ping-pong study kernel: its correctness, then the issue's rows against the tuned shipped
# choice, e.g. STUDY_ARGS="--do-bench"
[[ $WHAT == pingpong ]] && study fused_linear_update_pingpong fused_linear_update_pingpong.py \
  "${STUDY_TIMEOUT:-500}" ${STUDY_ARGS:-}
# the W/state stores' L2 priority (study run 42)
[[ $WHAT == store-policy ]] && study store_policy store_policy.py "${STUDY_TIMEOUT:-500}"
# the warp-specialised kernel's study, e.g. STUDY_ARGS="--quick --do-bench --configs RUN36"
[[ $WHAT == ws-study ]] && study fused_linear_update_ws bench_fused_linear_update_ws.py \
  "${STUDY_TIMEOUT:-400}" ${STUDY_ARGS:-}
# is T=512 limited by AdamW's math or the memory system?
# e.g. STUDY_ARGS="--roll --shapes 4096x4096,11008x4096" (stream_ceiling.py --help)
[[ $WHAT == stream ]] && study stream_ceiling stream_ceiling.py "${STUDY_TIMEOUT:-400}" ${STUDY_ARGS:-}
[[ $WHAT == operand-bytes ]] && study operand_bytes operand_bytes.py "${STUDY_TIMEOUT:-400}" \
  ${STUDY_ARGS:-}
[[ $WHAT == operand-clocks ]] && study operand_bytes_clocks operand_bytes.py \
  "${STUDY_TIMEOUT:-400}" --clocks --tokens 2048 --optimizers adamw,sgd_momentum ${STUDY_ARGS:-}
if [[ $WHAT == ncu-stream ]]; then
  # what the GEMM adds beside the W/state stream (docs/kernels.md, "Ninth session"): the same
  # kernel fused, with skip_gemm and with skip_epilogue, 4096² AdamW at T = NCU_T (default 512;
  # ws:1 at 512, ws:2 above; NCU_WS=I: _GPU_WS_CONFIGS[I]; NCU_PF=d: WS_PREFETCH=d;
  # NCU_GROUP_N: the tile walk's GROUP_N); DRAM and L2 bytes and throughput. NCU_DETAILS=1:
  # every unit's share of its peak (SpeedOfLight's breakdown) and the SM and L2 clocks, unfiltered
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  METRICS=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,smsp__inst_executed.sum
  FILTER="Duration|DRAM Throughput|L2 Cache Throughput|Memory Throughput|L1/TEX Cache|L2 Hit|Mem Busy|Max Bandwidth|dram__bytes|lts__t|smsp__inst|==ERR|rror"
  DETAILS=""
  if [[ ${NCU_DETAILS:-0} == 1 ]]; then
    DETAILS="--print-details all --section MemoryWorkloadAnalysis_Tables"
    METRICS=$METRICS,sm__cycles_elapsed.avg.per_second,lts__cycles_elapsed.avg.per_second
    FILTER="."
  fi
  # a variant may name the TMA loads' L2 priorities: fused:both (fused_linear_update_ws.L2_MODES)
  for vl in ${NCU_VARIANTS:-fused stream}; do
    v=${vl%%:*}; l2=""; [[ $vl == *:* ]] && l2=${vl#*:}
    echo "== ncu $vl T=${NCU_T:-512}"
    timeout 150 "$NCU" --target-processes all -k 'regex:_fused_linear_update_ws_kernel' \
      --launch-skip 2 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section MemoryWorkloadAnalysis $DETAILS --metrics $METRICS \
      $PY benchmarks/experiments/stream_ceiling.py --ncu-variant $v --tokens "${NCU_T:-512}" \
      ${l2:+--l2 $l2} ${NCU_WS:+--ws $NCU_WS} ${NCU_PF:+--prefetch $NCU_PF} \
      ${NCU_GROUP_N:+--group-n $NCU_GROUP_N} 2>&1 \
      | tee -a "$OUT/ncu_stream_full.log" \
      | grep -E "$FILTER"
  done 2>&1 | tee "$OUT/ncu_stream.log"
fi
if [[ $WHAT == ncu-operands ]]; then
  # run 56's variants under ncu (docs/kernels.md, "Twenty-fourth session"): every unit's share
  # of its peak (SpeedOfLight's breakdown) and the memory tables, AdamW 4096² T=2048, the
  # 11th WS candidate; NCU_VARIANTS: operand_bytes.py's variant names
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for v in ${NCU_VARIANTS:-full x_half none stream}; do
    echo "== ncu $v"
    timeout 150 "$NCU" --target-processes all -k 'regex:_fused_linear_update_ws_kernel' \
      --launch-skip 2 --launch-count 1 --clock-control none --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --print-details all $PY benchmarks/experiments/operand_bytes.py --ncu-variant "$v" \
      --tokens 2048 --optimizers adamw > "$OUT/ncu_operands_$v.log" 2>&1
    grep -E "Duration|Throughput|Shared|shared|l1tex__data|lts__t|xbar|Busy|==ERR|rror" \
      "$OUT/ncu_operands_$v.log" | head -60
  done
fi
if [[ $WHAT == all || $WHAT == profile ]]; then
  # host time per launch, launch cache off/on, and through the op (scripts/profile_launch.py)
  timeout 300 $PY scripts/profile_launch.py > "$OUT/profile_launch.txt" 2>&1
  rc=$(( rc | $? ))
  grep "^==" "$OUT/profile_launch.txt"
fi
if [[ $WHAT == ncu-bf16 ]]; then
  # Why the bf16-weight kernel streams at 51-68% of copy on the Llama's shapes (docs/README.md,
  # "bf16 weights"): the same ncu sections as "ncu" on bf16 W/state rows with the WS pick there
  # (ws:9, NCU_CONFIG to change it), then the warp-stall samples per SASS opcode
  # (scripts/ncu_stalls.py) of the first row
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  ROWS=(${NCU_ROWS:-adamw,5632,2048,512 adamw,4096,4096,512})
  for row in "${ROWS[@]}"; do
    echo "== ncu bf16 W $row ${NCU_CONFIG:-ws:9}"
    timeout 120 "$NCU" --target-processes all -k 'regex:_fused_linear_update(_ws)?_kernel' \
      --launch-skip 2 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section InstructionStats \
      $PY benchmarks/bench_fused_linear_update.py --precompile 0 --weights bfloat16 \
      --ncu-row "$row" --ncu-config "${NCU_CONFIG:-ws:9}" 2>&1 | tee -a "$OUT/ncu_bf16_full.log" \
      | grep -E "ncu row|DRAM Throughput|Compute \(SM\)|Duration|Registers|Issue Slots|Issued Warp|No Eligible|Active Warps|Eligible Warps|Stall|Executed Ipc|==ERR|rror"
  done 2>&1 | tee "$OUT/ncu_bf16.log"
  timeout 150 "$NCU" --target-processes all -k 'regex:_fused_linear_update(_ws)?_kernel' \
    --launch-skip 2 --launch-count 1 --section SourceCounters -o "$OUT/ncu_bf16_src" \
    $PY benchmarks/bench_fused_linear_update.py --precompile 0 --weights bfloat16 \
    --ncu-row "${ROWS[0]}" --ncu-config "${NCU_CONFIG:-ws:9}" > /dev/null 2>&1
  "$NCU" --import "$OUT/ncu_bf16_src.ncu-rep" --page source --csv --print-source sass \
    > "$OUT/ncu_bf16_src.csv" 2>/dev/null && $PY scripts/ncu_stalls.py --parse "$OUT/ncu_bf16_src.csv" \
    | tee "$OUT/ncu_bf16_stalls.txt" | head -30
  rm -f "$OUT/ncu_bf16_src.ncu-rep"
fi
# forge_compile::grad_sqnorm (clip_grad_norm_ from dY and X): its GPU tests, then every
# implementation timed on the Llama's shapes (benchmarks/bench_grad_norm.py)
if [[ $WHAT == grad-norm ]]; then
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_grad_norm.py \
    2>&1 | tee "$OUT/grad_norm_tests.log" | tail -5
  rc=$(( rc | $? ))
  timeout "${BENCH_TIMEOUT:-400}" $PY benchmarks/bench_grad_norm.py ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_grad_norm.log"
  rc=$(( rc | $? ))
  cp benchmarks/results/grad_norm.jsonl "$OUT/" 2>/dev/null || true
fi
# bf16 weights under CUDA graphs: the seed XORed from a GPU scalar (the kernels, bit for bit
# against a launch with that seed) and the replayed step (unbiased, two replays round
# differently), then the rest of the bf16-weight e2e tests
if [[ $WHAT == device-seed ]]; then
  timeout "${TEST_TIMEOUT:-400}" $PY -m pytest -q -rfE -p no:cacheprovider -m gpu \
    tests/test_fused_linear_update.py -k "device_seed or bf16_model" \
    2>&1 | tee "$OUT/device_seed_kernels.log" | tail -5
  rc=$(( rc | $? ))
  timeout "${TEST_TIMEOUT:-400}" $PY -m pytest -q -rfE -p no:cacheprovider -m gpu \
    tests/test_fused_linear_update_e2e.py -k bf16 2>&1 | tee "$OUT/device_seed_e2e.log" | tail -5
  rc=$(( rc | $? ))
fi
if [[ $WHAT == all || $WHAT == ncu ]]; then
  # Evidence for the memory-bound rows: DRAM throughput, occupancy, registers, warp stalls of
  # the tuned kernel (uses the tuning cache the benchmark left behind); every section's full
  # text in $OUT/ncu_full.log.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  # NCU_CONFIG (e.g. ws:1): profile that candidate instead of the tuned one (no tuning cache
  # needed); the regex matches the Triton and the warp-specialised kernel
  for row in ${NCU_ROWS:-adamw,4096,4096,512 adamw,4096,4096,2048}; do
    echo "== ncu $row ${NCU_CONFIG:-tuned}"
    timeout 120 "$NCU" --target-processes all -k 'regex:_fused_linear_update(_ws)?_kernel' \
      --launch-skip 2 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --section WarpStateStats --section SchedulerStats \
      $PY benchmarks/bench_fused_linear_update.py --precompile 0 --ncu-row "$row" \
      ${NCU_CONFIG:+--ncu-config $NCU_CONFIG} 2>&1 | tee -a "$OUT/ncu_full.log" \
      | grep -E "ncu row|DRAM Throughput|Memory Throughput|Compute \(SM\)|Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Shared Memory Config|L2 Hit|Waves|Mem Busy|Max Bandwidth|==ERR|rror"
  done 2>&1 | tee "$OUT/ncu.log"
fi
exit $rc
