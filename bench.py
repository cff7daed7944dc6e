"""Benchmark: AR vs Jacobi vs Jacobi Forcing on HumanEval prompts, in TPF (tokens per forward pass) and tokens/s.

    python bench.py                          # the table, then one JSON line
    python bench.py --prompts heldout        # documented functions from files no model trained on
    python bench.py --stop none              # full-length completions only
    python bench.py --sweep                  # first search the decoder settings for this GPU
    python bench.py --prompts my.jsonl --limit 20
    python bench.py --chart results/h200/bench.log   # redraw the charts of an earlier run
    python bench.py --temperature 0.7 --limit 64     # every row samples (exact AR sampling in distribution)
    python bench.py --batch 1,4,16,64                # throughput as B prompts decode together

Rows: AR eager and AR fast (base model); the base model with vanilla Jacobi and with context n-gram
candidates (prompt lookup: the training-free baseline, no distillation); the Jacobi Forcing (JF) model
with vanilla Jacobi, with MR (rejection recycling + multi-block, the paper's defaults: n=64, K=2 blocks
in flight, pool 4) and with the fastest settings the sweep found on this device ('JF best'; the base
model's fastest n-gram settings likewise become 'base best'). TPF = tokens per forward. Speedups are
against the base model's AR rows of the same run ('vs own': the same model's).
Each row decodes every prompt twice: to what a user keeps (up to the function's end: before the first new
line of code that is not blank and is indented at or left of the prompt's last def; or end-of-text, or
--max_new_tokens), and at full length. Kept-text TPF counts the forwards that committed the kept tokens;
kept tokens/s the time until the decoder stopped. Every row is also split into kept bodies that loop and
bodies that do not. Greedy decoding unless --temperature > 0; prefill is timed apart; warm-up and graph
capture excluded. Sampled rows cannot be compared with AR token for token (their 'lossless' is '-'): that
they sample exactly as AR does is what tests/test_sampling.py checks, statistically, on a CPU.
Outputs that differ from AR fast are checked for floating-point ties: the float32 model's logit gap
between the two tokens at the first divergence, in rounding steps of the decoding dtype (at most
TIE_ULPS = 2 steps counts as a tie).
"""
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import cli, field, parse_config, pick_device
from jfmini.runtime.writes import atomic_write, check_writable
from jfmini.runtime.tokenizers import completion_text, model_tokenizer
from jfmini.runtime.prompts import heldout_prompts, read_prompts
from jfmini.runtime.files import read_sweep
from jfmini.runtime.checkpoints import default_checkpoint, load_checkpoint
from jfmini.runtime.engine import METHODS
from jfmini.runtime.quality import LOOP_DISTINCT4, distinct4, score, summarize, truth_loss
from jfmini.runtime.stop import function_stops
from jfmini.tools.report import TIE_ULPS, charts, print_batch_table, print_table, redraw
from jfmini.tools.rows import (SWEEP, SWEEP_BASE, batch_sizes, batch_table, describe, profile_lines, profile_step,
                               run_row, sweep, total, verified_per_step)


