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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jfmini.runtime.errors import UserError
from jfmini.runtime.writes import check_writable, out_dir_lock
from jfmini.runtime.cli import cli, field, parse_config
from jfmini.runtime.training import Run
from jfmini.tools.ablation import append_line, check_kept, int_list, parse_variants, split_flags, table
from jfmini.tools.evaluate import evaluate
from jfmini.tools.config import TrainConfig, checks, with_preset
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
