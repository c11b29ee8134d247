#!/usr/bin/env bash
# call 1 (2026-12-05 evening 2): persistent-kernel probe against the engine's cost model, then the full GPU triton tests
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
  echo "$n rc=$? $((SECONDS - t0)) s: $*" | tee -a "$W/machine.txt"; tail -n 12 "$W/${n}_log.txt" | cut -c1-1500
  tar czf "$O/verify_g.tgz" -C "$W" .
}
step persistent 150 python3 experiments/bench/gpu_persistent.py --out "$W/persistent"
step cost 100 python3 experiments/bench/gpu_cost_model.py --rounds 1 --densities 0.3333 --no-breakdown --out "$W/cost"
step pytest 300 python3 -m pytest -q -m triton -p no:cacheprovider
