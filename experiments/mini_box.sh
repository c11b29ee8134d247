#!/usr/bin/env bash
# reproduce-mini on an offline GPU box (README "On an offline GPU machine"), from the repository root,
# after `bash .gpu/teacher.NN/stash.sh` for each teacher part. Arguments go to reproduce_mini.py:
#   bash experiments/mini_box.sh gpu --group all --parallel --minutes 20
# Runs and scores stay in $MINI_WORK and $MINI_OUT (re-runs continue from them); what should come back
# (scores, metrics, summaries, log tails, GPU name and utilisation) is copied to $OUT (or runs/mini_box).
set -eo pipefail
source .gpu/run_env.sh
OUTDIR=${OUT:-runs/mini_box}
MINI_WORK=${MINI_WORK:-/root/mini_work}
MINI_OUT=${MINI_OUT:-/root/mini_out}
mkdir -p "$OUTDIR" "$MINI_WORK" "$MINI_OUT"
nvidia-smi -L | tee "$OUTDIR/gpu.txt"
( while :; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
    >> "$OUTDIR/smi.csv"; sleep 15; done ) &
MON=$!
collect() {
  kill $MON 2>/dev/null || true
  mkdir -p "$OUTDIR/scores" "$OUTDIR/logs"
  cp -r "$MINI_OUT"/. "$OUTDIR/scores/" 2>/dev/null || true
  for f in "$MINI_WORK"/*.log "$MINI_WORK"/*/train.log; do
    [ -f "$f" ] && tail -c 20000 "$f" > "$OUTDIR/logs/$(basename "$(dirname "$f")")_$(basename "$f")"
  done
  return 0
}
trap collect EXIT
python3 experiments/reproduce_mini.py "$@" --work "$MINI_WORK" --out "$MINI_OUT"
