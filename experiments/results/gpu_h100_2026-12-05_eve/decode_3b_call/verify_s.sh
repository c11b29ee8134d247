#!/usr/bin/env bash
# one device call (2026-12-05, evening session), H100: issue 5's decode command on the Llama-3.2-3B shape (never
# measured): does a wider model, with more bytes a layer against the same fixed cost a layer, come closer to 2.5x?
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
t0=$SECONDS
timeout 500 python3 experiments/bench_decode.py --device cuda --model 3B --new-tokens 128 --hf-new-tokens 2 --out "$W/decode_3b" > "$W/decode_3b_log.txt" 2>&1
echo "decode 3B rc=$? $((SECONDS - t0)) s" | tee -a "$W/machine.txt"
grep "|" "$W/decode_3b"/*.md | head -12; tail -n 1 "$W/decode_3b_log.txt" | cut -c1-600
tar czf "$O/verify_s.tgz" -C "$W" .
