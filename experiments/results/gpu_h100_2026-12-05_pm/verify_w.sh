#!/usr/bin/env bash
# one device call (2026-12-05 pm): the GPU kernel tests at real shapes after the Triton NaN fixes (e3ba4ce, cc62133),
# test_triton_edges.py (never run on a GPU) and the ACT_KINDS refactor (72294d9); the decode table at HEAD; then
# an A/B of the whole decode step, the kernels of 16ab8a7 (before the act rounding and the NaN fixes) against HEAD's
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, lightning, pytest; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__, pytest.__version__)"; } > "$O/machine.txt" 2>&1
cat "$O/machine.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src:$PWD/tests timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton_edges.py tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py tests/test_engine_host.py > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 8 "$O/pytest_gpu.txt"
[ -z "${SKIP_DECODE:-}" ] || exit 0
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 120 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$O/decode" > "$O/bench_decode_log.txt" 2>&1
echo "decode rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "|" "$O/decode"/*.md 2>/dev/null | head -14
[ -n "${AB:-}" ] || exit 0
for v in old new old new; do
  t0=$SECONDS
  if [ $v = old ]; then P=$PWD/.gpu/ab_old; else P=/tmp/pp; fi
  PYTHONPATH=$P python3 -c "import cwic_kernels; print(cwic_kernels.__file__)" >> "$O/ab_log.txt" 2>&1
  PYTHONPATH=$P:$PWD/src timeout 70 python3 experiments/bench/gpu_tune_decode.py --groups "" --repeats 3 --rounds 1 >> "$O/ab_log.txt" 2>&1
  echo "ab $v rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt" "$O/ab_log.txt"
done
grep -E "^\[|^ab |Alternated|tok/s" "$O/ab_log.txt" | head -40
