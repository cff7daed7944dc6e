"""Jacobi trajectories on disk and in memory, and their filters: the machinery under jfmini.forcing
(which records them and packs them into training rows).

- `Trajectories`: N prompts' fixed points and every recorded Jacobi state, stored compactly, turned
  into and loaded from plain arrays (no code), checked whole.
- `longest_run`, `repetitive`: which fixed points are greedy loops.
- `merge_trajectories`: one set from the shares that data-parallel ranks collected.
"""
import io
from dataclasses import dataclass

import numpy as np

from jfmini.runtime.errors import UserError


@dataclass
class Trajectories:
    """Jacobi trajectories of N prompts, T blocks of n tokens each, stored compactly.

    prompts: concatenated prompt tokens, split by prompt_offsets (N + 1,)
    fixed:   (N, T, n) fixed points: the greedy AR continuation, block by block
    states:  (S, n) every recorded state (before each iteration), owner (S,) = prompt * T + block,
             sorted; states[owner == g] are block g's states in iteration order
    source:  what made them (JSON: checkpoint fingerprint, block length, blocks, prompts, seed), so a
             stale file is never reused for another model
    truth:   (N, K) the ground truth after each prompt: the next K tokens of its source file, -1 past the
             file's end (K = 0: none recorded). jfmini's addition: an AR loss on real code.
    """
    prompts: np.ndarray
    prompt_offsets: np.ndarray
    fixed: np.ndarray
    states: np.ndarray
    owner: np.ndarray
    source: str = "{}"
    truth: np.ndarray = None

    @classmethod
    def from_lists(cls, prompts, fixed, states, owner, source="{}", truth=None):
        """Build from token lists (prompts), per-prompt (T, n) fixed points, per-block state arrays and
        their owners, as collection produces them; checked whole."""
        lens = [len(p) for p in prompts]
        traj = cls(prompts=np.concatenate([np.asarray(p, dtype=np.uint16) for p in prompts]),
                   prompt_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                   fixed=np.stack(fixed).astype(np.uint16), states=np.concatenate(states).astype(np.uint16),
                   owner=np.asarray(owner, dtype=np.int64), source=source, truth=truth_array(truth, len(prompts)))
        if (bad := traj.problem()) is not None:
            raise RuntimeError(f"collected trajectories are inconsistent: {bad}")
        return traj

    def __post_init__(self):
        if self.truth is None:
            self.truth = np.zeros((len(self.fixed), 0), np.int32)

    @property
    def block_len(self):
        return self.fixed.shape[2]

    def __len__(self):
        return self.fixed.shape[0]

    def prompt(self, i):
        return self.prompts[self.prompt_offsets[i]:self.prompt_offsets[i + 1]]

    def problem(self):
        """What is inconsistent (a string), or None. Every block has 1..n states, each in order and each
        starting with the block's verified first token, and states line up with owner one to one."""
        N, T, n = self.fixed.shape
        if len(self.owner) != len(self.states):
            return f"{len(self.states)} states but {len(self.owner)} owner entries"
        if len(self.prompt_offsets) != N + 1 or self.prompt_offsets[-1] != len(self.prompts):
            return "prompt offsets do not match the prompts"
        if len(self.owner) and (np.any(np.diff(self.owner) < 0) or self.owner[0] < 0 or self.owner[-1] >= N * T):
            return "owner is not sorted or out of range"
        counts = np.bincount(self.owner, minlength=N * T)
        if counts.min(initial=1) < 1 or counts.max(initial=1) > n:
            return f"a block has {counts.min()}..{counts.max()} states, expected 1..{n}"
        if self.truth.ndim != 2 or len(self.truth) != N:
            return f"truth has shape {self.truth.shape}, expected ({N}, K)"
        first = self.fixed.reshape(N * T, n)[self.owner, 0]
        if np.any(self.states[:, 0] != first):
            return f"{int(np.sum(self.states[:, 0] != first))} states do not start with their block's first token"
        return None

    def to_bytes(self):
        """The .npz file's bytes (plain arrays); train.py writes them atomically."""
        buf = io.BytesIO()
        np.savez(buf, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        return buf.getvalue()

    @classmethod
    def load(cls, path):
        try:
            with np.load(path) as z:
                traj = cls(**{k: z[k] for k in cls.__dataclass_fields__ if k not in ("source", "truth")},
                           source=str(z["source"]) if "source" in z else "{}",
                           truth=z["truth"] if "truth" in z else None)
        except Exception as e:
            raise UserError(f"trajectories file {path} is unreadable ({type(e).__name__}); delete it and run "
                            f"the stage again to regenerate it") from None
        if (bad := traj.problem()) is not None:
            raise UserError(f"trajectories file {path} is inconsistent ({bad}); delete it and run the stage "
                            f"again to regenerate it")
        return traj


    def subset(self, keep):
        """The trajectories of prompts `keep` (sorted indices), renumbered."""
        keep = np.asarray(keep, dtype=np.int64)
        T = self.fixed.shape[1]
        lens = np.diff(self.prompt_offsets)[keep]
        blocks = (keep[:, None] * T + np.arange(T)).reshape(-1)              # old block ids, in order
        new_id = np.full(len(self) * T, -1, np.int64)
        new_id[blocks] = np.arange(len(blocks))
        mine = new_id[self.owner] >= 0
        return Trajectories(np.concatenate([self.prompt(i) for i in keep]) if len(keep) else self.prompts[:0],
                            np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), self.fixed[keep],
                            self.states[mine], new_id[self.owner[mine]], self.source, self.truth[keep])


def truth_array(truth, count):
    """Token lists -> (count, longest) int32, -1 past each list's end; no lists -> (count, 0)."""
    width = max((len(t) for t in truth), default=0) if truth else 0
    out = np.full((count, width), -1, np.int32)
    for i, t in enumerate(truth or []):
        out[i, :len(t)] = t
    return out


def longest_run(tokens, eot=None):
    """Length of the longest run of one repeated token (up to the first end-of-text)."""
    tokens = np.asarray(tokens)
    if eot is not None and np.any(tokens == eot):
        tokens = tokens[:int(np.argmax(tokens == eot))]
    if len(tokens) == 0:
        return 0
    change = np.flatnonzero(np.diff(tokens) != 0)
    edges = np.concatenate([[-1], change, [len(tokens) - 1]])
    return int(np.diff(edges).max())


def repetitive(traj, max_repeat, eot):
    """Which prompts' fixed points hold a run of max_repeat or more identical tokens (bool (N,)): greedy
    loops, which teach the consistency loss to predict repetition. CLLM drops such samples."""
    stream = traj.fixed.reshape(len(traj), -1)
    return np.array([longest_run(row, eot) >= max_repeat for row in stream], dtype=bool)


def merge_trajectories(parts):
    """Concatenate per-rank Trajectories (prompt indices renumbered)."""
    prompts, offsets, fixed, states, owner = [], [0], [], [], []
    n_before = 0
    T = parts[0].fixed.shape[1]
    for t in parts:
        prompts.append(t.prompts)
        offsets += list(offsets[-1] + t.prompt_offsets[1:])
        fixed.append(t.fixed)
        states.append(t.states)
        owner.append(t.owner + n_before * T)
        n_before += len(t)
    width = max(t.truth.shape[1] for t in parts)
    truth = np.concatenate([np.pad(t.truth, ((0, 0), (0, width - t.truth.shape[1])), constant_values=-1) for t in parts])
    return Trajectories(np.concatenate(prompts), np.asarray(offsets, dtype=np.int64), np.concatenate(fixed),
                        np.concatenate(states), np.concatenate(owner), parts[0].source, truth)
