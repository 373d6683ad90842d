#!/usr/bin/env bash
# The cross-validation folds emseg segment's defaults were tuned on (benchmarks/README.md,
# "Instance segmentation"): ISBI 2012 slices 0-26 only (27-29 stay held out), four small CPU
# models (the README's configuration, 400 steps), each trained without one fold of 7 slices and
# predicting it. Then benchmarks/segment_tune.py scores the grid on the four predictions and on
# `emseg demo`'s (its synthetic stack's validation slices 27-29, predicted by its 3-minute model).
#
#   bash benchmarks/segment_folds.sh ../shared/data/isbi2012 /tmp/folds      # STEPS=40 x 10 epochs
#   python benchmarks/segment_tune.py --tune /tmp/folds/predA.zarr /tmp/folds/tune.zarr 0:7 \
#       --tune /tmp/folds/predB.zarr /tmp/folds/tune.zarr 7:14 ... \
#       --tune emseg-demo/pred-val.zarr emseg-demo/train.zarr 27:30 --apply pred.zarr isbi.zarr 27:30
set -euo pipefail
isbi=${1:?ISBI folder with train-volume.tif and train-labels.tif}
out=${2:?output folder}
steps=${STEPS:-40}
epochs=${EPOCHS:-10}
mkdir -p "$out"
python - "$isbi" "$out" <<'PY'
import sys, tifffile
src, out = sys.argv[1:]
for name in ("volume", "labels"):
    tifffile.imwrite(f"{out}/tune-{name}.tif", tifffile.imread(f"{src}/train-{name}.tif")[:27])
PY
emseg ingest "$out/tune-volume.tif" --labels "$out/tune-labels.tif" -o "$out/tune.zarr" --voxel-size 50 4 4 --quiet --overwrite
fold() {  # name, held-out slices
  OMP_NUM_THREADS=1 emseg train "$out/tune.zarr" -o "$out/run$1" --depth 3 --base-channels 16 --crop 256 \
    --batch-size 4 --steps-per-epoch "$steps" --epochs "$epochs" --val-slices "$2" --seed 0 --device cpu --overwrite --quiet
  OMP_NUM_THREADS=1 emseg predict "$out/run$1" "$out/tune.zarr" -o "$out/pred$1.zarr" --slices "$2" --device cpu --overwrite --quiet
  echo "fold $1 ($2) done"
}
fold A 0:7 & fold B 7:14 & wait
fold C 13:20 & fold T 20:27 & wait
