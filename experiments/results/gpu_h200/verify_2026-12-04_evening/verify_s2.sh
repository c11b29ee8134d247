#!/usr/bin/env bash
# second call: the test that failed in run1 (calibrate_apr on a CUDA model) and the GPU tests near it, then the decode table
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp /tmp/pyt && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
python3 -m pip install -q --no-deps --target /tmp/pyt .gpu/pytest_whl/*.whl 2>&1 | tail -2
t0=$SECONDS
PYTHONPATH=/tmp/pyt:/tmp/pp:$PWD/src timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "engine or calibrat or refresh" > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 3 "$O/pytest_gpu.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 300 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$O/decode" > "$O/bench_decode_log.txt" 2>&1
echo "decode rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "|" "$O/decode"/*.md 2>/dev/null | head -14; tail -n 2 "$O/bench_decode_log.txt"
