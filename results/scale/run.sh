#!/usr/bin/env bash
# The GPU run behind results/scale (issue 36): the cost of a distillation row and what more rows buy.
#  1. a base model (`python train.py --stage pretrain`);
#  2. round 1 of the earlier defaults (n=16, 5,120 function prompts, 300 steps of 32 rows) on that base with
#     the code before compact rows (.old, a `git archive 8b24f41`) and with this code, the same trajectories:
#     rows/s side by side on one GPU;
#  3. the curve: one round at n=32 from that base, 51,200 mixed trajectory prompts (collected once), distillation
#     steps of 32 rows in STEPS (rows = 32 x steps: 12.8K, 25.6K, 51.2K, 102.4K), each evaluated on HumanEval and
#     512 held-out functions. STEPS="..." picks other points, NEWN=... the prompts. Steps 1 and 3 (CURVE=1): about
#     24 minutes of an H100, estimated (collecting 51,200 trajectories from the base alone ~7 minutes).
# The code is copied first so that edits to the checkout during the run do not reach it. Logs in /tmp/s.
#   setsid nohup bash results/scale/run.sh > /dev/null 2>&1 &   then   bash results/scale/poll.sh 560
# SMOKE=1 runs the same steps with the CPU preset and tiny sizes (a check of this script on a laptop).
# CURVE=1 skips step 2 (the curve only); BASE=path/base.pt starts from that base instead of pretraining one.
# CPU=1: the curve of the CPU preset on this machine's cores (n=32, 1,024 prompts, STEPS default 100 200 400 800).
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=${R:-/tmp/s}; W=${W:-/tmp/sw}; mkdir -p $R $W
cd "$(dirname "$0")/../.."; rm -rf /tmp/code; cp -r . /tmp/code; cd /tmp/code
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; log "rc $rc, $((SECONDS - t0)) s: ${*:2}"; return $rc; }
# QUICK=1: rows/s and the profile only, on a base pretrained for 20 steps (a step's cost does not depend on
# what the model knows), with every trajectory kept (--max_repeat 0); no curve.
PRE=""; KEEP=""; [ -n "$QUICK" ] && { PRE="--steps 20 --eval_every 1000"; KEEP="--max_repeat 0"; STEPS=" "; }
if [ -n "$SMOKE" ]; then
  SIZE="--preset cpu --steps 30 --traj_batch 32 --probe 4 --heldout 8"; OLDN=64; OLDSTEPS=25; NEWN=128; STEPS=${STEPS:-"10 30"}
elif [ -n "$CPU" ]; then
  SIZE="--preset cpu"; OLDN=256; OLDSTEPS=100; NEWN=1024; STEPS=${STEPS:-"100 200 400 800"}; CURVE=1
else
  SIZE=""; OLDN=5120; OLDSTEPS=300; NEWN=${NEWN:-51200}; STEPS=${STEPS:-"400 800 1600 3200"}
fi
log "start ($SIZE)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt 2>&1
python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> $R/env.txt 2>&1 && export PYTHONPATH=/tmp/site
fi
if [ -n "$BASE" ]; then
  mkdir -p $W/base; cp "$BASE" $W/base/base.pt; log "base: $BASE"
  for c in "$(dirname "$BASE")"/data_*; do ln -sfn "$c" $W/base/; done      # its token cache
else
  timed python3 train.py $SIZE $PRE --stage pretrain --out_dir $W/base > $R/pretrain.log 2>&1 || exit 1
fi
share() {   # a fresh out_dir holding the base model and its token cache
  local c; mkdir -p $1; cp $W/base/base.pt $1/; for c in $W/base/data_*; do ln -sfn $c $1/; done
}
# 2. rows/s, the code before and this code
if [ -z "$CURVE" ]; then
share $W/new; share $W/old
ROUND1="--stage round1 --block_lens 16,32 --traj_prompts $OLDN --distill_steps $OLDSTEPS --probe 0 --heldout 0 $KEEP"
timed python3 train.py $SIZE $ROUND1 --traj_source heldout --out_dir $W/new > $R/rows_new.log 2>&1 || exit 1
cp $W/new/traj_n16_*.npz $W/old/
(cd .old && timed python3 train.py $SIZE $ROUND1 --out_dir $W/old > $R/rows_old.log 2>&1)
# the profile of a step, before and after (30 steps each, caches warm, trajectories reused)
PROF="--stage round1 --block_lens 16,32 --traj_prompts $OLDN --distill_steps 30 --probe 0 --heldout 0 --ckpt_every 100000 $KEEP"
rm -f $W/new/jf1.pt $W/old/jf1.pt
timed python3 results/scale/profile_step.py 30 train.py $SIZE $PROF --traj_source heldout --out_dir $W/new > $R/profile_new.log 2>&1
(cd .old && timed python3 ../results/scale/profile_step.py 30 train.py $SIZE $PROF --out_dir $W/old > $R/profile_old.log 2>&1)
fi
# 3. the curve
for s in $STEPS; do
  d=$W/c$s; share $d
  cp $W/traj_n32_*.npz $d/ 2>/dev/null; cp $W/eval_base.json $d/ 2>/dev/null
  timed python3 train.py $SIZE --stage round1 --block_lens 32 --traj_prompts $NEWN --distill_steps $s --ckpt_every 100000 \
    --out_dir $d > $R/curve_$s.log 2>&1 || exit 1
  cp -n $d/traj_n32_*.npz $d/eval_base.json $W/ 2>/dev/null
done
log "all done"; touch $R/ALLDONE
