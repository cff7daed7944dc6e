"""Jacobi decoding, batched in fixed shapes, with rejection recycling, multi-block decoding and (jfmini,
beyond the paper) context n-gram candidates. The paper's plain loop, in ~25 eager lines, is
jfmini.tools.paper.jacobi_reference; AR decoding, the oracle every decoder here equals token for token, is
jfmini.tools.ar.generate_ar. One iteration (`Jacobi._step`) is one fixed-shape forward over the KV cache:

    cache: [ candidate scratch (R*c slots) | committed x[0:m] | main row's drafts ... ]
    main row     [ v d d d d d d d ][ d d d d d d d d ]   W = K*n tokens at positions m..m+W-1
                   block 0 (commits)  block 1..K-1 (pseudo-active: refined, never committed alone)
    candidate 1  [ v c c c ]                              c tokens at positions m..m+c-1
    ...          (rejection recycling: pool entries that contain v; context n-grams: what followed
    candidate R   earlier occurrences of the newest tokens in the prompt and text so far)

v is the verified next token, d draft guesses; an iteration reads and writes a `State`. Every row
attends to the committed prefix and its own tokens causally (jfmini.masks.cache_mask), so all rows read
one cache. Candidate rows and block growth: jfmini.candidates; graph replay, host loop: runtime.engine.
"""
import math
from typing import NamedTuple

import torch

from jfmini.candidates import file_rejected, grow, ngram_rows, recycled_rows
from jfmini.masks import cache_mask
from jfmini.runtime.engine import Replay, check_args, check_prompts, decode_batch, generate
from jfmini.runtime.sampling import distribution, draw

KV_TILE = 128     # the cache length is a multiple of this (regular kernel shapes)


def guesses(text, m, it, slots):
    """Initial guesses for draft slots: tokens 'sampled' from the text so far (prompt + committed) by an
    integer hash of the iteration, the slot and the length: deterministic and graph-safe.
    text (B, C), m (B,) committed lengths, it (B,) iterations so far, slots (W,) -> (B, W)."""
    h = (it[:, None] + 1) * 1000003 + (slots + 1) * 7919 + m[:, None] * 31
    h = (h * 2654435761) % 2147483647
    return text.gather(1, h % m[:, None])


class Verdict(NamedTuple):
    """What one forward decided, per row: `a` tokens accepted (>= 1), `a_main` the main row's own count, and
    laid over the main row (B, W) the winning row's `tokens`, the token `drawn` and the greedy `guess` after each."""
    a: torch.Tensor
    a_main: torch.Tensor
    tokens: torch.Tensor
    drawn: torch.Tensor
    guess: torch.Tensor


class Flight(NamedTuple):
    """The blocks for the next iteration: `draft` tokens (B, W); block 0's uncommitted tokens `left0`, the
    number of `blocks` and of drafts `in_flight` (B,); `reset`: every block retired, a fresh block 0 starts."""
    draft: torch.Tensor
    left0: torch.Tensor
    blocks: torch.Tensor
    in_flight: torch.Tensor
    reset: torch.Tensor


class State:
    """Everything one Jacobi iteration reads and writes, per row of the batch. All tensors, updated in
    place, so that a captured CUDA graph replays the iteration on the live state."""

    def __init__(self, B, C, W, n, pool_entries, rows, c, device):
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)
        self.text = z(B, C)                      # committed tokens: prompt + generated
        self.length = z(B)                       # committed tokens so far
        self.prompt_len = z(B)
        self.limit = z(B)                        # max new tokens
        self.draft = z(B, W)                     # the blocks in flight; draft[:, 0] is the verified next token
        self.in_flight = z(B)                    # drafts in flight: block0_left + (blocks - 1) * n
        self.block0_left = z(B)                  # uncommitted tokens of block 0
        self.blocks = z(B)                       # blocks in flight (multi-block: up to K)
        self.pool = z(B, pool_entries, n) - 1    # recycling: rejected drafts, a ring buffer, -1 = empty
        self.pool_next = z(B)                    # the pool entry to overwrite next
        self.cand = z(B, rows, c)                # candidate rows of the next iteration
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.forwards = z(B)                     # forwards that did work
        self.iteration = z(B)                    # iterations so far (seeds the initial guesses)
        self.accepted = z(B, W + 1)              # forwards that committed a tokens, a = 0..W
        self.committed_by = z(B, C)              # the forward (1, 2, ...) that committed each text position

    def tensors(self):
        return list(vars(self).values())


