"""Stream a completion (greedy, or sampled with --temperature) and report TPF (tokens per forward pass).

    python decode.py --prompt "def fib(n):"                     # the fastest decoder here, to the function's end
    python decode.py --prompt_file my_prompt.py                 # a multi-line prompt from a file
    printf 'import os\\n\\ndef f(root):\\n' | python decode.py --prompt -   # ... or from standard input
    python decode.py --prompt "def fib(n):" --stop none         # run on past the function's end
    python decode.py --prompt "def fib(n):" --method jacobi     # vanilla Jacobi, block length 32
    python decode.py --prompt "def fib(n):" --method mr         # recycling + multi-block (n=64, K=2, pool 4)
    python decode.py --prompt "def fib(n):" --method best       # the settings `bench.py --sweep` chose
    python decode.py --prompt "def fib(n):" --show              # the Jacobi trajectory, iteration by iteration

The completion ends at the function's end: before the first new line of code that is not blank and is
indented at or left of the prompt's last `def` (or at end-of-text, or after --max_new_tokens). The default
decoder (--method auto) is the fastest measured: plain AR on a CPU (where a forward costs in proportion to
the tokens it verifies), Jacobi with context n-gram candidates on a GPU. MR = rejection recycling +
multi-block decoding, with n tokens per block, K blocks in flight, a pool of recycled candidates verified
in the same forward, and r the activation ratio. Every method prints the same text: the model's own greedy
output. Only the forward count differs.
"""
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import cli, field, parse_config, pick_device
from jfmini.runtime.tokenizers import model_tokenizer
from jfmini.jacobi import Jacobi
from jfmini.runtime.engine import METHODS, SETTINGS, finish
from jfmini.runtime.files import read_sweep
from jfmini.runtime.checkpoints import default_checkpoint, load_checkpoint
from jfmini.runtime.stop import StopAtFunctionEnd, token_pieces


@dataclass
class DecodeConfig:
    prompt: str = field(None, "text to complete; - reads it from standard input (this or --prompt_file is required)")
    prompt_file: str = field(None, "read the text to complete from this UTF-8 file (a multi-line prompt)")
    stop: str = field("function", "where the completion ends besides end-of-text and --max_new_tokens: function "
                                  "(before the first new line at or left of the prompt's last def) or none",
                      ["function", "none"])
    ckpt: str = field(None, "checkpoint (default: the newest out/jf*.pt, else out/base.pt)")
    method: str = field("auto", "decoder: auto (the fastest measured: ar on a CPU, or jacobi if a size flag is "
                                "given; ngram on a GPU), ar, jacobi "
                                "(vanilla), ngram (jacobi + 2 context n-gram candidates), mr (recycling + "
                                "multi-block), or best (the fastest settings `python bench.py --sweep` found on "
                                "this device)", ["auto"] + list(METHODS) + ["best"])
    block_len: int = field(None, "tokens per block n (default: ar 1, jacobi and ngram 32, mr 64)")
    num_blocks: int = field(None, "blocks in flight K (mr default 2)")
    pool_size: int = field(None, "recycled candidates verified per forward (mr default 4)")
    ngram: int = field(None, "context n-gram candidates (prompt lookup) verified per forward (default 0)")
    cand_len: int = field(None, "tokens per candidate (default: mr 16, else the block length)")
    activation_ratio: float = field(None, "converged fraction of the newest block that activates the next (mr 0.85)")
    max_new_tokens: int = field(None, "stop after this many new tokens (or at end-of-text); default 256, or what "
                                      "the model's context leaves after the prompt")
    show: bool = field(False, "render the trajectory: committed tokens, correct guesses, wrong guesses")
    sweep_file: str = field("out/sweep.json", "where --method best finds the sweep's choice")
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    graph: str = field("auto", "capture each iteration as a CUDA graph: auto (on CUDA), no", ["auto", "no"])
    temperature: float = field(0.0, "0 = greedy; above 0: sample, exactly as AR sampling at this temperature would")
    top_k: int = field(0, "sampling: only the k most likely tokens (0 = all)")
    top_p: float = field(1.0, "sampling: only the most likely tokens that make up this much probability (1 = all)")
    seed: int = field(0, "seed of the sampling noise")


