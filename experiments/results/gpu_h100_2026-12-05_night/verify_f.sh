#!/usr/bin/env bash
# call 6 (2026-12-05 night): batch blocks that read every weight row (dense_w: masks on x alone, so the weight loads
# can be pipelined by the compiler) against the current batch tables, 2-16 tokens, five 1B shapes; GPU tests first.
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
  tar czf "$O/verify_f.tgz" -C "$W" .
}
step pytest 90 python3 -m pytest -q tests/test_triton_kernels.py -k "dense_weight or tile_configs or batch_equals"
step tiles 170 python3 experiments/bench/gpu_batch_tiles.py --configs current,dense,dense_s3,dense_pipe,dense_w8_s3,dense_bn64_s3,dense_bm128_w8_s3 --out "$W/tiles"
grep -E "^\| (union|dense|prefill|current)" "$W/tiles_log.txt" | head -60
