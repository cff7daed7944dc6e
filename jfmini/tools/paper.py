"""The paper's statements, written literally: its Jacobi decoding loop (`jacobi_reference`, the algorithm
jfmini.jacobi.Jacobi runs batched in fixed shapes), and its training row, mask and loss:

    [ prompt | k_0 | l_0 | k_1 | l_1 | ... | k_{T-1} | l_{T-1} | padding ]

k_j a noisy Jacobi state of block j (drawn by the progressive noise schedule), l_j its fixed point, with
the same position ids. `noise_aware_mask` is who may attend to whom (drawn in jfmini/masks.py), `pack`
lays rows out and `forcing_loss` gives L_pc and L_AR from one forward's logits. Training packs the
compact rows of jfmini.forcing.pack_rows instead (the same losses with fewer tokens); this layout is the
reference the tests check them against, and `accuracy_by_distance` (ablate.py's diagnostic) measures on
it how often a model predicts a noisy position's next clean token, by distance from the block's first
wrong token.
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jfmini.forcing import draw_packing, state_ratios
from jfmini.jacobi import guesses
from jfmini.runtime.attention import dense_mask
from jfmini.runtime.engine import finish


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


def noise_aware_mask(prompt_len, pad_start, block_len, context="clean"):
    """mask_mod(b, h, q, kv) -> bool for FlexAttention and the dense form alike.

    prompt_len, pad_start: (B,) tensors, per batch row (indexed by b, so one compiled kernel serves
    rows of any prompt length and block count). block_len: n, the same for the whole batch.
    """
    if context not in ("noisy", "clean"):
        raise ValueError(f"context must be 'noisy' or 'clean', not {context!r}")
    n, clean_context = block_len, context == "clean"

    def mask_mod(b, h, q, kv):
        P, end = prompt_len[b], pad_start[b]
        rq, rk = q - P, kv - P                                # offsets after the prompt
        blk_q, blk_k = rq // (2 * n), rk // (2 * n)           # block index j
        clean_q, clean_k = rq % (2 * n) >= n, rk % (2 * n) >= n
        off_q, off_k = rq % n, rk % n                         # offset inside the block
        sees_prompt = (kv < P) & (kv <= q)
        own_block = (blk_k == blk_q) & (clean_k == clean_q) & (off_k <= off_q)
        earlier_block = (blk_k < blk_q) & (clean_k == (clean_q | clean_context))
        body = (q >= P) & (kv >= P) & (own_block | earlier_block)
        real = (q < end) & (kv < end)
        return (real & (sees_prompt | body)) | ((q >= end) & (kv == q))  # padding rows see themselves only
    return mask_mod


@dataclass
class Packed:
    """A batch of packed rows (numpy), fixed length L. noisy_idx[b, j*n + t] is the position of k_j[t];
    its clean twin l_j[t] sits n positions later."""
    tokens: np.ndarray      # (B, L)
    pos: np.ndarray         # (B, L)
    ar_targets: np.ndarray  # (B, L) next clean token, -1 = no target
    noisy_idx: np.ndarray   # (B, T*n)
    cons_weight: np.ndarray  # (B, T*n) 1 where the consistency loss applies
    first_div: np.ndarray   # (B, T) offset of k_j's first token that differs from l_j (n = none)
    prompt_len: np.ndarray  # (B,)
    pad_start: np.ndarray   # (B,)


def packed_length(max_prompt, block_len, num_blocks, multiple=128):
    return math.ceil((max_prompt + 2 * block_len * num_blocks) / multiple) * multiple


def pack(traj, rows, length, schedule, rng, eot, noise_window=16, fresh=True, cons_window=0):
    """The paper's layout, literally: pack the trajectories of prompts `rows` into one batch of rows
    [prompt | k_0 | l_0 | k_1 | l_1 | ...], choosing k_j by the noise schedule. Training packs the
    compact rows of pack_rows instead (the same losses with fewer tokens); this layout serves the
    diagnostics (accuracy_by_distance) and the tests' reference.

    fresh: draw the states anew at every call (a random phase of the ramp per row, and a random state
    among the nearest ratios); otherwise the same nearest state every epoch. cons_window > 0 (jfmini, beyond
    the paper) keeps the consistency loss on the first cons_window positions from the first divergence
    (0 = through n-1, the paper's)."""
    n, T = traj.block_len, traj.fixed.shape[1]
    B = len(rows)
    out = Packed(np.zeros((B, length), np.int64), np.zeros((B, length), np.int64),
                 np.full((B, length), -1, np.int64), np.zeros((B, T * n), np.int64),
                 np.zeros((B, T * n), np.float32), np.full((B, T), n, np.int64), np.zeros(B, np.int64),
                 np.zeros(B, np.int64))
    by_owner, ratios = np.searchsorted(traj.owner, np.arange(len(traj) * T + 1)), state_ratios(traj)  # owner is sorted
    reach = cons_window if cons_window > 0 else n
    for r, i in enumerate(rows):
        prompt, fixed, noisy, valid_until = draw_packing(traj, i, schedule, rng, eot, noise_window, fresh, by_owner,
                                                         ratios)
        P, clean = len(prompt), fixed.reshape(-1)
        toks, pos = [prompt], [np.arange(P)]
        ar = [np.append(prompt[1:], clean[0])]                     # prompt predicts its next token, then l_0[0]
        for j, k in enumerate(noisy):
            diff = np.flatnonzero(k != fixed[j])
            stream = j * n + np.arange(n)                            # stream index of l_j[t]
            nxt = np.append(clean[stream[1:]], clean[stream[-1] + 1] if j + 1 < T else -1)
            ok = stream < valid_until                                # l_j[t] predicts a token up to end-of-text
            base = P + 2 * n * j
            out.noisy_idx[r, j * n:(j + 1) * n] = base + np.arange(n)
            if len(diff):                                            # from the first divergence on
                d = diff[0]
                out.first_div[r, j] = d
                out.cons_weight[r, j * n + d:j * n + min(n, d + reach)] = ok[d:d + reach]
            toks += [k, fixed[j]]
            pos += [P + j * n + np.arange(n)] * 2
            ar += [np.full(n, -1), np.where(ok, nxt, -1)]
        row = np.concatenate(toks)
        L = len(row)
        if L > length:
            raise ValueError(f"packed row of {L} tokens exceeds length {length}")
        out.tokens[r, :L], out.pos[r, :L], out.ar_targets[r, :L] = row, np.concatenate(pos), np.concatenate(ar)
        out.pos[r, L:] = np.arange(L, length)
        out.prompt_len[r], out.pad_start[r] = P, L
    return out


def kl(ref_logits, logits):
    """KL(ref || model) at every position: (..., V) logits -> (...)."""
    ref = ref_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1)


