#!/usr/bin/env bash
# call 4: batch blocks of 2 or 4 tokens with fp32 products against the 16-token tensor-core blocks (union reads, the
# TUNED tiles) and the dense reads, tokens sharing their sparsity (--share 0.55) and independent; GPU tests first
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
  tar czf "$O/verify_j.tgz" -C "$W" .
}
step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "batch or tile or small or extremes"
export CWIC_DENSE_W_FROM=0
step shared 240 python3 experiments/bench/gpu_batch_tiles.py --batches 2,3,4,8 --share 0.55 --configs current,dense_bn64_s3,b2_bn64,b2_bn128_w8,b4,b4_bn64,b4_bn64_w8,b4_bn128_w8,b4_dense --out "$W/shared"
step indep 120 python3 experiments/bench/gpu_batch_tiles.py --batches 2,3,4 --configs current,dense_bn64_s3,b2_bn64,b4_bn64,b4_bn64_w8 --out "$W/indep"
