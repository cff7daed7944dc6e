"""Train jfmini end to end: pretrain a small GPT on Python code, then Jacobi Forcing rounds.

    python train.py                           # the whole pipeline: pretrain, then the rounds of --block_lens
    python train.py --stage pretrain          # one stage; later stages reuse earlier outputs in --out_dir
    python train.py --resume                  # continue an interrupted stage from its last checkpoint
    torchrun --nproc_per_node=2 train.py      # data parallel (nccl on GPU, gloo on CPU)

Outputs in --out_dir: base.pt (the AR model), traj_n{n}_{hash}.npz (trajectories, named after the model
and settings that made them), jf{r}.pt (round r model),
*_state.pt (resumable training state, written atomically every --ckpt_every steps, removed when the
stage is done). One run at a time per --out_dir (train.lock holds its pid).
Flags left unset take their value from --preset: gpu (a 51M-parameter model and one round at n=32; needs a
CUDA GPU), gpu-long (the same, distilled on twice the prompts for 8,000 steps instead of 2,200) or cpu (a
2.6M-parameter model and two rounds, n=16 then n=32, for a laptop). The gpu and cpu presets' values are
listed below; the resolved config is printed at start-up.
"""
import concurrent.futures
import copy
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jfmini.runtime.common import (UserError, atomic_save, check_writable, cli, field, file_sha256, out_dir_lock,
                                   parse_config, world_size)
from jfmini.runtime.files import (check_npz, check_token_files, check_token_meta, check_trajectories, gb, load_checkpoint,
                                  memory_bytes, model_config_problem, param_count)
from jfmini.runtime.data import (TOKENIZERS, full_vocab, get_batch, load_split, model_tokenizer, prepare_corpus,
                                 token_cache, tokenizer, trajectory_prompts, TRAJ_SOURCES)
from jfmini.runtime.training import (Run, changed_flags, flops_per_token, make_optimizer, resume, save_state, train_loop,
                                     val_loss)
from jfmini.forcing import ce_chunk, collect_trajectories, pack_rows, row_length, row_objective
from jfmini.runtime.trajectories import Trajectories, repetitive
from jfmini.masks import dense_mask, flex_mask, row_mask
from jfmini.model import GPT, GPTConfig
from jfmini.tools.evaluate import eval_settings, evaluate, saved_settings


