"""The model: KV-cache decoding, mask paths, and that training lowers the loss."""
import torch
import torch.nn.functional as F

from conftest import cuda, tiny_model
from jfmini.masks import cache_mask
from jfmini.runtime.attention import dense_mask, flex_mask
from jfmini.tools.paper import noise_aware_mask
from jfmini.model import GPT, GPTConfig


def test_kv_cache_decoding_matches_full_forward(model):
    x = torch.randint(0, 257, (1, 24))
    pos = torch.arange(24)
    full = model(x, pos)                                   # causal, no cache
    S = 40
    model.new_cache(1, S)
    zero = torch.zeros(1, dtype=torch.long)
    slots = pos[:10][None]
    steps = [model(x[:, :10], slots, cache_mask(zero, zero[:, None].expand(1, 10), slots, S), slots)]
    for t in range(10, 24):                                # then one token at a time
        m = torch.tensor([[t]])
        steps.append(model(x[:, t:t + 1], m, cache_mask(m[0], m, m, S), m))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_bool_causal_mask_equals_causal_path(model):
    x = torch.randint(0, 257, (3, 20))
    pos = torch.arange(20)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(model(x, pos, causal), model(x, pos), rtol=1e-5, atol=1e-5)


def test_explicit_positions_matter(model):
    x = torch.randint(0, 257, (1, 12))
    assert not torch.allclose(model(x, torch.arange(12)), model(x, torch.arange(12) + 5))


@cuda
def test_flex_attention_equals_sdpa_for_the_same_mask():
    model = tiny_model(n_head=2, d_model=64, spread=1.0).cuda()
    B, n, T, L = 2, 4, 3, 128
    prompt_len = torch.tensor([5, 9], device="cuda")
    pad_start = prompt_len + 2 * n * T
    mod = noise_aware_mask(prompt_len, pad_start, n, "noisy")
    x = torch.randint(0, 257, (B, L), device="cuda")
    pos = torch.arange(L, device="cuda")
    dense = model(x, pos, dense_mask(mod, B, L, "cuda"))
    flex = torch.compile(model)(x, pos, flex_mask(mod, B, L, "cuda"))
    torch.testing.assert_close(flex, dense, rtol=2e-3, atol=2e-3)


def test_a_few_training_steps_lower_the_loss():
    model = tiny_model(spread=1.0).train()
    text = (b"def add(a, b):\n    return a + b\n\n" * 40)[:600]
    data = torch.tensor(list(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        i = torch.randint(0, len(data) - 65, (8,))
        x = torch.stack([data[j:j + 64] for j in i])
        y = torch.stack([data[j + 1:j + 65] for j in i])
        loss = F.cross_entropy(model(x, torch.arange(64)).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_rotary_angles_stay_float32_in_a_bf16_model():
    # model.to(torch.bfloat16) must not round the rotary frequencies: positions far into the context
    # would land up to ~0.45 rad away from where the model was trained.
    model = GPT(GPTConfig(vocab_size=64, seq_len=1024, n_layer=1, n_head=2, d_model=32)).to(torch.bfloat16)
    pos = torch.tensor([[0, 1, 517, 1023]])
    cos, sin = model.rotary(pos)
    assert cos.dtype == torch.float32 and cos.shape == (1, 1, 4, 8)
    head_dim = 16
    freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    exact = pos[0, :, None].double() * freq                        # (T, Dh/2) in float64
    assert torch.allclose(cos[0, 0].double(), exact.cos(), atol=1e-3)
    assert torch.allclose(sin[0, 0].double(), exact.sin(), atol=1e-3)
