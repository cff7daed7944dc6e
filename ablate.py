"""Distillation variants from one base model, measured side by side: which change raises TPF.

    python ablate.py --variants "paper: --context noisy; clean: --context clean"
    python ablate.py --variants "a: --cons_window 8; b: --cons_target hard" --seeds 1,2 --train_args "--distill_steps 300"

Every variant (train.py's round flags) distils the same base model (out_dir/base.pt, pretrained first if
missing) for --rounds rounds; trajectories with the same source are collected once and shared. Each run
is evaluated like train.py's rounds (vanilla-Jacobi tokens per forward (TPF) on HumanEval and the
held-out prompts, parse rate, validation loss; with --diagnose the histogram of tokens committed per
forward and the noisy-block accuracy by distance from the first wrong token) and becomes one row of the
table; rows are appended to --results as JSON lines as they finish, so an interrupted run keeps them.
"""
import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import cli, field, parse_config
from jfmini.runtime.writes import check_writable, file_sha256, out_dir_lock, write_failed
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.runtime.training import Run, changed_flags
from jfmini.tools.evaluate import evaluate
from jfmini.tools.config import ROUND_FLAGS, TrainConfig, checks, with_preset
from train import distill_round, pretrain


@dataclass
class AblateConfig:
    variants: str = field(None, "variants separated by ';', each 'name: train.py round flags' (required)")
    train_args: str = field("", "train.py flags for the base model and every variant, e.g. '--distill_steps 300'")
    seeds: str = field("1337", "training seeds, comma separated: every variant runs once per seed")
    rounds: int = field(1, "rounds per variant (block lengths from --block_lens)")
    block_lens: str = field("32,16,64", "block lengths at which TPF is measured (the first also gives parse rates)")
    diagnose: bool = field(True, "acceptance histogram and accuracy by distance for every row (a few seconds each)")
    results: str = field("results/ablate.jsonl", "JSON lines file the rows are appended to")
    keep: bool = field(False, "keep each variant's checkpoints (out_dir/ablate/NAME_sSEED/)")


def split_flags(text, what):
    """shlex.split, with unbalanced quotes as a one-line error naming `what`."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"{what}: {e} in {text!r}; balance its quotes") from None


def parse_variants(text):
    """[(name, flags)]. A name becomes a folder in out_dir/ablate (deleted afterwards without --keep), so it
    is letters, digits, '.', '_' and '-' only: no '/', no '..', nothing that leads out of out_dir."""
    variants = []
    for part in filter(str.strip, text.split(";")):
        name, sep, flags = part.partition(":")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"variant {part.strip()!r} needs the form 'name: --flag value ...'")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name or name == "base":
            raise UserError(f"variant name {name!r} must be letters, digits, '.', '_' or '-' (up to 64, no '..', "
                            f"not 'base'): it names a folder in out_dir/ablate")
        variants.append((name, split_flags(flags, f"--variants {name}")))
    if not variants:
        raise UserError("--variants names no variant; give 'name: --flag value; ...'")
    if len({n for n, _ in variants}) != len(variants):
        raise UserError("variant names must differ")
    return variants


def int_list(text, flag, least):
    """'1,2,3' -> [1, 2, 3], each at least `least`, or a one-line error."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise UserError(f"{flag} must be comma-separated integers of at least {least} (got {text!r})")
    return values


def check_kept(vout, c, rounds, base):
    """A kept variant folder (--keep) is reused only if every round in it was distilled from this base
    model with this variant's flags; else it is refused before any work."""
    for r in range(1, rounds + 1):
        done = vout / f"jf{r}.pt"
        if not done.exists():
            continue
        ckpt = load_checkpoint(done)[1]
        changed = changed_flags(ckpt.get("train_config", {}), c, ROUND_FLAGS)
        if r == 1 and (not base.exists() or ckpt.get("source_sha256") != file_sha256(base)):
            changed.append(f"it was distilled from another {base.name}")
        if changed:
            raise UserError(f"{done} was distilled differently ({'; '.join(changed)}); delete {vout} or name the "
                            f"variant differently")