def checks(c):
    yield c.prompt is not None or c.prompt_file is not None, "--prompt is required, e.g. --prompt \"def fib(n):\" " \
                                                             "(or --prompt_file PATH, or --prompt - for standard input)"
    yield c.prompt is None or c.prompt_file is None, "give --prompt or --prompt_file, not both"
    v = c.max_new_tokens
    yield v is None or v >= 1, f"--max_new_tokens must be at least 1 (got {v})"
    plain_ar = {"block_len": 1, "num_blocks": 1}
    sizes = [f"--{k} {getattr(c, k)}" for k in SETTINGS if getattr(c, k) is not None and getattr(c, k) != plain_ar.get(k)]
    yield c.method != "ar" or not sizes, f"--method ar decodes one token per forward, so {' '.join(sizes)} would " \
                                         f"be ignored; drop it, or pick --method jacobi or mr"
    for name in ("block_len", "num_blocks", "cand_len"):
        v = getattr(c, name)
        yield v is None or v >= 1, f"--{name} must be at least 1 (got {v})"
    for name in ("pool_size", "ngram"):
        v = getattr(c, name)
        yield v is None or v >= 0, f"--{name} must be 0 or more (got {v})"
    r = c.activation_ratio
    yield r is None or 0 < r <= 1, f"--activation_ratio must be in (0, 1] (got {r})"
    yield c.temperature >= 0, f"--temperature must be 0 (greedy) or more (got {c.temperature})"
    yield c.top_k >= 0, f"--top_k must be 0 (all tokens) or more (got {c.top_k})"
    yield 0 < c.top_p <= 1, f"--top_p must be in (0, 1] (got {c.top_p})"
    yield c.temperature > 0 or (c.top_k == 0 and c.top_p == 1), "--top_k and --top_p apply to sampling: give " \
                                                                 "--temperature above 0 too"


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


def decoder_settings(cfg, cuda):
    """(the method's name, its settings): auto resolved for this device, the defaults overridden by any size
    flag given."""
    sized = any(getattr(cfg, k) is not None for k in SETTINGS)      # size flags describe a parallel decoder
    method = cfg.method if cfg.method != "auto" else "ngram" if cuda else "jacobi" if sized else "ar"
    if method == "best":
        if not Path(cfg.sweep_file).is_file():
            what = "is not a file" if Path(cfg.sweep_file).exists() else "is missing"
            raise UserError(f"--method best reads the sweep's choice from {cfg.sweep_file}, which {what}; run "
                            f"`python bench.py --sweep` first (or pass --sweep_file)")
        s = dict(read_sweep(cfg.sweep_file, "--sweep_file")["best"])
    else:
        s = dict(METHODS[method])
    for k in SETTINGS:
        if getattr(cfg, k) is not None:
            s[k] = getattr(cfg, k)
    return method, s


COLOR = {"new": "\033[1;32m", "good": "\033[30;43m", "bad": "\033[2;31m", "end": "\033[0m"}
PLAIN = {"new": ("[", "]"), "good": ("{", "}"), "bad": ("", "")}


def piece(enc, tok):
    return enc.decode([tok]).replace("\n", "\\n").replace("\t", "\\t")


def render(enc, frames, final, prompt_len, color):
    """One line per iteration (the paper's Figure 4): tokens committed by this forward, then the drafts,
    marked where they already equal the final output (a correct guess not yet verified) or not."""
    def mark(kind, text):
        return f"{COLOR[kind]}{text}{COLOR['end']}" if color else f"{PLAIN[kind][0]}{text}{PLAIN[kind][1]}"
    legend = (f"{mark('new', 'committed now')} {mark('good', 'correct guess')} {mark('bad', 'wrong guess')}")
    lines = [f"trajectory ({legend}):"]
    prev_m = prompt_len
    for it, (m, draft) in enumerate(frames):
        m = min(m, prompt_len + len(final))   # the last forward may commit past the cut at max_new_tokens
        new = [mark("new", piece(enc, t)) for t in final[prev_m - prompt_len:m - prompt_len]]
        guesses = []
        for i, t in enumerate(draft):
            at = m - prompt_len + i
            ok = at < len(final) and final[at] == t
            guesses.append(mark("good" if ok else "bad", piece(enc, t)))
        lines.append(f"{it:4d} +{m - prev_m:<3d}" + "".join(new) + " | " + " ".join(guesses))
        prev_m = m
    return "\n".join(lines)


