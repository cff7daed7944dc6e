"""The noise-aware mask: the worked example of jfmini.masks, a larger hand-checked case, Flex = dense."""
import torch

from conftest import cuda
from jfmini.runtime.attention import dense_mask, flex_mask
from jfmini.tools.paper import noise_aware_mask

WORKED = """
1 . . . . . . . .
1 1 . . . . . . .
1 1 1 . . . . . .
1 . . 1 . . . . .
1 . . 1 1 . . . .
1 1 1 . . 1 . . .
1 1 1 . . 1 1 . .
1 . . 1 1 . . 1 .
1 . . 1 1 . . 1 1
"""


def grid(text):
    return torch.tensor([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


def mask(P, n, T, context="noisy", length=None):
    length = length or P + 2 * n * T
    mod = noise_aware_mask(torch.tensor([P]), torch.tensor([P + 2 * n * T]), n, context)
    return dense_mask(mod, 1, length)[0, 0]


def test_worked_example_p1_n2_t2():
    assert torch.equal(mask(1, 2, 2), grid(WORKED))


def test_larger_case_by_rule():
    """P=3, n=3, T=3, checked against the rule written out longhand for every pair."""
    P, n, T = 3, 3, 3
    kind = ["p"] * P
    blk, off = [-1] * P, list(range(P))
    for j in range(T):
        for stream in ("k", "l"):
            kind += [stream] * n
            blk += [j] * n
            off += list(range(n))
    L = len(kind)
    want = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for kv in range(L):
            if kind[kv] == "p":
                ok = kind[q] != "p" or kv <= q
            elif kind[q] == "p":
                ok = False
            elif kind[q] == kind[kv]:
                ok = blk[kv] < blk[q] or (blk[kv] == blk[q] and off[kv] <= off[q])
            else:
                ok = False
            want[q, kv] = ok
    assert torch.equal(mask(P, n, T), want)


def test_never_clean_to_noisy_nor_noisy_to_clean():
    m = mask(2, 4, 3)
    P, n = 2, 4
    noisy = torch.tensor([False] * P + ([True] * n + [False] * n) * 3)
    clean = ~noisy
    clean[:P] = False
    assert not m[clean][:, noisy].any() and not m[noisy][:, clean].any()


def test_clean_context_variant_sees_earlier_clean_blocks():
    P, n = 1, 2
    m = mask(P, n, 2, context="clean")
    k1a, l0a, l0b, k0a = P + 2 * n, P + n, P + n + 1, P
    assert m[k1a, l0a] and m[k1a, l0b] and not m[k1a, k0a]


def test_padding_attends_nowhere_real():
    m = mask(1, 2, 1, length=8)      # real length 5, then 3 padding positions
    assert not m[:5, 5:].any()
    assert torch.equal(m[5:, :], torch.eye(8, dtype=torch.bool)[5:])


@cuda
def test_flex_block_mask_keeps_exactly_the_blocks_the_dense_mask_needs():
    B, n, L, tile = 3, 8, 256, 128
    prompt_len = torch.tensor([3, 17, 64], device="cuda")
    pad_start = prompt_len + 2 * n * torch.tensor([4, 6, 2], device="cuda")
    mod = noise_aware_mask(prompt_len, pad_start, n, "noisy")
    dense = dense_mask(mod, B, L, "cuda")[:, 0]
    kept = flex_mask(mod, B, L, "cuda").to_dense()[:, 0].bool()           # (B, L/tile, L/tile)
    needed = dense.view(B, L // tile, tile, L // tile, tile).any(2).any(-1)
    assert torch.equal(kept, needed)
