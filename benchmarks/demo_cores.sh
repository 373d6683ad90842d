#!/usr/bin/env bash
# Issue 29: `emseg demo` (ISBI 2012, 3 minutes of training) on one core, and on a quarter of one
# core (three busy loops share it), as a laptop busy with other work would run it. The demo
# measures its training speed first and fine-tunes the built-in model when random weights would
# get fewer than 250 steps; its table says which it did (benchmarks/README.md, "Built-in model").
# The second part (several classes on the VNC sections) is left out: --classes-minutes 0.
#
#   bash benchmarks/demo_cores.sh ../shared/data/isbi2012 /tmp/demo-cores 0     # core 0; ~12 min
set -euo pipefail
isbi=${1:?ISBI folder}
out=${2:?output folder}
core=${3:-0}
emseg=${EMSEG:-emseg}
mkdir -p "$out"
export OMP_NUM_THREADS=1
taskset -c "$core" $emseg demo --data "$isbi" -o "$out/one-core" --device cpu --classes-minutes 0 > "$out/one-core.txt" 2>&1
loops=()
for _ in 1 2 3; do
  taskset -c "$core" sh -c 'while :; do :; done' &
  loops+=($!)
done
trap 'kill "${loops[@]}" 2> /dev/null || true' EXIT
taskset -c "$core" $emseg demo --data "$isbi" -o "$out/quarter-core" --device cpu --classes-minutes 0 > "$out/quarter-core.txt" 2>&1
grep -h -E "V_rand|trained" "$out/one-core.txt" "$out/quarter-core.txt"
