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
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from jfmini.runtime.writes import check_writable
from jfmini.runtime.cli import cli, field, parse_config, pick_device
from jfmini.runtime.tokenizers import model_tokenizer
from jfmini.runtime.prompts import read_prompts
from jfmini.runtime.files import read_sweep
from jfmini.runtime.engine import METHODS, setting_checks
from jfmini.runtime.stop import function_stops
from jfmini.tools.choose import best_settings
from jfmini.tools.lossless import check_lossless
from jfmini.tools.measure import bench_prompts, load_models, measure, table_rows
from jfmini.tools.report import charts, json_line, print_batch_table, print_table, redraw
from jfmini.tools.rows import batch_sizes, batch_table, profile_lines, profile_step


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
    yield from setting_checks("--", temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    yield c.batch is None or batch_sizes(c.batch) is not None, f"--batch takes batch sizes like 1,4,16,64 (got {c.batch!r})"
    for name in ("max_new_tokens", "eager_limit", "sweep_prompts", "ar_sync_every", "ar_stop_every", "batch_prompts"):
        v = getattr(c, name)
        yield v is None or v >= 1, f"--{name} must be at least 1 (got {v})"
    yield c.limit is None or c.limit >= 0, f"--limit must be 0 (all) or more (got {c.limit})"


CPU_LIMIT = 20                                        # prompts when --limit is not given, on a CPU


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
        print(json_line(gpu, dtype, t_start, config=asdict(cfg), ckpt=paths["jf"], batch_rows=results))
        return
    results, outputs, refs = measure(table_rows(best), models, vals, records, prompts, cfg, enc, eot, compile,
                                     max_len, device, log, stops)
    check_lossless(results, outputs, refs, prompts, paths, device, dtype, sampled=cfg.temperature > 0)
    print_table(results, cfg.max_new_tokens)
    try:
        print("\n" + charts({"device": gpu, "prompts": len(prompts), "rows": results, "sweep": sweep_results}))
    except UnicodeEncodeError:                        # a terminal without the block characters: no pictures
        log("charts skipped: stdout cannot encode their block characters (set PYTHONIOENCODING=utf-8)")
    print(json_line(gpu, dtype, t_start, prompts=len(prompts), config=asdict(cfg), base_ckpt=cfg.base_ckpt,
                    ckpt=paths["jf"], rows=results, sweep=sweep_results))
    if cfg.profile:
        print("\n" + profile_lines(results))
    if cfg.profile and cuda:
        for settings in (METHODS["ar"], METHODS["mr"]):
            profile_step(models["jf"], prompts[0], settings, eot, compile, max_len, cfg.max_new_tokens)

if __name__ == "__main__":
    main()
