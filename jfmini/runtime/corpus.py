"""The corpus, offline: the Python source already installed on this machine: the standard library plus
the torch package and the packages it brings (numpy, sympy, networkx, mpmath, jinja2), test folders
excluded, split by a hash of each file's path into pretraining, validation and two held-out parts, and
tokenized once into uint16 memmaps (nanoGPT style), from which training draws random windows.
"""
import importlib
import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from jfmini.runtime.errors import UserError
from jfmini.runtime.tokenizers import full_vocab
from jfmini.runtime.writes import atomic_write

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


def token_cache(out_dir, corpus, vocab_size, name="gpt2"):
    """The folder of a corpus's token files for one tokenizer and vocabulary size."""
    default = vocab_size == full_vocab(name)
    return Path(out_dir) / (f"data_{corpus.replace('+', '_')}" + ("" if name == "gpt2" else f"_{name}")
                            + ("" if default else f"_v{vocab_size}"))


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
