"""Jacobi Forcing: trajectories, the progressive noise schedule, packing and the whole objective.

    model --Jacobi decode prompts, record every state of every block--> Trajectories   collect_trajectories
    Trajectories --noise schedule: pick a noisy state k_j per block--> training rows   target_ratios, pack_rows
    rows --one forward with the noise-aware mask--> L = L_pc + lambda * L_AR            row_objective

The Jacobi iteration used to collect trajectories is the decoder's own (jfmini.jacobi.Jacobi), with a
hook that records each block's state before every iteration (Recorder).
Training packs compact rows (pack_rows, jfmini.masks.row_mask): the paper's row [prompt | k_0 | l_0 |
...] (pack, noise_aware_mask, forcing_loss: the literal statement, kept for the diagnostics and as the
tests' reference) with every token no loss needs left out, so the same losses cost fewer tokens.
Beyond the paper, marked "jfmini" where they appear: a consistency window (cons_window); the KL anchor
(the AR term as a KL divergence from a frozen anchor model, train.py's base model by default, instead of
cross-entropy to the greedy tokens); a replay term on corpus text; and a term on the real code after
each trajectory prompt (the truth segment: cross-entropy to it, or the anchor's KL there).
Storage and checks of trajectories live in jfmini.runtime.trajectories. accuracy_by_distance is a
diagnostic: how often the model predicts a noisy position's next clean token, by distance from the
block's first divergence.
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from jfmini.jacobi import Jacobi
from jfmini.masks import MAIN, PAD, TRUTH, dense_mask, noise_aware_mask
from jfmini.runtime.trajectories import Trajectories


@torch.no_grad()
def collect_trajectories(model, prompts, block_len, num_blocks, batch_size, eot, compile=False, log=print,
                         graph=None, source="{}", truth=None):
    """Greedy Jacobi-decode every prompt for num_blocks blocks of block_len, recording every state.
    truth: optional ground-truth continuation of each prompt (token lists), kept with the trajectories."""
    n, T = block_len, num_blocks
    fixed, states, owner = [], [], []
    jac = rec = None
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]                          # a short last batch: padding rows frozen
        if jac is None:
            jac = Jacobi(model, block_len=n, batch=batch_size, eot=None, compile=compile, graph=graph,
                         max_len=max(len(p) for p in prompts) + n * T)
            rec = Recorder(jac, T)
            jac.pre_step = rec
        rec.states.zero_()
        rec.count.zero_()
        jac.decode_batch(chunk, n * T)                               # at most n iterations per block
        start = jac.state.prompt_len[:, None] + torch.arange(n * T, device=jac.dev)
        fx = jac.state.text.gather(1, start).view(batch_size, T, n).cpu().numpy().copy()  # own memory: buffers are reused
        st, cnt = rec.states.cpu().numpy().copy(), rec.count.cpu().numpy().copy()
        for b in range(min(batch_size, len(prompts) - lo)):
            fixed.append(fx[b])
            for j in range(T):
                states.append(st[b, j, :cnt[b, j]])
                owner += [(lo + b) * T + j] * int(cnt[b, j])
        log(f"  trajectories: {min(lo + batch_size, len(prompts))}/{len(prompts)} prompts")
    return Trajectories.from_lists(prompts, fixed, states, owner, source, truth)


def noise_ratio(states, fixed_point):
    """(n - index of the first mismatch with the fixed point) / n, for states (S, n)."""
    n = fixed_point.shape[-1]
    diff = states != fixed_point
    first = np.where(diff.any(-1), diff.argmax(-1), n)
    return (n - first) / n


def state_ratios(traj):
    """The noise ratio of every recorded state of traj against its block's fixed point (S,), computed once
    per Trajectories (packing asks for it at every batch)."""
    if getattr(traj, "_ratios", None) is None:
        traj._ratios = noise_ratio(traj.states, traj.fixed.reshape(-1, traj.block_len)[traj.owner])
    return traj._ratios


def target_ratios(num_blocks, schedule, rng, t_min=0.0, t_max=1.0, window=16, phase=0):
    """Noise ratio wanted for each block j: progressive = a ramp from t_min to t_max that repeats
    every `window` blocks, starting `phase` blocks into it; reverse = the ramp descending; random =
    uniform draws."""
    ramp = np.linspace(t_min, t_max, window)
    j = (np.arange(num_blocks) + phase) % window
    if schedule == "progressive":
        return ramp[j]
    if schedule == "reverse":
        return ramp[::-1][j]
    if schedule == "random":
        return rng.uniform(t_min, t_max, num_blocks)
    raise ValueError(f"unknown schedule {schedule!r}")


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


def pick_state(cands, ratios, wanted, rng, fresh, tolerance):
    """Index of the state whose noise ratio is nearest `wanted`; with `fresh`, a random one among those
    within `tolerance` of the nearest (states of equal ratio differ in their tails)."""
    gap = np.abs(ratios - wanted)
    if not fresh:
        return int(gap.argmin())
    near = np.flatnonzero(gap <= gap.min() + tolerance)
    return int(near[rng.integers(len(near))])


def choose_states(traj, i, by_owner, ratios, wanted, rng, fresh, tolerance):
    """The noisy state k_j of every block j of prompt i: among its recorded states and the fixed point
    itself (ratio 0), the one whose noise ratio is nearest the schedule's wanted[j]. Returns (T, n)."""
    T, fixed = traj.fixed.shape[1], traj.fixed[i].astype(np.int64)
    noisy = []
    for j in range(T):
        lo, hi = by_owner[i * T + j], by_owner[i * T + j + 1]
        cands = np.concatenate([traj.states[lo:hi], fixed[j][None]]).astype(np.int64)   # (S + 1, n)
        noisy.append(cands[pick_state(cands, np.append(ratios[lo:hi], 0.0), wanted[j], rng, fresh, tolerance)])
    return np.stack(noisy)


