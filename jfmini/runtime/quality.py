"""What a completion is worth: parse, blank, loop, distinct-4, and against the true code (edit similarity,
first-line match, teacher-forced loss of the true body), with standard errors.

Jacobi decoding is lossless, so a model's quality is that of its own greedy AR output: these metrics
compare a distilled model with its base on the same prompts. Each prompt ends inside a function (after
its docstring, HumanEval style); the completion's *body* is what a user keeps of it, up to the function's
end (jfmini.runtime.stop), and that is what is compared with the true body.
"""
import ast
import math
import textwrap

import numpy as np
import torch
import torch.nn.functional as F

from jfmini.runtime.stop import FunctionEnd, kept_text

LOOP_DISTINCT4 = 0.3     # a completion whose distinct 4-gram ratio is below this is a repetition loop


def function_body(prompt, completion):
    """(source of the prompt's last function, completed; the completion's part of it). The function runs
    from the prompt's last `def` line through the completion up to the function's end (the stop rule of
    jfmini.runtime.stop); it is dedented, so methods of held-out classes count like top-level functions."""
    body = kept_text(prompt, completion)
    return textwrap.dedent(prompt[FunctionEnd(prompt).def_start:] + body), body


def parses(prompt, completion):
    """Does the prompt's last function, completed, parse as Python?"""
    try:
        ast.parse(function_body(prompt, completion)[0])
        return True
    except (SyntaxError, ValueError):
        return False


def distinct4(tokens):
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def edit_similarity(pairs, limit=500, device="cpu"):
    """1 - Levenshtein distance / the longer length, over characters, for each (a, b) pair (texts cut at
    `limit` characters). All pairs advance together, one row of the distance table per step, as tensors."""
    if not pairs:
        return []
    codes = lambda t: torch.tensor([ord(c) for c in t[:limit]], dtype=torch.int32)
    a, b = [codes(x) for x, _ in pairs], [codes(y) for _, y in pairs]
    la = torch.tensor([len(t) for t in a], device=device)
    lb = torch.tensor([len(t) for t in b], device=device)
    A, B = int(la.max()), int(lb.max())
    x = torch.full((len(pairs), max(A, 1)), -1, dtype=torch.int32)
    y = torch.full((len(pairs), B), -2, dtype=torch.int32)           # pads never match
    for i, (s, t) in enumerate(zip(a, b)):
        x[i, :len(s)], y[i, :len(t)] = s, t
    x, y = x.to(device), y.to(device)
    idx = torch.arange(B + 1, device=device)
    row = idx.expand(len(pairs), -1).clone()                          # distances from a[:0] to b[:j]
    dist = lb.clone()                                                 # a empty: |b|
    for i in range(1, A + 1):
        cand = torch.empty_like(row)
        cand[:, 0] = i
        cand[:, 1:] = torch.minimum(row[:, 1:] + 1, row[:, :-1] + (y != x[:, i - 1:i]).long())  # del, sub
        row = torch.cummin(cand - idx, dim=1).values + idx                                    # insertions
        dist = torch.where(la == i, row.gather(1, lb[:, None])[:, 0], dist)
    longer = torch.maximum(la, lb)
    return torch.where(longer > 0, 1 - dist / longer.clamp(min=1), torch.ones(len(pairs), device=device)).tolist()


def first_line(text):
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def score(prompts, completions, tokens, truths=None, device="cpu"):
    """Per-prompt metrics (dicts of floats in [0, 1]): parse, blank (the body is empty or whitespace), loop
    (distinct-4 below LOOP_DISTINCT4), distinct4; where a true body is given, also its edit similarity and
    first-line exact match with the completion's body."""
    truths = truths or [None] * len(prompts)
    rows, pairs = [], []
    for prompt, completion, toks, truth in zip(prompts, completions, tokens, truths):
        _, body = function_body(prompt, completion)
        d4 = distinct4(toks)
        m = {"parse": float(parses(prompt, completion)), "blank": float(not body.strip()),
             "loop": float(d4 < LOOP_DISTINCT4), "distinct4": d4}
        if truth is not None:
            m["first_line"] = float(first_line(body) == first_line(truth) != "")
            pairs.append((body.strip("\n"), truth.strip("\n")))
        rows.append(m)
    sims = iter(edit_similarity(pairs, device=device))
    for m, truth in zip(rows, truths):
        if truth is not None:
            m["edit_sim"] = next(sims)
    return rows


def summarize(per_prompt):
    """{metric: (mean, standard error)} over prompts: for a rate p, sqrt(p (1 - p) / N)."""
    out = {}
    for k in per_prompt[0] if per_prompt else []:
        v = np.array([m[k] for m in per_prompt if k in m], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))
    return out


def paired_difference(a, b, key):
    """(mean of b - a, its standard error) over prompts both measured: the noise of a base-vs-distilled
    comparison on the same prompts, smaller than either rate's own."""
    d = np.array([y[key] - x[key] for x, y in zip(a, b) if key in x and key in y], dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


@torch.no_grad()
def truth_loss(model, prompts, bodies, batch=32, autocast=None):
    """Teacher-forced loss of each true body after its prompt: (total nats, tokens scored) per prompt.
    prompts and bodies are token lists; pairs longer than the model's context are cut at the end."""
    dev = model.embed.weight.device
    S = model.cfg.seq_len
    nats, counts = [], []
    for lo in range(0, len(prompts), batch):
        rows = [(p + b)[:S + 1] for p, b in zip(prompts[lo:lo + batch], bodies[lo:lo + batch])]
        L = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), L, dtype=torch.long)
        y = torch.full((len(rows), L), -1, dtype=torch.long)
        for i, (r, p) in enumerate(zip(rows, prompts[lo:lo + batch])):
            x[i, :len(r) - 1] = torch.tensor(r[:-1])
            t = torch.tensor(r[1:])
            t[:len(p) - 1] = -1                                   # only the body's tokens are scored
            y[i, :len(r) - 1] = t
        x, y = x.to(dev), y.to(dev)
        with autocast or torch.autocast(dev.type, enabled=False):
            logits = model(x, torch.arange(L, device=dev))
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
        nats += loss.sum(1).tolist()
        counts += (y >= 0).sum(1).tolist()
    return nats, counts
