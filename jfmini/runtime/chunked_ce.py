"""The head and a cross-entropy over a 50K-token vocabulary without a (positions, V) tensor: machinery
under jfmini.forcing.RowObjective. A chunk of positions at a time, its logits made, used and dropped, and
its gradient computed in the forward pass (backward only scales it)."""
import contextlib

import torch
from torch.autograd.function import once_differentiable


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


def hidden_states(net, tokens, pos, mask, autocast, grad=True):
    """net's final hidden states (B, L, D), in the dtype autocast gives the head's matmul (RMSNorm returns
    float32 under autocast); grad False for the frozen anchor."""
    with autocast(), contextlib.nullcontext() if grad else torch.no_grad():
        h = net(tokens, pos, mask, hidden=True)
        return h.to(autocast_dtype(h))
