#!/usr/bin/env bash
# one device call (2026-12-05): the GPU kernel tests at real shapes after act(g) rounded to x's dtype in every FFN
# path (the unit mask as the bf16 model decides it), the engine tests owed since 2026-12-04, then the decode table
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
mkdir -p /tmp/pp /tmp/pyt && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
python3 -m pip install -q --no-deps --target /tmp/pyt .gpu/pytest_whl/*.whl 2>&1 | tail -2
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, lightning; print(torch.__version__, triton.__version__, transformers.__version__, lightning.__version__)"; } > "$O/machine.txt" 2>&1
cat "$O/machine.txt"; git log --oneline -1 > "$O/tree.txt" 2>/dev/null; cat "$O/tree.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pyt:/tmp/pp:$PWD/src:$PWD/tests timeout 360 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py tests/test_engine_host.py > "$O/pytest_gpu.txt" 2>&1
echo "pytest rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 6 "$O/pytest_gpu.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pyt:/tmp/pp:$PWD/src:$PWD/tests timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_transport_and_references.py -k "fallback_count or act_in_dtype or reference" > "$O/pytest_gpu_refs.txt" 2>&1
echo "pytest refs rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; tail -n 6 "$O/pytest_gpu_refs.txt"
t0=$SECONDS
PYTHONPATH=/tmp/pp:$PWD/src timeout 150 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$O/decode" > "$O/bench_decode_log.txt" 2>&1
echo "decode rc=$? $((SECONDS - t0)) s" | tee -a "$O/steps.txt"; grep "|" "$O/decode"/*.md 2>/dev/null | head -14; tail -n 1 "$O/bench_decode_log.txt" | cut -c1-300
