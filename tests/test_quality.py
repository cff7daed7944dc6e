"""The code tokenizer, the quality metrics against the true code, and the recipe's parts that keep quality:
the repetition filter, the ground-truth AR rows and the KL-anchored AR term."""
import hashlib
import math

import numpy as np
import pytest
import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.tokenizers import P50K_SHA256, byte_tokenizer, p50k_table, tokenizer
from jfmini.runtime.corpus import token_cache
from jfmini.forcing import pack_rows
from jfmini.masks import TRUTH
from jfmini.runtime.trajectories import Trajectories, longest_run, repetitive
from jfmini.runtime.quality import (edit_similarity, first_line, function_body, paired_difference, parses, score, summarize,
                                    truth_loss)
from tests.conftest import tiny_model
from jfmini.tools.paper import forcing_loss


def test_p50k_table_is_tiktokens_file_byte_for_byte():
    assert hashlib.sha256(p50k_table()).hexdigest() == P50K_SHA256


def test_p50k_keeps_gpt2_ids_and_gives_an_indent_one_token():
    enc, gpt2 = tokenizer("p50k"), tokenizer("gpt2")
    assert enc.encode("Hello world") == gpt2.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50281 and enc.eot_token == 50256 and gpt2.eot_token == 50256
    assert enc.encode(" " * 8) == [50263]                       # runs of 2..25 spaces are ids 50257..50280
    assert len(enc.encode("        return x")) == 3 and len(gpt2.encode("        return x")) == 9
    code = "def f(x):\n    if x:\n        return [x,\n                x]\n    return None\n"
    assert enc.decode(enc.encode(code)) == code and len(enc.encode(code)) < 0.75 * len(gpt2.encode(code))


def test_small_p50k_vocab_keeps_space_runs_and_puts_end_of_text_last():
    enc = tokenizer("p50k", 4096)
    assert enc.n_vocab == 4096 and enc.eot_token == 4095
    code = "class A:\n    def f(self):\n        return 1\n"
    ids = enc.encode(code)
    assert enc.decode(ids) == code and max(ids) < 4095 and len(enc.encode(" " * 8)) == 1
    with pytest.raises(UserError, match="vocab_size"):
        tokenizer("p50k", 270)                                  # no room for the bytes and the space runs
    with pytest.raises(UserError, match="tokenizer"):
        tokenizer("cl100k")


def test_token_caches_of_two_tokenizers_never_share_a_folder(tmp_path):
    names = {token_cache(tmp_path, "stdlib", 4096, "gpt2"), token_cache(tmp_path, "stdlib", 4096, "p50k"),
             token_cache(tmp_path, "stdlib", 50257, "gpt2"), token_cache(tmp_path, "stdlib", 50281, "p50k")}
    assert len(names) == 4
    assert token_cache(tmp_path, "stdlib", 50257, "gpt2").name == "data_stdlib"   # the folder older runs made


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_similarity_equals_the_textbook_levenshtein():
    rng = np.random.default_rng(0)
    pairs = [("kitten", "sitting"), ("", ""), ("", "abc"), ("abc", ""), ("same", "same")]
    pairs += [("".join(rng.choice(list("ab \n"), rng.integers(0, 40))), "".join(rng.choice(list("ab \n"), rng.integers(0, 40))))
              for _ in range(50)]
    got = edit_similarity(pairs)
    want = [1.0 if not (a or b) else 1 - levenshtein(a, b) / max(len(a), len(b)) for a, b in pairs]
    assert np.allclose(got, want, atol=1e-6)
    assert got[0] == pytest.approx(1 - 3 / 7)


def test_function_body_stops_where_the_function_ends():
    prompt = 'class A:\n    def f(self):\n        """Doc."""\n'
    source, body = function_body(prompt, "        return 1\n\n    def g(self):\n        pass\n")
    assert body == "        return 1\n\n"         # the kept text: up to the next method
    assert source.startswith("def f(self):") and parses(prompt, "        return 1\n")
    assert not parses(prompt, "        return (1\n")
    assert first_line("\n\n   x = 1  \ny") == "x = 1"


