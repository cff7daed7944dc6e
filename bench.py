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

from jfmini.runtime.common import UserError, atomic_write, check_writable, cli, field, parse_config, pick_device
from jfmini.runtime.data import completion_text, heldout_prompts, model_tokenizer, read_prompts
from jfmini.runtime.files import default_checkpoint, load_checkpoint, read_sweep
from jfmini.jacobi import Jacobi, generate_ar
from jfmini.runtime.engine import METHODS, Stats
from jfmini.runtime.quality import LOOP_DISTINCT4, distinct4, score, summarize, truth_loss
from jfmini.runtime.stop import function_stops


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


def batch_sizes(text):
    """'1,4,16,64' -> [1, 4, 16, 64]; None if it is not a list of positive integers."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        return None
    return sizes if sizes and min(sizes) >= 1 else None


def sampling(cfg):
    """The decoders' sampling settings from the flags (temperature 0: greedy)."""
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


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


# A greedy flip is a floating-point tie, not a decoder error, when the float32 model's two candidates are
# within TIE_ULPS rounding steps of the decoding dtype at that logit's size: bfloat16 keeps 8 significant
# bits, so logits of 16-32 are stored in steps of 0.125, and a multi-token forward rounds differently from
# a one-token one.
TIE_ULPS = 2

# The sweep: block length x blocks in flight x (recycled, n-gram) candidates x candidate length.
CANDIDATES = [(0, 0, None), (0, 1, 16), (0, 2, 8), (4, 0, 16), (4, 2, 16)]
SWEEP = [dict(block_len=n, num_blocks=k, pool_size=p, ngram=g, cand_len=c, activation_ratio=0.85)
         for n, k in ((16, 1), (32, 1), (32, 2), (64, 1), (64, 2)) for p, g, c in CANDIDATES]
SWEEP_BASE = [dict(block_len=n, ngram=g, cand_len=c) for n in (16, 32) for g, c in ((1, 16), (2, 8))]
CPU_LIMIT = 20                                        # prompts when --limit is not given, on a CPU


def describe(settings):
    """'n=64 K=2 pool 4 ngram 2 c=16' from a settings dict."""
    s = dict(settings)
    parts = [f"n={s.get('block_len', 1)}"] + ([f"K={s['num_blocks']}"] if s.get("num_blocks", 1) > 1 else [])
    parts += [f"pool {s['pool_size']}"] if s.get("pool_size") else []
    parts += [f"ngram {s['ngram']}"] if s.get("ngram") else []
    parts += [f"c={s['cand_len']}"] if s.get("cand_len") and (s.get("pool_size") or s.get("ngram")) else []
    return " ".join(parts)


@torch.no_grad()
def run_row(model, settings, prompts, cfg, eot, compile, passes, max_len=None):
    """Decode every prompt once per pass, (sync_every, stops: a stop rule per prompt, or None), with one
    decoder (compiled and captured once); returns ([(outputs, Stats per prompt)] per pass, us per captured
    step or None). settings None = the AR eager loop. max_len sizes the static cache (longest prompt + new
    tokens): attention reads every slot of it each step."""
    results, none = [], [None] * len(prompts)
    if settings is None:
        generate_ar(model, prompts[0], cfg.max_new_tokens, eot, **sampling(cfg))          # warm-up
        for _, stops in passes:
            torch.manual_seed(cfg.seed)
            results.append([list(x) for x in zip(*(generate_ar(model, p, cfg.max_new_tokens, eot, **sampling(cfg),
                                                                stop=stop) for p, stop in zip(prompts, stops or none)))])
        return results, None
    jac = Jacobi(model, eot=eot, compile=compile, max_len=max_len, **settings, **sampling(cfg))
    jac.generate(prompts[0], cfg.max_new_tokens, passes[0][0])              # warm-up, capture
    for every, stops in passes:
        torch.manual_seed(cfg.seed)
        results.append([list(x) for x in zip(*(jac.generate(p, cfg.max_new_tokens, every, stop=stop)
                                               for p, stop in zip(prompts, stops or none)))])
    return results, step_us(jac, prompts[0], cfg.max_new_tokens) if jac.graph_enabled else None


def total(stats):
    out = Stats()
    for st in stats:
        out += st
    return out


