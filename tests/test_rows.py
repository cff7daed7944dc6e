"""Compact training rows: the same losses and gradients as the paper's layout, with fewer tokens."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EOT, cuda, tiny_model
from jfmini.forcing import RowObjective, pack_rows, row_length
from jfmini.masks import MAIN, PAD, TRUTH, row_mask
from jfmini.runtime.attention import dense_mask
from jfmini.runtime.chunked_ce import ce_chunk, soft_cross_entropy
from jfmini.runtime.trajectories import Trajectories
from jfmini.tools.paper import forcing_loss, kl, masked_mean, noise_aware_mask, pack, packed_length


# ----------------------------------------------------------------------------- the reference: the paper's layout

def truth_rows(traj, rows, length):
    """The truth term's rows as separate causal text: [prompt | its true continuation] for an AR loss on real code:
    (tokens, targets), (B, length) each; the targets are the continuation's tokens (the prompt's last
    token predicts the first)."""
    tokens, targets = np.zeros((len(rows), length), np.int64), np.full((len(rows), length), -1, np.int64)
    for r, i in enumerate(rows):
        prompt, truth = traj.prompt(i).astype(np.int64), traj.truth[i].astype(np.int64)
        truth = truth[:max(0, min(int(np.argmax(truth < 0)) if np.any(truth < 0) else len(truth), length - len(prompt)))]
        row = np.concatenate([prompt, truth])
        tokens[r, :len(row)] = row
        targets[r, len(prompt) - 1:len(row) - 1] = truth
    return tokens, targets


def reference_loss(model, anchor, p, gx, gy, x, y, n, context, cons_target, ar_target, replay, truth, lam, w_replay,
                   w_truth):
    """L = consistency + lam * AR + w_replay * replay + w_truth * truth, computed the literal way: the
    paper's packed row [prompt | k_0 | l_0 | ...] under noise_aware_mask, full (B, L, V) logits, and the
    truth and replay rows as separate causal forwards."""
    t = {k: torch.from_numpy(getattr(p, k)) for k in ("tokens", "pos", "ar_targets", "noisy_idx", "cons_weight")}
    B, L = t["tokens"].shape
    mask = dense_mask(noise_aware_mask(torch.from_numpy(p.prompt_len), torch.from_numpy(p.pad_start), n, context), B, L)
    logits = model(t["tokens"], t["pos"], mask)
    ref = anchor(t["tokens"], t["pos"], mask) if ar_target == "anchor" else None
    pc, ar = forcing_loss(logits, t["ar_targets"], t["noisy_idx"], t["cons_weight"], n, cons_target, ref)

    def causal(xx, yy, target):
        pos = torch.arange(xx.shape[1])
        lg = model(xx, pos)
        if target == "ce":
            return F.cross_entropy(lg.flatten(0, 1), yy.flatten(), ignore_index=-1)
        return masked_mean(kl(anchor(xx, pos), lg), (yy >= 0).float())

    terms = {"consistency": pc, "AR": ar,
             "replay": causal(x, y, replay) if x is not None else torch.zeros(()),
             "truth": causal(gx, gy, truth) if gx is not None else torch.zeros(())}
    return terms["consistency"] + lam * terms["AR"] + w_replay * terms["replay"] + w_truth * terms["truth"], terms


def trajectories_with_truth(seed, n=4, T=3, N=5, eot_in=True):
    """Random trajectories (prompts of 3..9 tokens, each block with 1..n recorded states that agree with the
    fixed point up to a random first wrong token) and a ground truth of random length after each prompt."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 250, rng.integers(1, 10)) for _ in range(N)]
    fixed = rng.integers(0, 250, (N, T, n))
    if eot_in:
        fixed[0, T - 1, n // 2] = EOT                    # an end-of-text inside the last block
    states, owner = [], []
    for i in range(N):
        for j in range(T):
            for first in sorted(rng.choice(np.arange(0, n + 1), rng.integers(1, n + 2), replace=False)):
                s = fixed[i, j].copy()
                s[first:] = (s[first:] + 1 + rng.integers(0, 50, n - first)) % 250
                states.append(s)
                owner.append(i * T + j)
    truth = np.full((N, n * T), -1, np.int32)
    for i in range(N):
        k = rng.integers(0, n * T + 1)
        truth[i, :k] = rng.integers(0, 250, k)
    lens = [len(q) for q in prompts]
    return Trajectories(np.concatenate(prompts).astype(np.uint16), np.concatenate([[0], np.cumsum(lens)]),
                        fixed.astype(np.uint16), np.asarray(states, np.uint16), np.asarray(owner), truth=truth)


GRID = [dict(context=c, cons_window=w, cons_target=ct, ar_target=a, truth=tr, replay=rp)
        for c, w, ct, a, tr, rp in itertools.product(("clean", "noisy"), (0, 1, 2, 4, 7), ("soft", "hard"),
                                                     ("anchor", "greedy"), ("anchor", "ce", None), ("kl", "ce", None))
        if (w in (0, 2) or (a, tr, rp) == ("anchor", "anchor", "kl"))                   # windows: the default terms
        and (c == "clean" or (a, tr) == ("anchor", "anchor") and rp != "ce")]           # noisy context: both targets


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_compact_rows_give_the_papers_layout_loss_terms_and_gradients(case, seed):
    """Same trajectories, same noisy states (same rng), float32: the compact row's loss, every term and
    every weight's gradient equal the literal layout's, for both contexts, windows, targets and terms."""
    n, T = 4, 3
    traj = trajectories_with_truth(seed, n, T)
    rows = [0, 3, 1, 4]
    lam, w_replay, w_truth = 10.0, 5.0 if case["replay"] else 0.0, 5.0 if case["truth"] else 0.0
    if case["truth"] == "ce" and not any((traj.truth[i] >= 0).any() for i in rows):
        pytest.skip("no truth token to score: the reference's cross-entropy of nothing is NaN")
    model, anchor = tiny_model(seed), tiny_model(seed + 7)
    model.train()
    anchor.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 257, (2, 11), generator=g) if case["replay"] else None
    y = torch.randint(-1, 257, (2, 11), generator=g) if case["replay"] else None
    kw = dict(noise_window=3, fresh=True, cons_window=case["cons_window"])
    p = pack(traj, rows, packed_length(9, n, T), "progressive", np.random.default_rng(seed), EOT, **kw)
    gx = gy = None
    if case["truth"]:
        gx, gy = map(torch.from_numpy, truth_rows(traj, rows, 9 + n * T))
    ref, ref_terms = reference_loss(model, anchor, p, gx, gy, x, y, n, case["context"], case["cons_target"],
                                    case["ar_target"], case["replay"], case["truth"], lam, w_replay, w_truth)
    ref.backward()
    ref_grads = {k: v.grad.clone() for k, v in model.named_parameters()}
    model.zero_grad()

    L = row_length(9, n * T, n, case["cons_window"], case["context"], truth=bool(case["truth"]), multiple=8)
    r = pack_rows(traj, rows, L, "progressive", np.random.default_rng(seed), EOT, context=case["context"],
                  truth=bool(case["truth"]), **kw)
    b = as_tensors(r)
    mask = dense_mask(row_mask(b.group, b.pos, b.start, case["context"]), len(rows), L)
    loss_fn = RowObjective(model, anchor, case["cons_target"], case["ar_target"], case["replay"] or "kl",
                            case["truth"] or "anchor", chunk=7)
    got, terms = loss_fn(b, mask, lam, w_replay, w_truth, x, y)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for k in ("consistency", "AR", "replay") + (("truth",) if case["truth"] else ()):
        assert terms[k].item() == pytest.approx(ref_terms[k].item(), rel=1e-5, abs=1e-6), k
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_row_objective_gives_the_head_autocast_dtype_hidden_states():
    """Under autocast the hidden states (RMSNorm output, float32) are cast to the autocast dtype before
    the head's chunked matmuls, for the row, the anchor and the replay."""
    n, T, seed = 4, 3, 0
    traj = trajectories_with_truth(seed, n, T)
    rows = [0, 3, 1, 4]
    model, anchor = tiny_model(seed), tiny_model(seed + 7)
    anchor.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 257, (2, 11), generator=g), torch.randint(-1, 257, (2, 11), generator=g)
    L = row_length(9, n * T, n, 2, "clean", truth=True, multiple=8)
    r = pack_rows(traj, rows, L, "progressive", np.random.default_rng(seed), EOT, noise_window=3, fresh=True,
                  cons_window=2, context="clean", truth=True)
    b = as_tensors(r)
    mask = dense_mask(row_mask(b.group, b.pos, b.start, "clean"), len(rows), L)
    seen = []

    def chunk_fn(h, W, pad, weight, labels, target_h, target_W):
        seen.append((h.dtype, None if target_h is None else target_h.dtype))
        return ce_chunk(h, W, pad, weight, labels, target_h, target_W)

    loss_fn = RowObjective(model, anchor, "soft", "anchor", "kl", "ce", chunk=7, chunk_fn=chunk_fn,
                            autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    got, _ = loss_fn(b, mask, 10.0, 5.0, 5.0, x, y)
    got.backward()
    assert seen and all(d == torch.bfloat16 and t in (None, torch.bfloat16) for d, t in seen), seen
    assert torch.isfinite(got)


class as_tensors:
    def __init__(self, r):
        for k, v in vars(r).items():
            setattr(self, k, torch.from_numpy(v) if isinstance(v, np.ndarray) else v)


def test_the_masks_worked_example_is_what_row_mask_computes():
    """The table in row_mask's docstring, cell by cell."""
    names = "k0a k0b k1b . p0 p1 l0a l0b l1a l1b p' t0 t1".split()
    group = torch.tensor([[2, 2, 3, PAD, MAIN, MAIN, MAIN, MAIN, MAIN, MAIN, TRUTH, TRUTH, TRUTH]])
    pos = torch.tensor([[2, 3, 5, 0, 0, 1, 2, 3, 4, 5, 1, 2, 3]])
    start = torch.tensor([[2, 2, 5, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]])
    got = dense_mask(row_mask(group, pos, start), 1, len(names))[0, 0].int()
    import jfmini.masks
    lines = [ln.split() for ln in jfmini.masks.row_mask.__doc__.splitlines() if ln.split()[:1] and ln.split()[0] in names
             and len(ln.split()) == len(names) + 1]
    table = torch.tensor([[1 if c == "1" else 0 for c in ln[1:]] for ln in lines])
    assert [ln[0] for ln in lines] == names
    assert torch.equal(got, table)


def test_compact_rows_hold_windows_from_the_first_wrong_token_and_clean_twins_as_teachers():
    n, T = 4, 3
    traj = trajectories_with_truth(3, n, T, eot_in=False)
    r = pack_rows(traj, [2], row_length(9, n * T, n, 2), "random", np.random.default_rng(0), EOT, cons_window=2)
    P = len(traj.prompt(2))
    for j in range(T):
        cols = np.flatnonzero(r.group[0] == 2 + j)
        if not len(cols):
            continue
        k_pos = r.pos[0, cols]
        assert np.all(np.diff(k_pos) == 1) and len(cols) <= 2
        d = k_pos[0] - P - j * n
        assert traj.fixed[2, j, d] != r.tokens[0, cols[0]]          # the window starts at the first wrong token
        assert np.all(r.start[0, cols] == k_pos[0])
        twins = r.teacher[0, cols]
        assert np.all(r.pos[0, twins] == k_pos) and np.all(r.group[0, twins] == MAIN)
        assert list(r.tokens[0, twins]) == list(traj.fixed[2, j, d:d + len(cols)])


def test_row_length_fits_the_longest_row_and_is_the_same_for_every_round_of_a_run():
    assert row_length(192, 256, 32, 8) == 768          # 8 windows of 8 + 192 + 256 + 256
    assert row_length(192, 256, 16, 8) == 896          # 16 windows of 8 + 704, rounded up to 128
    assert row_length(192, 256, 32, 0) == 1024         # whole blocks: 256 + 704, rounded up


@cuda
@pytest.mark.parametrize("context", ["clean", "noisy"])
def test_flex_attention_under_row_mask_equals_the_dense_mask(context):
    from jfmini.runtime.attention import flex_mask
    n, T = 4, 3
    traj = trajectories_with_truth(5, n, T)
    L = row_length(9, n * T, n, 2, context, multiple=128)
    r = as_tensors(pack_rows(traj, [0, 1, 2, 3], L, "progressive", np.random.default_rng(0), EOT, noise_window=3,
                             cons_window=2, context=context))
    model = tiny_model(0).cuda()
    meta = [t.cuda() for t in (r.group, r.pos, r.start)]
    mod = row_mask(*meta, context)
    x, pos = r.tokens.cuda(), r.pos.cuda()
    dense = model(x, pos, dense_mask(mod, 4, L, "cuda"), hidden=True)
    flex = torch.compile(model)(x, pos, flex_mask(mod, 4, L, "cuda"), hidden=True)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)