class Jacobi:
    """Batched Jacobi decoding in fixed shapes, greedy or sampled; block_len=1 is plain AR. Rows of the
    batch are independent sequences. block_len n; num_blocks K (multi-block: a pseudo-active block joins
    once the newest has converged activation_ratio*n tokens); pool_size (rejection recycling: candidate
    rows per forward from the 2*pool_size latest rejected drafts); ngram (context n-gram candidate rows);
    cand_len c (tokens per candidate row, at most n).

    temperature > 0 (with top_k, top_p) samples exactly as AR sampling does (jfmini, beyond the paper):
    each iteration draws one token after every position, with fresh noise shared by every row at the same
    depth, and a token is accepted when it equals the token drawn before it: speculative sampling with
    point-mass drafts. The drafts stay greedy guesses, made before the noise that judges them."""

    def __init__(self, model, block_len=16, num_blocks=1, pool_size=0, ngram=0, cand_len=None,
                 activation_ratio=0.85, batch=1, eot=None, graph=None, compile=False, max_len=None,
                 pre_step=None, temperature=0.0, top_k=0, top_p=1.0):
        check_args(block_len, num_blocks, pool_size, ngram, cand_len, activation_ratio, temperature=temperature,
                   top_k=top_k, top_p=top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.sampling = temperature > 0
        self.model, self.n, self.K, self.B = model, block_len, num_blocks, batch
        self.pool_size, self.ngram = (pool_size, ngram) if block_len > 1 else (0, 0)  # a 1-token block: nothing to add
        self.rows = self.pool_size + self.ngram           # candidate rows
        self.c = min(cand_len or block_len, block_len)    # tokens per candidate row
        self.W = self.K * self.n                          # main row: drafts of all blocks
        self.pool_slots = 2 * self.pool_size              # pool entries per sequence
        self.threshold = math.ceil(activation_ratio * self.n - 1e-9)
        self.eot = -1 if eot is None else eot
        self.pre_step = pre_step     # a hook run before each iteration, in the same graph (trajectory recording)
        self.dev = dev = model.embed.weight.device
        # Cache slots: [candidate scratch (R*c) | positions 0..C-1]. C covers the longest prompt plus new
        # tokens (max_len) and slack for tentative draft writes; a tile-aligned length keeps kernels regular.
        self.base = self.rows * self.c
        self.S = -(-(self.base + (max_len or model.cfg.seq_len) + 2 * self.W) // KV_TILE) * KV_TILE
        self.C = self.S - self.base
        B, n, W, c = batch, self.n, self.W, self.c
        self.cache = model.new_cache(B, self.S)           # this decoder owns its cache buffer
        arange = lambda k: torch.arange(k, device=dev)
        self.arange_n, self.arange_W, self.arange_c, self.bidx = arange(n), arange(W), arange(c), arange(B)
        self.cand_slots = cand = arange(self.rows * c)   # scratch slots of candidate rows
        self.offs = torch.cat([arange(W), cand % c])      # position offsets of the T = W + R*c tokens
        self.cand_seg = (cand // c) * c                   # first scratch slot of each candidate row
        self.state = State(B, self.C, W, n, max(self.pool_slots, 1), max(self.rows, 1), c, dev)
        self.step = Replay(self._step, self._tensors, dev, graph, compile)   # one iteration, fast

    generate, decode_batch = generate, decode_batch       # the host loop (jfmini.runtime.engine.decode)

    def _tensors(self):
        """Every tensor an iteration writes: the state, the cache and a pre_step hook's (its `tensors()`)."""
        hook = self.pre_step.tensors() if hasattr(self.pre_step, "tensors") else []
        return [*self.state.tensors(), *self.cache.buffers(), *hook]

    @torch.no_grad()
    def prefill(self, prompts, max_new_tokens):
        """Run the prompts (a list of B token lists) through the cache; set the state for decoding."""
        B, n, s = self.B, self.n, self.state
        lens = check_prompts(prompts, B, max_new_tokens, self.model.cfg.seq_len, self.C - 2 * self.W)
        self.model.cache = self.cache
        longest = max(lens)
        idx = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.dev)
        pos = torch.arange(longest, device=self.dev).expand(B, longest)
        slots = self.base + pos
        first = torch.full((B,), self.base, device=self.dev)
        mask = cache_mask(first, first[:, None].expand(B, longest), slots, self.S, lo=self.base)
        logits = self.model(idx, pos, mask, slots)                     # (B, longest, V)
        start = torch.tensor(lens, device=self.dev)
        for t, value in ((s.text, 0), (s.iteration, 0), (s.forwards, 0), (s.done, 0), (s.pool_next, 0),
                         (s.accepted, 0), (s.committed_by, 0), (s.limit, max_new_tokens), (s.pool, -1),
                         (s.blocks, 1), (s.block0_left, n), (s.in_flight, n)):
            t.fill_(value)
        s.text[:, :longest] = idx
        s.length.copy_(start)
        s.prompt_len.copy_(start)
        v = self._next(logits[self.bidx, start - 1])                   # the next token after each prompt (B,)
        s.draft.copy_(torch.where(self.arange_W == 0, v[:, None], guesses(s.text, start, s.iteration, self.arange_W)))
        s.cand.copy_(s.draft[:, None, :self.c].expand_as(s.cand))

    def _next(self, logits):
        """The next token after each row's last position (B, V) -> (B,): greedy, or one draw from p."""
        p = distribution(logits, self.temperature, self.top_k, self.top_p) if self.sampling else None
        return logits.argmax(-1) if p is None else draw(p, torch.empty_like(p).exponential_())

    # ---------------------------------------------- one iteration: _step, then its steps in order
    @torch.no_grad()
    def _step(self):
        """One iteration. A worked example, n=4, K=2 blocks, activation ratio 0.5, greedy: the prompt is
        "x y z", greedy AR continues it with A B C D E F G H I ..., and ? is a wrong prediction (a model that
        needs the right token before some positions, and guesses others right anyway). Block 0 starts as
        the verified next token A and three guesses drawn from the text so far:

            iteration  drafts in flight   predictions    accepted   committed        next drafts
            1          A x x z            B ? ? E        A          A                B ? ? | E y x A
            2          B ? ? | E y x A    C ? E F ? H I  B          A B              C ? | E F ? H
            3          C ? | E F ? H      D E F G H I    C          A B C            D | E F G H
            4          D | E F G H        E F G H I      D E F G H  A B C D E F G H  I y B E

        Iteration 1, by the steps of the code below:
        1-3. One forward over the drafts gives the prediction after each. The first draft is always right
             (verified last iteration); each later one is accepted while it equals the prediction before
             it (x is not B, so only A). A is committed.
        4.   The Jacobi update: the drafts after it become the predictions shifted in (B ? ?).
        5.   Multi-block: block 0 has now 2 = 0.5 * 4 converged tokens (A committed, B known), so a
             pseudo-active block 1 joins it: the prediction after the last draft (E), then fresh guesses.
             It is refined by every forward but commits only behind block 0.
        Iteration 4: D is verified and the refined block 1 equals the predictions after it, so one
        forward commits 5 tokens and retires both blocks; a new block 0 starts from I.
        tests/test_decoding.py replays this table."""
        if self.pre_step is not None:
            self.pre_step(self)
        drawn, guess = self._verify()              # 1. draft + verify: one forward over every row
        verdict = self._accept(drawn, guess)       # 2. the longest verified run; the best row wins
        verdict, length, ended = self._commit(verdict)   # 3. commit it
        flight = self._update(verdict, length)     # 4. the Jacobi update: the next drafts
        if self.K > 1:                             # 5. multi-block: grow a pseudo-active block
            flight = grow(flight, verdict.a, verdict.guess, self.state.draft, self.state.in_flight, self.n, self.K,
                          self.threshold)
        if self.rows:                              # 6. candidates for the next iteration
            self._recycle(verdict.a_main, flight.draft, length)
        self._store(verdict.a, length, ended, flight)    # 7. the new state, in place

    def _verify(self):
        """One forward: the main row writes its K/V right after the committed prefix (kept only up to the
        new length), candidate rows into their scratch slots. Returns (the token drawn after every token,
        the greedy guess after every token), each (B, T); greedy decoding draws the guess."""
        B, W, s = self.B, self.W, self.state
        tokens = torch.cat([s.draft, s.cand[:, :self.rows].reshape(B, -1)], 1)         # (B, T)
        pos = s.length[:, None] + self.offs                                            # (B, T)
        slots = torch.cat([self.base + pos[:, :W], self.cand_slots.expand(B, -1)], 1)  # (B, T)
        seg = torch.cat([(self.base + s.length)[:, None].expand(B, W), self.cand_seg.expand(B, -1)], 1)
        mask = cache_mask(self.base + s.length, seg, slots, self.S, self.base)         # (B, 1, T, S)
        logits = self.model(tokens, pos, mask, slots)                                  # (B, T, V)
        guess = logits.argmax(-1)
        if not self.sampling:
            return guess, guess
        p = distribution(logits, self.temperature, self.top_k, self.top_p)
        return draw(p, self._noise(p.shape[-1])), guess

    def _noise(self, V):
        """Exp(1) noise for drawing after every token (B, T, V): fresh at each iteration and shared by every
        row at the same depth, so rows agreeing so far draw the same next token (else: not AR sampling)."""
        return torch.empty(self.B, self.W, V, device=self.dev).exponential_()[:, self.offs]

    def _run(self, x, preds, limit):
        """1 + the longest run of tokens equal to the prediction before them, within `limit` tokens.
        x, preds (B, rows, L); limit (B,). Returns (B, rows)."""
        L = x.shape[-1]
        ok = (x[..., 1:] == preds[..., :-1]) & (torch.arange(L - 1, device=self.dev) < limit[:, None, None] - 1)
        return 1 + ok.long().cumprod(-1).sum(-1)

    def _accept(self, preds, guess):
        """Accepted tokens of every row (its first token is the verified one, so always >= 1): those equal
        to the token drawn after the tokens before them (preds; greedy: the guesses). The longest run wins,
        ties go to the main row; a winning candidate's K/V are moved into the main row's slots. A Verdict."""
        B, W, R, c, s = self.B, self.W, self.rows, self.c, self.state
        pred_main = preds[:, :W]
        a_main = self._run(s.draft[:, None], pred_main[:, None], s.in_flight)[:, 0]
        if not R:
            return Verdict(a_main, a_main, s.draft, pred_main, guess[:, :W])
        cand, pred_cand = s.cand[:, :R], preds[:, W:].view(B, R, c)
        # a candidate is verified on its own c tokens, so it may commit past block 0's end (the blocks it
        # completes retire in _update); capping it at the drafts in flight would only cost forwards
        whole = torch.full_like(s.in_flight, c)
        a_all = torch.cat([a_main[:, None], self._run(cand, pred_cand, whole)], 1)       # (B, 1 + R)
        win = a_all.argmax(1)
        use, cw = (win > 0)[:, None], (win - 1).clamp(min=0)
        # the winning row laid over the main row: a winning candidate's c tokens replace its first c slots
        #     main row [ v d d d d d d d ]   candidate 2 wins:   [ v c c c | d d d d ]
        over_main_row = lambda x: torch.cat([torch.where(use, x[:, W:].view(B, R, c)[self.bidx, cw], x[:, :c]),
                                             x[:, c:W]], 1)
        chosen = torch.cat([torch.where(use, cand[self.bidx, cw], s.draft[:, :c]), s.draft[:, c:]], 1)
        pred = over_main_row(preds)
        guess = over_main_row(guess) if self.sampling else pred
        # a winning candidate's K/V move from its scratch slots into place (a no-op when the main row wins)
        dst = self.base + s.length[:, None] + self.arange_c
        self.cache.copy(torch.where(use, cw[:, None] * c + self.arange_c, dst), dst)
        return Verdict(a_all.gather(1, win[:, None])[:, 0], a_main, chosen, pred, guess)

    def _commit(self, verdict):
        """Write the accepted tokens into the text (their K/V are already in the cache). Returns (the verdict,
        0 accepted for finished rows; the new committed length (B,); whether end-of-text was committed (B,))."""
        s, chosen = self.state, verdict.tokens
        a = torch.where(s.done, 0, verdict.a)                          # finished rows stay frozen
        commit = self.arange_W < a[:, None]
        dst = s.length[:, None] + self.arange_W
        s.text.scatter_(1, dst, torch.where(commit, chosen, s.text.gather(1, dst)))
        s.committed_by.scatter_(1, dst, torch.where(commit, s.forwards[:, None] + 1, s.committed_by.gather(1, dst)))
        return verdict._replace(a=a), s.length + a, ((chosen == self.eot) & commit).any(1)

    def _update(self, verdict, length):
        """Blocks whose n tokens are all committed retire (block 1 becomes block 0); the next drafts are
        the winner's guesses shifted past the accepted tokens (the Jacobi update), the first being the
        verified next token (the token drawn after the last accepted one), and slots past the drafts in
        flight get fresh guesses. A Flight. Example, n=4, K=2, block 0 with 3 tokens left, 5 accepted:
        block 0's 3 and 2 of block 1's are committed (over = 2), so one block retires, block 1 becomes
        block 0 with 4 - 2 = 2 tokens left, and the drafts in flight drop by 5."""
        n, W, s, (a, drawn, guess) = self.n, self.W, self.state, (verdict.a, verdict.drawn, verdict.guess)
        over = a - s.block0_left
        retired = torch.where(over >= 0, 1 + over.clamp(min=0) // n, 0)
        left0 = torch.where(over >= 0, n - over.clamp(min=0) % n, s.block0_left - a)
        blocks = s.blocks - retired
        reset = blocks <= 0                    # every block retired (K=1: at each block's end): start a fresh one
        blocks, left0 = torch.where(reset, 1, blocks), torch.where(reset, n, left0)
        keep = (s.in_flight - a).clamp(min=1)  # drafts still in flight; at least the verified next token
        shifted = guess.gather(1, (a[:, None] - 1 + self.arange_W).clamp(0, W - 1))
        if self.sampling:
            shifted = torch.where(self.arange_W == 0, drawn.gather(1, (a[:, None] - 1).clamp(min=0)), shifted)
        draft = torch.where(self.arange_W < keep[:, None], shifted, guesses(s.text, length, s.iteration, self.arange_W))
        return Flight(draft, left0, blocks, torch.where(reset, n, s.in_flight - a), reset)

    def _recycle(self, a_main, draft, length):
        """Candidate rows for the next iteration, each starting with the verified next token v: rejection
        recycling (the pool's rejected tails that contain v, from v on) and context n-grams (what followed
        earlier occurrences of v and the tokens before it); a row with nothing to offer repeats the draft."""
        s, v, fallback = self.state, draft[:, 0], draft[:, None, :self.c]   # v (B,), fallback (B, 1, c)
        rows, nxt = [], s.pool_next
        if self.pool_size:
            s.pool.copy_(file_rejected(s.pool, s.pool_next, s.draft, a_main, s.in_flight))
            rows.append(recycled_rows(s.pool, s.pool_next, v, fallback, self.pool_size))
            nxt = (nxt + 1) % self.pool_slots
        if self.ngram:
            rows.append(ngram_rows(s.text, length, v, fallback, self.ngram))
        s.pool_next.copy_(torch.where(s.done, s.pool_next, nxt))
        s.cand[:, :self.rows].copy_(torch.where(s.done[:, None, None], s.cand[:, :self.rows], torch.cat(rows, 1)))

    def _store(self, a, length, ended, flight):
        """Write the results into the state, in place (a graph replays on this memory); finished rows keep theirs."""
        s, done = self.state, self.state.done
        s.draft.copy_(torch.where(done[:, None], s.draft, flight.draft))
        s.block0_left.copy_(torch.where(done, s.block0_left, flight.left0))
        s.blocks.copy_(torch.where(done, s.blocks, flight.blocks))
        s.in_flight.copy_(torch.where(done, s.in_flight, flight.in_flight))
        s.forwards.add_((~done).long())
        s.accepted.scatter_add_(1, a[:, None], (~done).long()[:, None])
        s.length.copy_(length)
        s.iteration.add_(1)
        s.done.copy_(done | ended | (length - s.prompt_len >= s.limit))
