#!/usr/bin/env bash
# Device check (torch 2.11 + CUDA): install the project without deps, then run the capture tests
# with CUDA tensors and the CPU suite under torch 2.11. Logs under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/forge_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
FORGE_TEST_CUDA=1 python3 -m pytest -q -p no:cacheprovider tests/test_capture.py tests/test_hf_models.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/capture_cuda.log" | tail -40
python3 -m pytest -q -p no:cacheprovider tests/test_capture.py -x 2>&1 | tee "$OUT/capture_cpu_211.log" | tail -15
