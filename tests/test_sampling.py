"""Sampling is exact: at temperature > 0 every decoder commits text distributed exactly as AR sampling.

Many rows of one prompt are decoded with the same settings, and the empirical joint distribution of the
first L new tokens (all V**L continuations of a 3-token vocabulary) is compared with the exact one, which
this file computes on its own: every continuation goes through one batched forward of the model without
a cache, and a plain-Python reference of temperature, top-k and top-p turns the logits into next-token
probabilities. A chi-square test measures the distance; a decoder that drew the wrong token even now and
then (an acceptance rule that is a little off, noise that is not shared by the rows that must agree, a
top-k or top-p cut in the wrong place, a wrong temperature) shifts mass between continuations and fails
it, and two such planted bugs are checked to fail it. The tiny model is chosen so that drafts are often
accepted and often rejected, so the acceptance rule is exercised. top_k=1 must reproduce greedy decoding
token for token, generate_ar (the oracle) must sample exactly too, and bad sampling settings are refused.
"""
import itertools
import math

import pytest
import torch

from conftest import cuda, tiny_model
from jfmini.jacobi import Jacobi
from jfmini.runtime.errors import UserError
from jfmini.tools.ar import generate_ar
from jfmini.runtime.stop import StopAtFunctionEnd

V, L = 3, 5                           # vocabulary and continuation length: V**L = 243 cells
PROMPT = [0, 1, 2, 0, 1, 2, 0, 1]     # repetitive, so context n-grams find matches
# A test fails when z > Z_MAX: for a correct decoder the chance of that is P(N(0, 1) > 4.75), about 1e-6 per
# test. The seeds are fixed, so each run draws the same samples: the outcome is deterministic.
Z_MAX = 4.75
SAMPLES = 6000

DECODERS = {
    "ar": dict(block_len=1),
    "jacobi": dict(block_len=4),
    "recycling": dict(block_len=3, pool_size=2),   # 3-token blocks: recycled rows already win within L tokens
    "ngrams": dict(block_len=4, ngram=2, cand_len=3),
    "multiblock": dict(block_len=3, num_blocks=2, pool_size=2, cand_len=3),
}
CASES = [(name, temperature, 0, 1.0) for name in DECODERS for temperature in (0.7, 1.0)] + [
    ("jacobi", 1.0, 0, 0.8), ("multiblock", 1.0, 0, 0.8),      # top_p
    ("recycling", 1.0, 2, 1.0), ("ngrams", 0.7, 2, 1.0),       # top_k
]


@pytest.fixture(scope="module")
def model():
    """float64, so that the cached, batched forwards of the decoders and the plain forward of exact_probs
    agree far below anything the test can see; weights spread enough that continuations range from likely
    to rare and drafts are both accepted and rejected."""
    return tiny_model(seed=1, vocab=V, seq_len=64, n_layer=1, n_head=2, d_model=16, spread=4.0,
                      dtype=torch.float64)


