#!/usr/bin/env bash
# The CPU test suite under the device's torch (2.11) and Triton (3.6), on this machine: the
# code must work on torch 2.11 and 2.13, and CI runs 2.13 only. torch 2.11 has no CPU wheel in
# this machine's index, so this installs the cu130 build with its CUDA libraries (~4 GB, once;
# it runs on the CPU). Usage: bash scripts/cpu_torch211.sh [VENV (default /tmp/v211)] [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/v211}
shift || true
if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" setuptools wheel
  "$VENV/bin/pip" install -q sympy networkx pytest pytest-xdist transformers matplotlib tqdm
fi
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n 2 "${@:-tests/}"
