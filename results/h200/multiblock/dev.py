"""Step cost of the decoders on a random model of the default size (bf16, CUDA graph + inductor): the cache
attended over whole (the earlier static compile) vs only its live part (one dynamic compile, a graph per
length), with the attention written out or through SDPA. python results/h200/multiblock/dev.py"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import torch
import bench
import jfmini.model as M
from jfmini.runtime.tokenizers import tokenizer
from jfmini.runtime.prompts import read_prompts
from jfmini.jacobi import Jacobi

t0 = time.time()
log = lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)
enc = tokenizer("p50k")
torch.manual_seed(0)
model = M.GPT(M.GPTConfig(vocab_size=enc.n_vocab, tokenizer="p50k")).cuda().to(torch.bfloat16).eval()
prompts = [enc.encode(r["prompt"]) for r in read_prompts(None)]
max_new = 256
max_len = max(map(len, prompts)) + max_new
S = dict(block_len=1)
SETTINGS = {"AR": dict(block_len=1), "Jacobi": dict(block_len=32), "n-gram": dict(block_len=32, ngram=2, cand_len=16),
            "MR": dict(block_len=64, num_blocks=2, pool_size=4, cand_len=16),
            "best": dict(block_len=32, pool_size=4, ngram=2, cand_len=16)}
EXTRA = {"n=32 K=2 pool 4": dict(block_len=32, num_blocks=2, pool_size=4, cand_len=16),
         "n=64 pool 4": dict(block_len=64, pool_size=4, cand_len=16),
         "n=32 K=2": dict(block_len=32, num_blocks=2), "n=64": dict(block_len=64),
         "n=32 K=2 pool 4 ngram 2": dict(block_len=32, num_blocks=2, pool_size=4, ngram=2, cand_len=16)}


def measure(settings, variant):
    M.DECODE_ATTENTION = "sdpa" if variant.endswith("sdpa") else "manual"
    jac = Jacobi(model, eot=enc.eot_token, compile=True, max_len=max_len, **settings)
    if variant == "whole static":                      # what the decoder did before: one static compile, whole cache
        jac._fn, jac.compiled = torch.compile(jac._step, dynamic=False), False
        jac.lengths = lambda: [jac.S]
        jac.live_len = lambda: jac.S
    us = {}
    for i, p in enumerate((prompts[0], max(prompts, key=len))):
        live = bench.frozen_midway(jac, p, max_new)
        jac.step(live)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(200):
            jac.step(live)
        ev[1].record()
        torch.cuda.synchronize()
        us[i] = (ev[0].elapsed_time(ev[1]) * 1e3 / 200, live)
    return jac.S, us


rows = []
for name, s in list(SETTINGS.items()) + list(EXTRA.items()):
    for variant in (("whole static", "live manual", "live sdpa") if name in SETTINGS else ("live manual", "live sdpa")):
        torch._dynamo.reset()
        t = time.time()
        Sx, us = measure(s, variant)
        rows.append((name, variant, Sx, us))
        log(f"{name:<24} {variant:<13} S={Sx:5d}  HE/0 {us[0][0]:6.1f} us (live {us[0][1]:4d})  longest {us[1][0]:6.1f} us "
            f"(live {us[1][1]:4d})  [{time.time() - t:.0f}s]")
print("\nsetting                  variant        S      us/step HE/0 (live)   us/step longest (live)")
for name, variant, Sx, us in rows:
    print(f"{name:<24} {variant:<13} {Sx:5d}  {us[0][0]:8.1f} ({us[0][1]:4d})  {us[1][0]:8.1f} ({us[1][1]:4d})")
for variant in ("manual", "sdpa"):
    M.DECODE_ATTENTION = variant
    torch._dynamo.reset()
    bench.profile_step(model, prompts[0], SETTINGS["MR"], enc.eot_token, True, max_len, max_new)