def step_us(jac, prompt, max_new_tokens, iters=100):
    """One captured iteration's time (graph replays between CUDA events), measured where a decode spends
    its average step: with half the new tokens already in the cache (the live length sets the attention
    cost). The state is scratch afterwards; the next generate() prefills anew."""
    jac.prefill([prompt], max_new_tokens)
    jac.state.length.add_(max_new_tokens // 2)
    jac.state.done.fill_(True)          # frozen: every kernel still runs, nothing moves past the cache
    jac.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        jac.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def verified_per_step(settings):
    """Tokens one iteration feeds the model: the main row (K blocks of n drafts) plus every candidate row
    (pool + n-gram rows of c tokens each); 1 for AR."""
    s = {**dict(block_len=1, num_blocks=1, pool_size=0, ngram=0, cand_len=None), **(settings or {})}
    n = s["block_len"]
    rows = s["pool_size"] + s["ngram"] if n > 1 else 0
    return s["num_blocks"] * n + rows * min(s["cand_len"] or n, n)


def profile_lines(results):
    """One line per decoder row: what a step verifies, what it costs, what it commits per microsecond."""
    lines = [f"{'row':<9}{'model':<6}{'decoder':<24}{'verified/step':>14}{'us/step':>9}{'TPF':>7}{'tokens/us':>11}"]
    for r in results:
        us = r["step_us"] or r["us_per_forward"]
        lines.append(f"{r['row']:<9}{r['model']:<6}{r['decoder']:<24}{r['verified_per_step']:>14}{us:>9.0f}"
                     f"{r['tokens_per_forward']:>7.2f}{r['tokens_per_forward'] / us:>11.4f}")
    return "\n".join(lines + ["us/step: one captured iteration (graph replay) where available, else the mean "
                              "decode time per forward; tokens/us = TPF / us per step."])


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


def profile_step(model, prompt, settings, eot, compile, max_len, max_new_tokens):
    """Where one iteration's time goes: the CUDA kernels of the same (inductor-fused) step, run uncaptured
    so the profiler sees each kernel, with half the new tokens in the cache; the biggest first."""
    jac = Jacobi(model, eot=eot, graph=False, compile=compile, max_len=max_len, **settings)
    jac.prefill([prompt], max_new_tokens)
    jac.state.length.add_(max_new_tokens // 2)
    jac.state.done.fill_(True)          # frozen: every kernel still runs, nothing moves past the cache
    for _ in range(3):
        jac.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            jac.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / 10
    print(f"profile of one iteration, {describe(settings)}: {total:.0f} us of kernel time in "
          f"{sum(e.count for e in kernels) / 10:.0f} kernels")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / 10:7.1f} us  {e.count / 10:4.0f}x  {e.key[:100]}")


def sweep(model, grid, prompts, cfg, eot, compile, log, max_len, stops, finalists=3):
    """Every configuration with graph capture only (cheap to set up), then the fastest few again with
    inductor too (as the table rows run), on the text the table measures (stops(prompts): the stop rules,
    or None); returns all results and the fastest settings."""
    results = []
    for s in grid:
        st = total(run_row(model, s, prompts, cfg, eot, False, [(1, stops(prompts))], max_len)[0][0][1])
        results.append({**s, "tokens_per_forward": st.tokens_per_forward, "tokens_per_s": st.tokens_per_s})
        log(f"  sweep {describe(s):<28}: TPF {st.tokens_per_forward:5.2f}, {st.tokens_per_s:8,.0f} tokens/s")
        gc.collect()
    top = sorted(results, key=lambda r: -r["tokens_per_s"])[:finalists if compile else 1]
    for r in top if compile else []:
        s = {k: r[k] for k in grid[0]}
        st = total(run_row(model, s, prompts, cfg, eot, True, [(1, stops(prompts))], max_len)[0][0][1])
        r["compiled_tokens_per_s"] = st.tokens_per_s
        log(f"  finalist {describe(s)}: {st.tokens_per_s:,.0f} tokens/s compiled")
        gc.collect()
    best = max(top, key=lambda r: r.get("compiled_tokens_per_s", r["tokens_per_s"]))
    return results, {k: best[k] for k in grid[0]}


def bars(items, width=32):
    """Plain-text horizontal bars, one line per (label, value, note); the largest value gets `width` cells."""
    top = max(v for _, v, _ in items) or 1.0
    pad = max(len(label) for label, _, _ in items)
    lines = []
    for label, v, note in items:
        eighths = round(8 * width * v / top)
        bar = "\u2588" * (eighths // 8) + " \u258f\u258e\u258d\u258c\u258b\u258a\u2589"[eighths % 8].strip()
        lines.append(f"{label:<{pad}}  {bar:<{width + 1}} {note}")
    return "\n".join(lines)


def charts(record):
    """The pictures of a run: tokens/s of every table row, and of every sweep setting of the JF model
    grouped by decoder and block length (TPF after each bar). `record` is bench.py's JSON line or a
    --sweep_file."""
    out = []
    if record.get("rows"):
        p = "kept_" if "kept_tokens_per_s" in record["rows"][0] else ""
        out.append(f"{'kept ' if p else ''}tokens/s by row ({record['device']}, {record['prompts']} prompts; TPF "
                   f"after the bar)")
        out.append(bars([(f"{r['row']} ({r['model']}, {r['decoder']})", r[f"{p}tokens_per_s"],
                          f"{r[f'{p}tokens_per_s']:>7,.0f}/s  TPF {r[f'{p}tokens_per_forward']:.2f}")
                         for r in record["rows"]]))
    jf = (record.get("sweep") or record.get("results") or {}).get("jf")
    if jf:
        order = sorted(jf, key=lambda s: (s["pool_size"], s["ngram"], s["cand_len"] or 0, s["num_blocks"],
                                          s["block_len"]))
        out.append("JF model by decoder and block length (sweep: a few prompts, CUDA graph without inductor)")
        out.append(bars([(describe(s), s["tokens_per_s"], f"{s['tokens_per_s']:>7,.0f}/s  TPF "
                          f"{s['tokens_per_forward']:.2f}") for s in order]))
    return "\n\n".join(out)


def drawable(record):
    """Does a JSON value hold bench rows or the JF model's sweep results?"""
    if not isinstance(record, dict):
        return False
    sweep = record.get("sweep") or record.get("results")
    return bool(record.get("rows")) or (isinstance(sweep, dict) and bool(sweep.get("jf")))


def read_record(path):
    """The last JSON object with bench rows or sweep results in a file (a bench log, its JSON line, or a
    --sweep_file)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chart {path}: cannot read it as text ({getattr(e, 'strerror', None) or e.reason}); "
                        f"pass bench.py's log or --sweep_file") from None
    for line in reversed(text.strip().splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if drawable(record):
            return record
    raise UserError(f"--chart {path}: no bench.py JSON line or sweep results in it; pass bench.py's log or "
                    f"--sweep_file")


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


def print_table(results, max_new_tokens):
    """The results table (kept text beside full length), its legend, each row's mismatches, then every row's
    speed on bodies that loop and on bodies that do not."""
    ar_eager, ar_fast = results[0], results[1]
    kept = "kept_tokens" in ar_fast
    p = "kept_" if kept else ""
    if kept:
        print(f"kept: what a user keeps of each completion, up to the function's end (before the first new line "
              f"of code that is not blank and is indented at or left of the prompt's last def), end-of-text or "
              f"{max_new_tokens} tokens; full: all {max_new_tokens} new tokens (or up to end-of-text).")
    head = f"{'row':<9}{'model':<6}{'decoder':<22}" + (f"{'kept':>7}{'TPF':>6}{'tokens/s':>9}{'chars/s':>9}{'vs fast':>8}"
                                                       f"{'vs own':>7} |" if kept else "") + \
           f"{'full TPF' if kept else 'TPF':>9}{'tokens/s':>9}{'vs fast':>8} |{'step us':>8}{'lossless':>9}" \
           f"{'parse':>7}{'loop':>7}{'blank':>7}{'edit':>6}{'body':>6}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        step = f"{r['step_us']:.0f}" if r["step_us"] else "-"
        edit = f"{r['edit_sim']:.3f}" if "edit_sim" in r else "-"
        body = f"{r['body_loss']:.3f}" if r["body_loss"] is not None else "-"
        lossless = r[f"{p}lossless_ties_aside"]
        lossless = f"{lossless:.1%}" if lossless is not None else "-"
        line = f"{r['row']:<9}{r['model']:<6}{r['decoder']:<22}"
        if kept:
            line += f"{r['kept_tokens'] / r['prompts']:>7.1f}{r['kept_tokens_per_forward']:>6.2f}" \
                    f"{r['kept_tokens_per_s']:>9,.0f}{r['kept_chars_per_s']:>9,.0f}{r['kept_speedup_vs_ar_fast']:>7.2f}x" \
                    f"{r['kept_token_speedup_vs_own_ar_fast']:>6.2f}x |"
        line += f"{r['tokens_per_forward']:>9.2f}{r['tokens_per_s']:>9,.0f}{r['speedup_vs_ar_fast']:>7.2f}x |" \
                f"{step:>8}{lossless:>9}{r['parse']:>7.1%}{r['loop']:>7.1%}{r['blank']:>7.1%}{edit:>6}{body:>6}"
        print(line)
    print((f"kept: kept tokens per prompt; TPF: kept tokens / the forwards that committed them; tokens/s, chars/s: "
           f"kept text over the decode time to the stop (the host checks for the function's end at every sync: "
           f"each forward, AR fast every few; the forwards past the end before a check count in the time). "
           if kept else "") + "vs fast: characters/s over the base model's AR fast; vs own: tokens/s over the same "
          f"model's AR fast. lossless: {'kept ' if kept else ''}outputs equal to the model's AR fast, floating-point ties aside. "
          f"parse/loop/blank: rates over the {'kept ' if kept else ''}bodies of {ar_fast['prompts']} prompts (AR eager: "
          f"{ar_eager['prompts']}; the standard error of the base's parse rate is {100 * ar_fast['parse_se']:.1f} points); "
          f"edit: edit similarity of the body to the true one; body: the true body's teacher-forced loss (nats/token).")
    for kind in ("kept_", "") if kept else ("",):
        for r in results:
            if r[f"{kind}mismatches"]:
                gaps = [g for g in r[f"{kind}tie_gaps"] if g is not None]
                lengths = r[f"{kind}tie_gaps"].count(None)
                print(f"{r['row']} ({r['model']}), {'kept' if kind else 'full length'}: {r[f'{kind}mismatches']} of "
                      f"{r['prompts']} differ from AR fast; fp32 logit gap at the first divergence: "
                      + (f"max {max(abs(g) for g, _ in gaps):.3f} nats, at most {max(st for _, st in gaps):.2f} "
                         f"rounding steps" if gaps else "-")
                      + (f" ({lengths} differ only in length)" if lengths else "")
                      + f" -> {r[f'{kind}lossless_ties_aside']:.1%} lossless ties aside (gap <= {TIE_ULPS} steps)")
    print_loop_split(results, p)


def print_loop_split(results, p):
    """Speed on bodies that loop and on bodies that do not: how much of each decoder's speed is repetition."""
    what = "kept bodies" if p else "completions"
    print(f"\n{what} that loop (distinct-4 below {LOOP_DISTINCT4} in the model's own AR output) and that do not:")
    head = f"{'row':<9}{'model':<6}{'decoder':<22}{'loop: n':>8}{'TPF':>6}{'tokens/s':>9} |{'no loop: n':>11}" \
           f"{'TPF':>6}{'tokens/s':>9} |{'tokens in loops':>16}"
    print(head + "\n" + "-" * len(head))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in results:
        share = r[f"{p}loop_tokens"] / max(r[f"{p}loop_tokens"] + r[f"{p}noloop_tokens"], 1)
        print(f"{r['row']:<9}{r['model']:<6}{r['decoder']:<22}{r[f'{p}loop_prompts']:>8}"
              f"{fmt(r[f'{p}loop_tokens_per_forward'], '.2f'):>6}{fmt(r[f'{p}loop_tokens_per_s'], ',.0f'):>9} |"
              f"{r[f'{p}noloop_prompts']:>11}{fmt(r[f'{p}noloop_tokens_per_forward'], '.2f'):>6}"
              f"{fmt(r[f'{p}noloop_tokens_per_s'], ',.0f'):>9} |{share:>16.1%}")


def batch_run(jac, prompts, max_new_tokens, stops=None, sync_every=4):
    """Decode the prompts jac.B at a time, each to its stop rule's end (stops: one per prompt, or None).
    Returns (outputs, forwards that committed them, decode seconds, latency per token of each prompt: the
    decode time of its batch over its tokens)."""
    outs, forwards, seconds, latency = [], [], 0.0, []
    for lo in range(0, len(prompts), jac.B):
        chunk = prompts[lo:lo + jac.B]
        o, f, _, t = jac.decode_batch(chunk, max_new_tokens, None if stops is None else stops[lo:lo + jac.B], sync_every)
        outs += o
        forwards += f
        latency += [t / max(len(x), 1) for x in o]
        seconds += t
    return outs, forwards, seconds, latency


def batch_table(cfg, model, prompts, best, eot, compile, max_len, log, stops):
    """Throughput as B prompts decode together, for AR fast, Jacobi and the best decoder of the JF model, on
    the kept text (stops(prompts): the stop rules, or None for full length): one row per (decoder, B) with
    total tokens/s, TPF per row, latency per token and the outputs' agreement with the same decoder at B = 1
    (greedy)."""
    decoders = [("AR fast", METHODS["ar"]), ("Jacobi", METHODS["jacobi"]),
                ("best" if best else "n-gram", best.get("jf") or METHODS["ngram"])]
    use, results = prompts[:cfg.batch_prompts], []
    for name, settings in decoders:
        first = None
        for B in batch_sizes(cfg.batch):
            torch.manual_seed(cfg.seed)
            jac = Jacobi(model, batch=B, eot=eot, compile=compile, max_len=max_len, **settings, **sampling(cfg))
            batch_run(jac, use[:B], cfg.max_new_tokens)                          # warm-up, capture
            outs, forwards, seconds, latency = batch_run(jac, use, cfg.max_new_tokens, stops(use))
            first = first or outs
            tokens = sum(map(len, outs))
            results.append({"row": name, "decoder": describe(settings), "batch": B, "prompts": len(use),
                            "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                            "tokens_per_forward": tokens / max(sum(forwards), 1),
                            "ms_per_token": 1e3 * sum(latency) / len(latency),
                            "same_as_b1": sum(a == b for a, b in zip(outs, first)) / len(outs)})
            log(f"batch {B:>3} {name} ({describe(settings)}): {results[-1]['tokens_per_s']:,.0f} tokens/s, TPF "
                f"{results[-1]['tokens_per_forward']:.2f}, {results[-1]['ms_per_token']:.2f} ms/token per row")
            del jac
            gc.collect()
    return results


def print_batch_table(results, sampled):
    """The batch table, the batch size where a parallel decoder stops paying, and a chart."""
    head = f"{'row':<9}{'decoder':<24}{'B':>4}{'tokens/s':>10}{'vs AR':>7}{'TPF/row':>8}{'ms/token':>9}{'same as B=1':>12}"
    print(head + "\n" + "-" * len(head))
    ar = {r["batch"]: r for r in results if r["row"] == "AR fast"}
    for r in results:
        same = "-" if sampled else f"{r['same_as_b1']:.0%}"
        print(f"{r['row']:<9}{r['decoder']:<24}{r['batch']:>4}{r['tokens_per_s']:>10,.0f}"
              f"{r['tokens_per_s'] / ar[r['batch']]['tokens_per_s']:>6.2f}x{r['tokens_per_forward']:>8.2f}"
              f"{r['ms_per_token']:>9.2f}{same:>12}")
    print("tokens/s: all rows' kept tokens (to the function's end, unless --stop none) over the decode time (prefill "
          "apart); vs AR: over AR fast at the "
          "same B; TPF/row: tokens per forward of each row; ms/token: a row's wait per token (its batch's decode "
          "time over its tokens); same as B=1: outputs equal to that decoder's at B=1 (bfloat16 kernels round "
          "differently by batch size).")
    for name in dict.fromkeys(r["row"] for r in results if r["row"] != "AR fast"):
        below = [r["batch"] for r in results if r["row"] == name and r["tokens_per_s"] < ar[r["batch"]]["tokens_per_s"]]
        print(f"{name}: " + (f"total throughput falls below AR fast's from B = {min(below)}" if below
                             else "total throughput stays above AR fast's at every B measured"))
    try:
        print("\n" + bars([(f"{r['row']} B={r['batch']}", r["tokens_per_s"], f"{r['tokens_per_s']:>9,.0f}/s  TPF "
                            f"{r['tokens_per_forward']:.2f}") for r in results]))
    except UnicodeEncodeError:
        pass


def redraw(path):
    """--chart: print the charts of an earlier run's record."""
    try:
        print(charts(read_record(path)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"--chart {path}: not a bench.py record this version can draw ({e!r}); pass "
                        f"bench.py's log or --sweep_file") from None


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
