#!/usr/bin/env bash
# The GPU check of the restructured code: results/defaults/run.sh with QUICK=1 (a fresh `python train.py`,
# then `python bench.py` on HumanEval and its float32 losslessness check), then bench.py of the code before
# the restructuring (3c66188) on the same models, so that step times compare on one machine.
# .base holds that code, made beforehand and carried:
#   mkdir .base && git archive 3c66188 jfmini bench.py train.py decode.py | tar -x -C .base
# BASE_LIMIT=48: the earlier code's bench.py on the first 48 prompts only (step times need few).
# Start: setsid nohup bash results/restructure/gpu/run.sh > /dev/null 2>&1 &   Poll: results/defaults/poll.sh
R=${R:-/tmp/r}; mkdir -p $R
cd "$(dirname "$0")/../../.."
QUICK=1 R=$R bash results/defaults/run.sh
rm $R/ALLDONE
t0=$SECONDS
cd .base && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site python3 bench.py --ckpt /tmp/code/out/jf1.pt \
  --base_ckpt /tmp/code/out/base.pt --sweep_file /tmp/code/out/sweep.json --eager_limit 2 --limit ${BASE_LIMIT:-164} $BARGS \
  > $R/bench_3c66188.log 2>&1
echo "[$(date +%T)] rc $?, $((SECONDS - t0)) s: bench.py of 3c66188 on the same models" >> $R/driver.log
touch $R/ALLDONE