def test_score_rates_blank_loops_and_the_true_body():
    prompt = 'def f(x):\n    """Double x."""\n'
    rows = score([prompt] * 3, ["    return 2 * x\n", "\n\n\ndef g():\n", "    y = y\n" * 30],
                 [[1, 2, 3, 4, 5], [1], [7, 8] * 40], ["    return 2 * x\n"] * 3)
    assert [r["blank"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["loop"] for r in rows] == [0.0, 0.0, 1.0]
    assert rows[0]["edit_sim"] == 1.0 and rows[0]["first_line"] == 1.0 and rows[1]["first_line"] == 0.0
    assert rows[1]["edit_sim"] == 0.0 and 0 < rows[2]["edit_sim"] < 1
    mean, se = summarize(rows)["blank"]
    assert mean == pytest.approx(1 / 3) and se == pytest.approx(np.std([0, 1, 0], ddof=1) / math.sqrt(3))


def test_paired_difference_is_the_mean_change_with_its_standard_error():
    a = [{"parse": 1.0}, {"parse": 0.0}, {"parse": 1.0}, {"parse": 1.0}]
    b = [{"parse": 1.0}, {"parse": 1.0}, {"parse": 0.0}, {"parse": 0.0}]
    d, se = paired_difference(a, b, "parse")
    assert d == pytest.approx(-0.25) and se == pytest.approx(np.std([0, 1, -1, -1], ddof=1) / 2)


def test_truth_loss_scores_only_the_body_tokens():
    model = tiny_model(spread=1.0)
    prompts, bodies = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    nats, counts = truth_loss(model, prompts, bodies, batch=2)
    assert counts == [2, 3]
    for p, b, got in zip(prompts, bodies, nats):                 # the same as one plain forward per pair
        seq = torch.tensor([p + b])
        logp = model(seq[:, :-1], torch.arange(seq.shape[1] - 1)).log_softmax(-1)[0]
        want = -sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(b))
        assert got == pytest.approx(want, rel=1e-5)


def test_longest_run_stops_at_end_of_text():
    assert longest_run([1, 2, 2, 2, 3]) == 3 and longest_run([]) == 0
    assert longest_run([5, 9, 9, 9, 9, 0, 0], eot=5) == 0
    assert longest_run([1, 1, 5, 9, 9, 9, 9], eot=5) == 2


def fake_trajectories(fixed, truth=None):
    """One state per block (the fixed point itself), prompts of 3 tokens."""
    N, T, n = fixed.shape
    return Trajectories(prompts=np.arange(3 * N, dtype=np.uint16), prompt_offsets=np.arange(0, 3 * N + 1, 3),
                        fixed=fixed.astype(np.uint16), states=fixed.reshape(N * T, n).astype(np.uint16),
                        owner=np.arange(N * T), truth=truth)


def test_repetition_filter_drops_looping_trajectories_and_subset_renumbers():
    rng = np.random.default_rng(0)
    fixed = rng.integers(10, 200, (4, 2, 8))
    fixed[1, 0, 2:] = 7                                          # a run of 6 + 8 = 14 sevens across blocks
    fixed[1, 1, :] = 7
    fixed[2, 1, :] = 7                                           # 8 sevens, then past end-of-text nothing
    traj = fake_trajectories(fixed, truth=np.arange(4 * 5, dtype=np.int32).reshape(4, 5))
    loops = repetitive(traj, 10, eot=256)
    assert loops.tolist() == [False, True, False, False]
    kept = traj.subset(np.flatnonzero(~loops))
    assert kept.problem() is None and len(kept) == 3
    assert np.array_equal(kept.fixed, traj.fixed[[0, 2, 3]]) and np.array_equal(kept.prompt(1), traj.prompt(2))
    assert np.array_equal(kept.truth, traj.truth[[0, 2, 3]])


