"""Trajectories, the noise schedule, packing and the loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EOT, cuda, tiny_model
from jfmini.runtime.errors import UserError
from jfmini.jacobi import Jacobi
from jfmini.tools.ar import generate_ar
from jfmini.forcing import collect_trajectories, noise_ratio, target_ratios
from jfmini.runtime.engine import Replay
from jfmini.runtime.trajectories import Trajectories
from jfmini.runtime.attention import dense_mask
from jfmini.tools.paper import accuracy_by_distance, forcing_loss, noise_aware_mask, pack, packed_length


def synthetic(prompts, T, n, seed=0, states_per_block=None):
    """Trajectories whose block j of prompt i has states with first mismatch at 1..n (ratios (n-1)/n..0)."""
    rng = np.random.default_rng(seed)
    fixed = rng.integers(0, 200, (len(prompts), T, n))
    states, owner = [], []
    for i in range(len(prompts)):
        for j in range(T):
            for first in (states_per_block or range(1, n + 1)):
                s = fixed[i, j].copy()
                s[first:] = (s[first:] + 1 + rng.integers(0, 50, n - first)) % 250
                states.append(s)
                owner.append(i * T + j)
    lens = [len(p) for p in prompts]
    return Trajectories(np.concatenate(prompts).astype(np.uint16), np.concatenate([[0], np.cumsum(lens)]),
                        fixed.astype(np.uint16), np.asarray(states, np.uint16), np.asarray(owner))


@pytest.fixture
def traj():
    return synthetic([np.arange(5) + 10, np.arange(9) + 40], T=4, n=4)


def test_noisy_and_clean_twins_share_positions(traj):
    n, T = 4, 4
    p = pack(traj, [0, 1], packed_length(16, n, T), "progressive", np.random.default_rng(0), EOT)
    for r in range(2):
        P = p.prompt_len[r]
        assert list(p.pos[r, :P]) == list(range(P))
        for j in range(T):
            k = p.pos[r, P + 2 * n * j: P + 2 * n * j + n]
            l = p.pos[r, P + 2 * n * j + n: P + 2 * n * (j + 1)]
            assert list(k) == list(l) == list(range(P + n * j, P + n * (j + 1)))
        # the clean twins hold the fixed points
        assert list(p.tokens[r, P + n: P + 2 * n]) == list(traj.fixed[r, 0])


@pytest.mark.parametrize("schedule", ["progressive", "reverse", "random"])
def test_selected_noise_ratios_follow_the_schedule(schedule):
    n, T = 16, 16
    traj = synthetic([np.arange(6)], T=T, n=n)
    p = pack(traj, [0], packed_length(16, n, T), schedule, np.random.default_rng(1), EOT, fresh=False)
    P = 6
    got = np.array([noise_ratio(p.tokens[0, P + 2 * n * j: P + 2 * n * j + n][None], traj.fixed[0, j])[0]
                    for j in range(T)])
    wanted = target_ratios(T, schedule, np.random.default_rng(1))
    available = np.arange(n) / n      # ratios on offer: states with first mismatch at 1..n-1, the fixed point
    nearest = available[np.abs(available[None] - wanted[:, None]).argmin(1)]
    np.testing.assert_allclose(got, nearest)
    if schedule == "progressive":
        assert got[0] == 0 and got[-1] == (n - 1) / n and np.all(np.diff(got) >= 0)
    if schedule == "reverse":
        assert np.all(np.diff(got) <= 0)


def test_progressive_ramp_repeats_every_window():
    t = target_ratios(8, "progressive", None, noise_window=4)
    np.testing.assert_allclose(t, [0, 1 / 3, 2 / 3, 1] * 2)


def test_consistency_loss_zero_when_noisy_equals_clean_and_positive_otherwise():
    model = tiny_model(spread=1.0)
    n, T = 4, 3
    clean_traj = synthetic([np.arange(7)], T=T, n=n, states_per_block=[n])       # every state is the fixed point
    noisy_traj = synthetic([np.arange(7)], T=T, n=n, states_per_block=[1])
    for traj, zero in ((clean_traj, True), (noisy_traj, False)):
        L = packed_length(16, n, T)
        p = pack(traj, [0], L, "progressive", np.random.default_rng(0), EOT, noise_window=T)
        mod = noise_aware_mask(torch.tensor(p.prompt_len), torch.tensor(p.pad_start), n, "noisy")
        logits = model(torch.tensor(p.tokens), torch.tensor(p.pos), dense_mask(mod, 1, L))
        for target in ("soft", "hard"):
            pc, _ = forcing_loss(logits, torch.tensor(p.ar_targets), torch.tensor(p.noisy_idx),
                                 torch.tensor(p.cons_weight), n, target)
            assert (pc.item() == 0.0) == zero


def test_ar_part_equals_plain_causal_lm_loss_on_the_clean_stream(traj):
    model = tiny_model(spread=1.0)
    n, T = 4, 4
    L = packed_length(16, n, T)
    p = pack(traj, [0, 1], L, "progressive", np.random.default_rng(0), EOT)
    mod = noise_aware_mask(torch.tensor(p.prompt_len), torch.tensor(p.pad_start), n, "noisy")
    logits = model(torch.tensor(p.tokens), torch.tensor(p.pos), dense_mask(mod, 2, L))
    _, ar = forcing_loss(logits, torch.tensor(p.ar_targets), torch.tensor(p.noisy_idx),
                         torch.tensor(p.cons_weight), n)
    total, count = 0.0, 0
    for r in range(2):
        stream = torch.tensor(np.concatenate([traj.prompt(r), traj.fixed[r].reshape(-1)]).astype(np.int64))
        lg = model(stream[None, :-1], torch.arange(len(stream) - 1))[0]
        total += F.cross_entropy(lg, stream[1:], reduction="sum").item()
        count += len(stream) - 1
    assert ar.item() == pytest.approx(total / count, rel=1e-5)


def test_tokens_after_end_of_text_are_ignored(traj):
    n, T = 4, 4
    traj.fixed[0, 1, 2] = EOT                         # end-of-text in block 1 of prompt 0
    p = pack(traj, [0], packed_length(16, n, T), "progressive", np.random.default_rng(0), EOT)
    P = 5
    eot_stream = 1 * n + 2
    clean_pos = [P + 2 * n * (s // n) + n + s % n for s in range(T * n)]
    targets = p.ar_targets[0, clean_pos]
    assert targets[eot_stream - 1] == EOT              # learning to emit end-of-text is kept
    assert np.all(targets[eot_stream:] == -1)          # nothing after it is a target
    assert np.all(p.cons_weight[0, eot_stream:] == 0)


@pytest.mark.parametrize("seed", range(4))
def test_trajectories_end_at_the_greedy_ar_continuation(seed):
    model = tiny_model(seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 12))).tolist() for _ in range(5)]
    n, T = 5, 3
    traj = collect_trajectories(model, prompts, n, T, batch_size=4, eot=None, log=lambda *_: None)
    for i, prompt in enumerate(prompts):
        ar, _ = generate_ar(model, prompt, n * T)
        assert traj.fixed[i].reshape(-1).tolist() == ar
        for j in range(T):
            states = traj.states[traj.owner == i * T + j]
            assert 1 <= len(states) <= n
            assert states[0][0] == traj.fixed[i, j, 0]              # the first token is always verified
            ratios = noise_ratio(states, traj.fixed[i, j])
            assert np.all(ratios < 1) and np.all(np.diff(ratios) <= 0)  # converging, never backwards


def capture_like_step(self):
    """A decoder's step (engine.Replay) as on CUDA, without a GPU: the first call runs the real steps a
    graph capture runs (3 warm-ups + the capture) and undoes them, then every call runs one step."""
    if not getattr(self, "_warmed", False):
        with self.undone():
            for _ in range(4):
                self.fn()
        self._warmed = True
    self.fn()


def collect(model, prompts, n, T, batch_size):
    return collect_trajectories(model, prompts, n, T, batch_size=batch_size, eot=None, log=lambda *_: None)


@pytest.mark.parametrize("seed", range(3))
def test_graph_warm_up_leaves_trajectories_unchanged(monkeypatch, seed):
    # The CUDA capture runs real iterations (the recorder hook included) before the first replay; they
    # must not add states: once they did, and every later block's states were filed under another block.
    model = tiny_model(seed=seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 12))).tolist() for _ in range(7)]
    n, T = 6, 3
    plain = collect(model, prompts, n, T, batch_size=4)
    monkeypatch.setattr(Replay, "__call__", capture_like_step)
    warmed = collect(model, prompts, n, T, batch_size=4)
    assert plain.problem() is None and warmed.problem() is None
    for k in ("fixed", "states", "owner"):
        assert np.array_equal(getattr(plain, k), getattr(warmed, k)), k


def test_undone_puts_back_the_hook_tensors():
    model = tiny_model(seed=1)

    class Hook:                       # a stateful pre_step hook, like the trajectory recorder
        def __init__(self):
            self.calls = torch.zeros(1, dtype=torch.long)

        def tensors(self):
            return [self.calls]

        def __call__(self, jac):
            self.calls += 1

    hook = Hook()
    jac = Jacobi(model, block_len=4, pre_step=hook, graph=False)
    jac.prefill([[1, 2, 3]], 16)
    with jac.step.undone():
        for _ in range(3):
            jac.step()
        assert int(hook.calls) == 3 and int(jac.state.forwards[0]) == 3
    assert int(hook.calls) == 0 and int(jac.state.forwards[0]) == 0


@cuda
def test_cuda_graph_collection_equals_eager_collection():
    model = tiny_model(seed=2).cuda()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 12))).tolist() for _ in range(9)]
    eager = collect_trajectories(model, prompts, 8, 3, 4, eot=None, log=lambda *_: None, graph=False)
    graph = collect_trajectories(model, prompts, 8, 3, 4, eot=None, log=lambda *_: None, graph=True)
    for k in ("fixed", "states", "owner"):
        assert np.array_equal(getattr(eager, k), getattr(graph, k)), k


def test_inconsistent_trajectories_are_refused(tmp_path, traj):
    assert traj.problem() is None
    shifted = Trajectories(traj.prompts, traj.prompt_offsets, traj.fixed, traj.states,
                           np.append(traj.owner, traj.owner[-1]))                 # one owner entry too many
    assert "owner" in shifted.problem()
    wrong_first = Trajectories(traj.prompts, traj.prompt_offsets, traj.fixed, traj.states.copy(), traj.owner)
    wrong_first.states[5, 0] += 1                                                 # not the verified token
    assert "first token" in wrong_first.problem()
    too_many = Trajectories(traj.prompts, traj.prompt_offsets, traj.fixed, np.concatenate([traj.states] * 2),
                            np.sort(np.concatenate([traj.owner] * 2)))            # 2n states in a block
    assert "expected 1.." in too_many.problem()
    (tmp_path / "bad.npz").write_bytes(wrong_first.to_bytes())
    with pytest.raises(UserError, match="inconsistent.*delete it"):
        Trajectories.load(tmp_path / "bad.npz")


def test_trajectories_round_trip(tmp_path, traj):
    traj.source = '{"checkpoint": "abc"}'
    (tmp_path / "t.npz").write_bytes(traj.to_bytes())
    back = Trajectories.load(tmp_path / "t.npz")
    assert np.array_equal(back.states, traj.states) and np.array_equal(back.fixed, traj.fixed)
    assert back.source == traj.source


def test_a_few_distillation_steps_lower_the_loss():
    model = tiny_model(spread=1.0).train()
    n, T = 4, 4
    traj = synthetic([np.arange(6) + i for i in range(8)], T=T, n=n)
    L = packed_length(16, n, T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(30):
        p = pack(traj, list(range(8)), L, "progressive", rng, EOT)
        mod = noise_aware_mask(torch.tensor(p.prompt_len), torch.tensor(p.pad_start), n, "noisy")
        logits = model(torch.tensor(p.tokens), torch.tensor(p.pos), dense_mask(mod, 8, L))
        pc, ar = forcing_loss(logits, torch.tensor(p.ar_targets), torch.tensor(p.noisy_idx),
                              torch.tensor(p.cons_weight), n)
        loss = pc + ar
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def packed_states(p, n, T, P):
    return np.stack([p.tokens[:, P + 2 * n * j: P + 2 * n * j + n] for j in range(T)], 1)   # (B, T, n)


def test_fresh_states_vary_across_epochs_with_the_same_schedule_statistics():
    """Each packing draws k_j anew (a random ramp phase per row, a random state among the nearest
    ratios), so epochs see different pairs; the ratios still follow the ramp: uniform over it."""
    n, T, W = 8, 8, 8
    traj = synthetic([np.arange(6)] * 40, T=T, n=n, states_per_block=[1, 1, 2, 3, 3, 5, 6, 8, 8])
    rows = list(range(40))
    L = packed_length(16, n, T)
    rng = np.random.default_rng(0)
    a, b = (pack(traj, rows, L, "progressive", rng, EOT, noise_window=W) for _ in range(2))
    assert (packed_states(a, n, T, 6) != packed_states(b, n, T, 6)).any(-1).mean() > 0.3
    fixed = (pack(traj, rows, L, "progressive", rng, EOT, noise_window=W, fresh=False) for _ in range(2))
    assert np.array_equal(*(packed_states(p, n, T, 6) for p in fixed))
    for p in (a, b):
        got = np.array([[noise_ratio(p.tokens[r, 6 + 2 * n * j: 6 + 2 * n * j + n][None], traj.fixed[r, j])[0]
                         for j in range(T)] for r in rows])
        assert abs(got.mean() - 0.5) < 0.08                       # the ramp's mean
        assert (got == 0).any() and (got >= 7 / 8).any()          # clean and fully noisy ends both drawn
        assert len(np.unique(got[:, 0])) > 2                       # block 0 is no longer always clean


def test_consistency_window_keeps_only_positions_near_the_first_divergence(traj):
    n, T = 4, 4
    L = packed_length(16, n, T)
    full = pack(traj, [0, 1], L, "progressive", np.random.default_rng(3), EOT)
    near = pack(traj, [0, 1], L, "progressive", np.random.default_rng(3), EOT, cons_window=2)
    for r in range(2):
        for j in range(T):
            d = full.first_div[r, j]
            w_full, w_near = full.cons_weight[r, j * n:(j + 1) * n], near.cons_weight[r, j * n:(j + 1) * n]
            assert list(np.flatnonzero(w_full)) == list(range(d, n))
            assert list(np.flatnonzero(w_near)) == list(range(d, min(n, d + 2)))


def test_hard_consistency_is_cross_entropy_to_the_fixed_points_next_token():
    torch.manual_seed(0)
    n, B, L, V = 2, 1, 12, 11
    logits = torch.randn(B, L, V)
    noisy_idx = torch.tensor([[3, 4, 7, 8]])
    ar_targets = torch.full((B, L), -1)
    ar_targets[0, [5, 6, 9, 10]] = torch.tensor([4, 7, 1, 2])
    weight = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    pc, _ = forcing_loss(logits, ar_targets, noisy_idx, weight, n, "hard")
    want = F.cross_entropy(logits[0, [4, 7, 8]], torch.tensor([7, 1, 2]))
    assert pc.item() == pytest.approx(want.item(), rel=1e-6)
    ar_targets[0, 10] = -1                       # the trajectory's last clean token: nothing follows it
    pc, _ = forcing_loss(logits, ar_targets, noisy_idx, weight, n, "hard")
    assert pc.item() == pytest.approx(F.cross_entropy(logits[0, [4, 7]], torch.tensor([7, 1])).item(), rel=1e-6)


def test_accuracy_by_distance_counts_every_kept_noisy_position():
    model = tiny_model(seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(rng.integers(3, 10))).tolist() for _ in range(6)]
    n, T = 6, 3
    traj = collect_trajectories(model, prompts, n, T, batch_size=6, eot=None, log=lambda *_: None)
    hits, counts = accuracy_by_distance(model, traj, EOT, "noisy", batch=4)
    assert len(hits) == n and np.all(hits <= counts) and counts[0] > 0
    assert np.all(np.diff(counts) <= 0)               # distance d needs a divergence at most n-1-d in
    # with the fixed point itself as the context nothing diverges, so the model is its own teacher:
    exact = Trajectories(traj.prompts, traj.prompt_offsets, traj.fixed, traj.fixed.reshape(-1, n)[traj.owner],
                         traj.owner)
    assert accuracy_by_distance(model, exact, EOT, "noisy")[1].sum() == 0
