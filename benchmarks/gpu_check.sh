#!/usr/bin/env bash
# Every GPU check and benchmark of emseg in one call, for a lent CUDA machine (see
# benchmarks/README.md, "Running the GPU checks"). Writes logs and JSON under $OUT and prints a
# short table last. Each step has its own time limit so one slow step cannot eat the budget.
#
#   prepare here:  .whl/ (zarr, numcodecs, dask, distributed, smp, monai wheels for the device's
#                  Python) and .data/isbi2012/ (the ISBI stacks), both ignored by git
#   run there:     bash benchmarks/gpu_check.sh            (with carry: [".whl", ".data"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/emseg-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 EMSEG_ISBI_DIR=$PWD/.data/isbi2012 EMSEG_DATA=$PWD/.data/isbi2012
: > "$OUT/status"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? ${SECONDS}s" | tee -a "$OUT/status"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step cuda-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_augment.py tests/test_predict.py -k "cuda or tta or crop_blending"
step train-speed 150 python3 benchmarks/train.py speed --device cuda --json "$OUT/train_speed.json"
step predict 300 python3 benchmarks/predict.py --device cuda --slices 8 --memory-slices 2 --json "$OUT/predict.json"
step quality 330 python3 benchmarks/train.py quality --device cuda --minutes 3.34 --steps-per-epoch 200 --json "$OUT/quality.json"
step bench 300 python3 -m emseg bench --device cuda --compile --json "$OUT/bench.json"
python3 benchmarks/gpu_summary.py "$OUT"