def append_line(path, line):
    """One JSON line onto --results; a failed write (disk full) is a one-line error, earlier rows kept."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(write_failed(path, e)) from None


def table(rows, block_lens):
    """One line per run: TPF per prompt set and block length, validation loss, and the quality of the greedy
    output on the held-out functions (parse, loop and blank rates, edit similarity and loss of the true
    body), each with its change from the base model, paired prompt by prompt."""
    keys = [f"kept_tpf_{s}_n{n}" for s in ("humaneval", "heldout") for n in block_lens]
    quality = ("parse", "loop", "blank", "edit_sim", "body_loss")
    head = f"{'variant':<22}{'seed':>6}" + "".join(f"{k[9:].replace('humaneval', 'HE').replace('heldout', 'HO'):>10}"
                                                   for k in keys) + f"{'val':>8}" + \
        "".join(f"{q.replace('_sim', '').replace('body_loss', 'body'):>15}" for q in quality) + f"{'train s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[k]:>10.3f}" if isinstance(r.get(k), float) else f"{'-':>10}" for k in keys)
        val = r.get("val_loss")
        q = ""
        for k in quality:
            mean, delta = r.get(f"{k}_heldout"), r.get(f"delta_{k}_heldout")
            q += f"{'-' if mean is None else f'{mean:.3f}':>8}" + (f"{delta:+7.3f}" if delta is not None else " " * 7)
        lines.append(f"{r['variant']:<22}{r.get('seed', '-'):>6}{cells}{'-' if val is None else f'{val:.4f}':>8}{q}"
                     f"{r.get('train_s', 0):>9.0f}")
    return "\n".join(lines)


@cli
def main(argv=None):
    cfg = parse_config(AblateConfig, argv, description=__doc__.split("\n")[0],
                       checks=lambda c: [(c.variants is not None, "--variants is required, e.g. --variants "
                                                                  "\"clean: --context clean\""),
                                         (c.rounds >= 1, "--rounds must be at least 1")])
    variants = parse_variants(cfg.variants)
    seeds = int_list(cfg.seeds, "--seeds", 0)
    block_lens = tuple(int_list(cfg.block_lens, "--block_lens", 1))
    train_args = split_flags(cfg.train_args, "--train_args")
    base_cfg = parse_config(TrainConfig, train_args, checks=checks)
    run = Run(base_cfg)
    base_cfg = with_preset(base_cfg, run.cuda)
    configs = {}
    for name, flags in variants:           # every variant's flags are checked before anything runs
        for seed in seeds:
            c = parse_config(TrainConfig, train_args + flags + ["--seed", str(seed)], checks=checks)
            configs[name, seed] = with_preset(c, run.cuda)
            if configs[name, seed].block_lens.count(",") + 1 < cfg.rounds:
                raise UserError(f"variant {name}: --block_lens names fewer than --rounds {cfg.rounds} rounds")
    out = Path(base_cfg.out_dir)
    results = Path(cfg.results)
    if run.master:
        check_writable(out, "--out_dir")              # now, not after pretraining
        check_writable(results, "--results", folder=False)
    with out_dir_lock(out, run.master, "train.py or ablate.py"):
        ablate(cfg, run, out, base_cfg, configs, variants, block_lens, results)


def ablate(cfg, run, out, base_cfg, configs, variants, block_lens, results):
    """Pretrain (if base.pt is missing), then distil and evaluate every variant; one row each."""
    if (out / "ablate").is_symlink():
        raise UserError(f"{out / 'ablate'} is a symbolic link; ablate.py deletes variant folders in it: remove the "
                        f"link")
    for (name, seed), c in configs.items():
        check_kept(out / "ablate" / f"{name}_s{seed}", c, cfg.rounds, out / "base.pt")
    pretrain(base_cfg, run, out)
    rows = [{"variant": "base", **evaluate(base_cfg, run, out / "base.pt", "base", block_lens, cfg.diagnose)}]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    append_line(results, json.dumps({"time": stamp, "train_args": cfg.train_args, **rows[0]}))
    for (name, seed), c in configs.items():
        vout = out / "ablate" / f"{name}_s{seed}"
        if vout.is_symlink() or (vout.exists() and not vout.is_dir()):
            raise UserError(f"{vout} is not a folder ablate.py made; remove it")
        vout.mkdir(parents=True, exist_ok=True)
        t0, res = time.time(), {}
        for r in range(1, cfg.rounds + 1):
            done = distill_round(c, run, vout, r, src=out / "base.pt" if r == 1 else None, traj_dir=out, probe=False)
            res["train_s"] = res.get("train_s", 0) + done.get("train_s", 0)
        res = {**res, **evaluate(c, run, vout / f"jf{cfg.rounds}.pt", name, block_lens, cfg.diagnose,
                                 base_path=out / "base.pt")}
        row = {"variant": name, "seed": seed, "flags": dict(variants)[name], **res, "wall_s": time.time() - t0}
        rows.append(row)
        append_line(results, json.dumps({"time": stamp, "train_args": cfg.train_args, **row}))
        if not cfg.keep:
            shutil.rmtree(vout, ignore_errors=True)
        run.log("\n" + table(rows, block_lens))
    print(table(rows, block_lens))


if __name__ == "__main__":
    main()
