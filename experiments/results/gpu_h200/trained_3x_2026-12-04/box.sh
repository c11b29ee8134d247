#!/usr/bin/env bash
# The H200 call that trained the SmolLM2 CWIC checkpoint at 3.05x and packed it for the trip back
# (run from the repository root, after `bash .gpu/teacher.00/stash.sh` in the call before; carry .gpu/teacher.01,
# .gpu/data, .gpu/whl). The parts come back 4 a call: this call returns 0-3, the next ones
# `python3 experiments/ckpt_transport.py take /root/stash/pack "$OUT" 4 4`, then 8 4, ...
set -o pipefail
ls /root/stash/teacher/*.gguf >/dev/null 2>&1 || bash .gpu/teacher.01/stash.sh || exit 1
source .gpu/run_env.sh || exit 1
nvidia-smi -L | tee /root/stash/gpu.txt
RUN=/root/stash/runs
( time python3 train.py +experiment=mini run_name=t3x cwic.apr_final=3.05 cwic.apr_warmup_steps=260 \
    trainer.max_steps=330 trainer.val_every=110 trainer.ckpt_every=110 trainer.max_minutes=6.5 \
    model.name="$CWIC_TEACHER" data.source=packed data.path="$CWIC_DATA" out_dir=$RUN ) > /root/stash/train.log 2>&1
echo "train exit $?"
cat /root/stash/gpu.txt /root/stash/train.log | tr "\r" "\n" | grep -v '^\s*$' | tail -c 60000 > "$OUT/train_log_tail.txt"
tail -n 25 "$OUT/train_log_tail.txt"
cp $RUN/t3x/metrics.csv $RUN/t3x/summary.json "$OUT/" 2>/dev/null
ls $RUN/t3x/hf
( time python3 experiments/ckpt_transport.py pack $RUN/t3x/hf/final /root/stash/pack ) 2>&1 | tail -n 5
python3 experiments/ckpt_transport.py take /root/stash/pack "$OUT" 0 4
du -sh "$OUT"/*
