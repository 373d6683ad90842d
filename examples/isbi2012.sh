#!/usr/bin/env bash
# The full recipe on the ISBI 2012 challenge data, from TIFF stacks to scores.
# Copy the commands; the variables only let the test suite run it in a reduced size.
#
#   bash examples/isbi2012.sh                      # data in ../shared/data/isbi2012 or $DATA
set -euo pipefail
DATA=${DATA:-../shared/data/isbi2012}    # train-volume.tif, train-labels.tif, test-volume.tif
OUT=${OUT:-isbi2012}
EPOCHS=${EPOCHS:-50}                      # 50 x 100 steps: about 5 minutes on an H100
STEPS=${STEPS:-100}
MODEL=${MODEL:-"--depth 4 --base-channels 64 --crop 384 --batch-size 16"}
DEVICE=${DEVICE:-auto}
mkdir -p "$OUT"

# 1. TIFF stacks into OME-Zarr (4 x 4 x 50 nm voxels); labels: 255 = cell -> 1
emseg ingest "$DATA/train-volume.tif" --labels "$DATA/train-labels.tif" -o "$OUT/train.zarr" --voxel-size 50 4 4 --overwrite
emseg ingest "$DATA/test-volume.tif" -o "$OUT/test.zarr" --voxel-size 50 4 4 --overwrite
emseg info "$OUT/train.zarr"
emseg show "$OUT/train.zarr" --slice 27 -o "$OUT/slice27.png"
emseg augment-preview "$OUT/train.zarr" --slice 3 -o "$OUT/augmentation.png"

# 2. Train on slices 0-26, validate on 27-29 (weight-map loss, elastic augmentation)
# shellcheck disable=SC2086
emseg train "$OUT/train.zarr" -o "$OUT/run" --val-slices 27:30 --epochs "$EPOCHS" --steps-per-epoch "$STEPS" \
  $MODEL --device "$DEVICE" --overwrite

# 3. Predict the validation slices and the test volume
emseg predict "$OUT/run" "$OUT/train.zarr" -o "$OUT/pred-val.zarr" --slices 27:30 --device "$DEVICE" --overwrite
emseg predict "$OUT/run" "$OUT/test.zarr" -o "$OUT/pred-test.zarr" --device "$DEVICE" --overwrite

# 4. Score the validation slices in the challenge's terms, look, and export
emseg evaluate "$OUT/pred-val.zarr" "$OUT/train.zarr" --json "$OUT/scores.json"
emseg show "$OUT/train.zarr" --slice 28 --pred "$OUT/pred-val.zarr" -o "$OUT/check28.png"
emseg export "$OUT/pred-test.zarr" -o "$OUT/test-probabilities.tif" --overwrite   # the challenge's submission format
emseg export-model "$OUT/run" -o "$OUT/model" --overwrite
