#!/usr/bin/env bash
# emseg's GPU check, sized for one lease: at most 6 minutes on an H100/H200 with the wheel install,
# at most 8 files under $OUT, `timeout -k` on every step, an import smoke test first, no step that
# compiles more than once, and the summary table printed on exit whatever happened.
#
#   prepare here:  bash benchmarks/fetch_wheels.sh; mkdir -p .data && cp -r ../shared/data/isbi2012 .data/
#   run there:     bash benchmarks/gpu_check.sh                   (carry: [".whl", ".data"], timeout_s 420)
#   rehearse here: bash benchmarks/gpu_check.sh --rehearse        (the same steps on the CPU, tiny sizes)
#   plan:          bash benchmarks/gpu_check.sh --plan            (each device step's name and limit, nothing run)
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0 PLAN=0
[[ ${1:-} == --rehearse ]] && REHEARSE=1
[[ ${1:-} == --plan ]] && PLAN=1
if ((PLAN)); then  # the device's steps as bash computes their limits, for tests/test_gpu_rehearsal.py
  PY=true OUT=$(mktemp -d /tmp/emseg-plan-XXXX) DEVICE=cuda SLOW=1
elif ((REHEARSE)); then
  PY=${PY:-$PWD/.venv/bin/python}
  OUT=${OUT:-$(mktemp -d /tmp/emseg-rehearse-XXXX)}
  DEVICE=cpu
  SLOW=3  # a shared 2-core machine: imports alone can take half a minute
else
  PY=${PY:-python3}
  OUT=${OUT:-/tmp/emseg-gpu}
  DEVICE=cuda
  SLOW=1
fi
mkdir -p "$OUT"
# Files under $OUT (at most 8 come back): gpu.txt status steps.log bench.json quality.json
: > "$OUT/status"
: > "$OUT/steps.log"
T0=$SECONDS
summary() {
  echo "== summary (${DEVICE}, $((SECONDS - T0)) s)"
  timeout -k 5 30 "$PY" benchmarks/gpu_summary.py "$OUT" || echo "(no summary: gpu_summary.py failed)"
}
((PLAN)) || trap summary EXIT
trap 'echo "stopped by a signal" >> "$OUT/status"; exit 124' TERM INT

step() {  # step NAME SECONDS COMMAND...: runs it under timeout -k, logs to steps.log, records rc
  local name=$1 limit=$2 t=$SECONDS rc
  if ((PLAN)); then
    echo "plan $name $limit"
    return 0
  fi
  shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  timeout -k 5 "$limit" "$@" >> "$OUT/steps.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t))s" | tee -a "$OUT/status"
  return $rc
}

if ((PLAN)); then
  step wheels 45 pip
elif ((!REHEARSE)); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  if ls .whl/*.whl > /dev/null 2>&1; then
    step wheels 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
else
  echo "rehearsal on the CPU ($(nproc) cores)" > "$OUT/gpu.txt"
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
[[ -d .data/isbi2012 ]] && export EMSEG_ISBI_DIR=$PWD/.data/isbi2012 EMSEG_DATA=$PWD/.data/isbi2012

# 1. imports and the CLI, before anything long (a missing wheel shows here in seconds)
step smoke $((30 * SLOW)) "$PY" -c "
import torch, zarr, numcodecs, dask, distributed, segmentation_models_pytorch, emseg
from emseg.cli import app
from emseg.device import resolve_device, autocast_dtype
d = resolve_device('$DEVICE')
print('torch', torch.__version__, 'device', d, 'autocast', autocast_dtype(d, 'auto'), 'zarr', zarr.__version__)
" || exit 1

if ((REHEARSE)); then
  # 2. the engine's tests, collected only (the suite that runs this rehearsal runs them), 3. bench,
  # 4. training quality
  step tests 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_engine.py --collect-only
  step bench 120 "$PY" -m emseg bench --device cpu --quick --no-monai --json "$OUT/bench.json"
  step quality 60 "$PY" benchmarks/train.py quality --device cpu --depth 2 --base-channels 8 --batch-size 2 \
    --crop 64 --minutes 0.15 --steps-per-epoch 5 --json "$OUT/quality.json"
else
  step tests 50 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_engine.py
  # forward per precision (one compile, default mode), predict 2 x 8192^2 vs MONAI, train speed
  step bench 140 "$PY" -m emseg bench --device cuda --compile --json "$OUT/bench.json"
  step quality 90 "$PY" benchmarks/train.py quality --device cuda --minutes 1.0 --steps-per-epoch 100 \
    --json "$OUT/quality.json"
fi