@dataclass
class TrainConfig:
    stage: str = field("all", "stages to run: all, or a comma list of pretrain, round1, round2")
    out_dir: str = field("out", "where checkpoints, trajectories and the token cache go")
    preset: str = field("auto", "defaults for the unset flags: gpu (the real model), gpu-long (the same with "
                                "--traj_prompts 51200 --distill_steps 8000), cpu (a small one); auto = gpu when "
                                "CUDA is visible", ["auto", "gpu", "gpu-long", "cpu"])
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    resume: bool = field(False, "continue an interrupted stage from its *_state.pt checkpoint")
    seed: int = field(1337, "seed for init, batches, prompts and the noise schedule")
    compile: str = field("auto", "torch.compile the training steps: auto (on CUDA), yes, no", ["auto", "yes", "no"])
    # model (None: from the preset)
    n_layer: int = field(None, "transformer blocks")
    n_head: int = field(None, "attention heads")
    d_model: int = field(None, "model width")
    seq_len: int = field(None, "context length")
    tokenizer: str = field("p50k", "BPE: p50k = GPT-2's plus one token per run of 2-25 spaces (made for code), "
                                   "gpt2 = GPT-2's own", list(TOKENIZERS))
    vocab_size: int = field(None, "tokens: the tokenizer's full vocabulary (p50k 50281, gpt2 50257), or fewer: GPT-2's "
                                  "first merges (a cheaper output layer)")
    # pretraining
    corpus: str = field(None, "the Python sources installed here: stdlib, stdlib+torch, or stdlib+torch+deps (with "
                              "numpy, sympy, networkx, mpmath, jinja2)", ["stdlib", "stdlib+torch", "stdlib+torch+deps"])
    batch_size: int = field(None, "sequences per micro-batch (per process)")
    grad_accum: int = field(None, "micro-batches per optimizer step")
    steps: int = field(None, "pretraining optimizer steps")
    lr: float = field(None, "peak learning rate (AdamW, linear warmup, cosine decay to lr/10)")
    warmup: int = field(None, "warmup steps")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices")
    eval_every: int = field(None, "steps between validation losses")
    eval_batches: int = field(None, "batches per validation loss")
    ckpt_every: int = field(None, "steps between resumable checkpoints")
    # Jacobi Forcing rounds
    block_lens: str = field(None, "block length n of each round, comma separated (round r uses the r-th)")
    traj_prompts: int = field(None, "trajectory prompts per round (see --traj_source)")
    traj_tokens: int = field(None, "new tokens per trajectory (num_blocks = traj_tokens / n)")
    traj_batch: int = field(None, "prompts Jacobi-decoded at once while collecting trajectories")
    distill_steps: int = field(None, "optimizer steps per round")
    distill_batch: int = field(None, "packed rows per step (per process)")
    distill_lr: float = field(None, "peak learning rate of a round")
    traj_source: str = field("mixed", "trajectory prompts: heldout = documented functions from files pretraining "
                                      "never saw, cut after the docstring; lines = any line end in those files; mixed "
                                      "= heldout's, then line ends to make up --traj_prompts; train = 64-token "
                                      "function starts from the pretraining files", list(TRAJ_SOURCES))
    lam: float = field(10.0, "weight of the AR loss: L = L_consistency + lam * L_AR (the paper's: 10)")
    ar_target: str = field("anchor", "the AR loss on the trajectories' clean stream: greedy = cross-entropy to the source "
                                     "model's own greedy tokens (the paper's; loops included), anchor = KL divergence "
                                     "from the anchor model's predictions there (keeps its AR behaviour)",
                           ["greedy", "anchor"])
    anchor_to: str = field("base", "the anchor model of the KL terms: base = the pretrained model (drift does not "
                                   "compound over rounds), start = the round's starting model", ["base", "start"])
    truth: float = field(5.0, "weight of an AR loss on the ground truth: the real code after each trajectory prompt "
                              "(0 = off)")
    truth_target: str = field("anchor", "the ground-truth loss: ce = cross-entropy to the real tokens (CLLM's use_gt_labels; "
                                    "new data the base never saw), anchor = KL divergence from the anchor model on "
                                    "that code (keeps its predictions on real code, adds no data)", ["ce", "anchor"])
    max_repeat: int = field(10, "drop trajectories whose greedy continuation holds a run of this many identical tokens "
                                "(greedy loops; 0 = keep all)")
    schedule: str = field("progressive", "noise schedule", ["progressive", "random", "reverse"])
    fresh_states: bool = field(True, "draw each block's noisy state anew whenever a trajectory is packed (a random "
                                     "ramp phase, a random state of the nearest noise ratio); else the same nearest "
                                     "state every epoch")
    cons_window: int = field(8, "consistency loss on the first N positions from a block's first wrong token only "
                                "(0 = through the block's end, the paper's)")
    cons_target: str = field("soft", "consistency target: soft = the clean distribution (the paper's), hard = its "
                                     "argmax, the fixed point's next token", ["soft", "hard"])
    context: str = field("clean", "what noisy blocks attend to: earlier noisy blocks (the paper's noise-aware "
                                  "mask) or earlier clean ones (CLLM-style, what vanilla Jacobi decoding sees)",
                         ["noisy", "clean"])
    replay: float = field(5.0, "weight of an extra AR loss on real corpus text each round step (keeps the "
                               "distilled model's validation loss near the base; 0 = off, the paper's loss)")
    replay_batch: int = field(None, "corpus sequences per step for the replay loss")
    anchor: str = field("kl", "the replay loss: ce = cross-entropy on the corpus text; kl = KL divergence from the "
                              "anchor model (--anchor_to) on that text (keeps its predictions, not just its loss)",
                        ["ce", "kl"])
    noise_window: int = field(16, "blocks per ramp of the progressive schedule (capped at the blocks per "
                                  "trajectory, so every trajectory sees the whole ramp)")
    probe: int = field(None, "HumanEval prompts for the speed and quality check of the base model and of each round: "
                             "vanilla-Jacobi TPF (tokens per forward) and the quality of the greedy output (0 = no "
                             "check at all)")
    heldout: int = field(None, "held-out documented functions (files no model trains on, true bodies known) for the "
                               "same check (0 = off)")


PRESETS = {
    "gpu": dict(n_layer=8, n_head=8, d_model=512, seq_len=1024, corpus="stdlib+torch+deps",
                batch_size=32, grad_accum=2, steps=1500, lr=2e-3, warmup=100, eval_every=300, eval_batches=20,
                ckpt_every=1000, block_lens="32", traj_prompts=25600, traj_tokens=256, traj_batch=512,
                distill_steps=2200, distill_batch=32, distill_lr=3e-4, replay_batch=8, probe=164, heldout=512),
    "cpu": dict(vocab_size=4096, n_layer=4, n_head=4, d_model=192, seq_len=256, corpus="stdlib", batch_size=16,
                grad_accum=1, steps=1000, lr=3e-3, warmup=50, eval_every=250, eval_batches=5, ckpt_every=100,
                block_lens="16,32", traj_prompts=256, traj_tokens=64, traj_batch=64, distill_steps=100, distill_batch=8,
                distill_lr=5e-4, replay_batch=2, probe=40, heldout=64),
}
PRESETS["gpu-long"] = {**PRESETS["gpu"], "traj_prompts": 51200, "distill_steps": 8000}   # 4x the gpu preset's rows

# --help shows both presets' value of each flag they set
PRESET_HELP = {k: ", ".join(f"{name} preset: {PRESETS[name].get(k, 'the full vocabulary')}" for name in ("gpu", "cpu"))
               for k in PRESETS["cpu"]}


