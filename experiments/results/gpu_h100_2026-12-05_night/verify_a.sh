#!/usr/bin/env bash
# call 1 (2026-12-05 late session): the batch kernel's new pipelined loop on sm_90 (tests), the small-batch tile
# sweep, and the 8B FFN's launch structure A/B (one launch / gate separate / three launches), whole decode step.
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
  tar czf "$O/verify_a.tgz" -C "$W" .
}
step pytest 90 python3 -m pytest -q -x tests/test_triton_kernels.py -k "tile_configs or batch or extremes"
step tiles 250 python3 experiments/bench/gpu_batch_tiles.py --out "$W/tiles"
grep -E "^\| (union|dense|prefill|default|pipe|w8|bn64|w4|bm|w16)" "$W/tiles_log.txt" | head -80
for v in one gate_sep three; do
  case $v in one) e="";; gate_sep) e="CWIC_FFN_GATE_FUSED=0";; three) e="CWIC_FFN_FUSED=0";; esac
  step "ffn8b_$v" 75 env $e python3 experiments/bench/gpu_tune_decode.py --model 8B --groups "" --repeats 3 --rounds 1
  grep -iE "tok/s|dense|current" "$W/ffn8b_${v}_log.txt" | tail -4 | cut -c1-300
done
