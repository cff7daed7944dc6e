"""What the decoder adds to vanilla Jacobi: candidate rows and multi-block growth, as small tensor
functions that jfmini.jacobi.Jacobi calls once per iteration. They run inside its captured CUDA graph, so
every shape is fixed and nothing branches on a value. B rows of the batch throughout; v (B,) is each row's
verified next token, and every candidate row starts with it.

- Rejection recycling (the paper's): `file_rejected` keeps the main row's rejected drafts in a small ring
  buffer (the pool); `recycled_rows` offers the newest entries that contain v, from v on.
- Context n-grams (jfmini's, prompt lookup): `ngram_rows` offers what followed the latest earlier
  occurrences of v and the tokens before it in the committed text.
- Multi-block decoding (the paper's): `grow` appends a pseudo-active block once the newest block has
  converged enough.
"""
import torch

NGRAM_KEY = 4     # a context n-gram matches up to the verified next token and the 3 tokens before it


def top_k(x, k):
    """(values, indices) of the k largest entries of each row of x (B, L), largest first, ties to the lower
    index: k argmax reductions, which inductor fuses. A topk kernel costs more for the small k used here
    (pool and n-gram candidates: ~30 us of a 440 us multi-block step on an H200)."""
    values, indices = [], []
    for _ in range(k):
        i = x.argmax(1, keepdim=True)
        values.append(x.gather(1, i))
        indices.append(i)
        x = x.scatter(1, i, torch.iinfo(x.dtype).min)
    return torch.cat(values, 1), torch.cat(indices, 1)


def file_rejected(pool, pool_next, draft, a_main, in_flight):
    """The pool (B, M, n) with entry pool_next (B,) overwritten by the main row's rejected tail: its drafts
    (B, W) from a_main (B,) on, -1 past the drafts in flight (B,)."""
    B, M, n = pool.shape
    tail = a_main[:, None] + torch.arange(n, device=pool.device)
    tail = torch.where(tail < in_flight[:, None], draft.gather(1, tail.clamp(max=draft.shape[1] - 1)), -1)
    return pool.scatter(1, pool_next[:, None, None].expand(B, 1, n), tail[:, None])


def recycled_rows(pool, pool_next, v, fallback, count):
    """`count` candidate rows (B, count, c): the pool's newest entries that contain v (pool_next (B,) is the
    entry filed last), each from v on; a row with no such entry repeats `fallback` (B, 1, c)."""
    B, M, n = pool.shape
    c = fallback.shape[-1]
    hit = pool[..., :-1] == v[:, None, None]                           # (B, M, n-1)
    age = (pool_next[:, None] - torch.arange(M, device=pool.device)) % M   # 0 = the entry just filed
    score = torch.where(hit.any(-1), M - age, 0)                       # newest hits first
    top = top_k(score, count)[1]                                       # (B, count)
    at = hit.long().argmax(-1).gather(1, top)[..., None] + torch.arange(c, device=pool.device)   # (B, count, c)
    cand = pool.gather(1, top[..., None].expand(B, count, n)).gather(2, at.clamp(max=n - 1))
    ok = (at < n) & (cand >= 0) & (score.gather(1, top) > 0)[..., None]
    return torch.where(ok, cand, fallback)


def ngram_rows(text, length, v, fallback, count):
    """Prompt lookup, `count` rows (B, count, c): positions j where the committed text (B, C; length (B,)
    tokens) holds v preceded by the same tokens as the newest committed ones; the longest match wins,
    then the latest. A row is v and the text after j; where there is none, `fallback` (B, 1, c)."""
    B, C = text.shape
    c, j = fallback.shape[-1], torch.arange(C, device=text.device)
    hit = (text == v[:, None]) & (j < (length - 1)[:, None])    # v at j, with a committed token after it
    match = hit.long()                                           # (B, C) matched key length at j
    for i in range(1, NGRAM_KEY):
        key = text.gather(1, (length - i).clamp(min=0)[:, None])   # the i-th newest committed token (B, 1)
        hit = hit & (j >= i) & (text.roll(i, 1) == key) & (length - i >= 0)[:, None]
        match = match + hit.long()
    values, indices = top_k(torch.where(match > 0, match * C + j, -1), count)    # (B, count)
    at = indices[..., None] + 1 + torch.arange(c - 1, device=text.device)      # (B, count, c-1) text after j
    follow = text.gather(1, at.clamp(max=C - 1).view(B, -1)).view(B, count, c - 1)
    ok = (at < length[:, None, None]) & (values >= 0)[..., None]
    return torch.cat([v[:, None, None].expand(B, count, 1), torch.where(ok, follow, fallback[..., 1:])], 2)


def grow(flight, a, guess, old_draft, old_in_flight, n, K, threshold):
    """Multi-block: count the newest block's converged tokens (committed ones, the verified next token when
    it is in that block, plus a leading run of drafts this update left unchanged); at `threshold` or more,
    append a pseudo-active block of n after it, whose first guess is the prediction after the last draft.
    flight: the blocks after the Jacobi update (its draft (B, W), left0, blocks, in_flight, reset); a: the
    tokens accepted; guess (B, W): the prediction after each old draft; old_draft, old_in_flight: the
    iteration's drafts. Returns flight with the blocks grown.

    Example, n=4, K=2, one block (first = 0) with left0 = 3 after committing A, drafts B ? ? where B is the
    verified next token: unchanged = [1 0 0 ...] (slot 0 always counts), so run = 1 and converged = 1 (run)
    + 1 (A, committed) = 2; with activation ratio 0.5 (threshold 2) a block joins at slot in_flight = 3.
    With two blocks, the newest starts at slot first = left0 and only its own leading drafts count."""
    draft, left0, blocks, in_flight = flight.draft, flight.left0, flight.blocks, flight.in_flight
    W = draft.shape[1]
    slot = torch.arange(W, device=draft.device)
    unchanged = draft == old_draft.gather(1, (a[:, None] + slot).clamp(max=W - 1))
    unchanged = unchanged | (slot == 0)          # draft[0] is the verified next token: known, not a guess
    first = torch.where(blocks == 1, 0, left0 + (blocks - 2) * n)   # the newest block's first draft slot
    lead = (unchanged | (slot < first[:, None])) & (slot < in_flight[:, None])
    run = (lead.long().cumprod(1).sum(1) - first).clamp(min=0)
    converged = run + torch.where(blocks == 1, n - left0, 0)
    grows = (blocks < K) & (converged >= threshold) & ~flight.reset
    after = guess.gather(1, (old_in_flight - 1)[:, None])          # the prediction after the last draft
    draft = torch.where(grows[:, None] & (slot == in_flight[:, None]), after, draft)
    return flight._replace(draft=draft, blocks=blocks + grows, in_flight=in_flight + grows * n)
