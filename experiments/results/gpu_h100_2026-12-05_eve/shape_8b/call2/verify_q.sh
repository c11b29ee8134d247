#!/usr/bin/env bash
# one device call (2026-12-05, evening session), H100: the decode table of the Llama-3.1-8B shape (never measured),
# then the q/k/v and FFN tile groups of its decode step (its shapes have no tuned entries).
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
t0=$SECONDS
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "ffn_real_shape or (real_shapes_gpu and 6144)" > "$W/pytest_8b.txt" 2>&1; echo "pytest rc=$? $(tail -n 1 $W/pytest_8b.txt)" | tee -a "$W/machine.txt"
timeout 230 python3 experiments/bench_decode.py --device cuda --model 8B --new-tokens 128 --hf-new-tokens 2 --out "$W/decode_8b" > "$W/decode_8b_log.txt" 2>&1
echo "decode 8B rc=$? $((SECONDS - t0)) s" | tee -a "$W/machine.txt"
grep "engine, \|HF gen\|Dense matrix" "$W/decode_8b"/*.md | head -9 | cut -c1-300; tail -n 3 "$W/decode_8b_log.txt" | cut -c1-400
tar czf "$O/verify_q.tgz" -C "$W" .
ls -R "$W" | head -20
