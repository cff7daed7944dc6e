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

import torch

from jfmini.runtime.cli import cli, field, parse_config, pick_device
from jfmini.runtime.tokenizers import model_tokenizer
from jfmini.jacobi import Jacobi
from jfmini.runtime.engine import METHODS, SETTINGS, setting_checks
from jfmini.runtime.checkpoints import default_checkpoint, load_checkpoint
from jfmini.runtime.stop import StopAtFunctionEnd, token_pieces
from jfmini.tools.choose import decoder_settings
from jfmini.tools.prompt_io import fit_to_context, read_prompt
from jfmini.tools.show import Stream, render, summary


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
    yield from setting_checks("--", **{k: getattr(c, k) for k in SETTINGS}, temperature=c.temperature,
                              top_k=c.top_k, top_p=c.top_p)


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
    printer = Stream(enc, text, len(prompt), f"# {ckpt_path} ({ckpt.get('kind', '?')}), {method} {settings}, {device}",
                    cfg.show, cfg.max_new_tokens, stop)
    tokens, stats = jac.generate(prompt, cfg.max_new_tokens, on_step=printer, stop=stop)
    if cfg.show:
        print(text + enc.decode([t for t in tokens if t != enc.eot_token]))
        print(render(enc, printer.frames, tokens, len(prompt), sys.stdout.isatty()))
    print(summary(tokens, stats, enc.eot_token, cfg.max_new_tokens, jac.step.enabled), file=sys.stderr)


if __name__ == "__main__":
    main()
