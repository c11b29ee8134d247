#!/usr/bin/env bash
# one device call (2026-12-05, late session): on an H100 (issue 5 asks for its tables measured on one), at HEAD:
# the GPU kernel tests at real shapes (with f269f96's test fix), the decode table, the 1B kernel table, then the
# larger shapes' kernel table without the sweep if time is left
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, lightning, pytest; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__, pytest.__version__)"; } > "$O/machine.txt" 2>&1
cat "$O/machine.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src:$PWD/tests timeout 280 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton_edges.py tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py tests/test_engine_host.py > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 8 "$O/pytest_gpu.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 130 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$O/decode" > "$O/bench_decode_log.txt" 2>&1
echo "decode rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "|" "$O/decode"/*.md 2>/dev/null | head -14; tail -n 1 "$O/bench_decode_log.txt" | cut -c1-400
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 110 python3 experiments/bench_kernels.py --device cuda --compact --models 1B --quick --out "$O/kern" > "$O/kern_log.txt" 2>&1
echo "kernels rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "^|" "$O/kern_log.txt" | grep -v sweep | head -30; tail -n 1 "$O/kern_log.txt" | cut -c1-400
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 45 python3 experiments/bench_kernels.py --device cuda --compact --models 3B,4096x14336 --quick --no-sweep --out "$O/kern_big" > "$O/kern_big_log.txt" 2>&1
echo "kernels_big rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 1 "$O/kern_big_log.txt" | cut -c1-400
ls -R "$O" | head -30
