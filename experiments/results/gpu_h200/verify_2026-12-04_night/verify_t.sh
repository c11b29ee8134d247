#!/usr/bin/env bash
# one device call (2026-12-04 night): the GPU kernel tests at real shapes after the NaN-is-on change and the engine's
# thread guard, then the 1B kernel table and the decode table (the NaN check added one compare to each mask)
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp /tmp/pyt && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
python3 -m pip install -q --no-deps --target /tmp/pyt .gpu/pytest_whl/*.whl 2>&1 | tail -2
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, lightning; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__)"; } > "$O/machine.txt" 2>&1
cat "$O/machine.txt"; git log --oneline -1 > "$O/tree.txt" 2>/dev/null; cat "$O/tree.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pyt:/tmp/pp:$PWD/src timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 4 "$O/pytest_gpu.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 120 python3 experiments/bench_kernels.py --device cuda --compact --models 1B --quick --out "$O/kern" > "$O/kern_log.txt" 2>&1
echo "kernels rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep -A8 "1B decoder layer" "$O/kern"/*.md 2>/dev/null | head -12; tail -n 1 "$O/kern_log.txt" | cut -c1-300
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 140 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$O/decode" > "$O/bench_decode_log.txt" 2>&1
echo "decode rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "|" "$O/decode"/*.md 2>/dev/null | head -14; tail -n 1 "$O/bench_decode_log.txt" | cut -c1-300
