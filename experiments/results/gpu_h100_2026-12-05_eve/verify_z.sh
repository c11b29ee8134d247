#!/usr/bin/env bash
# one device call (2026-12-05, evening session): at b4f416b on an H100, the decode table (381f6ca's kernel breakdowns
# from the prompt), the cost model and one tune_decode pass (85b5a96: both pass the prompt to kernel_breakdown), and
# issue 5's kernel command with --quick. Everything lands in one tarball (the tool returns at most 8 files).
set -u
O=${OUT:-/tmp/out}; W=/tmp/work; mkdir -p "$O" "$W"
mkdir -p /tmp/pp && ln -sfn "$PWD/kernels" /tmp/pp/cwic_kernels
export PYTHONPATH=/tmp/pp:$PWD/src
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; cat .gpu/REV 2>/dev/null; } > "$W/machine.txt" 2>&1
cat "$W/machine.txt"
step() {  # name, limit, command...
  local n=$1 lim=$2; shift 2; local t0=$SECONDS
  timeout "$lim" "$@" > "$W/${n}_log.txt" 2>&1
  echo "$n rc=$? $((SECONDS - t0)) s: $*" | tee -a "$W/machine.txt"; tail -n 1 "$W/${n}_log.txt" | cut -c1-600
  tar czf "$O/verify_z.tgz" -C "$W" .
}
step decode 150 python3 experiments/bench_decode.py --device cuda --new-tokens 128 --hf-new-tokens 2 --out "$W/decode"
grep "|" "$W/decode"/*.md | head -30
python3 - "$W/decode" <<'PY'
import glob, json, sys
for f in glob.glob(sys.argv[1] + "/*.json"):
    d = json.load(open(f))
    def walk(o, p=""):
        if isinstance(o, dict):
            for k, v in o.items():
                if k.startswith("breakdown"):
                    print(p + k, "error" in v if isinstance(v, dict) else type(v).__name__, str(v)[:300])
                else:
                    walk(v, p + k + ".")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, p + str(i) + ".")
    walk(d)
PY
step cost 200 python3 experiments/bench/gpu_cost_model.py --out "$W/cost"
grep "|" "$W/cost_log.txt" | head -30
step tune 120 python3 experiments/bench/gpu_tune_decode.py --groups "" --repeats 1 --rounds 1 --out "$W/tune"
step kern 150 python3 experiments/bench_kernels.py --device cuda --quick --out "$W/kern"
grep -A8 "decoder layer" "$W/kern"/*.md 2>/dev/null | head -12
ls -R "$W" | head -40
