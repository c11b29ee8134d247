#!/usr/bin/env bash
# call 5 (2026-12-05 night): the decode step cost model at the Llama-3.1-8B shape (never run before): the fixed step with
# no weight read, the streaming rate past it, and the bound at 3x APR, against the 1B figures of the evening session.
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
  tar czf "$O/verify_e.tgz" -C "$W" .
}
step cost8b 330 python3 experiments/bench/gpu_cost_model.py --model 8B --rounds 2 --out "$W/cost8b"
grep "|\|Fit\|With\|would" "$W/cost8b_log.txt" | head -40
