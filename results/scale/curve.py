"""TPF on kept text and the quality price against distillation rows, from results/scale/run.sh's logs.
Prints a markdown table (one row per data scale, the base first) and writes an SVG picture (TPF against
rows, log scale, with the held-out parse change written at each point).

    python results/scale/curve.py results/scale/h100 --out results/scale/h100/curve.svg
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tradeoff import read_log  # noqa: E402

KEPT = re.compile(r"round 1: (jf1\.pt|source base\.pt): vanilla Jacobi TPF on kept text .*? humaneval_n32 ([\d.]+),.*? "
                  r"heldout_n32 ([\d.]+).*?do not humaneval_n32 ([\d.]+) / ([\d.]+), heldout_n32 ([\d.]+) / ([\d.]+)")
RATE = re.compile(r"round 1: ([\d,]+) rows/s after the first 20 steps.*?, (\d+)s for (\d+) steps")
ROWS = re.compile(r"round 1: training (\d+) steps of (\d+) rows")


def read(path):
    text = Path(path).read_text()
    out = {}
    for m in KEPT.finditer(text):
        out["base" if "base" in m[1] else "jf"] = dict(he=float(m[2]), ho=float(m[3]), he_noloop=float(m[5]),
                                                       ho_noloop=float(m[7]))
    if m := RATE.search(text):
        out["rows_s"], out["train_s"] = int(m[1].replace(",", "")), int(m[2])
    if m := ROWS.search(text):
        out["rows"] = int(m[1]) * int(m[2])
    out["quality"] = read_log(path)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", help="the folder with curve_<steps>.log files")
    ap.add_argument("--out", help="where to write the SVG")
    a = ap.parse_args()
    points = sorted((read(p) for p in Path(a.logs).glob("curve_*.log")), key=lambda p: p.get("rows", 0))
    points = [p for p in points if "jf" in p]
    if not points:
        sys.exit(f"no finished curve_*.log in {a.logs}")
    base = next(p["base"] for p in points if "base" in p)
    base_q = next(p["quality"][0] for p in points if 0 in p["quality"])
    print("| rows | rows/s | train s | TPF HumanEval | TPF held-out | no-loop TPF HE / held-out | held-out parse | "
          "HumanEval parse | loop held-out / HE | body loss held-out / HE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| 0 (base) | | | {base['he']:.2f} | {base['ho']:.2f} | {base['he_noloop']:.2f} / {base['ho_noloop']:.2f} | "
          f"{100 * base_q['ho']['parse'][0]:.1f} % | {100 * base_q['he']['parse'][0]:.1f} % | "
          f"{100 * base_q['ho']['loop'][0]:.1f} / {100 * base_q['he']['loop'][0]:.1f} % | "
          f"{base_q['ho']['body_loss'][0]:.3f} / {base_q['he']['body_loss'][0]:.3f} |")
    for p in points:
        q, j = p["quality"][1], p["jf"]
        d = lambda s, k: 100 * q[s][k][1]                                           # noqa: E731
        body = lambda s: 100 * q[s]["body_loss"][1] / base_q[s]["body_loss"][0]     # noqa: E731
        print(f"| {p['rows']:,} | {p.get('rows_s', 0):,} | {p.get('train_s', 0)} | {j['he']:.2f} | {j['ho']:.2f} | "
              f"{j['he_noloop']:.2f} / {j['ho_noloop']:.2f} | {d('ho', 'parse'):+.1f} | {d('he', 'parse'):+.1f} | "
              f"{d('ho', 'loop'):+.1f} / {d('he', 'loop'):+.1f} | {body('ho'):+.1f} / {body('he'):+.1f} % |")
    if a.out:
        Path(a.out).write_text(svg(points, base))
        print(f"wrote {a.out}")


def svg(points, base, w=640, h=400, pad=60):
    import math
    xs = [math.log10(p["rows"]) for p in points]
    ys = [v for p in points for v in (p["jf"]["he"], p["jf"]["ho"])] + [base["he"], base["ho"], 1.0]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = 0.0, max(ys) * 1.15
    X = lambda v: pad + (v - x0) / (x1 - x0) * (w - 2 * pad)                       # noqa: E731
    Y = lambda v: h - pad - (v - y0) / (y1 - y0) * (h - 2 * pad)                   # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">distillation rows (log scale)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">vanilla-Jacobi TPF on '
           f'kept text (n=32)</text>']
    for p in points:
        x = X(math.log10(p["rows"]))
        out.append(f'<text x="{x}" y="{h - pad + 16}" text-anchor="middle">{p["rows"] / 1000:.0f}K</text>')
    for t in range(0, int(y1) + 1):
        out.append(f'<text x="{pad - 8}" y="{Y(t) + 4}" text-anchor="end">{t}</text>')
        out.append(f'<line x1="{pad}" y1="{Y(t)}" x2="{w - pad}" y2="{Y(t)}" stroke="#ddd"/>')
    for key, colour, name in (("he", "#1f77b4", "HumanEval"), ("ho", "#d62728", "held-out")):
        pts = [(X(math.log10(p["rows"])), Y(p["jf"][key])) for p in points]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        out.append(f'<line x1="{pad}" y1="{Y(base[key])}" x2="{w - pad}" y2="{Y(base[key])}" stroke="{colour}" '
                   f'stroke-dasharray="4 4"/>')
        for (x, y), p in zip(pts, points):
            q = p["quality"][1][key]["parse"][1]
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
            out.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" fill="{colour}">parse {100 * q:+.1f}</text>')
        out.append(f'<text x="{w - pad}" y="{Y(base[key]) - 4}" text-anchor="end" fill="{colour}">{name} base</text>')
    out.append('</svg>')
    return "\n".join(out)


if __name__ == "__main__":
    main()
