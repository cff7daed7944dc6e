"""decode.py's prompt: the text read from --prompt, standard input or --prompt_file (UTF-8, no NUL bytes),
then fitted to the model's context with the decoder's sizes, all before the decoder allocates its cache."""
import sys
from pathlib import Path

from jfmini.runtime.errors import UserError

# A prompt longer than this cannot fit any model's context: refused before it is read whole.
MAX_PROMPT_BYTES = 1 << 20


def read_prompt(cfg):
    """The text to complete: --prompt, standard input (--prompt -) or --prompt_file, which must be UTF-8
    text with no NUL bytes."""
    if cfg.prompt is not None and cfg.prompt != "-":
        try:
            cfg.prompt.encode("utf-8")
        except UnicodeEncodeError:                      # bytes that are not UTF-8 in the command line
            raise UserError("--prompt is not UTF-8 text; pass the prompt with --prompt_file or --prompt -") from None
        return cfg.prompt
    if cfg.prompt_file is None:
        where, data = "standard input (--prompt -)", sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    else:
        path, where = Path(cfg.prompt_file), f"--prompt_file {cfg.prompt_file}"
        if not path.exists():
            raise UserError(f"{where} does not exist; pass a UTF-8 text file holding the prompt")
        if path.is_dir():
            raise UserError(f"{where} is a directory; pass a UTF-8 text file holding the prompt")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PROMPT_BYTES + 1)
        except OSError as e:
            raise UserError(f"{where} cannot be read ({e.strerror}); pass a readable text file") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise UserError(f"{where} holds over {MAX_PROMPT_BYTES:,} bytes, more than any model's context; pass a "
                        f"shorter prompt")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (binary byte at offset {e.start}); pass a text file") from None


# One iteration verifies the drafts of all blocks and the candidate rows: at most this many model contexts
# of tokens. Beyond it a forward is mostly waste and its attention memory grows with the square (a
# --num_blocks 100 ran 100 s on a CPU, a --block_len 5000 ran out of memory).
MAX_CONTEXTS_PER_FORWARD = 8


def fit_to_context(cfg, settings, prompt_len, seq_len):
    """max_new_tokens, resolved and checked against the model's context, and the decoder's sizes checked,
    all before the decoder allocates its cache. Returns (max_new_tokens, a note when it was lowered)."""
    if prompt_len < 1:
        raise UserError("empty prompt: give at least one token of text")
    room = seq_len - prompt_len
    if room < 1:
        raise UserError(f"the prompt's {prompt_len} tokens fill the model's context of {seq_len}; shorten the prompt")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens > room:
        raise UserError(f"--max_new_tokens {cfg.max_new_tokens} + the prompt's {prompt_len} tokens exceed the "
                        f"model's context of {seq_len}; pass at most {room} or shorten the prompt")
    n, K = settings["block_len"], settings.get("num_blocks", 1)
    rows = settings.get("pool_size", 0) + settings.get("ngram", 0) if n > 1 else 0
    c = min(settings.get("cand_len") or n, n)
    if n > seq_len:
        raise UserError(f"--block_len {n} is longer than the model's context of {seq_len}; pass at most {seq_len}")
    tokens = n * K + rows * c                          # what Jacobi verifies per forward
    if tokens > MAX_CONTEXTS_PER_FORWARD * seq_len:
        P, G = settings.get("pool_size", 0), settings.get("ngram", 0)
        raise UserError(f"--block_len {n} x --num_blocks {K} + (--pool_size {P} + --ngram {G}) x --cand_len {c} = "
                        f"{tokens} tokens per forward, more than {MAX_CONTEXTS_PER_FORWARD}x the model's context of "
                        f"{seq_len}; lower them")
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens, None
    new = min(256, room)
    return new, (f"--max_new_tokens {new}: what the model's context of {seq_len} leaves after the prompt"
                 if new < 256 else None)
