"""Losslessness: every decoder commits exactly the greedy AR tokens."""
import itertools

import pytest
import torch

from conftest import cuda, tiny_model
from jfmini.runtime.errors import UserError
from jfmini.candidates import grow
from jfmini.jacobi import Flight, Jacobi
from jfmini.tools.ar import generate_ar
from jfmini.tools.evaluate import decode_many
from jfmini.tools.paper import jacobi_reference
from jfmini.model import GPT, GPTConfig

GRID = list(itertools.product([1, 2, 3, 8, 16], [0, 1, 4], [1, 2, 3], [0.5, 0.85, 1.0]))
# candidate rows: block length x (recycled, n-gram) x candidate length (None = n) x blocks
CANDIDATES = list(itertools.product([3, 8, 16], [(0, 1), (2, 1), (0, 3)], [2, None], [1, 2]))


def no_cache_greedy(model, prompt, count):
    ids = list(prompt)
    for _ in range(count):
        ids.append(int(model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("seed", range(3))
def test_ar_oracle_matches_full_recompute(seed):
    model = tiny_model(seed=seed)
    prompt = torch.randint(0, 256, (7,)).tolist()
    assert generate_ar(model, prompt, 30)[0] == no_cache_greedy(model, prompt, 30)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_eot", [False, True])
def test_every_decoder_is_lossless_over_the_grid(seed, with_eot):
    model = tiny_model(seed=seed)
    N = 48
    prompt, eot, ref = prompt_and_reference(model, seed, with_eot, N)
    assert len(ref) < N if with_eot else len(ref) == N
    for n, P, K, r in GRID:
        jac = Jacobi(model, block_len=n, num_blocks=K, pool_size=P, activation_ratio=r, eot=eot)
        model.forwards = 0
        out, stats = jac.generate(prompt, N)
        assert out == ref, (n, P, K, r)
        assert stats.forwards == model.forwards - 1, "forward count must equal real calls (minus the prefill)"
        assert stats.new_tokens == len(ref)


def prompt_and_reference(model, seed, with_eot, N=48, repeat=False):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
    if repeat:                      # text that repeats itself, so context n-grams find matches
        prompt = (prompt * 4)[:40]
    eot = None
    if with_eot:  # make a token the model really emits mid-way the end-of-text, so it lands mid-block
        eot = generate_ar(model, prompt, N)[0][13 + seed]
    return prompt, eot, generate_ar(model, prompt, N, eot=eot)[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_eot", [False, True])
def test_candidate_rows_are_lossless(seed, with_eot):
    """Rejection recycling and context n-grams, with candidates shorter than the block, over the grid."""
    model = tiny_model(seed=seed)
    prompt, eot, ref = prompt_and_reference(model, seed, with_eot, repeat=seed % 2 == 0)
    for n, (P, G), c, K in CANDIDATES:
        jac = Jacobi(model, block_len=n, num_blocks=K, pool_size=P, ngram=G, cand_len=c, eot=eot)
        model.forwards = 0
        out, stats = jac.generate(prompt, 48)
        assert out == ref, (n, P, G, c, K)
        assert stats.forwards == model.forwards - 1


@pytest.mark.parametrize("seed", range(3))
def test_context_ngrams_raise_tokens_per_forward_on_repetitive_text(seed):
    """Guards against candidates that are built but never win: on text that repeats, prompt lookup must
    find accepted runs (same tokens, fewer forwards)."""
    model = tiny_model(seed=seed)
    prompt, _, ref = prompt_and_reference(model, seed, with_eot=False, N=64, repeat=True)
    plain = Jacobi(model, block_len=16).generate(prompt, 64)
    lookup = Jacobi(model, block_len=16, ngram=2, cand_len=8).generate(prompt, 64)
    assert plain[0] == lookup[0] == ref[:64]
    assert lookup[1].forwards < plain[1].forwards


@pytest.mark.parametrize("settings", [dict(block_len=6), dict(block_len=8, ngram=2, cand_len=4),
                                      dict(block_len=8, pool_size=3, cand_len=4),
                                      dict(block_len=6, num_blocks=2, pool_size=2, ngram=1, cand_len=4)])
def test_lossless_with_batched_rows_of_different_prompt_lengths(settings):
    model = tiny_model(seed=5)
    prompts = [[1, 2, 3], list(range(40, 51)), [7], list(range(100, 106))]
    jac = Jacobi(model, batch=4, **settings)
    jac.prefill(prompts, 30)
    while not bool(jac.state.done.all()):
        jac.step()
    for b, p in enumerate(prompts):
        assert jac.state.text[b, len(p):len(p) + 30].tolist() == generate_ar(model, p, 30)[0]


def test_block_len_one_is_exactly_ar():
    model = tiny_model(seed=1)
    prompt = [5, 6, 7]
    out, stats = Jacobi(model, block_len=1).generate(prompt, 25)
    assert out == generate_ar(model, prompt, 25)[0]
    assert stats.tokens_per_forward == 1.0 and stats.forwards == 25


def test_recycling_and_multiblock_change_the_forward_count_not_the_tokens():
    """Guards against a decoder that silently ignores its options."""
    tpf = {}
    for seed in range(4):
        model = tiny_model(seed=seed)
        prompt = [3, 1, 4, 1, 5]
        for cfg in ((16, 0, 1), (16, 4, 1), (16, 4, 2)):
            out, st = Jacobi(model, block_len=cfg[0], pool_size=cfg[1], num_blocks=cfg[2]).generate(prompt, 60)
            tpf.setdefault(cfg, []).append(st.tokens_per_forward)
    mean = {k: sum(v) / len(v) for k, v in tpf.items()}
    assert mean[(16, 4, 1)] > mean[(16, 0, 1)]


@pytest.mark.parametrize("kwargs", [dict(block_len=0), dict(block_len=-3), dict(num_blocks=0), dict(pool_size=-1),
                                    dict(activation_ratio=0.0), dict(activation_ratio=1.5)])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(UserError):
        Jacobi(tiny_model(), **kwargs)


def test_prompt_too_long_and_empty_prompt_are_refused():
    model = tiny_model(seq_len=32)
    jac = Jacobi(model, block_len=4)
    with pytest.raises(UserError, match="context"):
        jac.generate(list(range(30)), 8)
    with pytest.raises(UserError, match="empty"):
        jac.generate([], 8)


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decoders_are_lossless(compile):
    model = tiny_model(seed=3).cuda()
    prompt = [9, 8, 7, 6]
    ref, _ = generate_ar(model, prompt, 64)
    for n, P, G, c, K in ((1, 0, 0, None, 1), (8, 0, 0, None, 1), (16, 4, 0, None, 2), (64, 4, 2, 16, 2),
                          (32, 0, 2, 8, 1)):
        jac = Jacobi(model, block_len=n, pool_size=P, ngram=G, cand_len=c, num_blocks=K, compile=compile)
        assert jac.step.enabled
        for _ in range(2):                                # the second run replays the captured graph
            out, stats = jac.generate(prompt, 64, sync_every=3)
            assert out == ref, (n, P, K)


@cuda
def test_cuda_graph_batches_are_lossless():
    """Batched rows of different prompt lengths, finished rows frozen, replayed as one fused CUDA graph in
    float32: every row commits the AR tokens at B = 4, 16, 64 (bench.py --batch's sizes above 1)."""
    model = tiny_model(seed=5).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    eot = generate_ar(model, prompts[0], 48)[0][20]          # some rows end early and must stay frozen
    refs = [generate_ar(model, p, 48, eot=eot)[0] for p in prompts]
    for settings in (dict(block_len=32), dict(block_len=32, ngram=2, cand_len=16)):
        for B in (4, 16, 64):
            outs, _, _ = decode_many(model, prompts, 48, eot=eot, batch=B, compile=True, **settings)
            assert outs == refs, (settings, B)


@pytest.mark.parametrize("block_len", [1, 4, 16])
def test_batched_decoding_counts_what_one_prompt_decoding_counts(block_len):
    """train.py's batched TPF check (rows of different prompt lengths, some stopping at end-of-text, a
    last partial batch) counts exactly what bench.py's one-prompt decoding counts."""
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(5)]
    eot = generate_ar(model, prompts[0], 40)[0][10]          # a token that really appears mid-way
    tokens = forwards = 0
    for p in prompts:
        out, st = Jacobi(model, block_len=block_len, eot=eot).generate(p, 40)
        assert out == generate_ar(model, p, 40, eot=eot)[0]
        tokens, forwards = tokens + st.new_tokens, forwards + st.forwards
    outs, fwd, hist = decode_many(model, prompts, 40, eot=eot, batch=2, block_len=block_len)
    assert sum(map(len, outs)) / sum(fwd) == pytest.approx(tokens / forwards)
    assert sum(fwd) == forwards == int(hist.sum())           # one histogram entry per forward
    assert int((hist * torch.arange(len(hist))).sum()) >= tokens  # committed (the last one may overshoot)
    if block_len == 1:
        assert tokens == forwards


def converging_update(jac, run):
    """A Jacobi update of a fresh block after one committed token: the verified next token is new, the next
    `run` drafts equal the guesses they replace (converged), the one after them changed."""
    old = jac.state.draft.clone()
    new = torch.cat([old[:, 1:], old[:, -1:]], 1)        # every draft as its predecessor guessed it
    new[:, 0] = (old[:, 1] + 1) % 256                     # the verified token differs from the guess
    new[:, run + 1] = (old[:, run + 2] + 1) % 256         # the first draft that moved
    return new


@pytest.mark.parametrize("run, grows", [(5, True), (4, False)])
def test_a_block_whose_drafts_converged_grows_a_pseudo_active_block(run, grows):
    """n=8, activation ratio 0.85: a new block is appended once 7 of the newest block's tokens are converged.
    After one commit, the verified next token and `run` unchanged drafts make 2 + run."""
    jac = Jacobi(tiny_model(seed=0), block_len=8, num_blocks=2, activation_ratio=0.85)
    jac.prefill([[1, 2, 3]], 40)
    one = torch.ones(1, dtype=torch.long)
    draft = converging_update(jac, run)
    s = jac.state
    zeros = torch.zeros_like(draft)
    grown = grow(Flight(draft, s.block0_left - 1, s.blocks, s.in_flight - 1, one < 0), one, zeros, s.draft, s.in_flight,
                 jac.n, jac.K, jac.threshold)
    assert int(grown.blocks) == (2 if grows else 1) and int(grown.in_flight) == (7 + 8 if grows else 7)


def test_a_candidate_row_may_commit_past_the_end_of_block_zero():
    """A context n-gram of 8 tokens, all verified, commits all 8 even when block 0 has 3 tokens left."""
    jac = Jacobi(tiny_model(seed=0), block_len=8, ngram=1, cand_len=8)
    jac.prefill([[1, 2, 3]], 40)
    jac.state.in_flight.fill_(3)
    jac.state.block0_left.fill_(3)
    cand = torch.arange(10, 18)[None]
    jac.state.cand[:, 0] = cand
    g = torch.zeros(1, jac.W + 8, dtype=torch.long)
    g[:, jac.W:jac.W + 7] = cand[:, 1:]                 # the model's prediction after each candidate token
    g[:, 0] = (jac.state.draft[:, 1] + 1) % 256                # the main row fails at its first draft
    verdict = jac._accept(g, g)
    assert int(verdict.a_main) == 1 and int(verdict.a) == 8 and verdict.tokens[0, :8].tolist() == cand[0].tolist()


def test_top_k_picks_what_torch_topk_picks():
    from jfmini.candidates import top_k
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        x = torch.randperm(50, generator=g)[None].repeat(3, 1) * torch.tensor([[1], [3], [-2]])
        values, indices = top_k(x, k)
        ref = x.topk(k, dim=1)
        assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)
    ties = torch.tensor([[0, 5, 0, 5, 0]])
    assert top_k(ties, 3)[1].tolist() == [[1, 3, 0]]      # ties go to the lower index


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_eot", [False, True])
def test_fast_jacobi_is_the_reference_loop(seed, with_eot):
    """The batched, fixed-shape Jacobi class with one block and no candidates is the plain eager loop:
    the same tokens (greedy AR's) in the same number of forwards, at every block length."""
    model = tiny_model(seed=seed)
    prompt, eot, ref = prompt_and_reference(model, seed, with_eot, N=40)
    for n in (1, 2, 3, 8, 16):
        tokens, forwards = jacobi_reference(model, prompt, n, 40, eot)
        out, stats = Jacobi(model, block_len=n, eot=eot).generate(prompt, 40)
        assert tokens == out == ref, n
        assert forwards == stats.forwards, n
        assert forwards <= len(ref), "every forward commits at least the verified token"


def test_the_worked_example_of_the_step_holds():
    """Jacobi._step's docstring table, replayed: a model that predicts the AR text's next token where the
    token before is right, or where the next position is an easy one, and a wrong token (?) otherwise."""
    text = [7, 8, 9] + list(range(11, 40))               # "x y z", then A B C ...
    hard, junk = {5, 6, 9}, 1
    letters = {7: "x", 8: "y", 9: "z", junk: "?", **{11 + i: chr(65 + i) for i in range(26)}}

    class Oracle(GPT):
        def forward(self, idx, pos, mask=None, slots=None, hidden=False):
            pos, logits = pos.expand(idx.shape), torch.full((*idx.shape, 64), -10.0)
            for b, t in itertools.product(range(idx.shape[0]), range(idx.shape[1])):
                p, tok = int(pos[b, t]), int(idx[b, t])
                logits[b, t, text[p + 1] if tok == text[p] or p + 1 not in hard else junk] = 10.0
            return logits

    model = Oracle(GPTConfig(vocab_size=64, seq_len=128, n_layer=1, n_head=1, d_model=8, tokenizer="p50k"))
    jac = Jacobi(model, block_len=4, num_blocks=2, activation_ratio=0.5, graph=False, compile=False, max_len=64)
    jac.prefill([text[:3]], 16)
    s = jac.state
    spell = lambda xs: " ".join(letters[int(x)] for x in xs)                     # noqa: E731
    drafts = lambda: spell(s.draft[0, :int(s.in_flight[0])])                     # noqa: E731
    assert drafts() == "A x x z"
    for committed, after in [("A", "B ? ? E y x A"), ("A B", "C ? E F ? H"), ("A B C", "D E F G H"),
                             ("A B C D E F G H", "I y B E")]:
        jac.step()
        assert (spell(s.text[0, 3:int(s.length[0])]), drafts()) == (committed, after)
    assert int(s.forwards[0]) == 4 and int(s.blocks[0]) == 1
