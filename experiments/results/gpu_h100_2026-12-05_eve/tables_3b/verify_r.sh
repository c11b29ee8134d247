#!/usr/bin/env bash
# one device call (2026-12-05, evening session), H100, Llama-3.2-3B shape: (1) the real-shape kernel tests with the
# new 3B entries (q/k/v 3072x5120 waves 4; FFN 3072x8192 block_u 64); (2) the q/k/v and FFN tile groups again around
# those entries; (3) whatever that keeps appended to the tables of this scratch copy, then the 3B decode table.
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
t0=$SECONDS
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "real_shape" > "$W/pytest_real.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s: $(tail -n 1 "$W/pytest_real.txt")" | tee -a "$W/machine.txt"
tar czf "$O/verify_r.tgz" -C "$W" .
t0=$SECONDS
timeout 240 python3 experiments/bench/gpu_tune_decode.py --model 3B --groups qkv,ffn --repeats 3 --rounds 2 --out "$W/tune3b" > "$W/tune3b_log.txt" 2>&1
echo "tune rc=$? $((SECONDS - t0)) s" | tee -a "$W/machine.txt"
grep "|\|Kept\|No variant" "$W/tune3b/gpu_tune_decode.md" | head -40
python3 - "$W/tune3b/gpu_tune_decode.json" <<'PY' | tee -a "$W/machine.txt"
import json, sys
d = json.load(open(sys.argv[1]))
files = {"updown": ("kernels/gpu/ffn_fused.py", "TUNED_UPDOWN"), "gemv": ("kernels/gpu/gemv.py", "TUNED")}
for t, key, entry in (o for o in d["combined"] if o != "rope"):
    if t in files:
        f, name = files[t]
        open(f, "a").write(f"\n{name}[{tuple(key)!r}] = {entry!r}\n")
        print("applied", t, tuple(key), entry)
    else:
        print("not applied", t, key, entry)
PY
tar czf "$O/verify_r.tgz" -C "$W" .
t0=$SECONDS
timeout 150 python3 experiments/bench_decode.py --device cuda --model 3B --new-tokens 128 --hf-new-tokens 2 --out "$W/decode_3b" > "$W/decode_3b_log.txt" 2>&1
echo "decode 3B rc=$? $((SECONDS - t0)) s" | tee -a "$W/machine.txt"
grep "engine, \|HF gen" "$W/decode_3b"/*.md | head -8; tail -n 1 "$W/decode_3b_log.txt" | cut -c1-400
tar czf "$O/verify_r.tgz" -C "$W" .
