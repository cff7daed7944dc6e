#!/usr/bin/env bash
# The H200 run behind results/h200/multiblock: a fresh `python train.py` (the defaults), then bench.py on its
# models: HumanEval with the per-decoder profile (the settings of the last sweep, sweep_recipe_s1.json, not a
# new sweep: the session's GPU budget), a float32 losslessness check, and held-out prompts as far as time allows.
# The code is copied first so that edits to the checkout during the run do not reach it. Logs go to /tmp/r.
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/r; mkdir -p $R
cd "$(dirname "$0")/../../.."; rm -rf /tmp/code; cp -r . /tmp/code; cd /tmp/code
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
log start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
python3 train.py > $R/train.log 2>&1; log "train rc $?"
python3 bench.py --sweep_file results/h200/multiblock/sweep_recipe_s1.json --eager_limit 2 --profile > $R/bench.log 2>&1; log "bench rc $?"
python3 bench.py --dtype float32 --compile no --limit 24 --max_new_tokens 128 --eager_limit 2 \
  --sweep_file results/h200/multiblock/sweep_recipe_s1.json > $R/bench_fp32.log 2>&1; log "fp32 rc $?"
python3 bench.py --prompts heldout --limit 64 --eager_limit 2 --sweep_file results/h200/multiblock/sweep_recipe_s1.json \
  --profile > $R/bench_heldout.log 2>&1; log "heldout rc $?"
log "all done"; touch $R/ALLDONE
