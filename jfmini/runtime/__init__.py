"""The machinery beside the idea layer (jfmini.model, masks, forcing, jacobi, candidates): nothing here is the
method.

- engine:       a Jacobi decoder run fast (CUDA graph replay, the host loops for one prompt and for a batch)
- trajectories: trajectories stored, loaded and checked; loop filters; merging the ranks' shares
- training:     the process, the schedule and optimizer, resumable states, the training loop, the validation loss
- common:       flags from config dataclasses, atomic writes, errors, signals, locks
- files:        every file read is untrusted: checkpoints (and their loader), states, trajectories, token caches, sweeps
- data:         offline tokenizers, the corpus and its splits, prompts, HumanEval
- stop:         what a user keeps: the function's end
- quality:      what a completion is worth against the true code, with standard errors
"""
