#!/usr/bin/env bash
# call 5: the small blocks as defaults ("current", default DENSE_W_FROM), GPU tests first
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
  echo "$n rc=$? $((SECONDS - t0)) s: $*" | tee -a "$W/machine.txt"
  grep -E "^\| (union|dense|current|b[24])|passed|failed" "$W/${n}_log.txt" | head -60 | cut -c1-230
  tar czf "$O/verify_k.tgz" -C "$W" .
}
step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "batch or tile or small or extremes or real_shape"
step shared 150 python3 experiments/bench/gpu_batch_tiles.py --batches 2,3,4 --share 0.55 --configs current,dense_bn64_s3 --out "$W/shared"