def draw_packing(traj, i, schedule, rng, eot, window, fresh, by_owner, ratios):
    """One packing of prompt i: (prompt (P,), fixed point (T, n), the noisy state chosen for each block
    by the schedule (T, n), the stream index of the first end-of-text (T*n = none)). by_owner: where each
    block's states begin in traj.states; ratios: state_ratios(traj)."""
    T = traj.fixed.shape[1]
    prompt, fixed = traj.prompt(i).astype(np.int64), traj.fixed[i].astype(np.int64)
    cut = np.flatnonzero(fixed.reshape(-1) == eot)
    phase = int(rng.integers(window)) if fresh and schedule != "random" else 0
    wanted = target_ratios(T, schedule, rng, window=window, phase=phase)
    tolerance = 0.5 / max(window - 1, 1) + 1e-9
    noisy = choose_states(traj, i, by_owner, ratios, wanted, rng, fresh, tolerance)
    return prompt, fixed, noisy, int(cut[0]) if len(cut) else fixed.size


def pack(traj, rows, length, schedule, rng, eot, window=16, fresh=True, cons_window=0):
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
        prompt, fixed, noisy, valid_until = draw_packing(traj, i, schedule, rng, eot, window, fresh, by_owner, ratios)
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


@dataclass
class Rows:
    """A batch of compact training rows (numpy, (B, L) each; jfmini.masks.row_mask draws the layout):
    [windows | prompt | clean stream | truth | padding], the windows in the first `windows` slots."""
    tokens: np.ndarray
    pos: np.ndarray
    group: np.ndarray         # MAIN, TRUTH, 2 + j for block j's window, PAD
    start: np.ndarray         # a query reads MAIN keys at positions before this
    ar_targets: np.ndarray    # next clean token on the prompt and the clean stream, -1 = none
    truth_targets: np.ndarray  # next real token on the truth segment, -1 = none
    cons_weight: np.ndarray   # 1 at window slots the consistency loss applies to
    teacher: np.ndarray       # index of each window slot's clean twin (same token position)
    windows: int              # slots before the prompt: blocks x window width


