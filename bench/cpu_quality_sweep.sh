#!/usr/bin/env bash
# One variant of the CPU default configuration at the CPU default budget, on this CPU:
# train (1 thread, tracking off), then evaluate the first evaluate.max_docs test documents
# with K = evaluate.iw_samples next to the LM baseline in paths.baseline.
#
#   bench/cpu_quality_sweep.sh NAME [--set KEY=VALUE ...]
#   BASELINE=models/sweep/lm-x bench/cpu_quality_sweep.sh NAME ...   # compare with another LM
#   TRAIN_ONLY=1 bench/cpu_quality_sweep.sh lm-x --set model.kind=lm  # train an LM baseline
#                                     # (into models/sweep/lm-x: an LM trains into paths.baseline)
#
# Two variants side by side use both cores of a 2-core box. Results: bench/out/cpu-quality/NAME.txt
# (the evaluate summary line and the training's last validation), models in models/sweep/NAME.
set -eu
NAME=$1; shift
OUT=bench/out/cpu-quality; mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
# An LM writes its checkpoints to paths.baseline, so an LM variant trains into
# paths.baseline=models/sweep/NAME (never the pipeline's models/lm); paths.model and paths.baseline
# may not be one folder, so its unused paths.model is models/sweep/_none.
case " $* " in
  *" model.kind=lm "*) MODEL=models/sweep/_none; DEFAULT_BASELINE=models/sweep/$NAME ;;
  *) MODEL=models/sweep/$NAME; DEFAULT_BASELINE=models/lm ;;
esac
COMMON=(--set tracking.enabled=false --set train.num_threads=1 --set paths.model=$MODEL
        --set paths.reports=reports/sweep/$NAME --set evaluate.splits=[test] --set evaluate.num_examples=0
        --set paths.baseline=${BASELINE:-$DEFAULT_BASELINE})
start=$(date +%s)
vaepipe train "${COMMON[@]}" "$@" >"$OUT/$NAME.train.log" 2>&1
mid=$(date +%s)
if [ -n "${TRAIN_ONLY:-}" ]; then grep -E "validation|done" "$OUT/$NAME.train.log" | tail -2 >"$OUT/$NAME.txt"; exit 0; fi
vaepipe evaluate "${COMMON[@]}" "$@" >"$OUT/$NAME.eval.log" 2>&1
end=$(date +%s)
{
  echo "variant $NAME: $*"
  grep -E "validation|done" "$OUT/$NAME.train.log" | tail -2
  grep -E "test:" "$OUT/$NAME.eval.log"
  echo "train $((mid - start)) s, evaluate $((end - mid)) s"
} >"$OUT/$NAME.txt"
cat "$OUT/$NAME.txt"