def checks(c):
    yield c.stage == "all" or all(s == "pretrain" or re.fullmatch(r"round[1-9]", s) for s in c.stage.split(",")), \
        "--stage must be 'all' or a comma list of pretrain, round1, round2, ..."
    yield c.cons_window >= 0, "--cons_window must be 0 (to the block end) or more"
    full, least = full_vocab(c.tokenizer), 257 if c.tokenizer == "gpt2" else 281    # the bytes (+ space runs), eot
    yield c.vocab_size is None or least <= c.vocab_size <= full, f"--vocab_size must be between {least} and {full} " \
                                                                 f"for the {c.tokenizer} tokenizer"
    for name in ("n_layer", "n_head", "d_model", "seq_len", "batch_size", "grad_accum", "steps", "eval_every",
                 "eval_batches", "ckpt_every", "traj_prompts", "traj_tokens", "traj_batch", "distill_steps",
                 "distill_batch", "noise_window", "replay_batch"):
        v = getattr(c, name)
        yield v is None or v >= 1, f"--{name} must be at least 1 (got {v})"
    for name in ("lr", "distill_lr"):
        v = getattr(c, name)
        yield v is None or 0 < v < math.inf, f"--{name} must be a positive number (got {v})"
    yield c.warmup is None or c.warmup >= 0, "--warmup must be 0 or more"
    for name in ("lam", "replay", "weight_decay"):
        v = getattr(c, name)
        yield 0 <= v < math.inf, f"--{name} must be a number, 0 or more (got {v})"
    yield c.probe is None or c.probe >= 0, "--probe must be 0 (off) or more"
    yield c.heldout is None or c.heldout >= 0, "--heldout must be 0 (off) or more"
    yield c.max_repeat >= 0, "--max_repeat must be 0 (keep all) or more"
    yield 0 <= c.truth < math.inf, f"--truth must be a number, 0 or more (got {c.truth})"
    yield 0 <= c.seed < 2**32, f"--seed must be between 0 and 2**32 - 1 (got {c.seed})"
    try:
        ok = c.block_lens is None or all(int(x) >= 2 for x in c.block_lens.split(","))
    except ValueError:
        ok = False
    yield ok, f"--block_lens must be comma-separated integers of at least 2 (got {c.block_lens!r})"
    if c.d_model and c.n_head:
        yield c.d_model % c.n_head == 0 and (c.d_model // c.n_head) % 2 == 0, \
            "--d_model must be a multiple of --n_head with an even head size"
    world = world_size()                                          # torchrun's processes
    if c.traj_prompts and c.distill_batch and c.stage != "pretrain":
        yield c.traj_prompts >= c.distill_batch * world, \
            f"--traj_prompts {c.traj_prompts} is fewer than one step's rows (--distill_batch {c.distill_batch} x " \
            f"{world} processes); raise --traj_prompts or lower --distill_batch"


# ----------------------------------------------------------------------------- helpers

# Flags that change what a stage computes: --resume refuses a state written with other values, and a
# finished file made with other values is reported. A round depends on every flag except these (and on
# its source model's file, and its block length alone of --block_lens).
PRETRAIN_FLAGS = ("seed", "corpus", "tokenizer", "vocab_size", "n_layer", "n_head", "d_model", "seq_len", "batch_size",
                  "grad_accum", "steps", "lr", "warmup", "weight_decay")
NOT_ROUND_FLAGS = set(PRETRAIN_FLAGS[1:]) | {"stage", "out_dir", "preset", "device", "resume", "compile",
                                              "eval_every", "eval_batches", "ckpt_every", "probe", "heldout", "traj_batch",
                                              "block_lens"}
ROUND_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_ROUND_FLAGS)


# ----------------------------------------------------------------------------- pretraining

