#!/usr/bin/env bash
# The H200 run behind results/h200/recipe (2026-12-02): the CUDA tests, three seeds of the defaults side by
# side (one GPU, time-shared), then the benchmark of seed 1 (with the sweep and the per-decoder profile),
# a float32 losslessness check of seed 2 and the quick-start prompt on every seed's models.
# Logs go to /tmp/r. Run from anywhere: bash results/h200/recipe/run.sh
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/r; mkdir -p $R
cd "$(dirname "$0")/../../.."   # the repository root
log() { echo "[$(date +%T)] $*" >> $R/driver.log; }
log start; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/env.txt; python3 -c "import torch;print(torch.__version__)" >> $R/env.txt
(python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_forcing.py tests/test_masks.py tests/test_model.py \
   -k "cuda or flex" > $R/cuda_tests.log 2>&1; log "cuda tests rc $?") &
for s in 1 2 3; do
  (python3 train.py --seed $s --out_dir out/s$s > $R/train_s$s.log 2>&1; log "seed $s rc $?") &
done
wait
log "training done"
python3 bench.py --ckpt out/s1/jf2.pt --base_ckpt out/s1/base.pt --sweep --sweep_prompts 8 --sweep_file out/sweep.json \
  --eager_limit 4 --profile > $R/bench_s1.log 2>&1; log "bench rc $?"
(python3 bench.py --ckpt out/s2/jf2.pt --base_ckpt out/s2/base.pt --dtype float32 --compile no --limit 40 \
  --max_new_tokens 128 --eager_limit 4 --sweep_file out/sweep.json > $R/bench_fp32_s2.log 2>&1; log "fp32 rc $?") &
for s in 1 2 3; do
  python3 decode.py --ckpt out/s$s/jf2.pt --prompt "def fib(n):" > $R/decode_s$s.txt 2>&1
  python3 decode.py --ckpt out/s$s/base.pt --prompt "def fib(n):" --method ar > $R/decode_base_s$s.txt 2>&1
done
wait
log "all done"; touch $R/ALLDONE
# Afterwards, in a separate call on the same warm machine (cut at 175 s by the session's GPU budget):
#   timeout 175 python3 bench.py --ckpt out/s1/jf2.pt --base_ckpt out/s1/base.pt --prompts heldout --limit 48 \
#     --eager_limit 2 --sweep_file out/sweep.json --profile > bench_heldout_s1_partial.log 2>&1
