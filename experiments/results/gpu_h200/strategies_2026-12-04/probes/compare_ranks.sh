ROOT=${ROOT:-$PWD}
C="model=tiny model.name=$ROOT/.gpu/ddp/tinyllm data.source=packed data.path=$ROOT/.gpu/ddp/data128.pt data.seq_len=128 trainer.sequences_per_step=8 trainer.micro_batch_size=2 trainer.val_every=3 trainer.ckpt_every=3 cwic.apr_final=2.0 cwic.apr_warmup_steps=4 optim.warmup_steps=1 optim.lr=1e-3 trainer.accelerator=cpu trainer.precision=32-true export_milestones=false"
rm -rf /tmp/cmp1; for d in 1 2; do $ROOT/.venv/bin/python $ROOT/train.py trainer=ddp $C trainer.devices=$d out_dir=/tmp/cmp1 run_name=d$d "$@" > /tmp/cmp1_$d.log 2>&1; done
$ROOT/.venv/bin/python - <<'PY'
from safetensors.torch import load_file
a=load_file("/tmp/cmp1/d1/hf/final/model.safetensors"); b=load_file("/tmp/cmp1/d2/hf/final/model.safetensors")
worst=sorted(((float((a[k].float()-b[k].float()).abs().max()), k) for k in a), reverse=True)[:3]
print(worst)
PY
