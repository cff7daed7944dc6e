"""Shared fixtures: tiny random models on CPU (no files, no network)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jfmini.model import GPT, GPTConfig  # noqa: E402

EOT = 256  # end-of-text of the byte tokenizer


def tiny_model(seed=0, vocab=257, seq_len=160, n_layer=2, n_head=2, d_model=32, spread=10.0, dtype=torch.float32):
    """A random GPT whose weights are scaled up so its logits are far apart (greedy ties are rare)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(spread)
    return model.to(dtype).eval()


@pytest.fixture
def model():
    return tiny_model()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