@dataclass
class BenchConfig:
    ckpt: str = field(None, "Jacobi Forcing checkpoint (default: the newest out/jf*.pt)")
    base_ckpt: str = field("out/base.pt", "the AR base model it was distilled from")
    prompts: str = field(None, "JSONL of {task_id, prompt} records, with an optional true 'body' (default: "
                               "HumanEval's 164); 'heldout' = 512 documented functions from files no model trained on")
    limit: int = field(None, "use only the first N prompts (0 = all); default: all on a GPU, the first 20 on a "
                             "CPU (where the whole set takes many minutes)")
    max_new_tokens: int = field(None, "new tokens per prompt at most (greedy, stops at end-of-text); default 256, "
                                      "or a quarter of the models' context if that is less")
    eager_limit: int = field(16, "prompts for the AR eager row (a slow plain loop; its tokens/s needs few)")
    sweep: bool = field(False, "search block length x blocks x candidates first; the fastest become 'JF best' and "
                               "'base best' (the base model with n-gram candidates only)")
    sweep_prompts: int = field(12, "prompts per sweep configuration")
    sweep_file: str = field("out/sweep.json", "where the sweep's choice is kept for later runs on this device")
    compile: str = field("auto", "inductor-fuse each captured step: auto (on CUDA), no", ["auto", "no"])
    stop: str = field("function", "function: every row decodes each prompt twice, to what a user keeps (up to the "
                                  "function's end) and to full length, and reports both; none: full length only",
                      ["function", "none"])
    ar_sync_every: int = field(16, "AR fast checks end-of-text every k tokens (no host sync per token)")
    ar_stop_every: int = field(4, "AR fast checks for the function's end every k tokens (the overshoot past it "
                                  "is trimmed but its time counts)")
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = field("auto", "decode in bfloat16 (auto on CUDA) or float32 (auto on CPU; bit-exact greedy "
                               "choices, slower)", ["auto", "bfloat16", "float32"])
    profile: bool = field(False, "print one line per decoder (tokens verified per step, us per step, tokens "
                                 "committed per us), then where one AR and one MR iteration's time goes (CUDA kernels)")
    chart: str = field(None, "only draw the charts of an earlier run: its JSON line (a bench log) or a --sweep_file")
    temperature: float = field(0.0, "0 = greedy; above 0 every row samples at this temperature, exactly as AR "
                                    "sampling does (in distribution, not token for token)")
    top_k: int = field(0, "sampling: only the k most likely tokens (0 = all)")
    top_p: float = field(1.0, "sampling: only the most likely tokens that make up this much probability (1 = all)")
    seed: int = field(0, "seed of the sampling noise (each row starts from it)")
    batch: str = field(None, "instead of the table: decode --batch_prompts prompts B at a time for each B of this "
                             "list (e.g. 1,4,16,64) with AR fast, Jacobi and the best decoder on the JF model: total "
                             "tokens/s, TPF per row, latency per token")
    batch_prompts: int = field(64, "prompts per --batch measurement")


def checks(c):
    yield c.temperature >= 0 and math.isfinite(c.temperature), f"--temperature must be 0 (greedy) or more (got {c.temperature})"
    yield c.top_k >= 0, f"--top_k must be 0 (all tokens) or more (got {c.top_k})"
    yield 0 < c.top_p <= 1, f"--top_p must be in (0, 1] (got {c.top_p})"
    yield c.temperature > 0 or (c.top_k == 0 and c.top_p == 1), "--top_k and --top_p apply to sampling: give " \
                                                                 "--temperature above 0 too"
    yield c.batch is None or batch_sizes(c.batch) is not None, f"--batch takes batch sizes like 1,4,16,64 (got {c.batch!r})"
    for name in ("max_new_tokens", "eager_limit", "sweep_prompts", "ar_sync_every", "ar_stop_every", "batch_prompts"):
        v = getattr(c, name)
        yield v is None or v >= 1, f"--{name} must be at least 1 (got {v})"
    yield c.limit is None or c.limit >= 0, f"--limit must be 0 (all) or more (got {c.limit})"


CPU_LIMIT = 20                                        # prompts when --limit is not given, on a CPU


def first_divergence(ref, out):
    """Index of the first token where the lists differ; None if one is a prefix of the other."""
    return next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None)


@torch.no_grad()
def tie_gap(model32, prompt, ref, i, tok, dtype):
    """(float32 logit of ref[i] minus that of tok after prompt + ref[:i], the decoding dtype's rounding step
    at that logit size): one plain forward, no cache."""
    device = model32.embed.weight.device
    idx = torch.tensor([prompt + ref[:i]], device=device)
    logits = model32(idx, torch.arange(idx.shape[1], device=device))[0, -1]
    a, b = logits[ref[i]].item(), logits[tok].item()
    step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(a), abs(b), 1e-30)))
    return a - b, step


