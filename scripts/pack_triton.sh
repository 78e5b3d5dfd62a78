#!/usr/bin/env bash
# On the development machine (it has pip's index; the GPU device has none): pack a Triton wheel
# for the device's Python as a tarball small enough to carry (the device tool takes 64 MiB),
#   bash scripts/pack_triton.sh [VERSION] [OUT]      (default 3.9.0, .whl/triton39.tar.xz)
# then, on the device: TRITON_TARBALL=.whl/triton39.tar.xz bash scripts/gpu_kernels.sh ...
# Why: the device has Triton 3.6, whose Gluon has no TMA multicast (study run 36,
# docs/kernels.md "Fourteenth session"). The cp312 wheel of 3.9.0 is 286 MB; this keeps what the
# kernels run on (libtriton.so without its debug sections: 500 -> 192 MB; the NVIDIA backend with
# the ptxas that 3.9 uses for sm_90, ptxas-blackwell) and drops the profiler, CUPTI, the AMD
# backend's libraries and the legacy ptxas (sm < 90): a 57 MB tar.xz.
set -euo pipefail
VER=${1:-3.9.0}
OUT=${2:-.whl/triton$(echo "$VER" | cut -d. -f1-2 | tr -d .).tar.xz}
PY=${PY:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d "$work" "triton==$VER"
mkdir "$work/pkg"
(cd "$work/pkg" && unzip -q "$work"/triton-*.whl)
T="$work/pkg/triton"
strip --strip-unneeded "$T/_C/libtriton.so"
rm -rf "$T/_C/libproton.so" "$T/profiler" "$T/instrumentation" "$T/FileCheck" \
  "$T/backends/nvidia/lib/cupti" "$T/backends/nvidia/lib/cupti-blackwell" \
  "$T/backends/nvidia/bin/ptxas" "$T/backends/amd/lib"
mkdir -p "$(dirname "$OUT")"
tar -C "$work/pkg" -cf - triton "triton-$VER.dist-info" | xz -T2 -9 > "$OUT"
ls -l "$OUT"