def pretrain(cfg, run, out):
    """Pretrain the AR base model on the corpus: next-token cross-entropy, saved as base.pt."""
    final, state_path = out / "base.pt", out / "pretrain_state.pt"
    if final.exists() and not cfg.resume:
        run.log(f"pretrain: {final} exists, reusing it (delete it to pretrain again)")
        return
    train_data, val_data, mcfg = pretrain_data(cfg, run, out)
    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(run.device)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, run.cuda)
    if cfg.resume and final.exists() and not state_path.exists():
        run.log(f"pretrain: {final} is already complete")
        return
    extra = {"kind": "pretrain_state", "world": run.world}
    step = resume(cfg, run, state_path, extra["kind"], "pretrain", model, opt, cfg.steps, "--steps", PRETRAIN_FLAGS,
                  model_config=mcfg.to_dict(), world=run.world)
    n_params = model.num_params()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * run.world
    run.log(f"pretrain: {n_params / 1e6:.1f}M parameters, {len(train_data):,} train tokens, "
            f"{tokens_per_step:,} tokens/step, {cfg.steps} steps ({cfg.steps * tokens_per_step / len(train_data):.1f} epochs)")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if run.ddp else model
    pos = torch.arange(cfg.seq_len, device=run.device)

    def loss_fn(x, y):
        with run.autocast():
            logits = ddp_model(x, pos)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    step_loss = torch.compile(loss_fn) if run.compile else loss_fn
    rng = np.random.default_rng(cfg.seed * 1000 + run.rank + step)  # a fresh stream after a resume

    def one_step(step):                                              # grad_accum micro-batches
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = (torch.from_numpy(v).to(run.device, non_blocking=True)
                    for v in get_batch(train_data, cfg.batch_size, cfg.seq_len, rng))
            if run.ddp:
                ddp_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            loss = step_loss(x, y) / cfg.grad_accum
            loss.backward()
            total = total + loss.detach()
        return total, {}, tokens_per_step

    step = train_loop(run, model, opt, "pretrain", "pretraining", step, cfg.steps, cfg.lr, cfg.warmup, one_step,
                      lambda s: save_state(state_path, model, opt, s, cfg, extra), cfg.ckpt_every, state_path,
                      flops=flops_per_token(mcfg, n_params), eval_every=cfg.eval_every,
                      on_eval=lambda s: run.log(f"pretrain step {s}: val loss "
                                                f"{val_loss(model, val_data, mcfg, cfg.eval_batches, cfg.batch_size, run):.4f}"))
    if run.ddp:
        check_replicas(model, run)
    if run.master:
        vl = val_loss(model, val_data, mcfg, cfg.eval_batches, cfg.batch_size, run)
        atomic_save({"model": model.state_dict(), "model_config": mcfg.to_dict(), "kind": "base",
                     "val_loss": vl, "train_config": dataclasses.asdict(cfg), "steps": step}, final)
        state_path.unlink(missing_ok=True)              # base.pt holds it all now (a round does the same)
        run.log(f"pretrain: done, val loss {vl:.4f}, saved {final}")


def pretrain_data(cfg, run, out):
    """The tokenized corpus (made once, by the first process) and the base model's config."""
    data_dir = token_cache(out, cfg.corpus, cfg.vocab_size, cfg.tokenizer)
    enc = tokenizer(cfg.tokenizer, cfg.vocab_size)
    if run.master:
        check_token_meta(data_dir)
        prepare_corpus(data_dir, cfg.corpus, enc, log=run.log)
    if run.ddp:
        dist.barrier()
    check_token_files(data_dir, enc.n_vocab, cfg.seq_len)
    mcfg = GPTConfig(vocab_size=enc.n_vocab, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     d_model=cfg.d_model, tokenizer=cfg.tokenizer)
    return load_split(data_dir, "train"), load_split(data_dir, "val"), mcfg


# ----------------------------------------------------------------------------- Jacobi Forcing rounds


def row_batches(num_rows, batch, rank, world, rng):
    """This rank's rows, batch by batch: each epoch is one permutation (the same rng state on every rank)
    split between the ranks, so they never train on the same row in an epoch."""
    order, cursor = rng.permutation(num_rows), 0
    while True:
        if cursor + batch * world > len(order):
            order, cursor = rng.permutation(num_rows), 0
        yield order[cursor + rank * batch: cursor + (rank + 1) * batch]
        cursor += batch * world


def trajectories(cfg, run, src, model, n, T, corpus, traj_dir):
    """Collect: the source model Jacobi-decodes the trajectory prompts, recording every state of every
    block. A file is named after (and records) the checkpoint and settings that made it, and is reused
    only by a run with the same ones."""
    source = json.dumps({"checkpoint": src.name, "sha256": file_sha256(src), "block_len": n, "blocks": T,
                         "prompts": cfg.traj_prompts, "from": cfg.traj_source, "corpus": corpus, "truth": n * T},
                        sort_keys=True)
    path = Path(traj_dir) / f"traj_n{n}_{hashlib.sha256(source.encode()).hexdigest()[:10]}.npz"
    if path.exists():
        check_npz(path)
        traj = Trajectories.load(path)
        if traj.source == source:
            check_trajectories(traj, path, n, T, model.cfg)
            run.log(f"trajectories: reusing {len(traj)} from {path}")
            return traj
    t0 = time.time()
    enc = model_tokenizer(model.cfg)
    max_prompt = traj_shape(cfg, n, model.cfg.seq_len)[1]
    if max_prompt < 8:
        raise UserError(f"--traj_tokens {cfg.traj_tokens} leaves no room for a prompt in the model's context "
                        f"of {model.cfg.seq_len}; lower --traj_tokens")
    found = trajectory_prompts(corpus, enc, cfg.traj_prompts, cfg.traj_source, max_prompt, seed=n, after=n * T)
    prompts, truth = [p for p, _ in found], [t for _, t in found]
    mine, my_truth = prompts[run.rank::run.world], truth[run.rank::run.world]   # each rank decodes its share
    run.log(f"trajectories: {len(prompts)} {cfg.traj_source} prompts, {T} blocks of n={n} "
            f"({'bf16' if run.cuda else 'fp32'}) from {src.name}")
    decoder = copy.deepcopy(model).to(torch.bfloat16) if run.cuda else model
    traj = collect_trajectories(decoder.eval(), mine, n, T, min(cfg.traj_batch, len(mine)), eot=None,
                                compile=run.compile, log=run.log, source=source, truth=my_truth)
    del decoder
    model.cache = None
    if run.ddp:
        parts = [None] * run.world
        dist.all_gather_object(parts, traj)
        traj = merge_trajectories(parts)
    if run.master:
        traj.save(path)
    run.log(f"trajectories: {len(traj)}, {len(traj.states)} states ({len(traj.states) / (len(traj) * T):.1f} "
            f"iterations per block) in {time.time() - t0:.0f}s, saved {path}")
    return traj


