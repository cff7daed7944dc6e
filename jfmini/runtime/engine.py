"""Running a decoder fast: the machinery under jfmini.jacobi.

- `Engine`, the base of `jfmini.jacobi.Jacobi`: one iteration replayed as a CUDA graph (`step`), warm-up
  steps that leave no trace (`undone`), and the host loops that decode one prompt (`generate`) or a
  batch (`decode_batch`).
- `METHODS`, `SETTINGS`: decoder settings by name; `Stats`, `check_args`, `finish`: counters, the settings'
  checks (`setting_checks`, which the scripts' flag checks share), the end-of-text cut.
"""
import contextlib
import gc
import math
import time
from dataclasses import dataclass

import torch

from jfmini.runtime.common import UserError


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


class Engine:
    """How a Jacobi decoder runs: the subclass defines `_step` (one iteration), `state` (its tensors) and
    `prefill`; this class compiles the iteration, replays it as a CUDA graph and drives the host loop."""

    def setup_engine(self, graph=None, compile=False):
        """graph: capture the iteration as a CUDA graph (default: on CUDA). compile: fuse its small tensor
        ops with inductor first. Each decoder configuration compiles the same method anew; past dynamo's
        default limit of 8 it would silently run eagerly (bench.py --sweep compiles many), hence the
        higher limit."""
        self.graph_enabled = (self.dev.type == "cuda") if graph is None else graph
        self._graph = None
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self._fn = torch.compile(self._step, dynamic=False) if compile else self._step

    def step(self):
        """One iteration: replays the captured CUDA graph, or runs eagerly (CPU)."""
        if not self.graph_enabled:
            return self._fn()
        if self._graph is None:
            self._capture()
        self._graph.replay()

    def _capture(self):
        """Warm up on a side stream, then capture one iteration. The state tensors and the cache are
        the same memory at every replay, so the graph reads and writes the live state."""
        with self.undone(), torch.cuda.device(self.dev):   # real steps, undone afterwards; on our GPU
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self._fn()
            torch.cuda.current_stream().wait_stream(s)
            self._graph = torch.cuda.CUDAGraph()
            gc.collect()
            gc.disable()  # a finalizer of an unreachable older graph must not run in the middle of this capture
            try:
                with torch.cuda.graph(self._graph):
                    self._fn()
            finally:
                gc.enable()

    @contextlib.contextmanager
    def undone(self):
        """Steps run inside this block leave no trace: every state tensor, the cache and the tensors of a
        pre_step hook (its `tensors()`, e.g. a trajectory recorder's counts) are put back afterwards."""
        hook = list(self.pre_step.tensors()) if hasattr(self.pre_step, "tensors") else []
        tensors = [*self.state.tensors(), *self.cache.buffers(), *hook]
        saved = [t.clone() for t in tensors]
        try:
            yield
        finally:
            for t, v in zip(tensors, saved):
                t.copy_(v)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, sync_every=1, on_step=None, stop=None):
        """Decode one prompt (batch=1) until end-of-text, max_new_tokens or, with `stop` (a
        jfmini.runtime.stop rule), the end it finds in the committed tokens. The host looks once per
        `sync_every` iterations (one sync); tokens committed past the end are trimmed. on_step(self, kept)
        is called after each host sync (streaming, the trajectory view), kept being the stop rule's count of
        kept tokens once it found the end, else None. Returns (new tokens, Stats)."""
        check_args(max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        self.prefill([prompt], max_new_tokens)
        sync(self.dev)
        t1 = time.perf_counter()
        s, P, committed, kept = self.state, len(prompt), [], None
        while kept is None:
            for _ in range(sync_every):
                self.step()
            if stop is None:
                done = bool(s.done[0])              # the one host sync per `sync_every` iterations
            else:                                   # the same sync, reading the newly committed tokens too
                done, committed = self._progress(P, committed, sync_every * self.W)
                kept = stop.kept(committed)
            if on_step is not None:
                on_step(self, kept)
            if done:
                break
        sync(self.dev)
        t2 = time.perf_counter()
        tokens = s.text[0, P:int(s.length[0])].tolist()
        tokens = finish(tokens if kept is None else tokens[:kept], max_new_tokens, self.eot)
        return tokens, Stats(len(tokens), self.forwards_for(0, P, len(tokens)), t1 - t0, t2 - t1,
                             int(s.forwards[0]))

    def _progress(self, prompt_len, committed, most):
        """(done, the committed new tokens) of row 0, in one device-to-host copy: the tokens committed since
        `committed` were read are at most `most` (the drafts of every iteration since)."""
        s, start = self.state, prompt_len + len(committed)
        v = torch.cat([s.done[:1].long(), s.length[:1], s.text[0, start:start + most]]).tolist()
        return bool(v[0]), committed + v[2:2 + v[1] - start]

    def forwards_for(self, b, prompt_len, count):
        """The forwards row b needed to commit its first `count` new tokens."""
        return int(self.state.committed_by[b, prompt_len + count - 1]) if count else 0

    @torch.no_grad()
    def decode_batch(self, prompts, max_new_tokens, stops=None, sync_every=8):
        """Decode up to B prompts together: rows that finish stay frozen, and so do the padding rows of a
        batch of fewer than B prompts. stops: a stop rule per prompt (or None), checked once per
        `sync_every` iterations; a row that reached its end is frozen then. Returns (new tokens per prompt,
        forwards that committed them, forwards run, decode seconds)."""
        n, s = len(prompts), self.state
        self.prefill(prompts + [prompts[-1]] * (self.B - n), max_new_tokens)
        s.done[n:] = True
        sync(self.dev)
        t0 = time.perf_counter()
        committed, kept = [[] for _ in range(n)], [None] * n
        while True:
            for _ in range(sync_every):
                self.step()
            done = s.done.tolist()                 # the host syncs once per `sync_every` iterations
            if stops is not None:                  # (and reads the new tokens of the rows still running)
                ended = self._check_stops(prompts, stops, committed, kept, done)
                if ended:
                    s.done[ended] = True
                    done = [d or b in ended for b, d in enumerate(done)]
            if all(done):
                break
        sync(self.dev)
        seconds = time.perf_counter() - t0
        lengths, outs, needed = s.length.tolist(), [], []
        text = s.text[:n].cpu()
        for b, p in enumerate(prompts):
            tokens = text[b, len(p):lengths[b]].tolist()
            outs.append(finish(tokens if kept[b] is None else tokens[:kept[b]], max_new_tokens, self.eot))
            needed.append(self.forwards_for(b, len(p), len(outs[-1])))
        return outs, needed, s.forwards[:n].tolist(), seconds

    def _check_stops(self, prompts, stops, committed, kept, done):
        """Read the newly committed tokens of every row still running; returns the rows whose stop rule
        found the end (their kept counts go into `kept`)."""
        lengths, ended = self.state.length.tolist(), []
        rows = [b for b, stop in enumerate(stops) if stop is not None and kept[b] is None]
        if not rows:
            return ended
        lo = min(len(prompts[b]) + len(committed[b]) for b in rows)      # one copy: the columns any row needs
        text = self.state.text[:len(prompts), lo:max(lengths[b] for b in rows)].cpu()
        for b in rows:
            committed[b] += text[b, len(prompts[b]) + len(committed[b]) - lo:lengths[b] - lo].tolist()
            kept[b] = stops[b].kept(committed[b])
            if kept[b] is not None and not done[b]:
                ended.append(b)
        return ended