def load_models(cfg, device, dtype):
    """The base and the Jacobi Forcing model, which must share a vocabulary: (models, val losses, paths,
    the base's checkpoint)."""
    paths = {"base": cfg.base_ckpt, "jf": cfg.ckpt or default_checkpoint()}
    models, vals, base_ck = {}, {}, {}
    for key, path in paths.items():
        model, ck = load_checkpoint(path, device, flag={"base": "--base_ckpt", "jf": "--ckpt"}[key])
        models[key], vals[key] = model.to(dtype).eval(), ck.get("val_loss", float("nan"))
        base_ck = ck if key == "base" else base_ck
    if (models["base"].cfg.vocab_size, models["base"].cfg.tokenizer) != (models["jf"].cfg.vocab_size,
                                                                          models["jf"].cfg.tokenizer):
        raise UserError(f"{cfg.base_ckpt} and {paths['jf']} use different vocabularies; pass the base model the "
                        f"Jacobi Forcing model was distilled from")
    return models, vals, paths, base_ck


def bench_prompts(cfg, enc, records, base_ck, context, log):
    """(cfg with max_new_tokens set, prompt records, their tokens): the prompts that fit the context;
    records None = the held-out functions of the base model's corpus."""
    if records is None:
        corpus = base_ck.get("train_config", {}).get("corpus") or "stdlib+torch+deps"
        records = heldout_prompts(corpus, enc, count=cfg.limit or 512)
    if cfg.max_new_tokens is None:                   # leave room for prompts: a quarter of the context
        cfg = replace(cfg, max_new_tokens=min(256, max(1, context // 4)))
        if cfg.max_new_tokens < 256:
            log(f"--max_new_tokens {cfg.max_new_tokens}: a quarter of the models' context of {context} tokens")
    fits = [r for r in records if len(enc.encode(r["prompt"], allowed_special="all")) + cfg.max_new_tokens <= context]
    if not fits:
        raise UserError(f"no prompt fits the models' context of {context} tokens with --max_new_tokens "
                        f"{cfg.max_new_tokens}; lower --max_new_tokens or use shorter prompts")
    if len(fits) < len(records):
        log(f"skipping {len(records) - len(fits)} prompts longer than the context allows")
    return cfg, fits, [enc.encode(r["prompt"], allowed_special="all") for r in fits]


def best_settings(cfg, models, prompts, saved, gpu, eot, compile, log, max_len, stops):
    """The fastest settings of each model: swept now (--sweep, kept in --sweep_file) or read from an
    earlier sweep on the same GPU. Returns (best by model, sweep results or None)."""
    best, sweep_results, sweep_path = {}, None, Path(cfg.sweep_file)
    if cfg.sweep:
        few = prompts[:cfg.sweep_prompts]
        log(f"sweep: {len(SWEEP)} configurations of the JF model, {len(SWEEP_BASE)} n-gram configurations of the "
            f"base model, on {len(few)} prompts")
        jf_results, best["jf"] = sweep(models["jf"], SWEEP, few, cfg, eot, compile, log, max_len, stops)
        base_results, best["base"] = sweep(models["base"], SWEEP_BASE, few, cfg, eot, compile, log, max_len, stops, 2)
        sweep_results = {"jf": jf_results, "base": base_results}
        saved = {"device": gpu, "best": best["jf"], "base_best": best["base"], "results": sweep_results}
        atomic_write(sweep_path, json.dumps(saved).encode())
        log(f"sweep: fastest JF settings {describe(best['jf'])}, base {describe(best['base'])}; kept in {sweep_path}")
    elif saved is not None:
        if saved.get("device") == gpu and "base_best" in saved:
            best = {"jf": saved["best"], "base": saved["base_best"]}
            log(f"best settings from the earlier sweep in {sweep_path}: JF {describe(best['jf'])}, "
                f"base {describe(best['base'])}")
    return best, sweep_results


def measure(rows, models, vals, records, prompts, cfg, enc, eot, compile, max_len, device, log, stops):
    """Decode every prompt with every row's decoder: to what a user keeps (stops(prompts): a stop rule per
    prompt, or None with --stop none) and to full length. Speed and quality per row; quality is that of the
    kept text. Returns (results, {'kept': outputs per row, 'full': ...}, each model's AR fast outputs: the
    lossless references)."""
    body_loss = {}                                    # teacher-forced loss of the true bodies, nats per token
    known = [i for i, r in enumerate(records) if r.get("body")]
    for key, model in models.items():
        bodies = [enc.encode_ordinary(records[i]["body"])[:cfg.max_new_tokens] for i in known]
        nats, counts = truth_loss(model, [prompts[i] for i in known], bodies)
        body_loss[key] = sum(nats) / max(sum(counts), 1) if known else None
    kinds = ("kept", "full") if cfg.stop == "function" else ("full",)
    results, outputs, refs = [], {k: [] for k in kinds}, {k: {} for k in kinds}
    for name, key, settings in rows:
        use = prompts[:cfg.eager_limit] if settings is None else prompts
        row = {"row": name, "model": key, "settings": settings or "eager loop", "prompts": len(use),
               "decoder": describe(settings) if settings else "eager loop", "verified_per_step": verified_per_step(settings)}
        ar = settings == METHODS["ar"]
        passes = [((cfg.ar_stop_every if kind == "kept" else cfg.ar_sync_every) if ar else 1,
                   stops(use) if kind == "kept" else None) for kind in kinds]
        decoded, step = run_row(models[key], settings, use, cfg, eot, compile, passes, max_len)
        for kind, (outs, stats) in zip(kinds, decoded):
            texts = [completion_text(enc, o) for o in outs]
            row.update(speed(stats, texts, "kept_" if kind == "kept" else ""))
            if kind == kinds[0]:                      # quality: of the kept text, or the full one with --stop none
                q = summarize(score([r["prompt"] for r in records[:len(use)]], texts, outs,
                                    [r.get("body") for r in records[:len(use)]], device))
                row.update({k: v[0] for k, v in q.items()}, **{f"{k}_se": v[1] for k, v in q.items()},
                           parse_rate=q["parse"][0], val_loss=vals[key], body_loss=body_loss[key], step_us=step,
                           loops=[distinct4(o) < LOOP_DISTINCT4 for o in outs], per_prompt=stats, texts=texts)
            if kind == "full":
                row["full_loop"] = sum(distinct4(o) < LOOP_DISTINCT4 for o in outs) / len(outs)
            if name == "AR fast":
                refs[kind][key] = outs                # the model's own greedy output: the lossless reference
            outputs[kind].append(outs)
        gc.collect()
        results.append(row)
        log(f"{name} ({key}, {row['decoder']}): " + "; ".join(
            f"{kind} TPF {row[p + 'tokens_per_forward']:.2f}, {row[p + 'tokens_per_s']:,.0f} tokens/s"
            for kind, p in (("kept", "kept_"), ("full", "")) if kind in kinds))
    split_by_loops(results, cfg.stop == "function")
    return results, outputs, refs


def speed(stats, texts, prefix):
    """A row's speed over its prompts: tokens, characters, forwards, TPF, tokens/s, characters/s, time per
    forward, prefill; keys prefixed ('kept_' for the kept text)."""
    st, chars = total(stats), sum(map(len, texts))
    return {f"{prefix}{k}": v for k, v in {
        "tokens": st.new_tokens, "chars": chars, "forwards": st.forwards, "forwards_run": st.ran,
        "tokens_per_forward": st.tokens_per_forward, "chars_per_forward": chars / max(st.forwards, 1),
        "tokens_per_s": st.tokens_per_s, "chars_per_s": chars / max(st.decode_s, 1e-9), "seconds": st.decode_s,
        "us_per_forward": 1e6 * st.decode_s / max(st.ran, 1), "prefill_ms": 1e3 * st.prefill_s / len(stats)}.items()}


def split_by_loops(results, kept):
    """Each row's speed on the prompts whose body loops (distinct-4 below LOOP_DISTINCT4 in its model's AR
    fast output, so every decoder of a model splits the same prompts) and on those whose body does not."""
    own = {r["model"]: r["loops"] for r in results if r["row"] == "AR fast"}
    p = "kept_" if kept else ""
    for r in results:
        loops = own[r["model"]][:r["prompts"]]
        for group, want in (("loop", True), ("noloop", False)):
            idx = [i for i, x in enumerate(loops) if x == want]
            st = total(r["per_prompt"][i] for i in idx)
            chars = sum(len(r["texts"][i]) for i in idx)
            r.update({f"{p}{group}_prompts": len(idx), f"{p}{group}_tokens": st.new_tokens,
                      f"{p}{group}_tokens_per_forward": st.tokens_per_forward if idx else None,
                      f"{p}{group}_tokens_per_s": st.tokens_per_s if idx else None,
                      f"{p}{group}_chars_per_s": chars / max(st.decode_s, 1e-9) if idx else None})
    for r in results:
        del r["per_prompt"], r["texts"], r["loops"]


def ratio(a, b):
    """a / b, NaN where b is 0 (a row that kept no text: nothing to compare)."""
    return a / b if b else float("nan")


def check_lossless(results, outputs, refs, prompts, paths, device, dtype, sampled=False):
    """Each row's outputs (kept and full) against its model's AR fast, with the float32 logit gap at every
    first divergence (a tie of the low-precision logits is not a decoder bug); speedups against the base's
    AR rows."""
    fp32 = {}                                          # float32 copies for the tie analysis, loaded on first need
    for kind, outs_by_row in outputs.items():
        p = "kept_" if kind == "kept" else ""
        ar_eager, ar_fast = results[0], results[1]
        own_ar = {r["model"]: r for r in results if r["row"] == "AR fast"}
        for n, (r, outs) in enumerate(zip(results, outs_by_row)):
            r[f"{p}speedup_vs_ar_fast"] = ratio(r[f"{p}chars_per_s"], ar_fast[f"{p}chars_per_s"])   # tokenizer-neutral
            r[f"{p}speedup_vs_ar_eager"] = ratio(r[f"{p}chars_per_s"], ar_eager[f"{p}chars_per_s"])
            r[f"{p}token_speedup_vs_ar_fast"] = ratio(r[f"{p}tokens_per_s"], ar_fast[f"{p}tokens_per_s"])
            r[f"{p}token_speedup_vs_own_ar_fast"] = ratio(r[f"{p}tokens_per_s"], own_ar[r["model"]][f"{p}tokens_per_s"])
            if sampled:                       # samples differ from AR's token for token by design
                r.update({f"{p}lossless": None, f"{p}mismatches": 0, f"{p}tie_gaps": [], f"{p}lossless_ties_aside": None})
                continue
            key, gaps = r["model"], []       # (gap, rounding step) per mismatch; None = differs only in length
            for j, (prompt, ref, out) in enumerate(zip(prompts, refs[kind][key], outs)):
                if out != ref:
                    i = first_divergence(ref, out)
                    if i is None and kind == "kept":   # one kept text stops where the other goes on: the token
                        ref, out = refs["full"][key][j], outputs["full"][n][j]   # that decided it is where the
                        i = first_divergence(ref, out)                           # full-length outputs part
                    if i is not None and key not in fp32:
                        fp32[key] = load_checkpoint(paths[key], device)[0]
                    gaps.append(None if i is None else tie_gap(fp32[key], prompt, ref, i, out[i], dtype))
            ties = sum(g is not None and abs(g[0]) <= TIE_ULPS * g[1] for g in gaps)
            r[f"{p}lossless"] = 1 - len(gaps) / len(outs)
            r[f"{p}mismatches"] = len(gaps)
            r[f"{p}tie_gaps"] = sorted([round(g, 4), round(abs(g) / st, 2)] for g, st in filter(None, gaps)) \
                + [None] * gaps.count(None)    # [gap in nats, gap in rounding steps]
            r[f"{p}lossless_ties_aside"] = (len(outs) - len(gaps) + ties) / len(outs)


@cli
def main(argv=None):
    cfg = parse_config(BenchConfig, argv, description=__doc__, checks=checks)
    if cfg.chart is not None:
        return redraw(cfg.chart)
    t_start = time.time()
    log = lambda msg: print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    device = pick_device(cfg.device)
    sweep_path = Path(cfg.sweep_file)
    if cfg.sweep:
        check_writable(cfg.sweep_file, "--sweep_file", folder=False)    # before minutes of sweeping
    saved = read_sweep(sweep_path, "--sweep_file") if not cfg.sweep and sweep_path.exists() else None  # checked now
    cuda = device.startswith("cuda")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.dtype,
                                                                       torch.bfloat16 if cuda else torch.float32)
    compile = cfg.compile == "auto" and cuda
    cpu_limit = cfg.limit is None and not cuda
    if cfg.limit is None:
        cfg = replace(cfg, limit=0 if cuda else CPU_LIMIT)
    records = read_prompts(cfg.prompts)[:cfg.limit or None] if cfg.prompts != "heldout" else None
    models, vals, paths, base_ck = load_models(cfg, device, dtype)
    enc = model_tokenizer(models["base"].cfg)
    eot = enc.eot_token
    context = min(m.cfg.seq_len for m in models.values())
    cfg, records, prompts = bench_prompts(cfg, enc, records, base_ck, context, log)
    max_len = max(len(p) for p in prompts) + cfg.max_new_tokens
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    if cpu_limit:
        log(f"--limit {CPU_LIMIT}: the first {CPU_LIMIT} prompts on a CPU (pass --limit 0 for all)")
    log(f"{len(prompts)} prompts, {cfg.max_new_tokens} new tokens max, {gpu}, torch {torch.__version__}, {dtype}; "
        f"base {cfg.base_ckpt}, Jacobi Forcing {paths['jf']}")
    stops = (lambda ps: function_stops(enc, ps)) if cfg.stop == "function" else (lambda ps: None)
    best, sweep_results = best_settings(cfg, models, prompts, saved, gpu, eot, compile, log, max_len, stops)
    if cfg.batch:
        results = batch_table(cfg, models["jf"], prompts, best, eot, compile, max_len, log, stops)
        print_batch_table(results, cfg.temperature > 0)
        print(json.dumps({"device": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
                          "config": asdict(cfg), "ckpt": paths["jf"], "batch_rows": results,
                          "seconds": time.time() - t_start}))
        return
    ar, jacobi, mr = METHODS["ar"], METHODS["jacobi"], METHODS["mr"]
    rows = [("AR eager", "base", None), ("AR fast", "base", ar), ("Jacobi", "base", jacobi),
            ("n-gram", "base", METHODS["ngram"])] + ([("best", "base", best["base"])] if best else []) + \
           [("AR fast", "jf", ar), ("Jacobi", "jf", jacobi), ("n-gram", "jf", METHODS["ngram"]), ("MR", "jf", mr)] + \
           ([("best", "jf", best["jf"])] if best else [])
    results, outputs, refs = measure(rows, models, vals, records, prompts, cfg, enc, eot, compile, max_len, device, log,
                                     stops)
    check_lossless(results, outputs, refs, prompts, paths, device, dtype, sampled=cfg.temperature > 0)
    print_table(results, cfg.max_new_tokens)
    try:
        print("\n" + charts({"device": gpu, "prompts": len(prompts), "rows": results, "sweep": sweep_results}))
    except UnicodeEncodeError:                        # a terminal without the block characters: no pictures
        log("charts skipped: stdout cannot encode their block characters (set PYTHONIOENCODING=utf-8)")
    print(json.dumps({"device": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
                      "prompts": len(prompts), "config": asdict(cfg), "base_ckpt": cfg.base_ckpt, "ckpt": paths["jf"],
                      "rows": results, "sweep": sweep_results, "seconds": time.time() - t_start}))
    if cfg.profile:
        print("\n" + profile_lines(results))
    if cfg.profile and cuda:
        for settings in (ar, mr):
            profile_step(models["jf"], prompts[0], settings, eot, compile, max_len, cfg.max_new_tokens)

if __name__ == "__main__":
    main()
