#!/usr/bin/env bash
# reproduce-mini on an offline GPU box (README "On an offline GPU machine"), from the repository root,
# after `bash .gpu/teacher.NN/stash.sh` for each teacher part. Three ways to call it:
#   bash experiments/mini_box.sh gpu --group all --parallel --minutes 25     # in the foreground
#   bash experiments/mini_box.sh start gpu --group all --parallel ...        # detached (setsid): it
#        outlives the command that started it, for boxes whose commands are cut at a time limit
#   bash experiments/mini_box.sh wait 560      # block until the detached run ends or 560 s pass
# Runs and scores stay in $MINI_WORK and $MINI_OUT (re-runs continue from them). What should come back
# (scores, summaries, metrics, log tails, GPU name and utilisation) is packed into $OUT/mini_box.tar.gz
# (or runs/mini_box/) on every exit, so an interrupted call still returns the state so far.
set -eo pipefail
source .gpu/run_env.sh
OUTDIR=${OUT:-runs/mini_box}
MINI_WORK=${MINI_WORK:-/root/mini_work}
MINI_OUT=${MINI_OUT:-/root/mini_out}
mkdir -p "$OUTDIR" "$MINI_WORK" "$MINI_OUT"
DRIVER_LOG="$MINI_WORK/driver.log"
STATUS="$MINI_WORK/driver.status"

collect() {
  local pack; pack=$(mktemp -d)
  mkdir -p "$pack/scores" "$pack/logs"
  cp -r "$MINI_OUT"/. "$pack/scores/" 2>/dev/null || true
  for f in "$MINI_WORK"/*.log "$MINI_WORK"/*/train.log; do
    [ -f "$f" ] && tail -c 40000 "$f" > "$pack/logs/$(basename "$(dirname "$f")")_$(basename "$f")"
  done
  cp "$MINI_WORK"/smi.csv "$MINI_WORK"/gpu.txt "$STATUS" "$pack/" 2>/dev/null || true
  tar -czf "$OUTDIR/mini_box.tar.gz" -C "$pack" .
  rm -rf "$pack"
  for f in "$MINI_WORK"/*.log; do   # each run's last progress line
    [ "$f" = "$DRIVER_LOG" ] || echo "== $(basename "$f"): $(tail -c 3000 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1)"
  done
  tail -n 2 "$MINI_WORK"/smi.csv 2>/dev/null || true
  echo "== driver log tail"; tail -n 25 "$DRIVER_LOG" 2>/dev/null || true
  echo "== status: $(cat "$STATUS" 2>/dev/null || echo none)"
  return 0
}

monitor() {
  nvidia-smi -L > "$MINI_WORK/gpu.txt"
  while :; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
      >> "$MINI_WORK/smi.csv"; sleep 15; done
}

drive() {   # the driver with a status file: running, then the exit code
  echo running > "$STATUS"
  monitor & local mon=$!
  local rc=0
  python3 experiments/reproduce_mini.py "$@" --work "$MINI_WORK" --out "$MINI_OUT" || rc=$?
  kill $mon 2>/dev/null || true
  echo "exit $rc" > "$STATUS"
  return $rc
}

case "${1:-}" in
  start)
    shift
    if [ "$(cat "$STATUS" 2>/dev/null)" = running ]; then echo "a detached run is already going"; exit 1; fi
    export PYTHONUNBUFFERED=1 MINI_WORK MINI_OUT
    echo running > "$STATUS"
    setsid bash -c "source .gpu/run_env.sh; $(declare -f monitor drive); STATUS='$STATUS' MINI_WORK='$MINI_WORK' \
      MINI_OUT='$MINI_OUT' drive $(printf '%q ' "$@")" >> "$DRIVER_LOG" 2>&1 < /dev/null &
    disown
    sleep 5; tail -n 5 "$DRIVER_LOG"
    ;;
  wait)
    trap collect EXIT
    limit=${2:-560}; t0=$(date +%s)
    while [ "$(cat "$STATUS" 2>/dev/null)" = running ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
      sleep 10
    done
    ;;
  *)
    trap collect EXIT
    PYTHONUNBUFFERED=1 drive "$@" 2>&1 | tee -a "$DRIVER_LOG"
    ;;
esac
