#!/usr/bin/env bash
# one device call: GPU kernel tests at real shapes, a short GPU training run (+ DDP one rank, resume), the 1B kernel table
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp /tmp/pyt && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
python3 -m pip install -q --no-deps --target /tmp/pyt .gpu/pytest_whl/*.whl 2>&1 | tail -2
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, lightning; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__)"; } > "$O/machine.txt" 2>&1
cat "$O/machine.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pyt:/tmp/pp:$PWD/src timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 3 "$O/pytest_gpu.txt"
t0=$SECONDS
OUT=$O/train NDEV=1 TMO=120 bash .gpu/ddp/run.sh > "$O/train_steps.txt" 2>&1
echo "train rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; cat "$O/train/steps.txt" 2>/dev/null; tail -n 12 "$O/train_steps.txt"
rm -rf "$O/train/runs"/*/checkpoints "$O/train/runs"/*/hf
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 150 python3 experiments/bench_kernels.py --device cuda --compact --models 1B --quick --out "$O/kern" > "$O/kern_log.txt" 2>&1
echo "kernels rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep -A8 "1B decoder layer" "$O/kern"/*.md 2>/dev/null | head -12; tail -n 2 "$O/kern_log.txt"