def row_length(max_prompt, traj_tokens, block_len, cons_window, context="clean", truth=True, multiple=128):
    """Tokens in a compact row: windows + prompt + clean stream + truth, rounded up."""
    width = cons_window if context == "clean" and 0 < cons_window < block_len else block_len
    need = (traj_tokens // block_len) * width + max_prompt + traj_tokens * (2 if truth else 1)
    return math.ceil(need / multiple) * multiple


def pack_rows(traj, rows, length, schedule, rng, eot, window=16, fresh=True, cons_window=0, context="clean",
              truth=True):
    """Pack prompts `rows` into compact rows of `length` tokens (jfmini.masks.row_mask): the same noisy
    states as pack() draws from the same rng, and the same losses, with fewer tokens. Block j keeps a
    window of its noisy state from its first wrong token d_j, cons_window tokens wide (to the block's end
    with cons_window 0 or >= n); with context "noisy" windows are whole blocks from offset 0, since later
    blocks read them. truth adds the prompt's real continuation (the first T*n tokens of traj.truth) in
    the same row. A block whose chosen state is its fixed point has nothing to learn and no window."""
    n, T = traj.block_len, traj.fixed.shape[1]
    clean_ctx = context == "clean"
    w = cons_window if clean_ctx and 0 < cons_window < n else n
    reach = cons_window if cons_window > 0 else n
    B, base = len(rows), T * w
    zeros, none = (lambda: np.zeros((B, length), np.int64)), (lambda: np.full((B, length), -1, np.int64))  # noqa: E731
    out = Rows(tokens=zeros(), pos=zeros(), group=np.full((B, length), PAD, np.int64), start=zeros(),
               ar_targets=none(), truth_targets=none(), cons_weight=np.zeros((B, length), np.float32),
               teacher=zeros(), windows=base)
    by_owner, ratios = np.searchsorted(traj.owner, np.arange(len(traj) * T + 1)), state_ratios(traj)
    slot = np.arange(w)
    for r, i in enumerate(rows):
        prompt, fixed, noisy, valid_until = draw_packing(traj, i, schedule, rng, eot, window, fresh, by_owner, ratios)
        P, clean = len(prompt), fixed.reshape(-1)
        S = len(clean)
        real = traj.truth[i][:S] if truth else np.zeros(0, np.int64)
        G = int(np.argmax(real < 0)) if np.any(real < 0) else len(real)
        end = base + P + S + G
        if end > length:
            raise ValueError(f"compact row of {end} tokens exceeds length {length}")
        seg = slice(base, base + P + S)                              # prompt, then the clean stream: MAIN
        out.tokens[r, seg], out.pos[r, seg], out.group[r, seg] = np.concatenate([prompt, clean]), np.arange(P + S), MAIN
        nxt = np.append(clean[1:], -1)
        out.ar_targets[r, seg] = np.concatenate([prompt[1:], clean[:1], np.where(np.arange(S) < valid_until, nxt, -1)])
        if G:                                                        # p' then the truth, from position P - 1
            seg = slice(base + P + S, end)
            out.tokens[r, seg] = np.concatenate([prompt[-1:], real[:G - 1]])
            out.pos[r, seg], out.group[r, seg], out.start[r, seg] = np.arange(P - 1, P + G - 1), TRUTH, P - 1
            out.truth_targets[r, seg] = real[:G]
        for j, k in enumerate(noisy):
            diff = np.flatnonzero(k != fixed[j])
            if clean_ctx and not len(diff):                          # the fixed point itself: nothing to learn
                continue
            d = int(diff[0]) if len(diff) else n                     # (noisy context: later windows read it)
            t = (d if clean_ctx else 0) + slot                       # block offsets in the window
            on = t < n
            cols = j * w + slot[on]
            out.tokens[r, cols], out.pos[r, cols] = k[t[on]], P + j * n + t[on]
            out.group[r, cols], out.start[r, cols] = 2 + j, P + j * n + t[0] if clean_ctx else P
            out.teacher[r, cols] = base + P + j * n + t[on]
            out.cons_weight[r, cols] = (t[on] >= d) & (t[on] < d + reach) & (j * n + t[on] < valid_until)
    return out


class SoftCrossEntropy(torch.autograd.Function):
    """sum_i weight_i * CE(p_i, softmax(h_i @ W.T)) over positions i, without a (positions, V) tensor:
    chunks of `chunk` positions, each chunk's gradient made in the forward pass (backward only scales it).
    p_i is one-hot at labels_i, or softmax(target_h_i @ target_W.T) (the anchor's distribution, or the
    model's own detached one). Also returns per position (no gradient) the cross-entropy and the
    entropy of p_i, so KL(p || q) = CE - entropy. W: (V_padded, D), the tied head; columns past `vocab`
    are padding, never predicted. Gradients reach h and W only: the targets and weights are constants
    (pass the model's own hidden states as target_h for a detached teacher)."""

    @staticmethod
    def forward(ctx, h, W, weight, labels, target_h, target_W, vocab, chunk, fn):
        N, dt = h.shape[0], h.dtype
        Wc = W.to(dt)
        tWc = target_W.to(dt) if target_W is not None else None
        pad = torch.zeros(W.shape[0], device=h.device)
        pad[vocab:] = -1e9
        grad_h, grad_W = torch.empty_like(h), torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        ce, ent, total = torch.empty(N, device=h.device), torch.empty(N, device=h.device), 0.0
        for lo in range(0, N, chunk):
            sl = slice(lo, lo + chunk)
            t = target_h[sl] if target_h is not None else None
            lab = labels[sl] if labels is not None else None
            loss, ce[sl], ent[sl], grad_h[sl], gW = fn(h[sl], Wc, pad, weight[sl], lab, t, tWc)
            grad_W += gW
            total = total + loss
        ctx.save_for_backward(grad_h, grad_W)
        ctx.w_dtype = W.dtype
        ctx.mark_non_differentiable(ce, ent)
        return total, ce, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _ce, _ent):
        grad_h, grad_W = ctx.saved_tensors
        return g * grad_h, (g * grad_W).to(ctx.w_dtype), None, None, None, None, None, None, None


