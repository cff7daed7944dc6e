#!/usr/bin/env bash
# The H200 run behind results/h200/quality (2026-12-02): a smoke run of every GPU path, three seeds of the
# defaults side by side (one GPU, time-shared), then the benchmark of seed 1 and a float32 check of seed 2.
# Logs go to /tmp/r. Run from anywhere: bash results/h200/quality/run.sh
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/r; mkdir -p $R
cd "$(dirname "$0")/../../.."   # the repository root
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
log start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
# smoke: every compiled GPU path of the rounds (anchor forward, flex mask, truth rows), in the background of the seeds
(python3 train.py --out_dir /tmp/smoke --steps 40 --traj_prompts 512 --distill_steps 10 --distill_batch 8 --probe 16 --heldout 16 --truth 1 \
   --ckpt_every 40 --eval_every 40 > $R/smoke.log 2>&1; echo "smoke rc $?" >> $R/driver.log) &
for s in 1 2 3; do
  (python3 train.py --seed $s --out_dir out/s$s > $R/train_s$s.log 2>&1; echo "seed $s rc $?" >> $R/driver.log) &
done
wait
log "training done"
for s in 1 2 3; do
  python3 decode.py --ckpt out/s$s/jf2.pt --prompt "def fib(n):" > $R/decode_s$s.txt 2>&1
  python3 decode.py --ckpt out/s$s/base.pt --prompt "def fib(n):" --method ar > $R/decode_base_s$s.txt 2>&1
done
log "decode done"
python3 bench.py --ckpt out/s1/jf2.pt --base_ckpt out/s1/base.pt --eager_limit 8 > $R/bench_s1.log 2>&1; log "bench rc $?"
python3 bench.py --ckpt out/s2/jf2.pt --base_ckpt out/s2/base.pt --dtype float32 --compile no --limit 40 --max_new_tokens 128 --eager_limit 4 > $R/bench_fp32_s2.log 2>&1; log "fp32 rc $?"
log "all done"
