"""Who may attend to whom: the noise-aware causal mask of training (the paper's layout, and the compact
row training packs) and the visibility rule of decoding.

Training. The paper packs a training row (block length n, T blocks) with these position ids:

    [ prompt | k_0 | l_0 | k_1 | l_1 | ... | k_{T-1} | l_{T-1} | padding ]
      0..P-1  P+0..P+n-1 (same ids for k_j and l_j)  ...
    k_j: a noisy Jacobi state of block j      l_j: its fixed point (clean)

Who may look at whom (1 = may attend), P=1, n=2, T=2:

            p k0a k0b l0a l0b k1a k1b l1a l1b
    p       1
    k0a     1  1
    k0b     1  1   1
    l0a     1          1
    l0b     1          1   1
    k1a     1  1   1            1
    k1b     1  1   1            1   1
    l1a     1          1   1            1
    l1b     1          1   1            1   1

This is the noise-aware causal mask. Clean queries see the prompt and the clean stream (plain AR). Noisy
queries see the prompt, earlier blocks and their own block causally. Which earlier blocks:
context="noisy" (the paper's mask, drawn above) lets them see earlier *noisy* blocks; context="clean"
(jfmini's default, beyond the paper) lets them see earlier *clean* blocks, the committed text a decoder
really has when it refines a block. Training uses `row_mask`, the same attention on a compact row (the
literal layout and mask are jfmini/tools/paper.py's `pack` and `noise_aware_mask`, the tests' reference).

Decoding. Every row of a Jacobi iteration (the main draft row and each candidate row) reads the
committed prefix from the KV cache and its own tokens causally (`may_read`, `cache_mask`), so all rows
share one cache without copies.
"""
import torch


MAIN, TRUTH, PAD = 0, 1, -1    # groups of a compact training row; noisy window j is group 2 + j


def row_mask(group, pos, start, context="clean"):
    """mask_mod of the compact row that training packs (jfmini.forcing.pack_rows): the same attention as
    the layout above, with every token that no loss needs left out.

    With context="clean" a noisy block k_j agrees with its fixed point l_j up to its first wrong token d_j,
    and those tokens see exactly what l_j's do, so their keys and values are l_j's: k_j[t] may read
    l_j[0..d_j-1] in place of its own copies. Its tokens after the consistency window are read by no
    query that has a loss. So a row keeps, per block, only the window k_j[d_j : d_j + w] (w =
    cons_window), and the prompt's real continuation (the truth term) joins the same row:

        [ windows k_0[d_0:], k_1[d_1:], ... | prompt | l_0 l_1 ... (clean) | p' t_0 t_1 ... (truth) | pad ]

    Every token carries its position, a group (MAIN = prompt and clean stream, TRUTH, 2 + j = window j,
    PAD) and `start`. A query reads: MAIN keys at positions before its `start`, and keys of its own group
    at or before its position. MAIN tokens have start 0 (plain causal text); a window of block j starts at
    its first token's position P + j*n + d_j; the truth segment at P - 1, and p' repeats the prompt's last
    token there so the truth's first target has its own query. With context="noisy" (the paper's mask)
    windows are whole blocks (d_j = 0), start at P (no clean keys) and also read every earlier window.

    P=2, n=2, T=2, w=2, d_0=0, d_1=1 (k_1's slot after k1b is padding), 3 truth tokens, context clean;
    positions under the names (1 = may attend):

              k0a k0b k1b  .  p0  p1 l0a l0b l1a l1b  p' t0  t1
               2   3   5   0   0   1   2   3   4   5   1  2   3
        k0a    1   .   .   .   1   1   .   .   .   .   .  .   .
        k0b    1   1   .   .   1   1   .   .   .   .   .  .   .
        k1b    .   .   1   .   1   1   1   1   1   .   .  .   .
        .      .   .   .   1   .   .   .   .   .   .   .  .   .
        p0     .   .   .   .   1   .   .   .   .   .   .  .   .
        p1     .   .   .   .   1   1   .   .   .   .   .  .   .
        l0a    .   .   .   .   1   1   1   .   .   .   .  .   .
        l0b    .   .   .   .   1   1   1   1   .   .   .  .   .
        l1a    .   .   .   .   1   1   1   1   1   .   .  .   .
        l1b    .   .   .   .   1   1   1   1   1   1   .  .   .
        p'     .   .   .   .   1   .   .   .   .   .   1  .   .
        t0     .   .   .   .   1   .   .   .   .   .   1  1   .
        t1     .   .   .   .   1   .   .   .   .   .   1  1   1

    k1b reads l1a, which equals k1a. group, pos, start: (B, L) tensors indexed by the batch row, so one
    compiled kernel serves every batch."""
    if context not in ("noisy", "clean"):
        raise ValueError(f"context must be 'noisy' or 'clean', not {context!r}")
    earlier_windows = context == "noisy"

    def mask_mod(b, h, q, kv):
        gq, gk = group[b, q], group[b, kv]
        reads = ((gk == MAIN) & (pos[b, kv] < start[b, q])) | ((gk == gq) & (gq != PAD) & (pos[b, kv] <= pos[b, q]))
        if earlier_windows:
            reads = reads | ((gq >= 2) & (gk >= 2) & (gk < gq))
        return reads | (q == kv)                              # padding sees itself only
    return mask_mod


def may_read(kv, lo, hi, seg, slot):
    """May a query read cache slot kv? Yes for the committed prefix (lo <= kv < hi) and for its own
    row's slots from the row's first slot `seg` through its own `slot` (causal within the row)."""
    return ((kv >= lo) & (kv < hi)) | ((kv >= seg) & (kv <= slot))


def cache_mask(hi, seg, slots, length, lo=0):
    """may_read as a dense bool mask (B, 1, T, S) over a cache of `length` slots; hi (B,), seg, slots (B, T)."""
    cols = torch.arange(length, device=slots.device)
    return may_read(cols, lo, hi[:, None, None], seg[..., None], slots[..., None])[:, None]