def test_soft_cross_entropy_equals_the_plain_formula_with_padding_columns_and_ragged_chunks():
    torch.manual_seed(0)
    N, D, V = 23, 8, 13
    W = torch.randn(V + 3, D, requires_grad=True)              # three padding columns
    h = torch.randn(N, D, requires_grad=True)
    th, tW = torch.randn(N, D), torch.randn(V + 3, D)
    wt = torch.rand(N)
    labels = torch.randint(-1, V, (N,))
    total, ce, ent = soft_cross_entropy(h, W, wt * (labels >= 0), V, labels=labels, chunk=5)
    z = h @ W[:V].T
    want_ce = F.cross_entropy(z, labels.clamp(min=0), reduction="none")
    want = (wt * (labels >= 0) * want_ce).sum()
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    gh, gW = torch.autograd.grad(3 * total, (h, W))
    wh, wW = torch.autograd.grad(3 * want, (h, W))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gW, wW)
    total, ce, ent = soft_cross_entropy(h, W, wt, V, target_h=th, target_W=tW, chunk=4)
    p = (th @ tW[:V].T).log_softmax(-1)
    want_kl = (p.exp() * (p - (h @ W[:V].T).log_softmax(-1))).sum(-1)
    torch.testing.assert_close(ce - ent, want_kl.detach(), rtol=1e-5, atol=1e-5)
    want = (wt * want_kl).sum()
    gh, gW = torch.autograd.grad(total, (h, W))
    wh, wW = torch.autograd.grad(want, (h, W))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gW, wW)
