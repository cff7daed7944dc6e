"""The decoders' static KV cache: machinery under jfmini.model.GPT's cached forward."""
import torch
import torch.nn as nn


class KVCache(nn.Module):
    """One static (B, H, S, Dh) key buffer and value buffer per layer (gpt-fast style). Writes index the
    buffers themselves (no views), which inductor performs in place inside a captured graph."""

    def __init__(self, n_layer, batch, n_head, length, head_dim, dtype, device):
        super().__init__()
        self.n_layer = n_layer
        for i in range(n_layer):
            for kind in "kv":
                self.register_buffer(f"{kind}{i}", torch.zeros(batch, n_head, length, head_dim, dtype=dtype,
                                                               device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device)[:, None], persistent=False)

    def buffers_of(self, layer):
        return getattr(self, f"k{layer}"), getattr(self, f"v{layer}")

    def write(self, layer, slots, k, v):
        """Store k, v (B, H, T, Dh) of one layer at cache slots (B, T); return that layer's buffers."""
        kb, vb = self.buffers_of(layer)
        kb[self.rows, :, slots] = k.transpose(1, 2)               # indexed (B, T, H, Dh)
        vb[self.rows, :, slots] = v.transpose(1, 2)
        return kb, vb

    def copy(self, src, dst):
        """Move the entries at slots src (B, n) to slots dst (B, n) in every layer: commits a winning row."""
        for layer in range(self.n_layer):
            for buf in self.buffers_of(layer):
                buf[self.rows, :, dst] = buf[self.rows, :, src]
