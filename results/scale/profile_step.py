"""Where a distillation step's GPU time goes: run a train.py (this one or another copy) under the PyTorch
profiler (CUDA activity only) and print the kernels by total GPU time, per optimizer step.

    python results/scale/profile_step.py STEPS path/to/train.py --stage round1 --distill_steps STEPS ...
Use reused trajectories and --probe 0, so that the training steps are the only GPU work of note.
"""
import os
import runpy
import sys

import torch
from torch.profiler import ProfilerActivity, profile

steps, script, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.argv = [script] + args
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
cuda = torch.cuda.is_available()
with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
events = prof.key_averages()
key = "self_device_time_total" if cuda else "self_cpu_time_total"
total = sum(getattr(e, key) for e in events)
print(f"{'GPU' if cuda else 'CPU'} time per step: {total / steps / 1e3:.1f} ms over {steps} steps (all kernels, compile-time autotuning and "
      f"the final validation loss included)")
print(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
