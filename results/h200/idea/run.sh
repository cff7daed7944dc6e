#!/usr/bin/env bash
# The H200 run behind results/h200/idea and results/h200/sampling (2026-12-04): the code split into an idea
# layer and a machinery layer, with exact sampling and batches. The quick-start commands exactly as the README
# gives them (a fresh `python train.py`, then `python bench.py` with --eager_limit 2: the session's GPU budget),
# then on the same models the batch table (--batch 1,4,16,64), sampled benchmarks at temperature 0.7 and 1.0
# (64 prompts), a float32 losslessness check, `python decode.py --prompt "def fib(n):"` and the CUDA-only
# tests, each timed. The code is copied first so that edits to the checkout during the run do not reach it.
# Logs go to /tmp/r. Run from anywhere: bash results/h200/idea/run.sh
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/r; mkdir -p $R
cd "$(dirname "$0")/../../.."; rm -rf /tmp/code; cp -r . /tmp/code; cd /tmp/code
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; log "rc $rc, $((SECONDS - t0)) s: ${*:2}"; }
log start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
timed bash -c "python3 train.py > $R/train.log 2>&1" train.py
timed bash -c "python3 bench.py --eager_limit 2 > $R/bench.log 2>&1" bench.py
timed bash -c "python3 bench.py --batch 1,4,16,64 > $R/bench_batch.log 2>&1" bench batch
timed bash -c "python3 bench.py --temperature 0.7 --limit 64 --eager_limit 2 > $R/bench_t07.log 2>&1" bench T=0.7
timed bash -c "python3 bench.py --temperature 1.0 --limit 64 --eager_limit 2 > $R/bench_t10.log 2>&1" bench T=1.0
timed bash -c "python3 bench.py --dtype float32 --compile no --limit 24 --max_new_tokens 128 --eager_limit 2 \
  > $R/bench_fp32.log 2>&1" bench fp32
timed bash -c "python3 decode.py --prompt 'def fib(n):' > $R/decode_fib.txt 2>&1" decode.py
timed bash -c "timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_forcing.py \
  tests/test_masks.py tests/test_model.py tests/test_sampling.py -k 'cuda or flex' > $R/cuda_tests.log 2>&1" cuda tests
log "all done"; touch $R/ALLDONE
