"""Jacobi Forcing: trajectories, the progressive noise schedule, packing and the whole objective.

    model --Jacobi decode prompts, record every state of every block--> Trajectories   collect_trajectories
    Trajectories --noise schedule: pick a noisy state k_j per block--> training rows   target_ratios, pack_rows
    rows --one forward with the noise-aware mask--> L = L_pc + lambda * L_AR            RowObjective

Trajectories are collected by the decoder's own Jacobi iteration (jfmini.jacobi.Jacobi) with a hook that
records each block's state before every iteration (Recorder). The paper packs rows [prompt | k_0 | l_0 |
k_1 | l_1 | ...] (drawn in jfmini/masks.py; jfmini/tools/paper.py writes that layout and its loss
literally, the reference the tests check this file against). Training packs compact rows instead
(pack_rows, jfmini.masks.row_mask): the same losses, with every token no loss needs left out. Beyond the
paper, marked "jfmini" where they appear: a consistency window (cons_window); the KL anchor (the AR term
as a KL divergence from a frozen anchor model, train.py's base model by default, instead of cross-entropy
to the greedy tokens); a replay term on corpus text; and a term on the real code after each trajectory
prompt (the truth segment).
"""
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from jfmini.jacobi import Jacobi
from jfmini.masks import MAIN, PAD, TRUTH
from jfmini.runtime.chunked_ce import ce_chunk, hidden_states, soft_cross_entropy
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
        rec.states.zero_(), rec.count.zero_()
        jac.decode_batch(chunk, n * T)                               # at most n iterations per block
        start = jac.state.prompt_len[:, None] + torch.arange(n * T, device=jac.dev)
        fx = jac.state.text.gather(1, start).view(batch_size, T, n).cpu().numpy().copy()  # copies: buffers are reused
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


def target_ratios(num_blocks, schedule, rng, t_min=0.0, t_max=1.0, noise_window=16, phase=0):
    """Noise ratio wanted for each block j: progressive = a ramp from t_min to t_max that repeats
    every `noise_window` blocks, starting `phase` blocks into it; reverse = the ramp descending; random =
    uniform draws."""
    ramp = np.linspace(t_min, t_max, noise_window)
    j = (np.arange(num_blocks) + phase) % noise_window
    if schedule == "progressive":
        return ramp[j]
    if schedule == "reverse":
        return ramp[::-1][j]
    if schedule == "random":
        return rng.uniform(t_min, t_max, num_blocks)
    raise ValueError(f"unknown schedule {schedule!r}")


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


def draw_packing(traj, i, schedule, rng, eot, noise_window, fresh, by_owner, ratios):
    """One packing of prompt i: (prompt (P,), fixed point (T, n), the noisy state chosen for each block
    by the schedule (T, n), the stream index of the first end-of-text (T*n = none)). by_owner: where each
    block's states begin in traj.states; ratios: state_ratios(traj)."""
    T = traj.fixed.shape[1]
    prompt, fixed = traj.prompt(i).astype(np.int64), traj.fixed[i].astype(np.int64)
    cut = np.flatnonzero(fixed.reshape(-1) == eot)
    phase = int(rng.integers(noise_window)) if fresh and schedule != "random" else 0
    wanted = target_ratios(T, schedule, rng, noise_window=noise_window, phase=phase)
    tolerance = 0.5 / max(noise_window - 1, 1) + 1e-9          # half a step of the ramp
    noisy = choose_states(traj, i, by_owner, ratios, wanted, rng, fresh, tolerance)
    return prompt, fixed, noisy, int(cut[0]) if len(cut) else fixed.size


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