def next_token_probs(logits, temperature, top_k=0, top_p=1.0):
    """AR sampling's distribution of the next token, from a list of logits, in plain Python: softmax of
    logits / temperature over the top_k most likely tokens (0 = all), then over the smallest set of most
    likely tokens whose mass reaches top_p, renormalised."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])[:top_k or None]   # most likely first
    weights = [math.exp((logits[i] - logits[order[0]]) / temperature) for i in order]
    kept, mass = 0, 0.0
    while kept < len(order) and (top_p == 1 or mass < top_p):    # the smallest head reaching top_p
        mass += weights[kept] / sum(weights)
        kept += 1
    probs = [0.0] * len(logits)
    for i, w in zip(order[:kept], weights[:kept]):
        probs[i] = w / sum(weights[:kept])
    return probs


def continuations(length):
    """Every continuation of `length` tokens, in the order of its code sum(token_i * V**(length-1-i))."""
    return torch.tensor(list(itertools.product(range(V), repeat=length)))


def codes(tokens):
    """Each row of tokens (N, length) as the index of its continuation."""
    return (tokens * V ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(1)


@torch.no_grad()
def exact_probs(model, length, temperature, top_k=0, top_p=1.0):
    """The probability of every continuation of PROMPT (V**length,): one forward without a cache over
    PROMPT + every continuation, then the product of the next-token probabilities of its tokens."""
    seqs = continuations(length)
    idx = torch.cat([torch.tensor(PROMPT).expand(len(seqs), -1), seqs[:, :-1]], 1)
    logits = model(idx, torch.arange(idx.shape[1]))[:, len(PROMPT) - 1:]        # (V**length, length, V)
    probs = []
    for seq, rows in zip(seqs.tolist(), logits.tolist()):
        probs.append(math.prod(next_token_probs(row, temperature, top_k, top_p)[t] for t, row in zip(seq, rows)))
    return torch.tensor(probs, dtype=torch.float64)


@torch.no_grad()
def sample(model, decoder, samples, temperature, top_k=0, top_p=1.0, graph=False, **settings):
    """Decode PROMPT `samples` times in one batch: (counts of each continuation of L tokens (V**L,),
    forwards that committed a tokens, a = 0..W, summed over the rows)."""
    torch.manual_seed(0)
    jac = decoder(model, batch=samples, temperature=temperature, top_k=top_k, top_p=top_p,
                  max_len=len(PROMPT) + L, graph=graph, **settings)
    jac.prefill([PROMPT] * samples, L)
    while not bool(jac.state.done.all()):
        jac.step()
    tokens = jac.state.text[:, len(PROMPT):len(PROMPT) + L].cpu()
    return torch.bincount(codes(tokens), minlength=V ** L).double(), jac.state.accepted.sum(0).cpu()


def chi_square_z(counts, probs):
    """How far the counts are from the probabilities, as a standard normal z (large = far): Pearson's
    chi-square over the cells, those expecting fewer than 5 samples pooled into one, turned into z by the
    Wilson-Hilferty approximation. A sample in a cell of probability 0 is infinitely far."""
    if counts[probs == 0].sum() > 0:
        return math.inf
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    x2, k = ((observed - expected) ** 2 / expected).sum().item(), len(observed) - 1
    return ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


@pytest.mark.parametrize("name, temperature, top_k, top_p", CASES)
def test_decoder_samples_exactly(model, name, temperature, top_k, top_p):
    counts, accepted = sample(model, Jacobi, SAMPLES, temperature, top_k, top_p, **DECODERS[name])
    z = chi_square_z(counts, exact_probs(model, L, temperature, top_k, top_p))
    assert z < Z_MAX, f"{name}: committed text is not distributed as AR sampling (z = {z:.2f})"
    forwards = accepted.sum()
    if name != "ar":      # drafts were both kept and rejected often: the acceptance rule had work to do
        assert accepted[2:].sum() > 0.1 * forwards, accepted.tolist()
        assert accepted[1] > 0.1 * forwards, accepted.tolist()


@cuda
@pytest.mark.parametrize("name, compile", [("multiblock", False), ("multiblock", True), ("ngrams", True)])
def test_sampling_is_exact_in_cuda_graphs(model, name, compile):
    """The captured (and inductor-fused) step draws fresh noise at every replay: the same test on the GPU."""
    gpu = tiny_model(seed=1, vocab=V, seq_len=64, n_layer=1, n_head=2, d_model=16, spread=4.0).cuda()
    counts, _ = sample(gpu, lambda *a, **k: Jacobi(*a, compile=compile, **k), SAMPLES, 1.0, graph=True,
                       **DECODERS[name])
    z = chi_square_z(counts, exact_probs(model, L, 1.0))
    assert z < Z_MAX, f"{name} in a CUDA graph (compile={compile}): not distributed as AR sampling (z = {z:.2f})"


class LooseAcceptance(Jacobi):
    """Planted bug: a draft token that differs from the token drawn before it is accepted anyway 1 time in
    10 (point-mass drafts kept a little too often)."""

    def _run(self, x, preds, limit):
        ok = (x[..., 1:] == preds[..., :-1]) | (torch.rand(x[..., 1:].shape, device=self.dev) < 0.1)
        ok = ok & (torch.arange(x.shape[-1] - 1, device=self.dev) < limit[:, None, None] - 1)
        return 1 + ok.long().cumprod(-1).sum(-1)


class NoiseByRow(Jacobi):
    """Planted bug: every row draws with its own noise, so the main row and the candidate rows race with
    independent draws and the longest run wins: a drafted token gets several chances to be drawn."""

    def _noise(self, V):
        return torch.empty(self.B, self.offs.numel(), V, device=self.dev).exponential_()


@pytest.mark.parametrize("decoder, name", [(LooseAcceptance, "jacobi"), (NoiseByRow, "recycling"),
                                           (NoiseByRow, "ngrams")])
def test_planted_bug_is_caught(model, decoder, name):
    counts, _ = sample(model, decoder, SAMPLES // 2, 1.0, **DECODERS[name])
    z = chi_square_z(counts, exact_probs(model, L, 1.0))
    assert z > Z_MAX, f"{decoder.__name__} with {name} went unnoticed (z = {z:.2f})"


@pytest.mark.parametrize("name", DECODERS)
def test_top_k_1_is_greedy(name):
    model = tiny_model()
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    greedy = generate_ar(model, prompt, 40)[0]
    torch.manual_seed(0)
    assert Jacobi(model, temperature=1.0, top_k=1, **DECODERS[name]).generate(prompt, 40)[0] == greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 2, 1.0), (1.0, 0, 0.8)])
def test_generate_ar_samples_exactly(model, temperature, top_k, top_p):
    length, samples = 3, 2000
    torch.manual_seed(0)
    tokens = torch.tensor([generate_ar(model, PROMPT, length, temperature=temperature, top_k=top_k,
                                       top_p=top_p)[0] for _ in range(samples)])
    counts = torch.bincount(codes(tokens), minlength=V ** length).double()
    z = chi_square_z(counts, exact_probs(model, length, temperature, top_k, top_p))
    assert z < Z_MAX, f"generate_ar is not distributed as AR sampling (z = {z:.2f})"


@pytest.mark.parametrize("settings", [dict(temperature=-1), dict(temperature=1.0, top_p=0),
                                      dict(temperature=1.0, top_p=1.5), dict(temperature=1.0, top_k=-1),
                                      dict(top_k=2)])
def test_bad_sampling_settings_are_refused(settings):
    with pytest.raises(UserError):
        Jacobi(tiny_model(), **settings)


# ----------------------------------------------------------------------------- sampling with the stop rule

# The stop rule reads token 0 as a line end, 1 as a space, 2 as a def line: PROMPT reads "\n def f():\n def
# f():\n " (a def indented by 1, an unfinished line), so a continuation ends before its first new line that
# is not blank and indented by at most 1 space.
STOP_PIECES = {0: b"\n", 1: b" ", 2: b"def f():"}


class KeepsOneMore(StopAtFunctionEnd):
    """Planted bug: a stop rule that keeps the first token of the line that ends the function."""

    def kept(self, tokens):
        k = super().kept(tokens)
        return None if k is None else min(k + 1, len(tokens))


def kept_continuation(seq):
    k = StopAtFunctionEnd(PROMPT, STOP_PIECES.__getitem__).kept(list(seq))
    return tuple(seq if k is None else seq[:k])


def kept_counts(model, name, rule=StopAtFunctionEnd):
    """(counts of every kept text, its exact probability under AR sampling at temperature 1, with a last
    cell for kept texts AR sampling never keeps): the decoder samples SAMPLES rows with the stop rule."""
    exact = {}
    for seq, p in zip(continuations(L).tolist(), exact_probs(model, L, 1.0).tolist()):
        exact[kept_continuation(seq)] = exact.get(kept_continuation(seq), 0.0) + p
    index = {k: i for i, k in enumerate(exact)}
    torch.manual_seed(0)
    jac = Jacobi(model, batch=SAMPLES, temperature=1.0, max_len=len(PROMPT) + L, **DECODERS[name])
    stops = [rule(PROMPT, STOP_PIECES.__getitem__) for _ in range(SAMPLES)]
    outs = jac.decode_batch([PROMPT] * SAMPLES, L, stops, sync_every=1)[0]       # rows freeze mid-way
    cells = torch.tensor([index.get(tuple(o), len(index)) for o in outs])
    return torch.bincount(cells, minlength=len(index) + 1).double(), torch.tensor([*exact.values(), 0.0]), outs


@pytest.mark.parametrize("name", ["ar", "jacobi", "ngrams", "multiblock"])
def test_sampling_with_the_stop_keeps_text_distributed_as_ar_sampling_kept_text(model, name):
    counts, probs, outs = kept_counts(model, name)
    z = chi_square_z(counts, probs)
    assert z < Z_MAX, f"{name} with the stop rule: kept text not distributed as AR sampling's (z = {z:.2f})"
    assert sum(len(o) < L for o in outs) > 0.1 * SAMPLES       # the rule really ended many completions early


def test_planted_stop_bug_is_caught(model):
    counts, probs, _ = kept_counts(model, "jacobi", KeepsOneMore)
    assert chi_square_z(counts, probs) > Z_MAX
