"""Training plumbing shared by pretraining and every Jacobi Forcing round: the process (device, DDP rank,
logging, autocast), the learning-rate schedule and optimizer, resumable states and their checks, the one
training loop (logging, NaN stops, checkpoints, stop signals), the validation loss, and the check that
data-parallel replicas ended identical."""
import dataclasses
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from jfmini.runtime.errors import UserError
from jfmini.runtime.signals import interrupted, signals_deferred
from jfmini.runtime.cli import check_device, distributed_env, pick_device, quiet_stdout
from jfmini.runtime.writes import atomic_save
from jfmini.runtime.corpus import get_batch
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.runtime.states import load_optimizer_state, rng_state, set_rng_state


class Run:
    """Device, distributed rank and logging for one process."""

    def __init__(self, cfg):
        check_device(cfg.device)
        env = distributed_env()                          # torchrun's RANK, WORLD_SIZE, LOCAL_RANK, checked
        self.ddp = env is not None
        if self.ddp:
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            local = env[2]
            if backend == "nccl" and local >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} GPU(s); "
                                f"pass torchrun at most that many --nproc_per_node")
            dist.init_process_group(backend)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.device = f"cuda:{local}" if backend == "nccl" else "cpu"
            if backend == "nccl":
                torch.cuda.set_device(self.device)
        else:
            self.rank, self.world, self.device = 0, 1, pick_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.master = self.rank == 0
        self.compile = cfg.compile == "yes" or (cfg.compile == "auto" and self.cuda)
        self.t0, self.unlogged = time.time(), False

    def log(self, msg):
        if self.master and not self.unlogged:
            try:
                print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)
            except OSError:               # stdout went away (`| head`, a closed terminal): train on, unlogged
                self.unlogged = True
                quiet_stdout()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def lr_at(step, total, peak, warmup):
    """Linear warmup, then cosine decay to peak/10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(model, lr, weight_decay, cuda):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=cuda)


def peak_flops(device):
    """bf16 dense peak of the GPU, for MFU; None when unknown."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)):
        if key in name:
            return flops
    return None


def flops_per_token(mcfg, n_params):
    """6N for the matmuls (tied head counted once) + 12 * layers * width * context for attention."""
    return 6 * n_params + 12 * mcfg.n_layer * mcfg.d_model * mcfg.seq_len


def save_state(path, model, opt, step, cfg, extra):
    """A resumable state: tensors and plain types only (it is read back with weights_only=True), with
    what --resume checks: the flags (train_config), and for a round its source and block length (extra).
    Stop signals wait until it is written."""
    with signals_deferred():
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "model_config": model.cfg.to_dict(), "train_config": dataclasses.asdict(cfg),
                     "rng": rng_state(), **extra}, path)


def changed_flags(saved, cfg, names):
    """'--lr 0.001 (it has 0.003)' for each flag in `names` whose value in a file's train_config differs
    from this run's; [] when they all match."""
    missing = object()
    return [f"--{k} {getattr(cfg, k)} (it has {saved.get(k, 'none')})" for k in names
            if saved.get(k, missing) != getattr(cfg, k)]


def check_resume(path, state, cfg, names, **expected):
    """--resume continues `state` only if it was started the way this run asks: the same flags among
    `names`, and the same `expected` entries (source model hash, block length, processes)."""
    label = {"source_sha256": "source model sha256", "block_len": "block length", "world": "processes"}
    short = lambda v: v[:12] if isinstance(v, str) else v                # noqa: E731 (a sha256: its start)
    wrong = changed_flags(state["train_config"], cfg, names) or \
        [f"{label.get(k, k)} {short(v)} (it has {short(state.get(k))})" for k, v in expected.items()
         if state.get(k) != v]
    if wrong:
        raise UserError(f"{path} was started differently from this run: {'; '.join(wrong)}; resume with the flags "
                        f"and files it was started with, or delete it to start the stage over")


def nonfinite(run, what, step, state_path):
    kept = f"the last good checkpoint {state_path} is kept; resume with --resume and a lower learning rate" \
        if state_path.exists() else "no checkpoint was written yet; lower the learning rate and start again"
    raise UserError(f"{what} loss became NaN/inf at step {step}; {kept}")


