"""Decoder runs for the benchmark: a row (one decoder over the prompts, timed), the sweep of decoder
settings, what one step costs (captured and profiled), and batches of prompts decoded together."""
import gc

import torch

from jfmini.jacobi import Jacobi
from jfmini.tools.ar import generate_ar
from jfmini.runtime.engine import METHODS, Stats

# The sweep: block length x blocks in flight x (recycled, n-gram) candidates x candidate length.
CANDIDATES = [(0, 0, None), (0, 1, 16), (0, 2, 8), (4, 0, 16), (4, 2, 16)]
SWEEP = [dict(block_len=n, num_blocks=k, pool_size=p, ngram=g, cand_len=c, activation_ratio=0.85)
         for n, k in ((16, 1), (32, 1), (32, 2), (64, 1), (64, 2)) for p, g, c in CANDIDATES]
SWEEP_BASE = [dict(block_len=n, ngram=g, cand_len=c) for n in (16, 32) for g, c in ((1, 16), (2, 8))]


def describe(settings):
    """'n=64 K=2 pool 4 ngram 2 c=16' from a settings dict."""
    s = dict(settings)
    parts = [f"n={s.get('block_len', 1)}"] + ([f"K={s['num_blocks']}"] if s.get("num_blocks", 1) > 1 else [])
    parts += [f"pool {s['pool_size']}"] if s.get("pool_size") else []
    parts += [f"ngram {s['ngram']}"] if s.get("ngram") else []
    parts += [f"c={s['cand_len']}"] if s.get("cand_len") and (s.get("pool_size") or s.get("ngram")) else []
    return " ".join(parts)


def sampling(cfg):
    """The decoders' sampling settings from the flags (temperature 0: greedy)."""
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def batch_sizes(text):
    """'1,4,16,64' -> [1, 4, 16, 64]; None if it is not a list of positive integers."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        return None
    return sizes if sizes and min(sizes) >= 1 else None


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
    return results, step_us(jac, prompts[0], cfg.max_new_tokens) if jac.step.enabled else None


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