def pack_rows(traj, rows, length, schedule, rng, eot, noise_window=16, fresh=True, cons_window=0, context="clean",
              truth=True):
    """Pack prompts `rows` into compact rows of `length` tokens (jfmini.masks.row_mask): the same noisy
    states as jfmini.tools.paper.pack draws from the same rng, and the same losses, with fewer tokens. Block
    j keeps a window of its noisy state from its first wrong token d_j, cons_window tokens wide (to the end
    of the block with cons_window 0 or >= n); with context "noisy" windows are whole blocks from offset 0,
    since later blocks read them. truth adds the prompt's real continuation (the first T*n tokens of
    traj.truth) in the same row. A block whose chosen state is its fixed point has no window."""
    n, T = traj.block_len, traj.fixed.shape[1]
    clean_ctx = context == "clean"
    w = cons_window if clean_ctx and 0 < cons_window < n else n     # a window's width: slots per block
    reach = cons_window if cons_window > 0 else n                  # the consistency loss's reach from d_j
    B, base = len(rows), T * w
    zeros, none = (lambda: np.zeros((B, length), np.int64)), (lambda: np.full((B, length), -1, np.int64))  # noqa: E731
    out = Rows(tokens=zeros(), pos=zeros(), group=np.full((B, length), PAD, np.int64), start=zeros(),
               ar_targets=none(), truth_targets=none(), cons_weight=np.zeros((B, length), np.float32),
               teacher=zeros(), windows=base)
    by_owner, ratios = np.searchsorted(traj.owner, np.arange(len(traj) * T + 1)), state_ratios(traj)
    slot = np.arange(w)
    for r, i in enumerate(rows):
        prompt, fixed, noisy, valid_until = draw_packing(traj, i, schedule, rng, eot, noise_window, fresh, by_owner,
                                                         ratios)
        P, clean = len(prompt), fixed.reshape(-1)        # valid_until: no targets past the first end-of-text
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
            out.group[r, cols], out.start[r, cols] = 2 + j, (P + j * n + t[0] if clean_ctx else P)  # reads MAIN before
            out.teacher[r, cols] = base + P + j * n + t[on]
            out.cons_weight[r, cols] = (t[on] >= d) & (t[on] < d + reach) & (j * n + t[on] < valid_until)
    return out


def consistency_term(h, b, W, V, hard, **chunking):
    """L_pc on the window slots: the cross-entropy from the clean twin's distribution (detached; hard: the
    fixed point's next token) to the noisy position's, averaged over the slots cons_weight keeps."""
    k, D = b.windows, h.shape[-1]
    cw = b.cons_weight[:, :k].reshape(-1)
    if hard:
        labels = b.ar_targets.gather(1, b.teacher[:, :k]).reshape(-1)
        cw = cw * (labels >= 0)
        target = dict(labels=labels)
    else:
        twin = h.detach().gather(1, b.teacher[:, :k, None].expand(-1, -1, D)).reshape(-1, D)
        target = dict(target_h=twin, target_W=W.detach())
    return soft_cross_entropy(h[:, :k].reshape(-1, D), W, cw / cw.sum().clamp(min=1), V, **target, **chunking)[0]


def mean(values, on):
    return (on * values).sum() / on.sum().clamp(min=1)