def resume(cfg, run, state_path, kind, what, model, opt, total, total_flag, names, **expected):
    """With --resume and a state file: check it was started the way this run asks, load the weights, the
    optimizer and the random streams into place, and return its step; else 0."""
    if not (cfg.resume and state_path.exists()):
        return 0
    _, state = load_checkpoint(state_path, kinds=(kind,))
    check_resume(state_path, state, cfg, names, **expected)
    if state["step"] > total:
        raise UserError(f"{state_path} is at step {state['step']}, past {total_flag} {total}; delete it")
    model.load_state_dict(state["model"])
    load_optimizer_state(opt, state["optimizer"], state_path)
    set_rng_state(state["rng"])
    run.log(f"{what}: resuming from {state_path} at step {state['step']}")
    return state["step"]


def train_loop(run, model, opt, name, what, step, total, peak_lr, warmup, one_step, save, ckpt_every, state_path,
               flops=None, eval_every=0, on_eval=None, rows=0):
    """The one training loop, of pretraining and of every round. one_step(step) runs the forward and
    backward passes of a step and returns (loss, {term: value}, tokens); this loop sets the learning
    rate, clips, steps the optimizer, logs every 20 steps (tokens/s, and rows/s given the rows of a
    step), stops on a NaN/inf loss, calls on_eval every eval_every steps, and save(step) every
    ckpt_every steps, at the end and on Ctrl-C/SIGTERM/SIGHUP (then exits 130/143/129). Returns the final
    step."""
    peak = peak_flops(run.device) if flops else None
    t_log, tok_log, step_log, first, t0 = time.time(), 0, step, step, time.time()
    t_steady = t0
    model.train()
    try:
        while step < total:
            lr = lr_at(step, total, peak_lr, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, terms, tokens = one_step(step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, tok_log = step + 1, tok_log + tokens
            saving, logging = step % ckpt_every == 0 or step == total, step % 20 == 0 or step == total or step == first + 1
            if (saving or logging) and not math.isfinite(value := loss.item()):   # NaN weights are never kept
                nonfinite(run, what, step, state_path)
            if logging:
                run.sync()
                seconds = time.time() - t_log
                tps = tok_log / seconds
                parts = " (" + ", ".join(f"{k} {v.item():.3f}" for k, v in terms.items()) + ")" if terms else ""
                mfu = f", MFU {tps * flops / (peak * run.world):.1%}" if peak else ""
                rate = f", {rows * (step - step_log) / seconds:,.0f} rows/s" if rows else ""
                began = f" (first step after {time.time() - t0:.1f}s{', compile included' if run.compile else ''})" \
                    if step == first + 1 else ""
                run.log(f"{name} step {step}/{total}: loss {value:.3f}{parts}, lr {lr:.2e}, {tps:,.0f} tokens/s"
                        f"{rate}{mfu}{began}")
                t_log, tok_log, step_log = time.time(), 0, step
            if rows and step == first + 20:
                run.sync()
                t_steady = time.time()
            if on_eval is not None and (step % eval_every == 0 or step == total):
                on_eval(step)
                t_log, tok_log, step_log = time.time(), 0, step
            if run.master and saving:
                save(step)
        if rows and step > first + 20:
            run.sync()
            run.log(f"{name}: {rows * (step - first - 20) / (time.time() - t_steady):,.0f} rows/s after the first 20 "
                    f"steps (checkpoint writes included), {time.time() - t0:.0f}s for {step - first} steps")
    except KeyboardInterrupt as e:
        if run.master:
            save(step)
        raise interrupted(e, f"interrupted at step {step}: saved {state_path}; continue with --resume") from None
    return step


@torch.no_grad()
def val_loss(model, data, mcfg, batches, batch_size, run, seed=0):
    """Mean next-token loss on the held-out files (same windows every call)."""
    rng = np.random.default_rng(seed)
    model.eval()
    total = 0.0
    pos = torch.arange(mcfg.seq_len, device=run.device)
    for _ in range(batches):
        x, y = get_batch(data, batch_size, mcfg.seq_len, rng)
        x, y = torch.from_numpy(x).to(run.device), torch.from_numpy(y).to(run.device)
        with run.autocast():
            logits = model(x, pos)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    model.train()
    return total / batches


def check_replicas(model, run):
    """DDP keeps one model per rank; after training they must be bit-identical. Compare checksums."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 9973).sum()]).double()
    sums = [torch.zeros_like(mine) for _ in range(run.world)]
    dist.all_gather(sums, mine)
    if any(not torch.equal(s, sums[0]) for s in sums):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {[s.tolist() for s in sums]}")
    run.log(f"weights identical on all {run.world} ranks (checksum {sums[0][0].item():.6f})")
