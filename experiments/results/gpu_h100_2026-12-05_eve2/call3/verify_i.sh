#!/usr/bin/env bash
# call 3: union reads (the TUNED tiles: CWIC_DENSE_W_FROM=0 makes "current" the union reads at every batch) against the
# dense reads' default tiles, with tokens sharing their sparsity as real neighbouring tokens do (--share 0.55 matches
# SmolLM2 at 3x APR) and independent ones; 1B shapes at 2/3/4/8/16 tokens, larger shapes at 2/4/8/16
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
  grep -E "^\| (union|dense|current|prefill)" "$W/${n}_log.txt" | head -40 | cut -c1-300
  tar czf "$O/verify_i.tgz" -C "$W" .
}
export CWIC_DENSE_W_FROM=0
step shared 200 python3 experiments/bench/gpu_batch_tiles.py --batches 2,3,4,8,16 --configs current,dense_bn64_s3 --share 0.55 --out "$W/shared"
step indep 120 python3 experiments/bench/gpu_batch_tiles.py --batches 2,3,4 --configs current,dense_bn64_s3 --out "$W/indep"
step big 200 python3 experiments/bench/gpu_batch_tiles.py --shapes 3072x3072,3072x8192,8192x3072,4096x14336 --batches 2,4,8,16 --configs current,dense_bn64_s3 --share 0.55 --out "$W/big"
