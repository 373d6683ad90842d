#!/usr/bin/env bash
# Issue 24: several classes from one annotation (benchmarks/README.md, "Several classes"). The ten
# VNC sections in ../shared/data/vnc: sections 0-7 train (7 validates and chooses the weights),
# sections 8-9 are kept out and only measured. Two networks of the README's small configuration,
# trained on the CPU side by side, one thread each, for TIME seconds (default 600), so that
# whatever else the machine runs slows both alike:
#
#   * five classes: membrane (0,32,64,96,128), glia (159), mitochondria (191), synapse (223), cell (255);
#   * membrane only: cell = every code but the membranes' (the binary model emseg trained before).
#
# then both scored on sections 8-9 by benchmarks/classes_score.py: per-class IoU and Dice,
# mitochondria object F1 and the V_rand of membrane against the rest for both.
#
#   bash benchmarks/classes.sh ../shared/data/vnc /tmp/classes [TIME]     # ~TIME + 3 min on 2 cores
#   INIT=builtin:membranes bash benchmarks/classes.sh ...   # both networks start from the built-in model
set -euo pipefail
vnc=${1:?VNC folder with train-volume.tif and train-labels.tif}
out=${2:?output folder}
seconds=${3:-600}
emseg=${EMSEG:-emseg}
mkdir -p "$out"
python - "$vnc" "$out" <<'PY'
import sys, numpy as np, tifffile
src, out = sys.argv[1:]
raw, lab = tifffile.imread(f"{src}/train-volume.tif"), tifffile.imread(f"{src}/train-labels.tif")
binary = (~np.isin(lab, (0, 32, 64, 96, 128))).astype(np.uint8) * 255
for name, sl in (("train", slice(0, 8)), ("test", slice(8, 10))):
    tifffile.imwrite(f"{out}/{name}-raw.tif", raw[sl])
    tifffile.imwrite(f"{out}/{name}-lab.tif", lab[sl])
    tifffile.imwrite(f"{out}/{name}-binary.tif", binary[sl])
PY
classes=(--class membrane=0,32,64,96,128 --class glia=159 --class mitochondria=191 --class synapse=223 --class cell=255)
small=(--depth 3 --base-channels 16 --crop 256 --batch-size 4 --steps-per-epoch 40 --epochs 100 ${INIT:+--init "$INIT"})
for name in train test; do
  $emseg ingest "$out/$name-raw.tif" --labels "$out/$name-lab.tif" "${classes[@]}" -o "$out/$name.zarr" \
    --voxel-size 50 4.6 4.6 --quiet --overwrite
  $emseg ingest "$out/$name-raw.tif" --labels "$out/$name-binary.tif" -o "$out/$name-binary.zarr" \
    --voxel-size 50 4.6 4.6 --quiet --overwrite
done
export OMP_NUM_THREADS=1
$emseg train "$out/train.zarr" -o "$out/classes" "${small[@]}" --val-slices 7 --time-limit "$seconds" --seed 0 \
  --device cpu --overwrite --quiet &
$emseg train "$out/train-binary.zarr" -o "$out/binary" "${small[@]}" --val-slices 7 --time-limit "$seconds" \
  --seed 0 --device cpu --overwrite --quiet &
wait -n; wait -n  # either failing stops the script (set -e)
python "$(dirname "$0")/classes_score.py" "$out"
