#!/usr/bin/env bash
# DDP / FSDP on 2 GPUs with the tiny random Llama (bf16-mixed): runs, resume, a multirun sweep, the rank-config check
set -u
R=${OUT:-/tmp/out}; mkdir -p "$R"; PY=${PY:-python3}
[ -n "${SKIP_PIP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/ddp/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false CWIC_CACHE=/tmp/cwic_cache
EXTRA=${EXTRA:-}
C="model=tiny model.name=$PWD/.gpu/ddp/tinyllm data.source=packed data.path=$PWD/.gpu/ddp/data128.pt data.seq_len=128 trainer.sequences_per_step=8 trainer.micro_batch_size=2 trainer.val_every=3 trainer.ckpt_every=3 cwic.apr_final=2.0 cwic.apr_warmup_steps=4 optim.warmup_steps=1 optim.lr=1e-3 trainer.devices=${NDEV:-2} $EXTRA"
step() { local name=$1; shift; local t0=$SECONDS; timeout ${TMO:-240} "$@" > "$R/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$R/steps.txt"; tail -n 3 "$R/$name.log"; }
{ nvidia-smi -L; $PY -c "import torch, lightning, transformers; print(torch.__version__, lightning.__version__, transformers.__version__)"; } > "$R/machine.txt" 2>&1
cat "$R/machine.txt"
step ddp_6   $PY train.py trainer=ddp $C trainer.max_steps=6 out_dir=$R/runs run_name=ddp
step ddp_10  $PY train.py trainer=ddp $C trainer.max_steps=10 out_dir=$R/runs run_name=ddp
step fsdp_6  $PY train.py trainer=fsdp $C trainer.max_steps=6 out_dir=$R/runs run_name=fsdp
step fsdp_10 $PY train.py trainer=fsdp $C trainer.max_steps=10 out_dir=$R/runs run_name=fsdp
if [ "${NDEV:-2}" -ge 2 ]; then   # a sweep, and ranks that compose different configs (run_name reads LOCAL_RANK)
  step ddp_mr  $PY train.py -m trainer=ddp $C trainer.max_steps=4 out_dir=$R/runs cwic.apr_final=2.0,3.0
  step ddp_env $PY train.py trainer=ddp $C trainer.max_steps=2 out_dir=$R/runs 'run_name=env${oc.env:LOCAL_RANK,0}'
fi
step gpu_10  $PY train.py trainer=gpu $C trainer.devices=1 trainer.max_steps=10 out_dir=$R/runs run_name=gpu
step exports $PY - <<'PY'
import torch, json, sys
from transformers import AutoModelForCausalLM
import os
R = os.environ.get("OUT", "/tmp/out")
ref = None
for run in ("gpu", "ddp", "fsdp"):
    p = f"{R}/runs/{run}/hf/final"
    try:
        m = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)
    except Exception as e:
        print(run, "LOAD FAILED", repr(e)[:300]); continue
    sd = m.state_dict()
    th = sum(float(v.abs().sum()) for k, v in sd.items() if k.endswith(("theta", "phi")))
    n = sum(v.numel() for v in sd.values())
    ids = torch.arange(1, 33).view(1, -1)
    with torch.no_grad():
        out = m(input_ids=ids).logits
    print(run, "tensors", len(sd), "numel", n, "sum|theta|", round(th, 3), "logits finite", bool(out.isfinite().all()),
          "shape", tuple(out.shape))
PY
for f in "$R"/runs/*/summary.json "$R"/runs/sweeps/*/summary.json; do echo "$f"; cat "$f"; echo; done > "$R/summaries.txt" 2>&1
find "$R/runs" -name "*.ckpt" -o -name "*.safetensors" | xargs rm -f
grep -h "resuming\|different configs\|Error\|error" "$R"/*.log | sort | uniq -c | head -20