def streamable(text, final):
    """What of the text decoded so far can be shown for sure: all of it once final; before that, not an
    unfinished UTF-8 character, nor a last line of only spaces (the stop rule may yet end the function
    there)."""
    if final:
        return text
    text = text.rstrip("\ufffd")
    tail = text[text.rfind("\n") + 1:]
    return text if tail.strip(" \t\f\r") else text[:len(text) - len(tail)]


@cli
def main(argv=None):
    cfg = parse_config(DecodeConfig, argv, description=__doc__, checks=checks)
    for stream in (sys.stdout, sys.stderr):                # any prompt prints, whatever the terminal's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    text = read_prompt(cfg)
    device = pick_device(cfg.device)
    ckpt_path = cfg.ckpt or default_checkpoint()
    model, ckpt = load_checkpoint(ckpt_path, device, flag="--ckpt")
    enc = model_tokenizer(model.cfg)                    # the encoding the model was trained with
    cuda = device.startswith("cuda")
    if cuda:
        model = model.to(torch.bfloat16)
    method, settings = decoder_settings(cfg, cuda)
    prompt = enc.encode(text, allowed_special="all")
    max_new, note = fit_to_context(cfg, settings, len(prompt), model.cfg.seq_len)
    if note:
        print(f"# {note}", file=sys.stderr)
    cfg = dataclasses.replace(cfg, max_new_tokens=max_new)
    jac = Jacobi(model, eot=enc.eot_token, graph=None if cfg.graph == "auto" else False,
                 max_len=len(prompt) + cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                 top_p=cfg.top_p, **settings)  # a cache just long enough
    stop = StopAtFunctionEnd(prompt, token_pieces(enc)) if cfg.stop == "function" else None
    torch.manual_seed(cfg.seed)
    frames, shown = [], [None]

    def on_step(j, kept):
        if not frames and shown[0] is None:  # the first iteration: the prompt was accepted
            print(f"# {ckpt_path} ({ckpt.get('kind', '?')}), {method} {settings}, {device}", file=sys.stderr)
        m = int(j.state.length[0])
        tokens = j.state.text[0, len(prompt):m].tolist()
        if cfg.show:
            frames.append((m, j.state.draft[0, :int(j.state.in_flight[0])].tolist()))
        else:
            if shown[0] is None:  # the prompt was accepted: echo it, then stream
                sys.stdout.write(text)
                shown[0] = text
            tokens = finish(tokens if kept is None else tokens[:kept], cfg.max_new_tokens, enc.eot_token)
            final = kept is not None or bool(j.state.done[0]) or stop is None
            new = streamable(enc.decode([t for t in tokens if t != enc.eot_token]), final)
            sys.stdout.write(new[len(shown[0]) - len(text):])
            sys.stdout.flush()
            shown[0] = text + new

    tokens, stats = jac.generate(prompt, cfg.max_new_tokens, on_step=on_step, stop=stop)
    if cfg.show:
        print(text + enc.decode([t for t in tokens if t != enc.eot_token]))
        print(render(enc, frames, tokens, len(prompt), sys.stdout.isatty()))
    ended = "end-of-text" if tokens and tokens[-1] == enc.eot_token else \
        f"--max_new_tokens {cfg.max_new_tokens}" if len(tokens) == cfg.max_new_tokens else "the function's end"
    capture = " including the one-off CUDA graph capture" if jac.step.enabled else ""
    print(f"\n# {stats.new_tokens} tokens to {ended} in {stats.forwards} forwards: {stats.tokens_per_forward:.2f} "
          f"tokens per forward, {stats.tokens_per_s:,.0f} tokens/s{capture} (prefill {stats.prefill_s * 1e3:.1f} ms)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
