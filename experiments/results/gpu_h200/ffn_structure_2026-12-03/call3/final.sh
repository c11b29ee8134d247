#!/bin/bash
# the last device call of the session: A/B of the weight loads' L2 policy, GPU tests, decode + kernel tables
mkdir -p /tmp/pp && ln -sfn $PWD/kernels /tmp/pp/cwic_kernels; export PYTHONPATH=/tmp/pp:$PWD/src
pip install -q --no-deps .gpu/pytest_whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
D="--device cuda --aprs 3 --new-tokens 128 --hf-new-tokens 2"
mkdir -p $OUT/ab_evict
for i in 1 2; do for e in 1 0; do
  CWIC_EVICT_FIRST=$e timeout 60 python experiments/bench_decode.py $D --out $OUT/ab_evict/e${e}_$i >/dev/null 2>&1
  python -c "import json;r=json.loads(open('$OUT/ab_evict/e${e}_$i/gpu_decode.json').read());print('evict_first=$e run $i', r['dense_engine_tps'], r['speedup_at_3x'])"
done; done
E=$(python - <<PY
import json, glob
s = {e: [json.load(open(f))["speedup_at_3x"] for f in glob.glob("$OUT/ab_evict/e%s_*/gpu_decode.json" % e)] for e in "10"}
print("0" if min(s["0"]) > max(s["1"]) else "1")
PY
)
echo "tables with CWIC_EVICT_FIRST=$E"; export CWIC_EVICT_FIRST=$E
timeout 260 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_prefill.py tests/test_gemv_compact.py 2>&1 | tail -3
timeout 120 python experiments/bench_decode.py --device cuda --out $OUT/decode 2>&1 | grep -E '^\| (dense|CWIC|HF)|speedup' | head -12
timeout 130 python experiments/bench_kernels.py --device cuda --compact --quick --out $OUT/kernels 2>&1 | tail -4 | cut -c1-600
