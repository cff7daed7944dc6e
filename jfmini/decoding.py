"""Greedy decoders: AR (the oracle), Jacobi, rejection recycling, multi-block (DESIGN sections 4, 6).

Every decoder here commits exactly the tokens greedy AR would produce; they differ only in how many
forwards that takes (tokens_per_forward).

One Jacobi iteration (`Jacobi._step`) is a single fixed-shape forward over the cache:

    committed x[0:m] in the KV cache | main row: drafts of K blocks      (W = K*n tokens at m..m+W-1)
                                     | candidate 1: recycled n-gram      (n tokens at m..m+n-1)
                                     | ...  candidate P                  (scratch slots after the
                                                                          committed region)
    block 0 (real-active: commits)   block 1 .. K-1 (pseudo-active: refined, never committed alone)
    [ v d d d d d d d ][ d d d d d d d d ] ...        v = verified next token, d = draft guesses

Each row attends to the committed prefix plus its own tokens causally, so every row reads the
same cache (no per-candidate copies). Acceptance, choosing the best row, the draft shift, pool
update and the commit are tensor ops; on CUDA the whole iteration is captured as one CUDA graph and
the host reads one flag per iteration (or per `sync_every` iterations).
"""
import contextlib
import gc
import math
import time
from dataclasses import dataclass

import torch

from jfmini.common import UserError


# Decoder settings by name; "mr" = rejection recycling + multi-block with the paper's defaults.
METHODS = {
    "ar": dict(block_len=1, num_blocks=1, pool_size=0),
    "jacobi": dict(block_len=32, num_blocks=1, pool_size=0),
    "mr": dict(block_len=64, num_blocks=2, pool_size=4, activation_ratio=0.85),
}


