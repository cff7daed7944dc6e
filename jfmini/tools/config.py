"""train.py's flags: the config (every flag with its help), the two presets that fill the flags left unset
(gpu, cpu, and gpu-long: the gpu preset distilled on more rows), the checks on the values, and which flags
a stage's results depend on (--resume refuses a state made with other values)."""
import dataclasses
import math
import re
from dataclasses import dataclass

from jfmini.model import GPTConfig
from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import field, world_size
from jfmini.runtime.tokenizers import TOKENIZERS, full_vocab
from jfmini.runtime.prompts import TRAJ_SOURCES
from jfmini.runtime.files import gb, memory_bytes
from jfmini.runtime.checkpoints import model_config_problem, param_count


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


# Flags that change what a stage computes: --resume refuses a state written with other values, and a
# finished file made with other values is reported. A round depends on every flag except these (and on
# its source model's file, and its block length alone of --block_lens).
PRETRAIN_FLAGS = ("seed", "corpus", "tokenizer", "vocab_size", "n_layer", "n_head", "d_model", "seq_len", "batch_size",
                  "grad_accum", "steps", "lr", "warmup", "weight_decay")
NOT_ROUND_FLAGS = set(PRETRAIN_FLAGS[1:]) | {"stage", "out_dir", "preset", "device", "resume", "compile",
                                              "eval_every", "eval_batches", "ckpt_every", "probe", "heldout", "traj_batch",
                                              "block_lens"}
ROUND_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_ROUND_FLAGS)


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
