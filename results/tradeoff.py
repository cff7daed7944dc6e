"""The price of speed: each distilled model's vanilla-Jacobi TPF against its quality change from its own
base, read from train.py logs. Prints a markdown table (mean and range over the logs of each recipe) and
writes an SVG scatter plot (TPF on x, held-out parse change on y; one dot per model).

    python results/tradeoff.py --out results/h200/tradeoff.svg \
        "lambda 1, no truth term (earlier defaults)=results/h200/quality/train_s?.log" \
        "lambda 10 + truth anchor 5 (defaults)=results/h200/recipe/train_s?.log" \
        "the same, an earlier seed-1 run=results/h200/recipe/earlier_train_s1.log"
"""
import argparse
import glob
import re
import statistics
from pathlib import Path

# train.py's lines, as it wrote them before and after its evaluation moved to kept text
TPF = re.compile(r"round (\d): jf\d\.pt: vanilla Jacobi TPF (?:on kept text \(to the function's end\) )?"
                 r"humaneval_n32 ([\d.]+).*?heldout_n32 ([\d.]+)")
QUALITY = re.compile(r"round (\d): jf\d\.pt: (humaneval|heldout) \(\d+ prompts[^)]*\)(?:, kept text)?: (.*)")
BASE = re.compile(r"round 1: source base\.pt: (humaneval|heldout) \(\d+ prompts[^)]*\)(?:, kept text)?: (.*)")
METRIC = re.compile(r"(\w+) ([-+\d.]+)±[\d.]+(?: \(vs base ([-+\d.]+)±[\d.]+\))?")


def metrics(text):
    """{'parse': (value, change from base or None), ...} from one quality log line's tail."""
    return {m[1]: (float(m[2]), float(m[3]) if m[3] else None) for m in METRIC.finditer(text)}


def read_log(path):
    """{round: {'tpf_he', 'tpf_ho', 'he': metrics, 'ho': metrics}} plus the base's metrics as round 0."""
    rounds = {}
    for line in Path(path).read_text().splitlines():
        if m := TPF.search(line):
            rounds.setdefault(int(m[1]), {}).update(tpf_he=float(m[2]), tpf_ho=float(m[3]))
        elif m := QUALITY.search(line):
            rounds.setdefault(int(m[1]), {})["he" if m[2] == "humaneval" else "ho"] = metrics(m[3])
        elif m := BASE.search(line):
            rounds.setdefault(0, {})["he" if m[1] == "humaneval" else "ho"] = metrics(m[2])
    return rounds


def point(rounds, r):
    """One model's row: TPF and changes from its base (parse and loop in points, body loss in %)."""
    d, base = rounds[r], rounds[0]
    return dict(tpf_he=d["tpf_he"], tpf_ho=d["tpf_ho"],
                ho_parse=100 * d["ho"]["parse"][1], he_parse=100 * d["he"]["parse"][1],
                ho_loop=100 * d["ho"]["loop"][1], he_loop=100 * d["he"]["loop"][1],
                ho_body=100 * d["ho"]["body_loss"][1] / base["ho"]["body_loss"][0],
                he_body=100 * d["he"]["body_loss"][1] / base["he"]["body_loss"][0])


def cell(values, fmt):
    lo, hi = min(values), max(values)
    mean = statistics.fmean(values)
    return f"{mean:{fmt}}" if len(values) == 1 else f"{mean:{fmt}} ({lo:{fmt}} to {hi:{fmt}})"