def packed_batches(cfg, run, traj, r, step, L, eot, truth):
    """Pack: endless batches of compact training rows (forcing.pack_rows): per block a window of the noisy
    state the schedule draws, the prompt and the clean stream, and (truth) the prompt's real code. On a
    GPU a thread packs the next batch while the current step runs."""
    order_rng = np.random.default_rng(cfg.seed * 7919 + r * 31 + step)      # the same on every rank
    rng = np.random.default_rng(cfg.seed * 6007 + r * 31 + run.rank + step)  # noise schedule, per rank
    window = min(cfg.noise_window, traj.fixed.shape[1])
    source = (pack_rows(traj, rows, L, cfg.schedule, rng, eot, window, cfg.fresh_states, cfg.cons_window, cfg.context,
                        truth) for rows in row_batches(len(traj), cfg.distill_batch, run.rank, run.world, order_rng))
    if not run.cuda:                       # on a CPU the cores are busy training anyway
        yield from source
        return
    with concurrent.futures.ThreadPoolExecutor(1) as prefetch:
        ahead = prefetch.submit(next, source)
        try:
            while True:
                p, ahead = ahead.result(), prefetch.submit(next, source)
                yield p
        finally:
            ahead.cancel()


def round_objective(cfg, run, model, anchor):
    """forcing.row_objective with this run's choices; on a GPU the model's forwards and each chunk of the
    loss are compiled (the same shapes every round, so one compile serves the run). DDP wraps the model
    it trains."""
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if run.ddp else model
    if run.compile:
        ddp_model, anchor = torch.compile(ddp_model), anchor and torch.compile(anchor)
    return row_objective(ddp_model, anchor, cfg.cons_target, cfg.ar_target, cfg.anchor,
                         cfg.truth_target if cfg.truth > 0 else None, run.autocast,
                         chunk_fn=compiled_chunk() if run.compile else ce_chunk,
                         chunk=2048 if run.cuda else 512)           # measured: 14 vs 8 rows/s on 2 cores


@functools.cache
def compiled_chunk():
    return torch.compile(ce_chunk, dynamic=False)


def run_row_length(cfg, seq_len):
    """One row length for every round of the run (so one compiled step serves them all): the longest
    compact row any round's block length makes."""
    lens = [int(x) for x in cfg.block_lens.split(",")]
    shapes = {n: traj_shape(cfg, n, seq_len) for n in lens}                 # n: (blocks, longest prompt)
    return max(row_length(shapes[n][1], shapes[n][0] * n, n, cfg.cons_window, cfg.context, truth=cfg.truth > 0)
               for n in lens)


