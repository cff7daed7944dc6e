"""Every file jfmini reads is untrusted input: the checks of trajectories, token caches and sweep files,
and what every check shares (the machine's memory as the bound, the type tests). Checkpoints and their
model configs are checked in checkpoints.py, optimizer and RNG states in states.py.

A checkpoint may come from anyone (model files get shared), and a file in --out_dir may be truncated,
stale, or planted. So:

- Before anything is allocated, each file's listing is checked against what it claims (an archive's
  declared sizes against the machine's memory; a model config's parameter count likewise).
- Then its contents: the exact keys of its kind, types, shapes, dtypes, value ranges, finiteness.

Every problem is a UserError: one line that names the file and says what to do. The functions return
what they checked; callers use only that.
"""
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from jfmini.runtime.errors import UserError


def memory_bytes():
    """This machine's physical memory (bytes): the bound for anything a file asks us to allocate."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def gb(n):
    return f"{n / 2**30:.1f} GB"


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------- trajectories

TRAJ_ARRAYS = {"prompts": 1, "prompt_offsets": 1, "fixed": 3, "states": 2, "owner": 1, "truth": 2}   # name: ndim


def check_npz(path):
    """Before np.load: the archive holds exactly the trajectory arrays, each .npy header's shape times its
    dtype's size equals the bytes really there (a header can claim any shape), integers only (never
    pickled objects), and the whole fits in memory."""
    path = Path(path)
    fix = "delete it and run the stage again to regenerate it"
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
            names = {n[:-4] for n in infos if n.endswith(".npy")}
            if not set(TRAJ_ARRAYS) - {"truth"} <= names - {"source"} <= set(TRAJ_ARRAYS) or "source" not in names \
                    or len(infos) != len(names):
                raise UserError(f"trajectories file {path} holds {', '.join(sorted(infos)) or 'nothing'}, not "
                                f"jfmini's arrays; {fix}")
            if sum(i.file_size for i in infos.values()) > memory_bytes() // 2:
                raise UserError(f"trajectories file {path} unpacks to more than this machine can hold; {fix}")
            for name in names:
                with z.open(name + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"npy format {version}")
                    shape, fortran, dtype = read_header(f)
                    data = infos[name + ".npy"].file_size - f.tell()
                want = ("U",) if name == "source" else ("i", "u")
                if dtype.hasobject or dtype.kind not in want or (name == "source" and shape != ()) \
                        or (name != "source" and len(shape) != TRAJ_ARRAYS[name]):
                    raise UserError(f"trajectories file {path}: {name} is a {len(shape)}-d {dtype} array, not what "
                                    f"jfmini writes; {fix}")
                if math.prod(shape) * dtype.itemsize != data:
                    raise UserError(f"trajectories file {path}: {name} claims shape {shape} but holds {data} bytes; "
                                    f"{fix}")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"trajectories file {path} is unreadable ({type(e).__name__}); {fix}") from None


def check_trajectories(traj, path, n, blocks, model_cfg):
    """What a round will train on, against what it asked for: block length n, `blocks` blocks per
    trajectory, token ids the model's vocabulary has, prompts that fit its context with their blocks."""
    fix = "delete it and run the stage again to regenerate it"
    N, T, bn = traj.fixed.shape
    if bn != n or T != blocks:
        raise UserError(f"trajectories file {path} holds {T} blocks of n={bn}, but its name and source say "
                        f"{blocks} blocks of n={n}; {fix}")
    if N < 1 or len(traj.states) < 1:
        raise UserError(f"trajectories file {path} holds no trajectories; {fix}")
    V = model_cfg.vocab_size
    for name in ("prompts", "fixed", "states"):
        a = getattr(traj, name)
        if a.size and (a.min() < 0 or a.max() >= V):
            raise UserError(f"trajectories file {path}: {name} holds token ids outside the model's vocabulary of "
                            f"{V}; {fix}")
    if traj.truth.size and (traj.truth.min() < -1 or traj.truth.max() >= V):
        raise UserError(f"trajectories file {path}: truth holds token ids outside the model's vocabulary of {V}; {fix}")
    lengths = np.diff(traj.prompt_offsets)
    if traj.prompt_offsets[0] != 0 or lengths.min() < 1:
        raise UserError(f"trajectories file {path}: its prompt offsets are not increasing from 0; {fix}")
    if lengths.max() + n * T > model_cfg.seq_len:
        raise UserError(f"trajectories file {path}: a prompt of {lengths.max()} tokens and {T} blocks of {n} do not "
                        f"fit the model's context of {model_cfg.seq_len}; {fix}")


