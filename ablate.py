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
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from jfmini.common import UserError, cli, field, parse_config
from train import Run, TrainConfig, checks, distill_round, evaluate, pretrain, with_preset


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


def parse_variants(text):
    variants = []
    for part in filter(str.strip, text.split(";")):
        name, sep, flags = part.partition(":")
        if not sep or not name.strip():
            raise UserError(f"variant {part.strip()!r} needs the form 'name: --flag value ...'")
        variants.append((name.strip(), shlex.split(flags)))
    if len({n for n, _ in variants}) != len(variants):
        raise UserError("variant names must differ")
    return variants


def table(rows, block_lens):
    """One line per run: TPF per prompt set and block length, validation loss, and the quality of the greedy
    output on the held-out functions (parse, loop and blank rates, edit similarity and loss of the true
    body), each with its change from the base model, paired prompt by prompt."""
    keys = [f"tpf_{s}_n{n}" for s in ("humaneval", "heldout") for n in block_lens]
    quality = ("parse", "loop", "blank", "edit_sim", "body_loss")
    head = f"{'variant':<22}{'seed':>6}" + "".join(f"{k[4:].replace('humaneval', 'HE').replace('heldout', 'HO'):>10}"
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
    seeds = [int(s) for s in cfg.seeds.split(",")]
    block_lens = tuple(int(n) for n in cfg.block_lens.split(","))
    base_cfg = parse_config(TrainConfig, shlex.split(cfg.train_args), checks=checks)
    run = Run(base_cfg)
    base_cfg = with_preset(base_cfg, run.cuda)
    configs = {}
    for name, flags in variants:           # every variant's flags are checked before anything runs
        for seed in seeds:
            c = parse_config(TrainConfig, shlex.split(cfg.train_args) + flags + ["--seed", str(seed)], checks=checks)
            configs[name, seed] = with_preset(c, run.cuda)
            if configs[name, seed].block_lens.count(",") + 1 < cfg.rounds:
                raise UserError(f"variant {name}: --block_lens names fewer than --rounds {cfg.rounds} rounds")
    out = Path(base_cfg.out_dir)
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    pretrain(base_cfg, run, out)
    rows = [{"variant": "base", **evaluate(base_cfg, run, out / "base.pt", "base", block_lens, cfg.diagnose)}]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(results, "a") as f:
        f.write(json.dumps({"time": stamp, "train_args": cfg.train_args, **rows[0]}) + "\n")
    for (name, seed), c in configs.items():
        vout = out / "ablate" / f"{name}_s{seed}"
        vout.mkdir(parents=True, exist_ok=True)
        t0, res = time.time(), {}
        for r in range(1, cfg.rounds + 1):
            done = distill_round(c, run, vout, r, src=out / "base.pt" if r == 1 else None, traj_dir=out, probe=False)
            res["train_s"] = res.get("train_s", 0) + done.get("train_s", 0)
        res = {**res, **evaluate(c, run, vout / f"jf{cfg.rounds}.pt", name, block_lens, cfg.diagnose,
                                 base_path=out / "base.pt")}
        row = {"variant": name, "seed": seed, "flags": dict(variants)[name], **res, "wall_s": time.time() - t0}
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps({"time": stamp, "train_args": cfg.train_args, **row}) + "\n")
        if not cfg.keep:
            shutil.rmtree(vout, ignore_errors=True)
        run.log("\n" + table(rows, block_lens))
    print(table(rows, block_lens))


if __name__ == "__main__":
    main()
