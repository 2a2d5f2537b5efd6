#!/usr/bin/env bash
# BN-VAE gamma at the CPU default budget (params.yaml; 1,100 steps when measured; fp32) on a GPU for speed:
# KL floor vs likelihood. Evaluates the first 500 test documents with K=500.
set -u
OUT=${OUT:-bench/out/gpu-gamma}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
D="--params params.yaml --set tracking.enabled=false --set train.device=cuda --set train.bf16=false --set evaluate.device=cuda --set evaluate.splits=[test] --set evaluate.num_examples=0"
for g in ${GAMMAS:-0.5 0.6}; do
  python3 -m vaepipe -q train $D --set model.bn_gamma=$g --set paths.model=models/vae-g$g 2>&1 | tail -2
  python3 -m vaepipe evaluate $D --set paths.model=models/vae-g$g --set paths.reports=reports/g$g 2>&1 | grep "test:" | tee "$OUT/gamma-$g.txt"
done
exit 0
