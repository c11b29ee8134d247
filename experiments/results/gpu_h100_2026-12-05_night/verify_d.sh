#!/usr/bin/env bash
# call 4 (2026-12-05 night): prefill A/B, the kernels of 64310a9 (.gpu/ab_old) against this tree (pipelined batch loop,
# batch tiles), alternated twice: gpu_prefill.py at 32 and 128 prompt tokens (eager prefill runs the batch kernels).
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
  tar czf "$O/verify_d.tgz" -C "$W" .
}
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then P=$PWD/.gpu/ab_old:$PWD/src; else P=/tmp/pp:$PWD/src; fi
    step prefill_${v}_$i 110 env PYTHONPATH=$P python3 experiments/bench/gpu_prefill.py --lens 32,128 --repeats 5 --out "$W/prefill_${v}_$i"
    grep "^| [0-9]" "$W/prefill_${v}_$i/gpu_prefill.md"
  done
done
