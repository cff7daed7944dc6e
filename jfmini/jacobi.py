"""Jacobi decoding: the paper's plain loop, then the same iteration batched in fixed shapes, with rejection
recycling, multi-block decoding and (jfmini, beyond the paper) context n-gram candidates.

Every decoder here commits exactly the tokens greedy AR would produce; they differ only in how many
forwards that takes (tokens per forward, TPF). `jacobi_reference` is the algorithm in ~25 eager lines;
`Jacobi` runs it fast. One Jacobi iteration (`Jacobi._step`) is a single fixed-shape forward over the
KV cache:

    cache: [ candidate scratch (R*c slots) | committed x[0:m] | main row's drafts ... ]
    main row     [ v d d d d d d d ][ d d d d d d d d ]   W = K*n tokens at positions m..m+W-1
                   block 0 (commits)  block 1..K-1 (pseudo-active: refined, never committed alone)
    candidate 1  [ v c c c ]                              c tokens at positions m..m+c-1
    ...          (rejection recycling: pool entries that contain v; context n-grams: what followed
    candidate R   earlier occurrences of the newest tokens in the prompt and text so far)

v is the verified next token, d draft guesses. Every row attends to the committed prefix plus its own
tokens causally (jfmini.masks.cache_mask), so all rows read the same cache. Acceptance, choosing the
best row, the commit, the draft update, multi-block growth and recycling are tensor ops; the machinery
that replays the iteration as one CUDA graph and drives the host loop is jfmini.runtime.engine.Engine.
"""
import math

import torch

from jfmini.masks import cache_mask
from jfmini.runtime.engine import Engine, check_args, check_prompts, finish, top_k


# Decoder settings by name. "mr" = rejection recycling + multi-block with the paper's defaults (n=64,
# K=2 blocks in flight, pool of 4 candidates, activation ratio 0.85); its candidates are 16 tokens long.
METHODS = {
    "ar": dict(block_len=1),
    "jacobi": dict(block_len=32),
    "mr": dict(block_len=64, num_blocks=2, pool_size=4, cand_len=16, activation_ratio=0.85),
}
SETTINGS = ("block_len", "num_blocks", "pool_size", "ngram", "cand_len", "activation_ratio")
NGRAM_KEY = 4     # a context n-gram matches up to the verified next token and the 3 tokens before it
KV_TILE = 128     # the cache length is a multiple of this (regular kernel shapes)


def guesses(text, m, it, slots):
    """Initial guesses for draft slots: tokens 'sampled' from the text so far (prompt + committed) by an
    integer hash of the iteration, the slot and the length: deterministic and graph-safe.
    text (B, C), m (B,) committed lengths, it (B,) iterations so far, slots (W,) -> (B, W)."""
    h = (it[:, None] + 1) * 1000003 + (slots + 1) * 7919 + m[:, None] * 31
    h = (h * 2654435761) % 2147483647
    return text.gather(1, h % m[:, None])


@torch.no_grad()
def jacobi_reference(model, prompt, block_len, max_new_tokens, eot=None):
    """The paper's Jacobi decoding, batch 1, eager, no cache: the plain loop the fast Jacobi class runs in
    fixed shapes. A block is the verified next token v and n-1 guesses. Each iteration is one parallel
    forward over prompt + committed + block; the greedy prediction after every position is the Jacobi
    update. The block's leading tokens that equal the prediction before them are verified (v always is)
    and committed; the rest of the block becomes the predictions after them. A block fully committed
    starts the next one. Returns (new tokens, forwards); the tokens are exactly greedy AR's."""
    dev, n = model.embed.weight.device, block_len
    text = list(prompt)
    def predict(tokens):                                         # greedy next token after every position
        return model(torch.tensor([tokens], device=dev), torch.arange(len(tokens), device=dev))[0].argmax(-1).tolist()
    def new_block(v, it):                                        # v + n-1 guesses, as the fast decoder draws them
        t, m = torch.tensor([text]), torch.tensor([len(text)])
        return [v] + guesses(t, m, torch.tensor([it]), torch.arange(n))[0, 1:].tolist()
    block, forwards = new_block(predict(text)[-1], 0), 0
    while len(text) - len(prompt) < max_new_tokens and (eot is None or eot not in text[len(prompt):]):
        pred = predict(text + block)[len(text):]                # pred[i]: the prediction after block[i]
        forwards += 1
        a = 1                                                    # verified: block[0], then each match
        while a < len(block) and block[a] == pred[a - 1]:
            a += 1
        text += block[:a]
        block = pred[a - 1:len(block) - 1] if a < len(block) else new_block(pred[a - 1], forwards - 1)
    return finish(text[len(prompt):], max_new_tokens, eot), forwards


