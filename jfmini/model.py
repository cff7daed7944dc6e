"""A pre-norm GPT with rotary positions, explicit position ids and a static KV cache.

Positions are an input because Jacobi Forcing needs them free: during training a noisy block and its
clean twin share position ids; during decoding, draft tokens sit at chosen positions.

One forward serves everything:

    model(idx, pos)                      causal attention over idx (pretraining)
    model(idx, pos, mask)                mask: bool (B, 1, T, T) for SDPA, or a FlexAttention BlockMask
    model(idx, pos, mask, slots)         decoding: write K/V of idx at cache `slots` (B, T), then attend
                                         over the static cache under a bool mask (B, 1, T, S)

The cache is a preallocated module buffer (gpt-fast style) so a captured CUDA graph keeps writing
into the same memory. It only ever holds verified tokens where the decoder's committed-length pointer
says so; everything past the pointer is masked out and simply overwritten later.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from jfmini.runtime.kv_cache import KVCache


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE with end-of-text
    seq_len: int = 1024      # longest context trained on
    n_layer: int = 8
    n_head: int = 8
    d_model: int = 512
    rope_base: float = 10000.0
    tokenizer: str = "gpt2"  # the encoding (jfmini.runtime.tokenizers.tokenizer): gpt2, or p50k with tokens for runs of spaces

    def to_dict(self):
        return asdict(self)


def rotate(x, cos, sin):
    """Rotary embedding on the two halves of the head dim. x (B, H, T, Dh); cos, sin (B, 1, T, Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, slots, cache, layer):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        if slots is not None:
            k, v = cache.write(layer, slots, k, v)  # (B, H, S, Dh): the whole static buffer, the mask picks
            scores = (q @ k.transpose(-1, -2)).float() * self.head_dim ** -0.5          # (B, H, T, S)
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v
        elif isinstance(mask, BlockMask):
            y = flex_attention(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, slots, cache, layer):
        x = x + self.attn(self.norm1(x), cos, sin, mask, slots, cache, layer)
        return x + self.out(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        padded_vocab = math.ceil(cfg.vocab_size / 64) * 64  # a friendlier matmul size; extra rows never win
        self.embed = nn.Embedding(padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.forwards = 0  # real forward calls (eager); decoders report the same count
        self.cache = None  # a KVCache, installed by the decoder that owns it
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, pos, mask=None, slots=None, hidden=False):
        """idx, pos: (B, T) (pos may be (T,)); returns float logits (B, T, vocab_size), or with hidden the
        final normed hidden states (B, T, d_model) that the tied head (self.embed.weight) turns into
        logits: distillation's loss applies the head itself, a chunk of positions at a time."""
        if not torch.compiler.is_compiling():
            self.forwards += 1
        x = self.embed(idx)
        cos, sin = self.rotary(pos.expand(idx.shape))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, slots, self.cache, i)
        if hidden:
            return self.norm(x)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied head
        return logits[..., :self.cfg.vocab_size].float()

    def rotary(self, pos):
        """cos and sin of the rotary angles for positions pos (B, T): (B, 1, T, Dh/2), always float32.
        Computed here, not kept as a buffer: model.to(torch.bfloat16) would round a buffer, and bf16
        frequencies put a token at position 1000 about 0.45 rad away from where training saw it."""
        head_dim = self.cfg.d_model // self.cfg.n_head
        inv_freq = self.cfg.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device)
                                          / head_dim)
        angles = pos[:, None, :, None].float() * inv_freq
        return angles.cos(), angles.sin()

    def new_cache(self, batch, length, dtype=None):
        """A static cache of `length` slots for `batch` rows, installed in the model."""
        p = self.embed.weight
        a = self.blocks[0].attn
        self.cache = KVCache(self.cfg.n_layer, batch, a.n_head, length, a.head_dim, dtype or p.dtype, p.device)
        return self.cache
