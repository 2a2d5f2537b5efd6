#!/usr/bin/env bash
# The CPU default configuration (params.yaml: emb 128, LSTM 256, z 32, BN-VAE 0.7, its step budget: 1,100 steps
# of 4,096-token batches) trained on a GPU in fp32 (train.bf16=false, as on a CPU) for speed:
# the LM baseline and the VAE with the same budget, then evaluate with K=500 on the default
# 500 test/valid documents and on the whole test split. Needs data/tokens + data/tokenizer
# from `vaepipe ingest && vaepipe tokenize` and, where missing, wheels in .whl/.
set -u
OUT=${OUT:-bench/out/gpu-default}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
run() { local t=$1 name=$2; shift 2; echo "== $name: $*"; timeout -s INT "$t" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "== $name exit ${PIPESTATUS[0]}"; }
D="--params params.yaml --set tracking.enabled=false --set train.device=cuda --set train.bf16=false --set evaluate.device=cuda"
run 90 train_lm python3 -m vaepipe train $D --set model.kind=lm
run 120 train_vae python3 -m vaepipe train $D
run 60 evaluate python3 -m vaepipe evaluate $D
cp reports/metrics.json "$OUT/metrics_500.json" 2>/dev/null
run 60 evaluate_full python3 -m vaepipe evaluate $D --set evaluate.max_docs=0 --set 'evaluate.splits=[test]'
cp reports/metrics.json "$OUT/metrics_full_test.json" 2>/dev/null
exit 0
