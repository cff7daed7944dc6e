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
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import cli, parse_config
from jfmini.runtime.writes import atomic_save, atomic_write, check_writable, file_sha256, out_dir_lock
from jfmini.runtime.files import check_npz, check_token_files, check_token_meta, check_trajectories
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.runtime.tokenizers import model_tokenizer, tokenizer
from jfmini.runtime.corpus import get_batch, load_split, prepare_corpus, token_cache
from jfmini.runtime.prompts import trajectory_prompts
from jfmini.runtime.training import (Run, changed_flags, check_replicas, flops_per_token, make_optimizer, resume,
                                     save_state, train_loop, val_loss)
from jfmini.forcing import RowObjective, collect_trajectories, pack_rows, row_length
from jfmini.runtime.chunked_ce import ce_chunk
from jfmini.runtime.trajectories import Trajectories, merge_trajectories, repetitive
from jfmini.masks import row_mask
from jfmini.runtime.attention import dense_mask, flex_mask
from jfmini.model import GPT, GPTConfig
from jfmini.tools.config import PRESET_HELP, PRETRAIN_FLAGS, ROUND_FLAGS, TrainConfig, checks, with_preset
from jfmini.tools.evaluate import eval_settings, evaluate, saved_settings


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
        atomic_write(path, traj.to_bytes())
    run.log(f"trajectories: {len(traj)}, {len(traj.states)} states ({len(traj.states) / (len(traj) * T):.1f} "
            f"iterations per block) in {time.time() - t0:.0f}s, saved {path}")
    return traj


def packed_batches(cfg, run, traj, r, step, L, eot, truth):
    """Pack: endless batches of compact training rows (forcing.pack_rows): per block a window of the noisy
    state the schedule draws, the prompt and the clean stream, and (truth) the prompt's real code. On a
    GPU a thread packs the next batch while the current step runs."""
    order_rng = np.random.default_rng(cfg.seed * 7919 + r * 31 + step)      # the same on every rank
    rng = np.random.default_rng(cfg.seed * 6007 + r * 31 + run.rank + step)  # noise schedule, per rank
    noise_window = min(cfg.noise_window, traj.fixed.shape[1])
    source = (pack_rows(traj, rows, L, cfg.schedule, rng, eot, noise_window, cfg.fresh_states, cfg.cons_window, cfg.context,
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
    """forcing.RowObjective with this run's choices; on a GPU the model's forwards and each chunk of the
    loss are compiled (the same shapes every round, so one compile serves the run). DDP wraps the model
    it trains."""
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if run.ddp else model
    if run.compile:
        ddp_model, anchor = torch.compile(ddp_model), anchor and torch.compile(anchor)
    return RowObjective(ddp_model, anchor, cons_target=cfg.cons_target, ar_target=cfg.ar_target,
                        replay_target=cfg.anchor, truth_target=cfg.truth_target if cfg.truth > 0 else None,
                        autocast=run.autocast, chunk_fn=compiled_chunk() if run.compile else ce_chunk,
                        chunk=2048 if run.cuda else 512)            # measured: 14 vs 8 rows/s on 2 cores


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
    """Train: compact rows, one forward with the noise-aware mask, the loss forcing.RowObjective defines.
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


def round_done(cfg, run, r, src, final, state_path):
    """Whether round r's model exists already (kept, with a warning if it came from another source model
    or other flags), so the round is skipped."""
    if final.exists() and not cfg.resume:
        run.log(f"round {r}: {final} exists, reusing it (delete it to train the round again)")
        done = load_checkpoint(final, kinds=("jacobi_forcing",))[1]
        if src.exists() and done.get("source_sha256") != file_sha256(src):
            run.log(f"round {r}: warning: {final.name} was distilled from an earlier {src.name}; delete "
                    f"{final.name} to distil the current one")
        if changed := changed_flags(done.get("train_config", {}), cfg, ROUND_FLAGS):
            run.log(f"round {r}: warning: {final.name} was distilled with other flags ({'; '.join(changed)}); "
                    f"delete it to distil with these")
        return True
    if cfg.resume and final.exists() and not state_path.exists():
        run.log(f"round {r}: {final} is already complete")
        return True
    return False


def distill_round(cfg, run, out, r, src=None, traj_dir=None, probe=True):
    """Round r of progressive distillation: collect trajectories of the previous model at the round's block
    length, train on them, save jf{r}.pt, and (with probe) evaluate it. Returns what it measured (a dict)."""
    n = int(cfg.block_lens.split(",")[r - 1])
    T = traj_shape(cfg, n, cfg.seq_len)[0]
    src = Path(src or out / ("base.pt" if r == 1 else f"jf{r - 1}.pt"))
    final, state_path = out / f"jf{r}.pt", out / f"jf{r}_state.pt"
    if round_done(cfg, run, r, src, final, state_path):
        return {}
    if cfg.traj_prompts < cfg.distill_batch * run.world:
        raise UserError(f"--traj_prompts {cfg.traj_prompts} is fewer than one step's rows (--distill_batch "
                        f"{cfg.distill_batch} x {run.world} processes); raise --traj_prompts or lower --distill_batch")
    last = r == len(cfg.block_lens.split(","))
    if r == 1 and probe:                                                    # 0. the base's evaluation, once
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
    steps, train_s = distill(cfg, run, model, traj, n, r, state_path, data_dir, base_path)  # 2. pack, distil
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
    res = {"train_s": train_s, "steps": steps, "trajectories": len(traj)}              # 3. evaluate
    return {**res, **evaluate(cfg, run, final, f"round {r}: {final.name}", block_lens=None if last else (32,),
                              base_path=base_path)} if probe else res


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
