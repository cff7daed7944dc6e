"""What one decoding iteration costs by what it verifies: the GPU model's shape (8 layers, d 512, p50k
vocabulary) with random weights (a step's cost does not depend on what the model knows), one prompt of
160 tokens with 128 new tokens in the cache, every decoder's row kinds alone and together. Per setting:
us per captured iteration (CUDA graph replay, no inductor, as bench.py --sweep times it) and the
uncaptured iteration's kernel time by kind (jfmini.tools.rows.profile_step). Run from the repository root:
  python results/defaults/profile_decoders.py [--compile] > profile_decoders.log
--compile adds inductor-fused timings for six of them (a compile each), before the kernel tables; --fused
makes the kernel tables those of the inductor-fused iteration (six more compiles)."""
import sys
import time

import torch

sys.path.insert(0, ".")
from jfmini.tools.rows import describe, profile_step, step_us, verified_per_step  # noqa: E402
from jfmini.jacobi import Jacobi  # noqa: E402
from jfmini.model import GPT, GPTConfig  # noqa: E402
from jfmini.runtime.engine import METHODS  # noqa: E402

SETTINGS = [dict(block_len=1), dict(block_len=16), dict(block_len=32), dict(block_len=64), dict(block_len=128),
            dict(block_len=32, num_blocks=2), dict(block_len=64, num_blocks=2),
            dict(block_len=32, pool_size=4, cand_len=16), dict(block_len=32, ngram=2, cand_len=16),
            dict(block_len=64, num_blocks=2, pool_size=4, cand_len=16, activation_ratio=0.85),
            dict(block_len=32, pool_size=4, ngram=2, cand_len=16)]


def main():
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = GPTConfig(vocab_size=50281, tokenizer="p50k") if cuda else \
        GPTConfig(vocab_size=50281, tokenizer="p50k", n_layer=2, d_model=64, n_head=2, seq_len=512)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    if cuda:
        model = model.to(torch.bfloat16)
    prompt, new = torch.randint(0, 50000, (160,)).tolist(), 256
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, {'bf16' if cuda else 'fp32'}, random weights, prompt 160 tokens, "
          f"{new // 2} new tokens in the cache")
    print(f"{'decoder':<30}{'verified/step':>14}{'us/step (graph)':>17}")
    for s in SETTINGS:
        jac = Jacobi(model, eot=None, compile=False, max_len=len(prompt) + new, **s)
        jac.generate(prompt, new, 1)                                          # warm-up, capture
        if cuda:
            us = step_us(jac, prompt, new, iters=200)
        else:
            jac.prefill([prompt], new)
            t0 = time.perf_counter()
            for _ in range(5):
                jac.step()
            us = (time.perf_counter() - t0) / 5 * 1e6
        print(f"{describe(s):<30}{verified_per_step(s):>14}{us:>17.0f}", flush=True)
        del jac
    if "--compile" in sys.argv and cuda:
        print("\ninductor-fused and captured (as bench.py's table rows):")
        for s in (METHODS["jacobi"], METHODS["mr"], dict(block_len=128), METHODS["ngram"],
                  dict(block_len=32, pool_size=4, cand_len=16), dict(block_len=64, num_blocks=2)):
            jac = Jacobi(model, eot=None, compile=True, max_len=len(prompt) + new, **s)
            jac.generate(prompt, new, 1)
            print(f"{describe(s):<30}{verified_per_step(s):>14}{step_us(jac, prompt, new, iters=200):>17.0f}", flush=True)
            del jac
    if cuda:
        fused = "--fused" in sys.argv
        print(f"\nkernel time of one uncaptured iteration, {'inductor-fused' if fused else 'no inductor'}:")
        for s in (METHODS["ar"], METHODS["jacobi"], dict(block_len=128), METHODS["ngram"],
                  dict(block_len=32, pool_size=4, cand_len=16), METHODS["mr"]):
            profile_step(model, prompt, s, None, fused, len(prompt) + new, new)


if __name__ == "__main__":
    main()
