#!/usr/bin/env bash
# call 3 (2026-12-05 night): with the new one-token entries (1B gate/up, 3B down, 8B down) and the wider sweep: GPU tests,
# the 3B and 4096x14336 kernel tables swept again, the 1B table (--quick), and the decode table of this tree.
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
  tar czf "$O/verify_c.tgz" -C "$W" .
}
step pytest 120 python3 -m pytest -q tests/test_triton_kernels.py -k "real_shape or tile or batch"
step kern_big 150 python3 experiments/bench_kernels.py --device cuda --models 3B,4096x14336 --sweep 3B,4096x14336 --out "$W/kern_big"
grep -A20 "decoder layer\|split-K sweep" "$W/kern_big_log.txt" | grep "|" | head -50
step kern_1b 100 python3 experiments/bench_kernels.py --device cuda --quick --out "$W/kern_1b"
grep -A20 "decoder layer\|split-K sweep\|Small batches" "$W/kern_1b_log.txt" | grep "|" | head -40
step decode 120 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$W/decode"
grep "|" "$W/decode"/*.md | head -20