def ce_chunk(h, W, pad, weight, labels, target_h, target_W):
    """One chunk of SoftCrossEntropy: (weighted sum, CE, entropy of the target, dL/dh, dL/dW). Written
    as plain tensor code; torch.compile fuses it so the chunk's logits are read a few times at most."""
    z = (h @ W.T).float() + pad                                       # (C, V) logits
    lse = z.logsumexp(-1)
    q = (z - lse[:, None]).exp()
    if labels is not None:
        lab = labels.clamp(min=0)
        ce = lse - z.gather(1, lab[:, None])[:, 0]
        ent = torch.zeros_like(ce)
        g = q.scatter_add(1, lab[:, None], torch.full_like(q[:, :1], -1.0))
    else:
        lt = ((target_h @ target_W.T).float() + pad).log_softmax(-1)
        p = lt.exp()
        ce, ent = lse - (p * z).sum(-1), -(p * lt).sum(-1)
        g = q - p
    g = (g * weight[:, None]).to(h.dtype)
    return (weight * ce).sum(), ce, ent, g @ W, (g.T @ h).float()


def autocast_dtype(t):
    """The dtype autocast gives matmuls on t's device (t's own dtype where autocast is off)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def soft_cross_entropy(h, W, weight, vocab, labels=None, target_h=None, target_W=None, chunk=2048, fn=ce_chunk):
    """SoftCrossEntropy over h (N, D): labels (N,) (-1 = none, weight it 0) or target_h (N, D) with
    target_W. Pads N to whole chunks. Returns (weighted sum, CE (N,), target entropy (N,))."""
    N = h.shape[0]
    extra = -N % chunk
    if extra:
        grow = lambda a, v=0: None if a is None else torch.cat([a, a.new_full((extra,) + a.shape[1:], v)])  # noqa: E731
        h, weight, labels, target_h = grow(h), grow(weight), grow(labels, -1), grow(target_h)
    total, ce, ent = SoftCrossEntropy.apply(h, W, weight, labels, target_h, target_W, vocab, chunk, fn)
    return total, ce[:N], ent[:N]


def row_objective(model, anchor, cons_target="soft", ar_target="greedy", replay="kl", truth="anchor",
                  autocast=contextlib.nullcontext, chunk_fn=ce_chunk, chunk=2048):
    """The whole objective of a round on compact rows (pack_rows), as loss(batch, mask, lam, w_replay,
    w_truth, x, y) -> (L, {term: value}):

        L = consistency + lam * AR                 (the paper's: soft or hard consistency on the windows,
                                                    AR on the prompt and clean stream; noise-aware mask)
              + w_replay * replay                  (jfmini: corpus text x, y; ce, or kl from the anchor)
              + w_truth * truth                    (jfmini: the prompt's real code; ce, or anchor KL)

    One forward of the model and (for the KL terms) one of the frozen anchor per row; the head and the
    losses run a chunk of positions at a time (soft_cross_entropy), so no (B, L, V) tensor is made.
    ar_target 'anchor' makes AR the KL from the anchor on the clean stream (jfmini's; 'greedy' = the
    paper's cross-entropy to the greedy tokens). batch: Rows as tensors (tokens, pos, ar_targets,
    truth_targets, cons_weight, teacher) and windows, an int. The weights are tensors or floats: changing
    one recompiles nothing."""
    raw = getattr(model, "module", model)                           # under DDP
    raw = getattr(raw, "_orig_mod", raw)                            # under torch.compile
    truth_kind = truth or ar_target                                 # truth None: no truth term, so its kind is moot
    anchored_rows = ar_target == "anchor" or truth_kind == "anchor"
    shared_pass = (ar_target == "anchor") == (truth_kind == "anchor")   # AR and truth: one pass, same kind of target

    def loss(b, mask, lam, w_replay=0.0, w_truth=0.0, x=None, y=None):
        W, V = raw.embed.weight, raw.cfg.vocab_size                  # the tied head
        with autocast():
            h = model(b.tokens, b.pos, mask, hidden=True)             # (B, L, D)
            h = h.to(autocast_dtype(h))                               # RMSNorm gives float32 under autocast
            with torch.no_grad():
                a = anchor(b.tokens, b.pos, mask, hidden=True) if anchored_rows else None
                a = a.to(autocast_dtype(a)) if a is not None else None
        B, L, D = h.shape
        k = b.windows
        # consistency, on the window slots: the teacher is the clean twin's distribution, detached
        cw = b.cons_weight[:, :k].reshape(-1)
        if cons_target == "hard":
            labels = b.ar_targets.gather(1, b.teacher[:, :k]).reshape(-1)
            cw = cw * (labels >= 0)
            pc, pc_ce, _ = soft_cross_entropy(h[:, :k].reshape(-1, D), W, cw / cw.sum().clamp(min=1), V, labels,
                                              chunk=chunk, fn=chunk_fn)
        else:
            twin = h.detach().gather(1, b.teacher[:, :k, None].expand(-1, -1, D)).reshape(-1, D)
            pc, pc_ce, _ = soft_cross_entropy(h[:, :k].reshape(-1, D), W, cw / cw.sum().clamp(min=1), V,
                                              target_h=twin, target_W=W.detach(), chunk=chunk, fn=chunk_fn)
        # AR (prompt + clean stream) and truth, on the rest of the row
        hm = h[:, k:].reshape(-1, D)
        ar_t, tr_t = b.ar_targets[:, k:].reshape(-1), b.truth_targets[:, k:].reshape(-1)
        ar_on, tr_on = (ar_t >= 0).float(), (tr_t >= 0).float()
        w_ar, w_tr = lam * ar_on / ar_on.sum().clamp(min=1), w_truth * tr_on / tr_on.sum().clamp(min=1)
        am = a[:, k:].reshape(-1, D) if a is not None else None
        parts = {}                                                   # term: (CE, target entropy) per position
        if shared_pass:                                              # their positions differ, so one pass serves both
            both = dict(target_h=am, target_W=anchor.embed.weight) if ar_target == "anchor" else \
                dict(labels=torch.where(ar_t >= 0, ar_t, tr_t))
            main, c, e = soft_cross_entropy(hm, W, w_ar + w_tr, V, chunk=chunk, fn=chunk_fn, **both)
            main = main - ((w_ar + w_tr) * e).sum()                  # KL = CE - entropy (0 for labels)
            parts["AR"] = parts["truth"] = (c, e)
            total = pc + main
        else:
            total = pc
            for name, wt, t in (("AR", w_ar, ar_t), ("truth", w_tr, tr_t)):
                kind = ar_target if name == "AR" else truth_kind
                spec = dict(target_h=am, target_W=anchor.embed.weight) if kind == "anchor" else dict(labels=t)
                part, c, e = soft_cross_entropy(hm, W, wt, V, chunk=chunk, fn=chunk_fn, **spec)
                parts[name] = (c, e)
                total = total + part - (wt * e).sum()
        value = lambda name, on: (on * (parts[name][0] - parts[name][1])).sum() / on.sum().clamp(min=1)  # noqa: E731
        terms = {"consistency": pc.detach(), "AR": value("AR", ar_on).detach(), "replay": torch.zeros_like(pc),
                 "truth": value("truth", tr_on).detach()}
        if x is not None:                                            # replay: plain causal text
            pos = torch.arange(x.shape[1], device=x.device)
            with autocast():
                hr = model(x, pos, hidden=True)
                hr = hr.to(autocast_dtype(hr))
                with torch.no_grad():
                    ar_ = anchor(x, pos, hidden=True) if replay == "kl" else None
                    ar_ = ar_.to(autocast_dtype(ar_)) if ar_ is not None else None
            yf = y.reshape(-1)
            on = (yf >= 0).float()
            spec = dict(target_h=ar_.reshape(-1, D), target_W=anchor.embed.weight) if replay == "kl" else dict(labels=yf)
            wr = w_replay * on / on.sum().clamp(min=1)
            rp, c, e = soft_cross_entropy(hr.reshape(-1, D), W, wr, V, chunk=chunk, fn=chunk_fn, **spec)
            total = total + rp - (wr * e).sum()
            terms["replay"] = ((on * (c - e)).sum() / on.sum().clamp(min=1)).detach()
        return total, terms
    return loss


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
    hard = cross-entropy to the fixed point's next token (the clean distribution's argmax).
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


class Recorder:
    """The Jacobi decoder's pre_step hook behind jfmini.forcing.collect_trajectories: before every
    iteration it stores each row's current block as n tokens (committed part + drafts), graph-safe."""

    def __init__(self, jac, num_blocks):
        B, n = jac.B, jac.n
        self.T = num_blocks
        self.states = torch.zeros(B, num_blocks, n, n, dtype=torch.long, device=jac.dev)
        self.count = torch.zeros(B, num_blocks, dtype=torch.long, device=jac.dev)

    def tensors(self):
        """The recorder's state: the decoder puts it back after the warm-up steps of a CUDA graph capture
        (without that, the first batch's block 0 counted 4 extra iterations and the states of every later
        block were filed under the wrong block)."""
        return [self.states, self.count]

    def __call__(self, jac):
        n, slot, bidx, s = jac.n, jac.arange_n, jac.bidx, jac.state
        committed = n - s.block0_left                              # (B,) tokens of the block already committed
        first = s.length - committed                               # block start position
        blk = ((first - s.prompt_len) // n).clamp(max=self.T - 1)
        from_text = s.text.gather(1, (first[:, None] + slot).clamp(max=jac.C - 1))
        from_draft = s.draft.gather(1, (slot - committed[:, None]).clamp(0, jac.W - 1))
        state = torch.where(slot < committed[:, None], from_text, from_draft)   # (B, n)
        k = self.count[bidx, blk].clamp(max=n - 1)
        ok = ~s.done
        self.states[bidx, blk, k] = torch.where(ok[:, None], state, self.states[bidx, blk, k])
        self.count[bidx, blk] += ok.long()


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
        p = pack(traj, range(lo, min(lo + batch, len(traj))), L, "progressive", rng, eot, window=min(16, T))
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
