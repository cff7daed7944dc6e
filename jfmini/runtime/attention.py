"""A mask function (mask_mod(b, h, q, kv) -> bool, as jfmini.masks writes them) in the two forms the
model's attention takes: a dense bool mask for scaled_dot_product_attention (CPU) and a FlexAttention
BlockMask (the fast CUDA path)."""
import torch
from torch.nn.attention.flex_attention import create_block_mask


def dense_mask(mask_mod, batch, length, device="cpu"):
    """The bool (B, 1, L, L) mask for scaled_dot_product_attention, evaluated from mask_mod."""
    b = torch.arange(batch, device=device)[:, None, None]
    q = torch.arange(length, device=device)[None, :, None]
    kv = torch.arange(length, device=device)[None, None, :]
    return mask_mod(b, 0, q, kv)[:, None]


def flex_mask(mask_mod, batch, length, device, compiled=False):
    """The FlexAttention BlockMask from the same mask_mod (the fast CUDA path); compiled: build it with a
    compiled kernel (each training step builds one)."""
    return create_block_mask(mask_mod, batch, None, length, length, device=device, _compile=compiled)
