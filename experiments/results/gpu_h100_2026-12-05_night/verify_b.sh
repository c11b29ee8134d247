#!/usr/bin/env bash
# call 2 (2026-12-05 night): the batch kernel pipelined by default with tuned batch tiles: GPU tests, the batch sweep
# (current tables vs not pipelined vs pipelined defaults), and the full kernel table with tile sweeps for 1B, 3B, 4096x14336.
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV 2>/dev/null; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
step() {  # name, limit, command...
  local n=$1 lim=$2; shift 2; local t0=$SECONDS
  timeout "$lim" "$@" > "$W/${n}_log.txt" 2>&1
  echo "$n rc=$? $((SECONDS - t0)) s: $*" | tee -a "$W/machine.txt"; tail -n 1 "$W/${n}_log.txt" | cut -c1-900
  tar czf "$O/verify_b.tgz" -C "$W" .
}
step pytest 150 python3 -m pytest -q tests/test_triton_kernels.py -k "batch or tile or real_shape or extremes or per_token or prefill or rmsnorm"
step tiles 120 python3 experiments/bench/gpu_batch_tiles.py --configs current,nopipe,pipe --out "$W/tiles"
grep -E "^\| (union|dense|prefill|current|nopipe|pipe)" "$W/tiles_log.txt" | head -40
step kern 330 python3 experiments/bench_kernels.py --device cuda --sweep 1B,3B,4096x14336 --out "$W/kern"
grep -B2 -A10 "decoder layer\|Small batches\|split-K sweep" "$W/kern_log.txt" | grep "|" | head -60
