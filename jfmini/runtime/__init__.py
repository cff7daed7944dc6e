"""The machinery beside the idea layer (jfmini.model, masks, forcing, jacobi, candidates): nothing here is the
method.

- engine:       a Jacobi decoder run fast (Replay: compile + CUDA graph; decode: the one host loop), its settings
- sampling:     AR sampling's next-token distribution and a draw from it fixed by Exp(1) noise
- kv_cache:     the decoders' static KV cache
- attention:    a mask function as a dense SDPA mask or a FlexAttention BlockMask
- chunked_ce:   the head and a cross-entropy or KL a chunk of positions at a time
- trajectories: trajectories stored, loaded and checked; loop filters; merging the ranks' shares
- training:     the process, the schedule and optimizer, resumable states, the training loop, the validation loss
- errors:       UserError, the one-line error for bad input (the idea layer may raise it)
- signals:      stop signals as an exception, held back while a file is written
- cli:          the scripts' exit codes and stdout, flags from config dataclasses, torchrun's environment, the device
- writes:       atomic writes, the start-up write check, file hashes, the out_dir lock
- files:        every file read is untrusted: what the checks share; trajectories, token caches, sweeps
- checkpoints:  model configs, checkpoints and their loader (it builds the model), each checked whole
- states:       the optimizer and RNG states of a resumable checkpoint, checked before they are loaded
- tokenizers:   offline tokenizers (GPT-2's BPE, p50k), a completion's text
- corpus:       the corpus, its splits and token files, training batches
- prompts:      trajectory and held-out prompts, HumanEval and JSONL prompts
- stop:         what a user keeps: the function's end
- quality:      what a completion is worth against the true code, with standard errors
"""
