"""Is a decoder lossless? Each row's outputs against its model's own greedy AR output, with the float32 logit gap
at every first divergence (a floating-point tie of the decoding dtype is no decoder bug), and each row's
speedups against the AR rows."""
import math

import torch

from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.tools.report import TIE_ULPS


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
