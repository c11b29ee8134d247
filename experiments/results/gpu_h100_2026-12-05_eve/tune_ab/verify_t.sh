#!/usr/bin/env bash
# one device call (2026-12-05, evening session), H100: (1) CWIC_FUSE_ATTN A/B at 3x APR, alternated 0 1 0 1
# (measured only on the H200 so far: -2.3 % for CWIC); (2) the whole tile tuning of the decode step
# (gpu_tune_decode.py, every group; the tables were tuned on the H200). Everything lands in one tarball.
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
i=0
for f in 0 1 0 1; do
  i=$((i + 1)); t0=$SECONDS
  CWIC_FUSE_ATTN=$f timeout 100 python3 experiments/bench_decode.py --device cuda --aprs 3 --new-tokens 128 --hf-new-tokens 2 \
    --out "$W/fa_${i}_$f" > "$W/fa_${i}_$f.log" 2>&1
  echo "fuse_attn=$f run $i rc=$? $((SECONDS - t0)) s: $(tail -n 1 "$W/fa_${i}_$f.log" | cut -c1-300)" | tee -a "$W/machine.txt"
  tar czf "$O/verify_t.tgz" -C "$W" .
done
t0=$SECONDS
timeout 380 python3 experiments/bench/gpu_tune_decode.py --repeats 3 --out "$W/tune" > "$W/tune_log.txt" 2>&1
echo "tune rc=$? $((SECONDS - t0)) s" | tee -a "$W/machine.txt"
grep "|" "$W/tune/gpu_tune_decode.md" 2>/dev/null | head -70; tail -n 1 "$W/tune_log.txt" | cut -c1-800
tar czf "$O/verify_t.tgz" -C "$W" .