class Jacobi(Engine):
    """Batched greedy Jacobi decoding in fixed shapes; block_len=1 is plain AR.

    block_len n, num_blocks K (multi-block: a new pseudo-active block is appended once the newest block
    has converged activation_ratio*n tokens), pool_size (rejection recycling: rejected drafts that
    contain the verified next token, verified in the same forward), ngram (jfmini, beyond the paper:
    context n-gram candidates, i.e. prompt lookup), cand_len c (tokens per candidate row, at most n). Rows of the batch are independent
    sequences (trajectory collection decodes many prompts at once); decode.py and bench.py use batch=1.
    """

    def __init__(self, model, block_len=16, num_blocks=1, pool_size=0, ngram=0, cand_len=None,
                 activation_ratio=0.85, batch=1, eot=None, graph=None, compile=False, max_len=None,
                 pre_step=None):
        check_args(block_len, num_blocks, pool_size, ngram, cand_len, activation_ratio)
        self.model, self.n, self.K, self.B = model, block_len, num_blocks, batch
        self.pool_size, self.ngram = (pool_size, ngram) if block_len > 1 else (0, 0)  # a 1-token block: nothing to add
        self.rows = self.pool_size + self.ngram      # candidate rows
        self.c = min(cand_len or block_len, block_len)    # tokens per candidate row
        self.W = self.K * self.n                          # main row: drafts of all blocks
        self.pool_slots = 2 * self.pool_size             # pool entries (ring buffer per sequence)
        self.threshold = math.ceil(activation_ratio * self.n - 1e-9)
        self.eot = -1 if eot is None else eot
        self.pre_step = pre_step     # optional hook (trajectory recording), captured in the same graph; a hook
                                     # with state exposes it as tensors() so that warm-up steps can be undone
        self.dev = dev = model.embed.weight.device
        self.graph_enabled = (dev.type == "cuda") if graph is None else graph
        self._graph = None
        # Cache slots: [candidate scratch (R*c) | positions 0..C-1]. C covers the longest prompt plus new
        # tokens (max_len) and slack for tentative draft writes; a tile-aligned length keeps kernels regular.
        self.base = self.rows * self.c
        self.S = -(-(self.base + (max_len or model.cfg.seq_len) + 2 * self.W) // KV_TILE) * KV_TILE
        self.C = self.S - self.base
        # inductor fuses the small tensor ops of an iteration before the graph is captured. Each decoder
        # configuration compiles the same method anew; past dynamo's default limit of 8 it would silently
        # run eagerly (bench.py --sweep compiles many), hence the higher limit.
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        self._fn = torch.compile(self._step, dynamic=False) if compile else self._step
        B, n, W, c = batch, self.n, self.W, self.c
        self.cache = model.new_cache(B, self.S)          # this decoder owns its cache buffer
        ar = lambda k: torch.arange(k, device=dev)
        self.ar_n, self.ar_W, self.ar_c, self.ar_C, self.bidx = ar(n), ar(W), ar(c), ar(self.C), ar(B)
        cand = ar(self.rows * c)
        self.offs = torch.cat([ar(W), cand % c])            # position offsets of the T = W + R*c tokens
        self.cand_slots = cand                              # scratch slots of candidate rows
        self.cand_seg = (cand // c) * c                     # first scratch slot of each candidate row
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
        self.pool = z(B, max(self.pool_slots, 1), n) - 1  # rejected tails, -1 = empty
        self.ptr = z(B)                # next pool entry to overwrite
        self.cand = z(B, max(self.rows, 1), c)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.iters = z(B)              # forwards that did work, per row
        self.it = z(B)                 # iteration counter (seeds the initial guesses)
        self.accepted = z(B, W + 1)    # per row: forwards that committed a tokens, a = 0..W

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def prefill(self, prompts, max_new_tokens):
        """Run the prompts (a list of B token lists) through the cache; set the state for decoding."""
        B, n = self.B, self.n
        lens = check_prompts(prompts, B, max_new_tokens, self.model.cfg.seq_len, self.C - 2 * self.W)
        self.model.cache = self.cache
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
        for t in (self.it, self.iters, self.done, self.ptr, self.accepted):
            t.zero_()
        self.pool.fill_(-1)
        self.nb.fill_(1)
        self.L0.fill_(n)
        self.valid.fill_(n)
        first = logits[self.bidx, start - 1].argmax(-1)  # greedy next token after each prompt (B,)
        draft = torch.where(self.ar_W == 0, first[:, None], self._guesses(start))
        self.draft.copy_(draft)
        self.cand.copy_(draft[:, None, :self.c].expand_as(self.cand))

    def _guesses(self, m):
        """Initial guesses for every draft slot (B, W), from the text so far."""
        return guesses(self.out, m, self.it, self.ar_W)

    # ------------------------------------------------------------------ one iteration, in the paper's order
    @torch.no_grad()
    def _step(self):
        if self.pre_step is not None:
            self.pre_step(self)
        preds = self._verify()                                # 1. draft + verify: one forward over every row
        a, a_main, chosen, pred = self._accept(preds)         # 2. the longest verified run; the best row wins
        a, m_new, ended = self._commit(a, chosen)             # 3. commit it
        draft, L0, nb, V, reset = self._update(a, pred, m_new)  # 4. Jacobi update of the drafts
        if self.K > 1:                                        # 5. multi-block: grow a pseudo-active block
            draft, nb, V = self._grow(a, pred, draft, L0, nb, V, reset)
        if self.rows:                                         # 6. candidates for the next iteration
            self._recycle(a_main, draft, m_new)
        self._store(a, m_new, ended, draft, L0, nb, V)        # 7. the new state, in place

    def _store(self, a, m_new, ended, draft, L0, nb, V):
        """Write the iteration's results into the state tensors (in place: a captured graph replays on the
        same memory). Rows that had already finished keep their state; count this forward for the others."""
        done = self.done
        self.draft.copy_(torch.where(done[:, None], self.draft, draft))
        self.L0.copy_(torch.where(done, self.L0, L0))
        self.nb.copy_(torch.where(done, self.nb, nb))
        self.valid.copy_(torch.where(done, self.valid, V))
        self.iters.add_((~done).long())
        self.accepted.scatter_add_(1, a[:, None], (~done).long()[:, None])
        self.m.copy_(m_new)
        self.it.add_(1)
        self.done.copy_(done | ended | (m_new - self.start >= self.limit))

    def _verify(self):
        """One forward: the main row writes its K/V right after the committed prefix (kept only up to the
        new length pointer), candidate rows into their scratch slots. Returns the model's greedy
        prediction after every token (B, T)."""
        B, W = self.B, self.W
        tokens = torch.cat([self.draft, self.cand[:, :self.rows].reshape(B, -1)], 1)     # (B, T)
        pos = self.m[:, None] + self.offs                                              # (B, T)
        slots = torch.cat([self.base + pos[:, :W], self.cand_slots.expand(B, -1)], 1)  # (B, T)
        seg = torch.cat([(self.base + self.m)[:, None].expand(B, W), self.cand_seg.expand(B, -1)], 1)
        mask = cache_mask(self.base + self.m, seg, slots, self.S, self.base)
        return self.model(tokens, pos, mask, slots).argmax(-1)

    def _run(self, x, preds, limit):
        """1 + the longest run of tokens equal to the prediction before them, within `limit` tokens.
        x, preds (B, rows, L); limit (B,). Returns (B, rows)."""
        L = x.shape[-1]
        ok = (x[..., 1:] == preds[..., :-1]) & (torch.arange(L - 1, device=self.dev) < limit[:, None, None] - 1)
        return 1 + ok.long().cumprod(-1).sum(-1)

    def _accept(self, preds):
        """Accepted tokens of every row (its first token is the verified one, so always >= 1); the longest
        run wins, ties go to the main row. Returns (a, a of the main row, the winner's tokens and predictions
        laid over the main row, each (B, W))."""
        B, W, R, c = self.B, self.W, self.rows, self.c
        pred_main = preds[:, :W]
        a_main = self._run(self.draft[:, None], pred_main[:, None], self.valid)[:, 0]
        if not R:
            return a_main, a_main, self.draft, pred_main
        cand, pred_cand = self.cand[:, :R], preds[:, W:].view(B, R, c)
        # a candidate is verified on its own c tokens, so it may commit past block 0's end (the blocks it
        # completes retire in _update); capping it at the drafts in flight would only cost forwards
        whole = torch.full_like(self.valid, c)
        a_all = torch.cat([a_main[:, None], self._run(cand, pred_cand, whole)], 1)          # (B, 1 + R)
        win = a_all.argmax(1)
        use, cw = (win > 0)[:, None], (win - 1).clamp(min=0)
        chosen = torch.cat([torch.where(use, cand[self.bidx, cw], self.draft[:, :c]), self.draft[:, c:]], 1)
        pred = torch.cat([torch.where(use, pred_cand[self.bidx, cw], pred_main[:, :c]), pred_main[:, c:]], 1)
        # a winning candidate's K/V move from its scratch slots into place (a no-op when the main row wins)
        dst = self.base + self.m[:, None] + self.ar_c
        self.cache.copy(torch.where(use, cw[:, None] * c + self.ar_c, dst), dst)
        return a_all.gather(1, win[:, None])[:, 0], a_main, chosen, pred

    def _commit(self, a, chosen):
        """Write the accepted tokens into the output (their K/V are already in the cache)."""
        a = torch.where(self.done, 0, a)                    # finished rows stay frozen
        commit = self.ar_W < a[:, None]
        dst = self.m[:, None] + self.ar_W
        self.out.scatter_(1, dst, torch.where(commit, chosen, self.out.gather(1, dst)))
        return a, self.m + a, ((chosen == self.eot) & commit).any(1)

    def _update(self, a, pred, m_new):
        """Blocks whose n tokens are all committed retire (block 1 becomes block 0); the next drafts are
        the winner's predictions shifted past the accepted tokens (the Jacobi update; the first is the
        verified next token), and slots past the drafts in flight get fresh guesses."""
        n, W, V = self.n, self.W, self.valid
        over = a - self.L0
        finished = torch.where(over >= 0, 1 + over.clamp(min=0) // n, 0)
        L0 = torch.where(over >= 0, n - over.clamp(min=0) % n, self.L0 - a)
        nb = self.nb - finished
        reset = nb <= 0                        # every block done (a long candidate may pass them all): start afresh
        nb, L0 = torch.where(reset, 1, nb), torch.where(reset, n, L0)
        keep = (V - a).clamp(min=1)
        shifted = pred.gather(1, (a[:, None] - 1 + self.ar_W).clamp(0, W - 1))
        draft = torch.where(self.ar_W < keep[:, None], shifted, self._guesses(m_new))
        return draft, L0, nb, torch.where(reset, n, V - a), reset

    def _grow(self, a, pred, draft, L0, nb, V, reset):
        """Count the newest block's converged tokens (committed ones, the verified next token when it is in
        that block, plus a leading run of drafts this update left unchanged); past activation_ratio*n,
        append a pseudo-active block after it, whose first guess is the prediction after the newest block's
        last draft."""
        n, W, ar_W = self.n, self.W, self.ar_W
        unchanged = draft == self.draft.gather(1, (a[:, None] + ar_W).clamp(max=W - 1))
        unchanged = unchanged | (ar_W == 0)        # draft[0] is the verified next token: known, not a guess
        first = torch.where(nb == 1, 0, L0 + (nb - 2) * n)
        lead = (unchanged | (ar_W < first[:, None])) & (ar_W < V[:, None])
        run = (lead.long().cumprod(1).sum(1) - first).clamp(min=0)
        grow = (nb < self.K) & (run + torch.where(nb == 1, n - L0, 0) >= self.threshold) & ~reset
        draft = torch.where(grow[:, None] & (ar_W == V[:, None]), pred.gather(1, (self.valid - 1)[:, None]), draft)
        return draft, nb + grow, V + grow * n

    def _recycle(self, a_main, draft, m_new):
        """Candidate rows for the next iteration, each starting with the verified next token v:
        rejection recycling (rejected tails in the pool that contain v, from v on) and context n-grams
        (what followed the latest earlier occurrence of v and the tokens before it). Rows with nothing to
        offer repeat the main draft."""
        B, n, c, P = self.B, self.n, self.c, self.pool_size
        v = draft[:, 0]
        fallback = draft[:, None, :c]                                        # (B, 1, c)
        rows = []
        ptr = self.ptr
        if P:
            tail = a_main[:, None] + self.ar_n                               # the main row's rejected tail
            tail = torch.where(tail < self.valid[:, None], self.draft.gather(1, tail.clamp(max=self.W - 1)), -1)
            self.pool.scatter_(1, ptr[:, None, None].expand(B, 1, n), tail[:, None])
            ptr = (ptr + 1) % self.pool_slots
            hit = self.pool[..., :-1] == v[:, None, None]                      # (B, M, n-1)
            age = (ptr[:, None] - 1 - torch.arange(self.pool_slots, device=self.dev)) % self.pool_slots
            score = torch.where(hit.any(-1), self.pool_slots - age, 0)                 # newest hits first
            top = top_k(score, P)[1]                                          # (B, P)
            at = hit.long().argmax(-1).gather(1, top)[..., None] + self.ar_c  # (B, P, c)
            entry = self.pool.gather(1, top[..., None].expand(B, P, n))
            cand = entry.gather(2, at.clamp(max=n - 1))
            ok = (at < n) & (cand >= 0) & (score.gather(1, top) > 0)[..., None]
            rows.append(torch.where(ok, cand, fallback))
        if self.ngram:
            rows.append(self._ngrams(v, m_new, fallback))
        frozen = self.done[:, None, None]
        self.ptr.copy_(torch.where(self.done, self.ptr, ptr))
        self.cand[:, :self.rows].copy_(torch.where(frozen, self.cand[:, :self.rows], torch.cat(rows, 1)))

    def _ngrams(self, v, m, fallback):
        """Prompt lookup: positions j where the committed text holds v preceded by the same tokens as the
        newest committed ones; the longest match wins, then the latest. A row is v + the text after j."""
        B, C, c, o, j = self.B, self.C, self.c, self.out, self.ar_C
        hit = (o == v[:, None]) & (j < (m - 1)[:, None])       # v at j, with a committed token after it
        length = hit.long()
        for i in range(1, NGRAM_KEY):
            key = o.gather(1, (m - i).clamp(min=0)[:, None])   # the i-th newest committed token (B, 1)
            hit = hit & (j >= i) & (o.roll(i, 1) == key) & (m - i >= 0)[:, None]
            length = length + hit.long()
        values, indices = top_k(torch.where(length > 0, length * C + j, -1), self.ngram)   # (B, G)
        at = indices[..., None] + 1 + self.ar_c[:-1]                             # (B, G, c-1) text after j
        follow = o.gather(1, at.clamp(max=C - 1).view(B, -1)).view(B, self.ngram, c - 1)
        ok = (at < m[:, None, None]) & (values >= 0)[..., None]
        return torch.cat([v[:, None, None].expand(B, self.ngram, 1), torch.where(ok, follow, fallback[..., 1:])], 2)