def traj_shape(cfg, n, seq_len):
    """(blocks per trajectory, longest prompt) at block length n: prompt and trajectory fit the context."""
    T = max(1, cfg.traj_tokens // n)
    return T, min(192, seq_len - n * T)


def anchor_model(cfg, run, model, base_path):
    """The frozen model the KL terms keep close to (None when no term needs one): the base model, or the
    round's starting model (taken before a resumed state is loaded over it)."""
    replay_kl = cfg.replay > 0 and cfg.anchor == "kl"
    truth_kl = cfg.truth > 0 and cfg.truth_target == "anchor"
    if not (replay_kl or truth_kl or cfg.ar_target == "anchor"):
        return None
    if cfg.anchor_to == "base" and base_path is not None:
        if not Path(base_path).is_file():
            raise UserError(f"the KL anchor is the base model {base_path}, which is missing; put it back, or pass "
                            f"--anchor_to start")
        anchor = load_checkpoint(base_path, run.device)[0]
    else:
        anchor = copy.deepcopy(model)
    return anchor.eval().requires_grad_(False)


def round_inputs(cfg, run, model, traj, r, data_dir, base_path):
    """What a round trains on beside its trajectories: (the frozen anchor model or None, the corpus text
    of the replay loss or None, whether rows hold the truth term)."""
    B = cfg.distill_batch
    if len(traj) < B * run.world:                  # the corpus gave fewer prompts than asked for
        raise UserError(f"round {r}: {len(traj)} trajectories are fewer than one step's rows (--distill_batch {B} "
                        f"x {run.world} processes); lower --distill_batch")
    replay = cfg.replay > 0 and (data_dir / "train.bin").exists()
    if cfg.replay > 0 and not replay:
        run.log(f"round {r}: no token cache in {data_dir}, so no replay loss")
    anchor = anchor_model(cfg, run, model, base_path)
    truth = cfg.truth > 0 and traj.truth.shape[1] > 0
    if cfg.truth > 0 and not truth:
        run.log(f"round {r}: the trajectories hold no ground truth, so no truth loss")
    return anchor, load_split(data_dir, "train") if replay else None, truth


def distill(cfg, run, model, traj, n, r, state_path, data_dir, base_path=None):
    """Train: compact rows, one forward with the noise-aware mask, the loss forcing.row_objective defines.
    Returns (steps, seconds)."""
    eot, B = model_tokenizer(model.cfg).eot_token, cfg.distill_batch
    anchor, real_data, truth = round_inputs(cfg, run, model, traj, r, data_dir, base_path if r > 1 else None)
    opt = make_optimizer(model, cfg.distill_lr, 0.0, run.cuda)
    made_from = {"source_sha256": json.loads(traj.source)["sha256"], "block_len": n, "world": run.world}
    extra = {"kind": "jacobi_forcing_state", "round": r, **made_from}
    step = resume(cfg, run, state_path, extra["kind"], f"round {r}", model, opt, cfg.distill_steps, "--distill_steps", ROUND_FLAGS,
                  round=r, model_config=model.cfg.to_dict(), **made_from)
    L = max(run_row_length(cfg, model.cfg.seq_len),                  # one row length for every round of the run
            row_length(int(np.diff(traj.prompt_offsets).max()), traj.fixed[0].size, n, cfg.cons_window, cfg.context,
                       truth))
    batches = packed_batches(cfg, run, traj, r, step, L, eot, truth)
    loss_of = round_objective(cfg, run, model, anchor)
    meta = {k: torch.zeros(B, L, dtype=torch.long, device=run.device) for k in ("group", "pos", "start")}
    mask_mod = row_mask(meta["group"], meta["pos"], meta["start"], cfg.context)   # one mask function for every batch
    replay_rng = np.random.default_rng(cfg.seed * 104729 + r * 31 + run.rank + step)
    tokens = (B * L + (cfg.replay_batch * model.cfg.seq_len if real_data is not None else 0)) * run.world
    run.log(f"round {r}: training {cfg.distill_steps} steps of {B * run.world} rows x {L} tokens (lambda {cfg.lam}, "
            f"{cfg.schedule} schedule, {'fresh' if cfg.fresh_states else 'nearest'} states, {cfg.context} context, "
            f"{cfg.cons_target} consistency target, window {cfg.cons_window or 'to the block end'}, "
            f"replay {cfg.replay} {cfg.anchor}, AR target {cfg.ar_target}, anchor {cfg.anchor_to}, truth {cfg.truth}"
            f"{' ' + cfg.truth_target if cfg.truth else ''})")
    gpu = lambda a: torch.from_numpy(a).to(run.device, non_blocking=True)            # noqa: E731

    def one_step(step):
        p = next(batches)
        for k, v in meta.items():
            v.copy_(torch.from_numpy(getattr(p, k)))
        mask = flex_mask(mask_mod, B, L, run.device, compiled=run.compile) if run.cuda else \
            dense_mask(mask_mod, B, L, run.device)
        x, y = map(gpu, get_batch(real_data, cfg.replay_batch, model.cfg.seq_len, replay_rng)) \
            if real_data is not None else (None, None)
        batch = dataclasses.replace(p, **{k: gpu(getattr(p, k)) for k in ("tokens", "pos", "ar_targets", "truth_targets",
                                                                          "cons_weight", "teacher")})
        loss, terms = loss_of(batch, mask, cfg.lam, cfg.replay, cfg.truth if truth else 0.0, x, y)
        loss.backward()
        return loss, terms, tokens

    t_start = time.time()
    try:
        step = train_loop(run, model, opt, f"round {r}", f"round {r}", step, cfg.distill_steps, cfg.distill_lr,
                          min(50, cfg.distill_steps // 10), one_step,
                          lambda s: save_state(state_path, model, opt, s, cfg, extra), cfg.ckpt_every, state_path,
                          rows=B * run.world)
    finally:
        batches.close()
    return step, time.time() - t_start


def distill_round(cfg, run, out, r, src=None, traj_dir=None, probe=True):
    """Round r of progressive distillation: collect trajectories of the previous model at the round's block
    length, train on them, save jf{r}.pt, and (with probe) evaluate it. Returns what it measured (a dict)."""
    n = int(cfg.block_lens.split(",")[r - 1])
    T = traj_shape(cfg, n, cfg.seq_len)[0]
    src = Path(src or out / ("base.pt" if r == 1 else f"jf{r - 1}.pt"))
    final, state_path = out / f"jf{r}.pt", out / f"jf{r}_state.pt"
    if final.exists() and not cfg.resume:
        run.log(f"round {r}: {final} exists, reusing it (delete it to train the round again)")
        done = load_checkpoint(final, kinds=("jacobi_forcing",))[1]
        if src.exists() and done.get("source_sha256") != file_sha256(src):
            run.log(f"round {r}: warning: {final.name} was distilled from an earlier {src.name}; delete "
                    f"{final.name} to distil the current one")
        if changed := changed_flags(done.get("train_config", {}), cfg, ROUND_FLAGS):
            run.log(f"round {r}: warning: {final.name} was distilled with other flags ({'; '.join(changed)}); "
                    f"delete it to distil with these")
        return {}
    if cfg.resume and final.exists() and not state_path.exists():
        run.log(f"round {r}: {final} is already complete")
        return {}
    if cfg.traj_prompts < cfg.distill_batch * run.world:
        raise UserError(f"--traj_prompts {cfg.traj_prompts} is fewer than one step's rows (--distill_batch "
                        f"{cfg.distill_batch} x {run.world} processes); raise --traj_prompts or lower --distill_batch")
    last = r == len(cfg.block_lens.split(","))
    if r == 1 and probe:
        done = src.with_name(f"eval_{src.stem}.json")
        if saved_settings(done) == eval_settings(cfg, src):
            run.log(f"round 1: {src.name} was evaluated already with these prompts ({done.name}); not again")
        else:
            evaluate(cfg, run, src, f"round 1: source {src.name}", block_lens=(32,))
    base_path = Path(traj_dir or out) / "base.pt"
    model, ckpt = load_checkpoint(src, run.device, kinds=("base", "jacobi_forcing"))
    corpus = ckpt.get("train_config", {}).get("corpus") or cfg.corpus    # the one the base was trained on
    data_dir = token_cache(traj_dir or out, corpus, model.cfg.vocab_size, model.cfg.tokenizer)
    check_token_files(data_dir, model.cfg.vocab_size, model.cfg.seq_len)    # the replay text and val loss
    traj = trajectories(cfg, run, src, model, n, T, corpus, traj_dir or out)    # 1. collect
    if cfg.max_repeat:
        loops = repetitive(traj, cfg.max_repeat, model_tokenizer(model.cfg).eot_token)
        traj = traj.subset(np.flatnonzero(~loops))
        run.log(f"round {r}: dropped {int(loops.sum())} of {len(loops)} trajectories whose greedy continuation "
                f"repeats one token {cfg.max_repeat}+ times in a row")
        if len(traj) < cfg.distill_batch * run.world:
            raise UserError(f"round {r}: only {len(traj)} of {len(loops)} trajectories are left after dropping the "
                            f"repetitive ones (--max_repeat {cfg.max_repeat}); pass --max_repeat 0 to keep them, or "
                            f"raise --traj_prompts")
    steps, train_s = distill(cfg, run, model, traj, n, r, state_path, data_dir, base_path)  # 2. pack and train
    if not run.master:
        return {}
    vl = val_loss(model, load_split(data_dir, "val"), model.cfg, cfg.eval_batches, cfg.batch_size, run) \
        if (data_dir / "val.bin").exists() else float("nan")
    atomic_save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "kind": "jacobi_forcing",
                 "round": r, "block_len": n, "val_loss": vl,
                 "train_config": {**dataclasses.asdict(cfg), "corpus": corpus},    # the base's, for later rounds
                 "steps": steps, "source_sha256": json.loads(traj.source)["sha256"]}, final)
    state_path.unlink(missing_ok=True)
    run.log(f"round {r}: done in {train_s:.0f}s of training ({steps * cfg.distill_batch * run.world:,} rows), "
            f"val loss {vl:.4f} ({src.name}: {ckpt.get('val_loss', float('nan')):.4f}), saved {final}")
    res = {"train_s": train_s, "steps": steps, "trajectories": len(traj)}
    return {**res, **evaluate(cfg, run, final, f"round {r}: {final.name}", block_lens=None if last else (32,),
                              base_path=base_path)} if probe else res


