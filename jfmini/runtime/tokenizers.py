"""Tokenizers, all offline: BPE through tiktoken, built from the GPT-2 rank table shipped in jfmini/assets
(sha256-checked), so nothing touches the network: GPT-2's own, or p50k (the same ranks plus tokens for
runs of spaces, made for code; the default). Also the tests' byte encoding and a completion's text.
"""
import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from jfmini.runtime.errors import UserError

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


def byte_tokenizer():
    """A tiny encoding for tests: the 256 bytes plus end-of-text (id 256). No files, no merges."""
    return tiktoken.Encoding(name="bytes", pat_str=GPT2_PATTERN,
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={EOT: 256})


# ----------------------------------------------------------------------------- completions

def completion_text(enc, tokens):
    return enc.decode([t for t in tokens if t != enc.eot_token])