class RowObjective:
    """The whole objective of a round on compact rows (pack_rows): objective(batch, mask, lam, w_replay,
    w_truth, x, y) -> (L, {term: value}), L = consistency + lam * AR + w_replay * replay + w_truth * truth:

    term         positions                     target (train.py flag: default; other)     why
    consistency  noisy windows, from the first the clean twin's distribution, detached     the paper's L_pc
                 wrong token d_j (cons_weight) (--cons_target soft; hard: its next token)
    AR           prompt + clean stream         KL from the anchor (--ar_target anchor;     the paper's L_AR (KL:
                                               greedy, the paper's: CE to the tokens)      keeps base predictions)
    replay       corpus text x, y              KL from the anchor (--anchor kl; ce)        jfmini: keeps val loss
    truth        the prompt's real code        KL from the anchor (--truth_target anchor;  jfmini: keeps real-code
                                               ce: cross-entropy to the real tokens)       predictions

    The anchor is a frozen model (train.py: the base). AR, replay and truth log their KL, consistency its
    cross-entropy (floor: the teacher's entropy). Losses run a chunk of positions at a time
    (jfmini.runtime.chunked_ce). The weights are tensors or floats: changing one recompiles nothing."""

    def __init__(self, model, anchor, cons_target="soft", ar_target="greedy", replay_target="kl",
                 truth_target="anchor", autocast=contextlib.nullcontext, chunk_fn=ce_chunk, chunk=2048):
        raw = getattr(model, "module", model)                       # under DDP
        self.raw = getattr(raw, "_orig_mod", raw)                   # under torch.compile
        self.model, self.anchor, self.autocast, self.chunking = model, anchor, autocast, dict(chunk=chunk, fn=chunk_fn)
        self.hard = cons_target == "hard"
        self.ar_to_anchor = ar_target == "anchor"
        self.truth_to_anchor = (truth_target or ar_target) == "anchor"  # None (w_truth 0): as AR, one pass
        self.replay_to_anchor = replay_target == "kl"

    def __call__(self, b, mask, lam, w_replay=0.0, w_truth=0.0, x=None, y=None):
        h = hidden_states(self.model, b.tokens, b.pos, mask, self.autocast)                     # (B, L, D)
        anchored = self.ar_to_anchor or self.truth_to_anchor
        a = hidden_states(self.anchor, b.tokens, b.pos, mask, self.autocast, grad=False) if anchored else None
        pc = consistency_term(h, b, self.raw.embed.weight, self.raw.cfg.vocab_size, self.hard, **self.chunking)
        ar_and_truth, ar, tr = self.clean_stream(h, a, b, lam, w_truth)
        rp, rp_kl = self.replay_term(x, y, w_replay) if x is not None else (0.0, torch.zeros_like(pc))
        total = pc + ar_and_truth + rp                              # L, as above
        return total, {"consistency": pc.detach(), "AR": ar.detach(), "replay": rp_kl.detach(), "truth": tr.detach()}

    def divergence(self, h, weight, to_anchor, labels, a):
        """sum weight * KL(target || model) over the positions of h (N, D), and the KL at each: the target is
        the anchor's distribution (its hidden states a) or labels, whose entropy is 0. KL = the chunked
        cross-entropy minus the target's entropy."""
        target = dict(target_h=a, target_W=self.anchor.embed.weight) if to_anchor else dict(labels=labels)
        total, ce, ent = soft_cross_entropy(h, self.raw.embed.weight, weight, self.raw.cfg.vocab_size, **target,
                                            **self.chunking)
        return total - (weight * ent).sum(), ce - ent

    def clean_stream(self, h, a, b, lam, w_truth):
        """lam * AR (the prompt and the clean stream) + w_truth * truth (the prompt's real code), on the row
        after its windows; and each term's mean KL. Their positions never overlap, so when both have the same
        kind of target one chunked pass serves both, with the AR tokens' or the truth's labels at each."""
        k, D = b.windows, h.shape[-1]
        hm, am = h[:, k:].reshape(-1, D), a[:, k:].reshape(-1, D) if a is not None else None
        ar_t, tr_t = b.ar_targets[:, k:].reshape(-1), b.truth_targets[:, k:].reshape(-1)
        ar_on, tr_on = (ar_t >= 0).float(), (tr_t >= 0).float()
        w_ar, w_tr = lam * ar_on / ar_on.sum().clamp(min=1), w_truth * tr_on / tr_on.sum().clamp(min=1)
        if self.ar_to_anchor == self.truth_to_anchor:
            both, kl = self.divergence(hm, w_ar + w_tr, self.ar_to_anchor, torch.where(ar_t >= 0, ar_t, tr_t), am)
            return both, mean(kl, ar_on), mean(kl, tr_on)
        ar, ar_kl = self.divergence(hm, w_ar, self.ar_to_anchor, ar_t, am)
        tr, tr_kl = self.divergence(hm, w_tr, self.truth_to_anchor, tr_t, am)
        return ar + tr, mean(ar_kl, ar_on), mean(tr_kl, tr_on)

    def replay_term(self, x, y, w_replay):
        """w_replay * replay on plain causal corpus text x, y (jfmini's), and its mean KL."""
        pos, y, to_anchor = torch.arange(x.shape[1], device=x.device), y.reshape(-1), self.replay_to_anchor
        hr = hidden_states(self.model, x, pos, None, self.autocast).flatten(0, 1)                 # (B * L, D)
        ar = hidden_states(self.anchor, x, pos, None, self.autocast, grad=False).flatten(0, 1) if to_anchor else None
        on = (y >= 0).float()
        total, kl = self.divergence(hr, w_replay * on / on.sum().clamp(min=1), to_anchor, y, ar)
        return total, mean(kl, on)


class Recorder:
    """The Jacobi decoder's pre_step hook behind jfmini.forcing.collect_trajectories: before every
    iteration it stores each row's current block as n tokens (committed part + drafts), graph-safe."""

    def __init__(self, jac, num_blocks):
        B, n = jac.B, jac.n
        self.T = num_blocks
        self.states = torch.zeros(B, num_blocks, n, n, dtype=torch.long, device=jac.dev)
        self.count = torch.zeros(B, num_blocks, dtype=torch.long, device=jac.dev)

    def tensors(self):
        """The recorder's state: the decoder puts it back after the warm-up steps of a CUDA graph capture,
        which would otherwise count as iterations of the first batch's block 0."""
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