def svg(groups, path, w=640, h=400, pad=60):
    pts = [(g, r, p) for g, per_round in groups.items() for r, ps in per_round.items() for p in ps]
    xs, ys = [p["tpf_he"] for *_, p in pts], [p["ho_parse"] for *_, p in pts]
    x0, x1 = 1.0, max(xs) * 1.1
    y0, y1 = min(min(ys) * 1.15, -5), max(max(ys) * 1.3, 5)
    X = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)
    Y = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{Y(0):.1f}" x2="{w - pad}" y2="{Y(0):.1f}" stroke="#999" stroke-dasharray="4"/>',
           f'<line x1="{pad}" y1="{Y(-3):.1f}" x2="{w - pad}" y2="{Y(-3):.1f}" stroke="#bbb" stroke-dasharray="2"/>',
           f'<text x="{w - pad}" y="{Y(-3) - 4:.1f}" text-anchor="end" fill="#777">-3 points</text>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">vanilla Jacobi TPF, HumanEval, n=32 (train.py check)</text>',
           f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">held-out parse rate '
           f'change from the base (points)</text>']
    for t in range(1, int(x1) + 1):
        out.append(f'<text x="{X(t):.1f}" y="{h - pad + 16}" text-anchor="middle">{t}</text>')
    for t in range(int(y0 // 5) * 5, int(y1) + 1, 5):
        if y0 <= t <= y1:
            out.append(f'<text x="{pad - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:+d}</text>')
    ly = h - pad - 18 * (len(groups) + 1) - 4          # the legend, bottom left (the dots sit elsewhere here)
    for i, (g, per_round) in enumerate(groups.items()):
        c = colors[i % len(colors)]
        for r, ps in per_round.items():
            for p in ps:
                fill = c if r == max(per_round) else "white"
                out.append(f'<circle cx="{X(p["tpf_he"]):.1f}" cy="{Y(p["ho_parse"]):.1f}" r="5" fill="{fill}" '
                           f'stroke="{c}" stroke-width="2"/>')
        out.append(f'<circle cx="{pad + 16}" cy="{ly + 10 + 18 * i}" r="5" fill="{c}"/>'
                   f'<text x="{pad + 28}" y="{ly + 14 + 18 * i}">{g}</text>')
    out.append(f'<text x="{pad + 16}" y="{ly + 14 + 18 * len(groups)}" fill="#555">hollow: round 1, filled: '
               f'round 2; one dot per seed</text></svg>')
    Path(path).write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="+", help="'label=glob of train.py logs'")
    ap.add_argument("--out", help="write the SVG here")
    args = ap.parse_args()
    groups = {}
    for spec in args.groups:
        label, _, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern))
        if not label or not paths:
            raise SystemExit(f"{spec!r}: give 'label=glob' with a glob that matches train.py logs")
        groups[label] = {1: [], 2: []}
        for path in paths:
            try:
                rounds = read_log(path)
                for r in (1, 2):
                    if r in rounds and "ho" in rounds[r]:
                        groups[label][r].append(point(rounds, r))
            except (OSError, UnicodeDecodeError, KeyError, TypeError, ZeroDivisionError) as e:
                raise SystemExit(f"{path}: not a complete train.py log with the base's and a round's checks "
                                 f"({type(e).__name__}: {e}); pass the log of a run with --probe and --heldout on")
        if not any(groups[label].values()):
            raise SystemExit(f"{pattern}: no round's check in these logs; pass train.py logs of finished rounds")
    print("| recipe | round | models | TPF HE n=32 | TPF held-out n=32 | held-out parse | HE parse | held-out loop "
          "| HE loop | true-body loss held-out | HE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for g, per_round in groups.items():
        for r, ps in per_round.items():
            if ps:
                col = lambda k, fmt: cell([p[k] for p in ps], fmt)
                print(f"| {g} | {r} | {len(ps)} | {col('tpf_he', '.2f')} | {col('tpf_ho', '.2f')} | "
                      f"{col('ho_parse', '+.1f')} | {col('he_parse', '+.1f')} | {col('ho_loop', '+.1f')} | "
                      f"{col('he_loop', '+.1f')} | {col('ho_body', '+.1f')} % | {col('he_body', '+.1f')} % |")
    if args.out:
        svg(groups, args.out)


if __name__ == "__main__":
    main()
