"""Running a decoder fast: the machinery under jfmini.jacobi.Jacobi.

- `Replay`: one decoder iteration compiled and, on CUDA, captured once as a CUDA graph and replayed on the
  live state; warm-up steps leave no trace (`undone`).
- `decode`: the one host loop (prefill, iterations between host syncs, stop rules, the cut at the end);
  `generate` (one prompt, streaming) and `decode_batch` (up to B prompts) are the decoder's two ways in.
- `METHODS`, `SETTINGS`: decoder settings by name; `Stats`, `check_args`, `finish`: counters, the settings'
  checks (`setting_checks`, which the scripts' flag checks share), the end-of-text cut.
"""
import contextlib
import gc
import math
import time
from dataclasses import dataclass

import torch

from jfmini.runtime.errors import UserError


@dataclass
class Stats:
    new_tokens: int = 0   # kept new tokens: up to the stop rule's end, end-of-text (included) or max_new_tokens
    forwards: int = 0     # decoding forwards that committed them, prefill excluded
    prefill_s: float = 0.0
    decode_s: float = 0.0  # until the decoder stopped (a stop rule's check every few forwards: past the end)
    ran: int = 0          # decoding forwards run: `forwards`, plus those past the end before a check saw it

    @property
    def tokens_per_forward(self):
        return self.new_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self):
        return self.new_tokens / max(self.decode_s, 1e-9)

    def __iadd__(self, o):
        for k in ("new_tokens", "forwards", "prefill_s", "decode_s", "ran"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self


# Decoder settings by name. "ngram" = vanilla Jacobi plus 2 context n-gram candidates of 16 tokens (prompt
# lookup, jfmini's); "mr" = rejection recycling + multi-block with the paper's defaults (n=64,
# K=2 blocks in flight, pool of 4 candidates, activation ratio 0.85); its candidates are 16 tokens long.
METHODS = {
    "ar": dict(block_len=1),
    "jacobi": dict(block_len=32),
    "ngram": dict(block_len=32, ngram=2, cand_len=16),
    "mr": dict(block_len=64, num_blocks=2, pool_size=4, cand_len=16, activation_ratio=0.85),
}
SETTINGS = ("block_len", "num_blocks", "pool_size", "ngram", "cand_len", "activation_ratio")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def setting_checks(flag="", block_len=None, num_blocks=None, max_new_tokens=None, cand_len=None, pool_size=None,
                   ngram=None, activation_ratio=None, temperature=0.0, top_k=0, top_p=1.0):
    """(ok, message) for each check of a decoder's settings, in order; a size of None is not checked. `flag`
    prefixes each name: "" for check_args, "--" for the scripts' flags (their messages name the flag)."""
    for name, v in (("block_len", block_len), ("num_blocks", num_blocks), ("max_new_tokens", max_new_tokens),
                    ("cand_len", cand_len)):
        yield v is None or v >= 1, f"{flag}{name} must be at least 1 (got {v})"
    for name, v in (("pool_size", pool_size), ("ngram", ngram)):
        yield v is None or v >= 0, f"{flag}{name} must be 0 or more (got {v})"
    r = activation_ratio
    yield r is None or 0 < r <= 1, f"{flag}activation_ratio must be in (0, 1] (got {r})"
    yield temperature >= 0 and math.isfinite(temperature), \
        f"{flag}temperature must be 0 (greedy) or more (got {temperature})"
    yield top_k >= 0, f"{flag}top_k must be 0 (all tokens) or more (got {top_k})"
    yield 0 < top_p <= 1, f"{flag}top_p must be in (0, 1] (got {top_p})"
    yield temperature > 0 or (top_k == 0 and top_p == 1), \
        f"{flag}top_k and {flag}top_p apply to sampling: give {flag + 'temperature' if flag else 'a temperature'} " \
        f"above 0 too"


def check_args(block_len=1, num_blocks=1, pool_size=0, ngram=0, cand_len=None, activation_ratio=0.85,
               max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0):
    for ok, msg in setting_checks("", block_len, num_blocks, max_new_tokens, cand_len, pool_size, ngram,
                                  activation_ratio, temperature, top_k, top_p):
        if not ok:
            raise UserError(msg)


def check_prompts(prompts, batch, max_new_tokens, context, capacity):
    """The prompts' lengths, once they are known to fit: `batch` non-empty prompts, each with
    max_new_tokens within the model's context and the decoder's capacity."""
    if len(prompts) != batch:
        raise ValueError(f"expected {batch} prompts, got {len(prompts)}")
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
        raise UserError("empty prompt: give at least one token of text")
    if max(lens) + max_new_tokens > context:
        raise UserError(f"prompt of {max(lens)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                        f"context of {context}; shorten the prompt or lower --max_new_tokens")
    if max(lens) + max_new_tokens > capacity:
        raise ValueError(f"this decoder was built for max_len {capacity} tokens")
    return lens


def finish(tokens, max_new_tokens, eot):
    """Cut a committed stream at max_new_tokens and just after the first end-of-text."""
    tokens = tokens[:max_new_tokens]
    return tokens[:tokens.index(eot) + 1] if eot is not None and eot in tokens else tokens


class Replay:
    """One decoder iteration `fn`, run fast. compile: fuse its small tensor ops with inductor first (each
    decoder configuration compiles anew; past dynamo's default limit of 8 it would silently run eagerly,
    and bench.py --sweep compiles many, hence the higher limit). graph: capture it as a CUDA graph
    (default: on CUDA), replayed on the same memory: `tensors()` lists every tensor an iteration reads and
    writes (state, cache, a hook's), which the warm-up steps before a capture leave as they found them."""

    def __init__(self, fn, tensors, device, graph=None, compile=False):
        self.enabled = (device.type == "cuda") if graph is None else graph
        self.tensors, self.device, self.graph = tensors, device, None
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self.fn = torch.compile(fn, dynamic=False) if compile else fn

    def __call__(self):
        """One iteration: replays the captured CUDA graph, or runs eagerly (CPU)."""
        if not self.enabled:
            return self.fn()
        if self.graph is None:
            self.capture()
        self.graph.replay()

    def capture(self):
        """Warm up on a side stream, then capture one iteration."""
        with self.undone(), torch.cuda.device(self.device):   # real steps, undone afterwards; on our GPU
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self.fn()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            gc.collect()
            gc.disable()  # a finalizer of an unreachable older graph must not run in the middle of this capture
            try:
                with torch.cuda.graph(self.graph):
                    self.fn()
            finally:
                gc.enable()

    @contextlib.contextmanager
    def undone(self):
        """Steps run inside this block leave no trace: every tensor of `tensors()` is put back afterwards."""
        tensors = list(self.tensors())
        saved = [t.clone() for t in tensors]
        try:
            yield
        finally:
            for t, v in zip(tensors, saved):
                t.copy_(v)


@torch.no_grad()
def decode(dec, prompts, max_new_tokens, stops=None, sync_every=8, on_sync=None):
    """The host loop every caller uses. Prefill up to dec.B prompts (a short batch's padding rows repeat the
    last prompt and stay frozen), then run `sync_every` iterations (dec.step) per host sync until every row
    is done: at end-of-text, after max_new_tokens or, with stops (a jfmini.runtime.stop rule per prompt, or
    None), where its rule finds the end in the committed tokens; that row is frozen then, and tokens
    committed past the end are cut. on_sync(kept) runs after each sync (streaming): kept holds each row's
    kept count once its rule found the end, else None. Returns (new tokens per prompt, the forwards that
    committed them, the forwards run, prefill seconds, decode seconds)."""
    check_args(max_new_tokens=max_new_tokens)
    n, s, lens = len(prompts), dec.state, [len(p) for p in prompts]
    t0 = time.perf_counter()
    dec.prefill(prompts + [prompts[-1]] * (dec.B - n), max_new_tokens)
    s.done[n:] = True
    sync(dec.dev)
    t1 = time.perf_counter()
    committed, kept = [[] for _ in range(n)], [None] * n
    while True:
        for _ in range(sync_every):
            dec.step()
        if stops is None:
            done = s.done[:n].tolist()                  # the one host sync per `sync_every` iterations
        else:                                           # the same sync, reading the new tokens too
            done = read_progress(s, lens, committed, sync_every * dec.W)
            ended = []
            for b, stop in enumerate(stops):
                if stop is not None and kept[b] is None:
                    kept[b] = stop.kept(committed[b])
                    if kept[b] is not None and not done[b]:
                        ended.append(b)
            if ended:
                s.done[ended] = True
                done = [d or b in ended for b, d in enumerate(done)]
        if on_sync is not None:
            on_sync(kept)
        if all(done):
            break
    sync(dec.dev)
    t2 = time.perf_counter()
    lengths, text, committed_by = s.length.tolist(), s.text[:n].cpu(), s.committed_by[:n].cpu()
    outs, needed = [], []
    for b, P in enumerate(lens):
        tokens = text[b, P:lengths[b]].tolist()
        outs.append(finish(tokens if kept[b] is None else tokens[:kept[b]], max_new_tokens, dec.eot))
        needed.append(int(committed_by[b, P + len(outs[-1]) - 1]) if outs[-1] else 0)
    return outs, needed, s.forwards[:n].tolist(), t1 - t0, t2 - t1


def read_progress(s, lens, committed, most):
    """Each row's done flag, and the tokens it committed since `committed` was last read appended to it, in
    one device-to-host copy: at most `most` new tokens a row (the drafts of every iteration since)."""
    n, starts = len(lens), [P + len(c) for P, c in zip(lens, committed)]
    lo, hi = min(starts), min(max(starts) + most, s.text.shape[1])
    v = torch.cat([s.done[:n, None].long(), s.length[:n, None], s.text[:n, lo:hi]], 1).cpu()
    head = v[:, :2].tolist()                            # (done, length) per row; only new tokens become lists
    for b, start in enumerate(starts):
        committed[b] += v[b, 2 + start - lo:2 + head[b][1] - lo].tolist()
    return [bool(done) for done, _ in head]


def generate(dec, prompt, max_new_tokens, sync_every=1, on_step=None, stop=None):
    """Decode one prompt until end-of-text, max_new_tokens or the end `stop` finds; the host looks once per
    `sync_every` iterations. on_step(dec, kept) after each look (streaming, the trajectory view). Returns
    (new tokens, Stats)."""
    on_sync = None if on_step is None else lambda kept: on_step(dec, kept[0])
    outs, needed, ran, prefill_s, decode_s = decode(dec, [prompt], max_new_tokens, None if stop is None else [stop],
                                                    sync_every, on_sync)
    return outs[0], Stats(len(outs[0]), needed[0], prefill_s, decode_s, ran[0])


def decode_batch(dec, prompts, max_new_tokens, stops=None, sync_every=8):
    """Decode up to B prompts together. Returns (new tokens per prompt, forwards that committed them,
    forwards run, decode seconds)."""
    outs, needed, ran, _, seconds = decode(dec, prompts, max_new_tokens, stops, sync_every)
    return outs, needed, ran, seconds
