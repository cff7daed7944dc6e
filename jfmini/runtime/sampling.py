"""Sampling, as AR decoding samples (jfmini's, beyond the paper): the next-token distribution and a draw
from it that Exp(1) noise fixes, so that the decoder can make every row that agrees so far draw the
same token. jfmini.jacobi.Jacobi and the AR oracle (jfmini.tools.ar) both use these."""
import torch


def draw(p, noise):
    """One sample from each distribution p (..., V), given Exp(1) noise of the same shape: the token with
    the largest p / noise is token i with probability exactly p_i (the first of independent exponential
    clocks of rates p_i to ring). Rows that share their noise and their p draw the same token."""
    return (p / noise.clamp(min=1e-30)).argmax(-1)


def distribution(logits, temperature, top_k=0, top_p=1.0):
    """AR sampling's next-token distribution after every position: softmax(logits / temperature) over the
    top_k most likely tokens (0 = all), then over the smallest set of most likely tokens whose mass reaches
    top_p (1 = all), renormalised. (..., V) -> (..., V) probabilities, in float32 at least."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(min(top_k, z.shape[-1]), -1).values[..., -1:], float("-inf"))
    p = z.softmax(-1)
    if top_p < 1:
        sorted_p, order = p.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p        # the mass before this token already reaches top_p
        p = p.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0)
        p = p / p.sum(-1, keepdim=True)
    return p
