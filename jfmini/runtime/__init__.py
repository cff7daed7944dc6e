"""The machinery beside the idea layer (jfmini.model, masks, forcing, jacobi): nothing here is the method.

- engine:       a Jacobi decoder run fast (CUDA graph replay, the host loop, batches), the AR oracle
- trajectories: trajectories stored, loaded and checked; loop filters; accuracy by distance
- common:       flags from config dataclasses, atomic writes, the checkpoint loader, errors, signals, locks
- files:        every file read is untrusted: checkpoints, states, trajectories, token caches, sweeps
- data:         offline tokenizers, the corpus and its splits, prompts, HumanEval
- quality:      what a completion is worth against the true code, with standard errors
"""