# ----------------------------------------------------------------------------- token cache

def _cache_fix(data_dir):
    return f"delete the folder {data_dir} and run again: it is rebuilt from the corpus"


def check_token_meta(data_dir):
    """meta.json of a token cache, if there is one, is a JSON object (prepare_corpus reads it)."""
    meta = Path(data_dir) / "meta.json"
    if not meta.exists():
        return
    try:
        value = json.loads(meta.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"token cache {meta} is unreadable ({type(e).__name__}); {_cache_fix(data_dir)}") from None
    if not isinstance(value, dict):
        raise UserError(f"token cache {meta} is not a JSON object; {_cache_fix(data_dir)}")


def check_token_files(data_dir, vocab, seq_len, splits=("train", "val")):
    """The token files that exist among `splits`: whole uint16 tokens, ids below `vocab`, and more than one
    training window (seq_len + 1 tokens)."""
    for split in splits:
        f = Path(data_dir) / f"{split}.bin"
        if not f.exists():
            continue
        if not f.is_file():
            raise UserError(f"token cache {f} is not a file; {_cache_fix(data_dir)}")
        size = f.stat().st_size
        if size == 0 or size % 2:
            raise UserError(f"token cache {f} is {'empty' if not size else 'cut mid-token'} ({size} bytes); "
                            f"{_cache_fix(data_dir)}")
        tokens = np.memmap(f, dtype=np.uint16, mode="r")
        if int(tokens.max()) >= vocab:
            raise UserError(f"token cache {f} holds token id {int(tokens.max())}, outside the vocabulary of {vocab}; "
                            f"{_cache_fix(data_dir)}")
        if len(tokens) < seq_len + 2:
            raise UserError(f"token cache {f} holds {len(tokens)} tokens, too few for one window of a context of "
                            f"{seq_len}; lower --seq_len, or use a larger --corpus")


# ----------------------------------------------------------------------------- sweep file

# A decoder setting: (type check, range), as jfmini.jacobi.check_args and bench.py's grid use them.
SETTING_RANGES = {"block_len": (1, 4096), "num_blocks": (1, 64), "pool_size": (0, 256), "ngram": (0, 256),
                  "cand_len": (1, 4096)}
SWEEP_KEYS = {"device", "best", "base_best", "results"}
RESULT_KEYS = {"tokens_per_forward", "tokens_per_s", "compiled_tokens_per_s"}


def settings_problem(s):
    if not isinstance(s, dict) or not s:
        return "is not an object of decoder settings"
    for k, v in s.items():
        if k == "activation_ratio":
            if not _is_number(v) or not 0 < v <= 1:
                return f"has activation_ratio {v!r}, not a number in (0, 1]"
        elif k in SETTING_RANGES:
            lo, hi = SETTING_RANGES[k]
            if not (_is_int(v) and lo <= v <= hi or k == "cand_len" and v is None):
                return f"has {k} {v!r}, not an integer in {lo}..{hi}"
        else:
            return f"has an unknown setting {k!r}"
    if "block_len" not in s:
        return "has no block_len"
    return None


def read_sweep(path, flag):
    """The JSON object bench.py --sweep writes: {device, best, base_best, results}, each checked. `flag`
    is the option that names the file. Returns the dict."""
    fix = f"run `python bench.py --sweep` to write it again, or pass another {flag}"
    try:
        saved = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{flag} {path} is not a JSON object; {fix}")
    if unknown := set(saved) - SWEEP_KEYS:
        raise UserError(f"{flag} {path} has unknown keys {', '.join(sorted(unknown))}; {fix}")
    if "best" not in saved:
        raise UserError(f"{flag} {path} has no 'best' settings; {fix}")
    for k in ("best", "base_best"):
        if k in saved and (bad := settings_problem(saved[k])):
            raise UserError(f"{flag} {path}: '{k}' {bad}; {fix}")
    if not isinstance(saved.get("device", ""), str):
        raise UserError(f"{flag} {path}: 'device' is not a string; {fix}")
    results = saved.get("results", {})
    rows = results.values() if isinstance(results, dict) else None
    if rows is None or not all(isinstance(r, list) for r in rows) or not all(
            isinstance(row, dict) and settings_problem({k: v for k, v in row.items() if k not in RESULT_KEYS}) is None
            and all(_is_number(row.get(k, 0)) and math.isfinite(row.get(k, 0)) for k in RESULT_KEYS)
            for r in rows for row in r):
        raise UserError(f"{flag} {path}: 'results' is not a list of measured settings per model; {fix}")
    return saved