@dataclass
class Stats:
    new_tokens: int = 0   # committed new tokens (capped at max_new_tokens, up to and including end-of-text)
    forwards: int = 0     # decoding forwards, prefill excluded
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_forward(self):
        return self.new_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self):
        return self.new_tokens / max(self.decode_s, 1e-9)

    def __iadd__(self, o):
        for k in ("new_tokens", "forwards", "prefill_s", "decode_s"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def may_read(kv, lo, hi, seg, slot):
    """May a query read cache slot kv? Yes for the committed prefix (lo <= kv < hi) and for its own
    row's slots from the row's first slot `seg` through its own `slot` (causal within the row).
    Written once; evaluated densely for SDPA and per tile inside FlexAttention."""
    return ((kv >= lo) & (kv < hi)) | ((kv >= seg) & (kv <= slot))


def cache_mask(hi, seg, slots, length, lo=0):
    """The dense bool mask (B, 1, T, S) over a cache of `length` slots; hi (B,), seg and slots (B, T)."""
    cols = torch.arange(length, device=slots.device)
    return may_read(cols, lo, hi[:, None, None], seg[..., None], slots[..., None])[:, None]


def check_args(block_len=1, num_blocks=1, pool_size=0, activation_ratio=0.85, max_new_tokens=1):
    for name, v in (("block_len", block_len), ("num_blocks", num_blocks), ("max_new_tokens", max_new_tokens)):
        if v < 1:
            raise UserError(f"{name} must be at least 1 (got {v})")
    if pool_size < 0:
        raise UserError(f"pool_size must be 0 or more (got {pool_size})")
    if not 0 < activation_ratio <= 1:
        raise UserError(f"activation_ratio must be in (0, 1] (got {activation_ratio})")


def finish(tokens, max_new_tokens, eot):
    """Cut a committed stream at max_new_tokens and just after the first end-of-text."""
    tokens = tokens[:max_new_tokens]
    return tokens[:tokens.index(eot) + 1] if eot is not None and eot in tokens else tokens


@torch.no_grad()
def generate_ar(model, prompt, max_new_tokens, eot=None):
    """The oracle: prefill, then one token per forward through the KV cache, plain eager PyTorch.
    Returns (new tokens, Stats). This is also the 'AR eager' baseline of bench.py."""
    check_args(max_new_tokens=max_new_tokens)
    dev = model.embed.weight.device
    P = len(prompt)
    S = P + max_new_tokens
    model.new_cache(1, S)
    t0 = time.perf_counter()
    idx = torch.tensor([prompt], device=dev)
    slots = torch.arange(P, device=dev)[None]
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    logits = model(idx, slots, cache_mask(zero, zero[:, None], slots, S), slots)
    tok = int(logits[0, -1].argmax())
    sync(dev)
    t1 = time.perf_counter()
    out, forwards = [], 0
    while True:
        out.append(tok)
        m = torch.tensor([[P + len(out) - 1]], device=dev)  # the slot of the token being committed
        logits = model(torch.tensor([[tok]], device=dev), m, cache_mask(m[0], m, m, S), m)
        forwards += 1
        if tok == eot or len(out) == max_new_tokens:
            break
        tok = int(logits[0, -1].argmax())
    sync(dev)
    return out, Stats(len(out), forwards, t1 - t0, time.perf_counter() - t1)


class Jacobi:
    """Batched greedy Jacobi decoding in fixed shapes; block_len=1 is plain AR.

    block_len n, num_blocks K (multi-block), pool_size P (rejection recycling candidates verified in
    the same forward), activation_ratio r (a new pseudo-active block is appended once the newest
    block has converged r*n tokens). Rows of the batch are independent sequences (used to collect
    trajectories for many prompts at once); decode.py and bench.py use batch=1.
    """

    def __init__(self, model, block_len=16, num_blocks=1, pool_size=0, activation_ratio=0.85, batch=1,
                 eot=None, graph=None, compile=False, max_len=None, pre_step=None):
        check_args(block_len, num_blocks, pool_size, activation_ratio)
        self.model, self.n, self.K, self.B = model, block_len, num_blocks, batch
        self.P = pool_size if block_len > 1 else 0       # a 1-token draft has no n-gram to recycle
        self.W = self.K * self.n                         # main row: drafts of all blocks
        self.T = self.W + self.P * self.n                # tokens per forward
        # Cache slots: [candidate scratch (P*n) | positions 0..C-1]. C covers the longest prompt plus new
        # tokens (max_len) and slack for tentative draft writes; a smaller max_len means a cheaper attention.
        self.base = self.P * self.n
        self.S = -(-(self.base + (max_len or model.cfg.seq_len) + 2 * self.W) // 64) * 64  # 64-aligned: a ragged
        self.C = self.S - self.base                      # length made the attention ~20% slower on an H100
        self.M = 2 * self.P                              # pool entries (ring buffer per sequence)
        self.threshold = math.ceil(activation_ratio * self.n - 1e-9)
        self.eot = -1 if eot is None else eot
        self.pre_step = pre_step     # optional hook (trajectory recording), captured in the same graph; a hook
                                     # with state exposes it as tensors() so that warm-up steps can be undone
        self.dev = dev = model.embed.weight.device
        self.graph_enabled = (dev.type == "cuda") if graph is None else graph
        self._graph = None
        # inductor fuses the small tensor ops of an iteration before the graph is captured. Each decoder
        # configuration compiles the same method anew; past dynamo's default limit of 8 it would silently
        # run eagerly (bench.py --sweep compiles up to 9), hence the higher limit.
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._fn = torch.compile(self._step, dynamic=False) if compile else self._step
        B, n, W = batch, self.n, self.W
        self.cache = model.new_cache(B, self.S)          # this decoder owns its cache buffer
        ar = lambda k: torch.arange(k, device=dev)
        self.ar_n, self.ar_W, self.bidx = ar(n), ar(W), ar(B)
        cand = torch.arange(self.P * n, device=dev)
        self.offs = torch.cat([ar(W), cand % n])             # position offsets of the T tokens
        self.cand_slots = cand                                # scratch slots of candidate rows
        self.cand_seg = (cand // n) * n                       # first scratch slot of each candidate row
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)
        # Decoding state: all tensors, updated in place so a captured graph can replay the step.
        self.out = z(B, self.C)        # committed tokens (prompt + generated)
        self.m = z(B)                  # committed length
        self.start = z(B)              # prompt length
        self.limit = z(B)              # max new tokens
        self.draft = z(B, W)           # current drafts (index 0 = verified next token)
        self.valid = z(B)              # drafts in flight: L0 + (nb - 1) * n
        self.L0 = z(B)                 # uncommitted tokens of block 0
        self.nb = z(B)                 # active blocks
        self.pool = z(B, max(self.M, 1), n) - 1  # rejected tails, -1 = empty
        self.ptr = z(B)                # next pool entry to overwrite
        self.cand = z(B, max(self.P, 1), n)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.iters = z(B)              # forwards that did work, per row
        self.it = z(B)                 # iteration counter (seeds the initial guesses)

    # ------------------------------------------------------------------ setup
    def _install(self):
        self.model.cache = self.cache

    @torch.no_grad()
    def prefill(self, prompts, max_new_tokens):
        """Run the prompts (a list of B token lists) through the cache; set the state for decoding."""
        B, n = self.B, self.n
        if len(prompts) != B:
            raise ValueError(f"expected {B} prompts, got {len(prompts)}")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise UserError("empty prompt: give at least one token of text")
        if max(lens) + max_new_tokens > self.model.cfg.seq_len:
            raise UserError(f"prompt of {max(lens)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                            f"context of {self.model.cfg.seq_len}; shorten the prompt or lower --max_new_tokens")
        if max(lens) + max_new_tokens > self.C - 2 * self.W:
            raise ValueError(f"this decoder was built for max_len {self.C - 2 * self.W} tokens")
        self._install()
        Pm = max(lens)
        idx = torch.tensor([p + [0] * (Pm - len(p)) for p in prompts], device=self.dev)
        pos = torch.arange(Pm, device=self.dev).expand(B, Pm)
        slots = self.base + pos
        first = torch.full((B,), self.base, device=self.dev)
        logits = self.model(idx, pos, cache_mask(first, first[:, None].expand(B, Pm), slots, self.S, lo=self.base),
                            slots)
        start = torch.tensor(lens, device=self.dev)
        self.out.zero_()
        self.out[:, :Pm] = idx
        self.m.copy_(start)
        self.start.copy_(start)
        self.limit.fill_(max_new_tokens)
        self.it.zero_()
        self.iters.zero_()
        self.done.zero_()
        self.pool.fill_(-1)
        self.ptr.zero_()
        self.nb.fill_(1)
        self.L0.fill_(n)
        self.valid.fill_(n)
        first = logits[self.bidx, start - 1].argmax(-1)  # greedy next token after each prompt (B,)
        draft = torch.where(self.ar_W == 0, first[:, None], self._guesses(start))
        self.draft.copy_(draft)
        self.cand.copy_(draft[:, None, :n].expand_as(self.cand))

    def _guesses(self, m):
        """Initial guesses for fresh draft slots: tokens 'sampled' from the prompt and text so far,
        by an integer hash (deterministic, graph-safe). (B, W)"""
        h = (self.it[:, None] + 1) * 1000003 + (self.ar_W + 1) * 7919 + m[:, None] * 31
        h = (h * 2654435761) % 2147483647
        return self.out.gather(1, h % m[:, None])

    # ------------------------------------------------------------------ one iteration
    def _accepted(self, x, g, limit):
        """1 + longest run of drafts equal to the prediction before them, within `limit` tokens.
        x, g (B, R, L); limit (B,). Returns (B, R)."""
        L = x.shape[-1]
        ok = (x[..., 1:] == g[..., :-1]) & (torch.arange(L - 1, device=self.dev) < limit[:, None, None] - 1)
        return 1 + ok.long().cumprod(-1).sum(-1)

    @torch.no_grad()
    def _step(self):
        if self.pre_step is not None:
            self.pre_step(self)
        B, n, W, P, K = self.B, self.n, self.W, self.P, self.K
        m, draft, V, ar_W, ar_n = self.m, self.draft, self.valid, self.ar_W, self.ar_n
        # 1. One forward: the main row writes its K/V straight after the committed prefix (kept only up
        #    to the new length pointer), candidate rows write into scratch slots.
        tokens = torch.cat([draft, self.cand[:, :P].reshape(B, P * n)], 1)   # (B, T)
        pos = m[:, None] + self.offs                                          # (B, T)
        slots = torch.cat([self.base + pos[:, :W], self.cand_slots.expand(B, -1)], 1)
        seg = torch.cat([self.base + m[:, None].expand(B, W), self.cand_seg.expand(B, -1)], 1)
        mask = cache_mask(self.base + m, seg, slots, self.S, lo=self.base)       # (B, 1, T, S)
        g = self.model(tokens, pos, mask, slots).argmax(-1)                     # (B, T)
        g_main = g[:, :W]
        # 2. Acceptance of every row; the best row wins (ties go to the main row).
        a_main = self._accepted(draft[:, None], g_main[:, None], V)[:, 0]
        a = a_main
        chosen, G = draft, g_main            # the winning row's tokens and predictions
        if P:
            g_cand = g[:, W:].view(B, P, n)
            a_all = torch.cat([a_main[:, None], self._accepted(self.cand[:, :P], g_cand, V)], 1)
            w = a_all.argmax(1)
            a = a_all.gather(1, w[:, None])[:, 0]
            cw, use = (w - 1).clamp(min=0), (w > 0)[:, None]
            chosen = torch.cat([torch.where(use, self.cand[self.bidx, cw], draft[:, :n]), draft[:, n:]], 1)
            G = torch.cat([torch.where(use, g_cand[self.bidx, cw], g_main[:, :n]), g_main[:, n:]], 1)
            # a winning candidate's K/V moves from scratch into place (a no-op copy when the main row wins)
            dst = self.base + m[:, None] + ar_n
            self.cache.copy(torch.where(use, cw[:, None] * n + ar_n, dst), dst)
        done = self.done
        a = torch.where(done, 0, a)           # finished rows stay frozen
        # 3. Commit the accepted tokens.
        commit = ar_W < a[:, None]
        dst = m[:, None] + ar_W
        self.out.scatter_(1, dst, torch.where(commit, chosen, self.out.gather(1, dst)))
        m_new = m + a
        eot_hit = ((chosen == self.eot) & commit).any(1)
        # 4. Block bookkeeping: blocks whose n tokens are all committed retire; block 1 becomes block 0.
        over = a - self.L0
        finished = torch.where(over >= 0, 1 + over.clamp(min=0) // n, 0)
        L0 = torch.where(over >= 0, n - over.clamp(min=0) % n, self.L0 - a)
        nb = self.nb - finished
        reset = nb == 0                        # every block done: start a fresh one
        nb, L0 = torch.where(reset, 1, nb), torch.where(reset, n, L0)
        Vn = torch.where(reset, n, V - a)
        # 5. Next drafts: shift the winning row's predictions (the Jacobi update); fresh slots get guesses.
        keep = (V - a).clamp(min=1)
        shifted = G.gather(1, (a[:, None] - 1 + ar_W).clamp(0, W - 1))
        new_draft = torch.where(ar_W < keep[:, None], shifted, self._guesses(m_new))
        if K > 1:
            # Multi-block: count the newest block's converged tokens (committed ones plus a leading run of
            # drafts that this update left unchanged); past r*n, append a pseudo-active block after it.
            unchanged = new_draft == draft.gather(1, (a[:, None] + ar_W).clamp(max=W - 1))
            first = torch.where(nb == 1, 0, L0 + (nb - 2) * n)
            lead = (unchanged | (ar_W < first[:, None])) & (ar_W < Vn[:, None])
            run = (lead.long().cumprod(1).sum(1) - first).clamp(min=0)
            conv = run + torch.where(nb == 1, n - L0, 0)
            grow = (nb < K) & (conv >= self.threshold) & ~reset
            # its first token is the prediction after the newest block's last draft
            new_draft = torch.where(grow[:, None] & (ar_W == Vn[:, None]), G.gather(1, (V - 1)[:, None]), new_draft)
            nb, Vn = nb + grow, Vn + grow * n
        if P:
            # Rejection recycling: remember the main row's rejected tail; next time, candidates are pool
            # entries that contain the verified next token, taken from there on.
            tail = a_main[:, None] + ar_n
            tail = torch.where(tail < V[:, None], draft.gather(1, tail.clamp(max=W - 1)), -1)
            self.pool.scatter_(1, self.ptr[:, None, None].expand(B, 1, n), tail[:, None])
            ptr = (self.ptr + 1) % self.M
            v = new_draft[:, :1, None]                                        # (B, 1, 1)
            hit = self.pool[..., :-1] == v                                    # (B, M, n-1)
            age = (ptr[:, None] - 1 - torch.arange(self.M, device=self.dev)) % self.M
            score = torch.where(hit.any(-1), self.M - age, 0)                # newest hits first
            top = score.topk(P, dim=1).indices                                # (B, P)
            at = hit.long().argmax(-1).gather(1, top)[..., None] + ar_n       # (B, P, n)
            ent = self.pool.gather(1, top[..., None].expand(B, P, n))
            cand = ent.gather(2, at.clamp(max=n - 1))
            ok = (at < n) & (cand >= 0) & (score.gather(1, top) > 0)[..., None]
            cand = torch.where(ok, cand, new_draft[:, None, :n])
            fresh = ~done[:, None]
            self.ptr.copy_(torch.where(done, self.ptr, ptr))
            self.cand[:, :P].copy_(torch.where(fresh[..., None], cand, self.cand[:, :P]))
        # 6. Write the new state (frozen rows keep theirs).
        keep_old = done[:, None]
        self.draft.copy_(torch.where(keep_old, draft, new_draft))
        self.L0.copy_(torch.where(done, self.L0, L0))
        self.nb.copy_(torch.where(done, self.nb, nb))
        self.valid.copy_(torch.where(done, V, Vn))
        self.iters.add_((~done).long())
        self.m.copy_(m_new)
        self.it.add_(1)
        self.done.copy_(done | eot_hit | (m_new - self.start >= self.limit))

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
        tensors = self._state()
        saved = [t.clone() for t in tensors]
        try:
            yield
        finally:
            for t, v in zip(tensors, saved):
                t.copy_(v)

    def _state(self):
        hook = list(self.pre_step.tensors()) if hasattr(self.pre_step, "tensors") else []
        return [self.out, self.m, self.draft, self.valid, self.L0, self.nb, self.pool, self.ptr, self.cand,
                self.done, self.iters, self.it] + list(self.cache.buffers()) + hook

    # ------------------------------------------------------------------ decoding loop
    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, sync_every=1, on_step=None):
        """Decode one prompt (batch=1). on_step(self) is called after each host sync (streaming, the
        trajectory view). Returns (new tokens, Stats)."""
        check_args(max_new_tokens=max_new_tokens)
        t0 = time.perf_counter()
        self.prefill([prompt], max_new_tokens)
        sync(self.dev)
        t1 = time.perf_counter()
        while True:
            for _ in range(sync_every):
                self.step()
            if on_step is not None:
                on_step(self)
            if bool(self.done[0]):  # the one host sync per `sync_every` iterations
                break
        sync(self.dev)
        t2 = time.perf_counter()
        P, m = int(self.start[0]), int(self.m[0])
        tokens = finish(self.out[0, P:m].tolist(), max_new_tokens, self.eot)
        return tokens, Stats(len(tokens), int(self.iters[0]), t1 - t0, t2 - t1)


@torch.no_grad()
def batch_tpf(model, prompts, block_len, max_new_tokens, eot=None, batch=64):
    """Vanilla Jacobi tokens per forward over many prompts, decoded `batch` at a time: a quick check of
    a model (train.py logs it after each round); bench.py measures one prompt at a time, with timing."""
    tokens = forwards = 0
    jac = Jacobi(model, block_len=block_len, batch=min(batch, len(prompts)), eot=eot,
                 max_len=max(len(p) for p in prompts) + max_new_tokens)
    for lo in range(0, len(prompts), jac.B):
        chunk = prompts[lo:lo + jac.B]
        jac.prefill(chunk + [chunk[-1]] * (jac.B - len(chunk)), max_new_tokens)  # fixed shape; extras dropped
        while not bool(jac.done.all()):
            for _ in range(8):          # rows that finish early stay frozen; one host sync per 8 iterations
                jac.step()
        for b in range(len(chunk)):
            tokens += len(finish(jac.out[b, int(jac.start[b]):int(jac.m[b])].tolist(), max_new_tokens, jac.eot))
            forwards += int(jac.iters[b])
    return tokens / max(forwards, 1)
