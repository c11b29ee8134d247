#!/usr/bin/env bash
# call 2: the probe's phases alone and two tile variants; the engine's switches A/B on the H100; the GPU triton tests
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
  echo "$n rc=$? $((SECONDS - t0)) s: $*" | tee -a "$W/machine.txt"; tail -n 9 "$W/${n}_log.txt" | cut -c1-700
  tar czf "$O/verify_h.tgz" -C "$W" .
}
step probe 90 python3 experiments/bench/gpu_persistent.py --densities off,0.3333 --breakdown --out "$W/probe"
step probe_w4 60 python3 experiments/bench/gpu_persistent.py --densities off,0.3333 --tiles ch=128,bk=128,bu=32,num_warps=4 --out "$W/probe_w4"
for sw in FUSE_ATTN FUSE_ROPE ATTN_O; do
  step "cost_$sw" 60 env CWIC_$sw=1 python3 experiments/bench/gpu_cost_model.py --rounds 1 --densities 0.3333 --no-breakdown --out "$W/cost_$sw"
done
step cost_default 60 python3 experiments/bench/gpu_cost_model.py --rounds 1 --densities 0.3333 --no-breakdown --out "$W/cost_default"
step pytest 300 python3 -m pytest -q -m triton -p no:cacheprovider tests/test_gemv_compact.py tests/test_transport_and_references.py tests/test_triton_edges.py tests/test_triton_kernels.py
