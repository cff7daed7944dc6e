"""AR decoding, the oracle: every decoder in jfmini.jacobi must commit exactly its tokens (greedy), or be
distributed as its samples. Plain eager PyTorch, one token per forward; also bench.py's 'AR eager' row."""
import time

import torch

from jfmini.masks import cache_mask
from jfmini.runtime.engine import Stats, check_args, sync
from jfmini.runtime.sampling import distribution, draw


@torch.no_grad()
def generate_ar(model, prompt, max_new_tokens, eot=None, temperature=0.0, top_k=0, top_p=1.0, stop=None):
    """The oracle: prefill, then one token per forward through the KV cache, plain eager PyTorch; greedy,
    or sampled at temperature > 0 (top_k, top_p: see distribution). It ends at end-of-text, after
    max_new_tokens, or where `stop` (a jfmini.runtime.stop rule, checked after every token) finds the end.
    Returns (new tokens, Stats). This is also the 'AR eager' baseline of bench.py."""
    check_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    def next_token(logits):                               # logits (V,)
        if not temperature:
            return int(logits.argmax())
        p = distribution(logits, temperature, top_k, top_p)
        return int(draw(p, torch.empty_like(p).exponential_()))
    dev = model.embed.weight.device
    P = len(prompt)
    S = P + max_new_tokens
    model.new_cache(1, S)
    t0 = time.perf_counter()
    idx = torch.tensor([prompt], device=dev)
    slots = torch.arange(P, device=dev)[None]
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    logits = model(idx, slots, cache_mask(zero, zero[:, None], slots, S), slots)
    tok = next_token(logits[0, -1])
    sync(dev)
    t1 = time.perf_counter()
    out, forwards, kept = [], 0, None
    while True:
        out.append(tok)
        m = torch.tensor([[P + len(out) - 1]], device=dev)  # the slot of the token being committed
        logits = model(torch.tensor([[tok]], device=dev), m, cache_mask(m[0], m, m, S), m)
        forwards += 1
        kept = stop.kept(out) if stop is not None else None
        if tok == eot or len(out) == max_new_tokens or kept is not None:
            break
        tok = next_token(logits[0, -1])
    sync(dev)
    out = out if kept is None else out[:kept]
    return out, Stats(len(out), len(out), t1 - t0, time.perf_counter() - t1, forwards)
