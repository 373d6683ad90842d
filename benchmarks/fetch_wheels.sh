#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh carries to a lent GPU machine into .whl/ (ignored by
# git) and rewrite benchmarks/wheels.txt, the committed manifest (name==version and Requires-Dist
# lines) that tests/test_gpu_rehearsal.py checks against benchmarks/device-packages.txt offline.
# Carry only what the device lacks: it has torch, numpy, typer, rich, timm, ... (KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
  dask==2026.8.0 distributed==2026.8.0 locket==1.0.0 partd==1.4.2 tblib==3.2.2 zict==3.0.0 tornado==6.6.1
  segmentation-models-pytorch==0.6.0 monai==1.6.1
)
rm -rf .whl && mkdir -p .whl
for spec in "${WHEELS[@]}"; do  # one at a time: pip then names the one it cannot find
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$spec"
done
"$PY" benchmarks/wheel_manifest.py .whl > benchmarks/wheels.txt
ls -l .whl && du -sh .whl
