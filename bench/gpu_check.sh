#!/usr/bin/env bash
# The GPU session's checks, as run on a lent H200 through the device tool: throughput
# benchmarks (train, IW-NLL evaluation, embed) and a full-size run of params-gpu.yaml with the
# no-op tracker: the LM baseline and the VAE with the same 1500-step budget, then evaluate with
# K=500. Needs the token data of params-gpu.yaml (vaepipe tokenize --params params-gpu.yaml) and,
# where pyyaml/tqdm/matplotlib are missing, their wheels in .whl/. Logs go to $OUT.
set -u
OUT=${OUT:-bench/out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
run() { local t=$1 name=$2; shift 2; echo "== $name: $*"; timeout -s INT "$t" "$@" 2>&1 | tee "$OUT/$name.txt"; echo "== $name exit ${PIPESTATUS[0]}"; }
G="--params params-gpu.yaml --set tracking.enabled=false --set train.max_steps=1500 --set train.kl_warmup_steps=600"
run 120 bench_train python3 bench/bench_train.py --device cuda --full --tokens data/tokens-16k --repeats 3
run 110 bench_evaluate python3 bench/bench_evaluate.py --device cuda --tokens data/tokens-16k --n 1000 --loop-n 40 --batch-tokens 262144
run 50 bench_embed python3 bench/bench_embed.py --device cuda --tokens data/tokens-16k --scales 1,10 --work /tmp/embed-bench
run 60 train_lm python3 -m vaepipe train $G --set model.kind=lm
run 130 train_vae python3 -m vaepipe train $G
run 70 evaluate python3 -m vaepipe evaluate $G
cp reports/gpu/metrics.json "$OUT/metrics.json" 2>/dev/null
exit 0