def check_replicas(model, run):
    """DDP keeps one model per rank; after training they must be bit-identical. Compare checksums."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 9973).sum()]).double()
    sums = [torch.zeros_like(mine) for _ in range(run.world)]
    dist.all_gather(sums, mine)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {[s.tolist() for s in sums]}")
    run.log(f"weights identical on all {run.world} ranks (checksum {sums[0][0].item():.6f})")


def merge_trajectories(parts):
    """Concatenate per-rank Trajectories (prompt indices renumbered)."""
    prompts, offsets, fixed, states, owner = [], [0], [], [], []
    n_before = 0
    T = parts[0].fixed.shape[1]
    for t in parts:
        prompts.append(t.prompts)
        offsets += list(offsets[-1] + t.prompt_offsets[1:])
        fixed.append(t.fixed)
        states.append(t.states)
        owner.append(t.owner + n_before * T)
        n_before += len(t)
    width = max(t.truth.shape[1] for t in parts)
    truth = np.concatenate([np.pad(t.truth, ((0, 0), (0, width - t.truth.shape[1])), constant_values=-1) for t in parts])
    return Trajectories(np.concatenate(prompts), np.asarray(offsets, dtype=np.int64), np.concatenate(fixed),
                        np.concatenate(states), np.concatenate(owner), parts[0].source, truth)


def check_sources(out, stages):
    """Each round distils the previous model: it must be in --out_dir or made by an earlier stage of this run."""
    for s in stages:
        if s == "pretrain":
            continue
        r = int(s[5:])
        src, prev = ("base.pt", "pretrain") if r == 1 else (f"jf{r - 1}.pt", f"round{r - 1}")
        if not (out / f"jf{r}.pt").exists() and not (out / src).exists() and prev not in stages:
            raise UserError(f"{out / src} not found: round {r} distils it; run `python train.py --stage {prev} "
                            f"--out_dir {out}` first, or pass the --out_dir that holds it")


def with_preset(cfg, cuda):
    """The config with every unset flag taken from its preset (gpu when CUDA is visible, else cpu), checked."""
    preset = cfg.preset if cfg.preset != "auto" else ("gpu" if cuda else "cpu")
    if preset.startswith("gpu") and not cuda:
        raise UserError(f"--preset {preset} needs a CUDA GPU (on a CPU its batches take tens of GB and the run is killed); "
                        "use --preset cpu, and raise sizes with flags such as --d_model if you want a larger model")
    cfg = dataclasses.replace(cfg, preset=preset, **{k: v for k, v in PRESETS[preset].items()
                                                      if getattr(cfg, k) is None})
    if cfg.vocab_size is None:
        cfg = dataclasses.replace(cfg, vocab_size=full_vocab(cfg.tokenizer))
    for ok, msg in checks(cfg):
        if not ok:
            raise UserError(msg)
    model = {k: getattr(cfg, k) for k in ("tokenizer", "vocab_size", "seq_len", "n_layer", "n_head", "d_model")}
    if (bad := model_config_problem({**model, "rope_base": GPTConfig.rope_base}, prefix="--")) is not None:
        raise UserError(f"{bad}; lower --n_layer, --d_model or --seq_len")
    # a pretraining step on a CPU holds at least the weights, their gradients and AdamW's two moments, and
    # a micro-batch's logits with their gradients: refuse what surely does not fit, before allocating it
    need = 16 * param_count(model) + 8 * cfg.batch_size * cfg.seq_len * cfg.vocab_size
    if not cuda and need > memory_bytes():
        raise UserError(f"pretraining this model with --batch_size {cfg.batch_size} needs more than {gb(need)}, more "
                        f"than this machine's {gb(memory_bytes())} of memory; lower --batch_size (raise "
                        f"--grad_accum instead) or the model's size")
    return cfg


@cli
def main(argv=None):
    cfg = parse_config(TrainConfig, argv, description=__doc__, checks=checks, defaults=PRESET_HELP)
    run = Run(cfg)
    cfg = with_preset(cfg, run.cuda)
    preset = cfg.preset
    rounds = len(cfg.block_lens.split(","))
    stages = ("pretrain",) + tuple(f"round{r}" for r in range(1, rounds + 1)) if cfg.stage == "all" \
        else tuple(cfg.stage.split(","))
    if any(s != "pretrain" and int(s[5:]) > rounds for s in stages):
        raise UserError(f"--stage names a round past the {rounds} rounds of --block_lens {cfg.block_lens}")
    out = Path(cfg.out_dir)
    if run.master:
        check_writable(out, "--out_dir")              # now, not at the first checkpoint
    with out_dir_lock(out, run.master):
        check_sources(out, stages)
        run.log(f"device {run.device} (world {run.world}), torch {torch.__version__}, preset {preset}, "
                f"compile {run.compile}, stages {','.join(stages)}")
        run.log("config " + json.dumps(dataclasses.asdict(cfg)))
        random.seed(cfg.seed)
        if "pretrain" in stages:
            pretrain(cfg, run, out)
        for r in range(1, rounds + 1):
            if f"round{r}" in stages:
                if run.ddp:
                    dist.barrier()
                distill_round(cfg, run, out, r)
        later = sorted(p.name for p in out.glob("jf*.pt") if p.stem[2:].isdigit() and int(p.stem[2:]) > rounds)
        if later and f"round{rounds}" in stages:
            run.log(f"note: {', '.join(later)} in {out} came from an earlier run with more rounds, and decode.py and "
                    f"bench.py take the highest round: remove them, or pass --ckpt {out / f'jf{rounds}.pt'}")
        if run.ddp:
            dist.barrier()
            dist.destroy_process_group()
        run.log("all done")


if __name__ == "__main__":
    main()
