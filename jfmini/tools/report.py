"""The benchmark's report: the results table, the split by looping bodies, the batch table, plain-text
charts (also redrawn from an earlier run's JSON line), and that JSON line."""
import json
import time
from pathlib import Path

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.quality import LOOP_DISTINCT4
from jfmini.tools.rows import describe

# A greedy flip is a floating-point tie, not a decoder error, when the float32 model's two candidates are
# within TIE_ULPS rounding steps of the decoding dtype at that logit's size: bfloat16 keeps 8 significant
# bits, so logits of 16-32 are stored in steps of 0.125, and a multi-token forward rounds differently from
# a one-token one.
TIE_ULPS = 2


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


def redraw(path):
    """--chart: print the charts of an earlier run's record."""
    try:
        print(charts(read_record(path)))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"--chart {path}: not a bench.py record this version can draw ({e!r}); pass "
                        f"bench.py's log or --sweep_file") from None


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
    print(("kept: kept tokens per prompt; TPF: kept tokens / the forwards that committed them; tokens/s, chars/s: "
           "kept text over the decode time to the stop (the host checks for the function's end at every sync: "
           "each forward, AR fast every few; the forwards past the end before a check count in the time). "
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


def json_line(gpu, dtype, started, **fields):
    """A run's JSON line: the device, torch and the decoding dtype, then `fields` in their order, then the
    seconds since `started`."""
    return json.dumps({"device": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), **fields,
                       "seconds": time.time() - started})