def masked_mean(values, keep):
    return (values * keep).sum() / keep.sum().clamp(min=1)


def forcing_loss(logits, ar_targets, noisy_idx, cons_weight, block_len, target="soft", ref_logits=None):
    """The paper's two terms of L = L_pc + lambda * L_AR from one forward's logits (B, L, V): (L_pc, L_AR).

    L_pc, at the noisy positions cons_weight keeps: soft = cross-entropy from the detached clean
    distribution at l_j[t] (n positions after k_j[t]) to the noisy one at k_j[t] (the paper's);
    hard = cross-entropy to the fixed point's next token (the clean distribution's argmax). pack keeps
    positions from the block's first wrong token d_j on: before it k_j[t] = l_j[t], and with the clean
    context they also see the same keys, so the term is constant there (no gradient); with the noisy
    context it would not be, and pack leaves them out too.
    L_AR: next-token cross-entropy on the clean stream (the paper's: its targets are the source model's
    own greedy tokens, loops included); with ref_logits (an anchor model's logits on the same rows),
    jfmini's alternative: the KL divergence from the anchor's distribution there, which keeps the model's
    AR predictions on its own trajectories instead of sharpening them towards its greedy choices."""
    V = logits.shape[-1]
    if ref_logits is None:
        ar = F.cross_entropy(logits.flatten(0, 1), ar_targets.flatten(), ignore_index=-1)
    else:
        ar = masked_mean(kl(ref_logits, logits), (ar_targets >= 0).float())   # the clean stream (and the prompt)
    idx = noisy_idx[..., None].expand(-1, -1, V)
    student = logits.gather(1, idx).log_softmax(-1)                  # (B, T*n, V)
    if target == "hard":
        label = ar_targets.gather(1, noisy_idx + block_len)
        cons_weight = cons_weight * (label >= 0)                     # the trajectory's last token has no next one
        pc = -student.gather(2, label.clamp(min=0)[..., None])[..., 0]
    else:
        teacher = logits.gather(1, idx + block_len).detach().softmax(-1)
        pc = -(teacher * student).sum(-1)                            # (B, T*n)
    return masked_mean(pc, cons_weight), ar


@torch.no_grad()
def accuracy_by_distance(model, traj, eot, context="clean", batch=16, seed=0, autocast=None):
    """Diagnostics on trajectories the model has not trained on: at every noisy position k_j[t] from the
    first divergence d_j on, is the model's greedy prediction the fixed point's next token l_j[t+1]?
    Returns (hits, counts), each (n,), indexed by the distance t - d_j (the progressive schedule packs
    one state per block)."""
    n, T = traj.block_len, traj.fixed.shape[1]
    dev = model.embed.weight.device
    L = packed_length(int(np.diff(traj.prompt_offsets).max()), n, T)
    rng = np.random.default_rng(seed)
    hits, counts = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for lo in range(0, len(traj), batch):
        p = pack(traj, range(lo, min(lo + batch, len(traj))), L, "progressive", rng, eot, noise_window=min(16, T))
        t = {k: torch.from_numpy(getattr(p, k)).to(dev) for k in ("tokens", "pos", "ar_targets", "noisy_idx")}
        mask = dense_mask(noise_aware_mask(torch.from_numpy(p.prompt_len).to(dev),
                                           torch.from_numpy(p.pad_start).to(dev), n, context), len(p.tokens), L, dev)
        with autocast or contextlib.nullcontext():
            guess = model(t["tokens"], t["pos"], mask).argmax(-1).gather(1, t["noisy_idx"]).cpu().numpy()
        label = t["ar_targets"].gather(1, t["noisy_idx"] + n).cpu().numpy()           # (B, T*n)
        dist = np.arange(T * n)[None] % n - np.repeat(p.first_div, n, axis=1)          # t - d_j
        keep = (dist >= 0) & (label >= 0)
        np.add.at(hits, dist[keep], (guess == label)[keep])
        np.add.at(counts, dist[keep], 1)
    return hits, counts