def test_trajectories_keep_their_ground_truth_through_a_file(tmp_path):
    fixed = np.random.default_rng(1).integers(0, 200, (2, 2, 4))
    truth = np.array([[5, 6, 7, -1], [8, 9, 10, 11]], np.int32)
    (tmp_path / "t.npz").write_bytes(fake_trajectories(fixed, truth).to_bytes())
    back = Trajectories.load(tmp_path / "t.npz")
    assert np.array_equal(back.truth, truth)
    (tmp_path / "old.npz").write_bytes(fake_trajectories(fixed).to_bytes())   # none recorded: an empty (N, 0) array
    assert Trajectories.load(tmp_path / "old.npz").truth.shape == (2, 0)


def test_the_truth_segment_repeats_the_prompts_last_token_then_holds_the_real_continuation():
    fixed = np.zeros((2, 1, 4), np.int64)
    traj = fake_trajectories(fixed, truth=np.array([[20, 21, 22, -1], [30, 31, 32, 33]], np.int32))
    r = pack_rows(traj, [1, 0], 32, "progressive", np.random.default_rng(0), eot=256, truth=True)
    for row, tokens, targets in ((0, [5, 30, 31, 32], [30, 31, 32, 33]), (1, [2, 20, 21], [20, 21, 22])):
        seg = np.flatnonzero(r.group[row] == TRUTH)
        assert r.tokens[row, seg].tolist() == tokens and r.truth_targets[row, seg].tolist() == targets
        assert r.pos[row, seg].tolist() == list(range(2, 2 + len(tokens))) and set(r.start[row, seg]) == {2}
    assert np.all(r.truth_targets[r.group != TRUTH] == -1)
    none = pack_rows(traj, [1, 0], 32, "progressive", np.random.default_rng(0), eot=256, truth=False)
    assert not np.any(none.group == TRUTH) and np.all(none.truth_targets == -1)


def test_anchored_ar_term_is_zero_at_the_anchor_and_positive_away_from_it():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    ar_targets = torch.tensor([[1, 2, -1, 3, 4, -1], [-1, 5, 6, 7, -1, -1]])
    noisy_idx, cons_weight = torch.tensor([[0], [1]]), torch.ones(2, 1)
    _, same = forcing_loss(logits, ar_targets, noisy_idx, cons_weight, 1, ref_logits=logits)
    _, away = forcing_loss(logits, ar_targets, noisy_idx, cons_weight, 1, ref_logits=logits + torch.randn(2, 6, 11))
    assert abs(same.item()) < 1e-6 and away.item() > 0.01
    moved = logits.clone()
    moved[0, 2] += 100 * torch.randn(11)                        # a position without an AR target: ignored
    _, ignored = forcing_loss(moved, ar_targets, noisy_idx, cons_weight, 1, ref_logits=logits)
    assert abs(ignored.item()) < 1e-6


def test_byte_tokenizer_still_serves_the_tests():
    assert byte_tokenizer().encode("ab") == [97, 98]


def test_the_gpu_preset_config_passes_its_own_checks():
    """The gpu preset's model (p50k's 50,281 tokens) is accepted: the size check must know the tokenizer."""
    import train
    from jfmini.runtime.cli import parse_config
    cfg = train.with_preset(parse_config(train.TrainConfig, ["--preset", "gpu"], checks=train.checks), True)
    assert cfg.vocab_size == 50281 and cfg.tokenizer == "p50k"


def test_the_long_gpu_preset_is_the_gpu_preset_with_more_rows():
    """gpu-long changes only the number of trajectory prompts and distillation steps; flags still win."""
    import dataclasses
    import train
    from jfmini.runtime.cli import parse_config
    made = lambda *flags: dataclasses.asdict(train.with_preset(parse_config(train.TrainConfig, list(flags),
                                                                            checks=train.checks), True))
    gpu, long = made("--preset", "gpu"), made("--preset", "gpu-long")
    assert {k for k in gpu if gpu[k] != long[k]} == {"preset", "traj_prompts", "distill_steps"}
    assert (long["traj_prompts"], long["distill_steps"]) == (51200, 8000)
    assert made("--preset", "gpu-long", "--distill_steps", "5")["distill_steps"] == 5
