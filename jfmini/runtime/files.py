"""Every file jfmini reads is untrusted input: the checks, in one place.

A checkpoint may come from anyone (model files get shared), and a file in --out_dir may be truncated,
stale, or planted. So:

- Checkpoints and *_state.pt files are read with torch.load(weights_only=True): tensors, numbers,
  strings and plain containers only. Python objects are refused, never built: a pickle's __reduce__
  could run any code. Optimizer and RNG state are stored as tensors and plain types for that reason.
- Before anything is allocated, each file's listing is checked against what it claims (an archive's
  declared sizes against the machine's memory; a model config's parameter count likewise).
- Then its contents: the exact keys of its kind, types, shapes, dtypes, value ranges, finiteness.

Every problem is a UserError: one line that names the file and says what to do. The functions return
what they checked; callers use only that.
"""
import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from jfmini.runtime.common import UserError

# Sane bounds of a model config (this project's models are far inside them). The largest vocabulary is
# the p50k-style code tokenizer's (GPT-2's 50,257 tokens plus 24 whitespace runs); token files are uint16.
MAX_VOCAB = 50281
MAX_SEQ_LEN = 1 << 16
MAX_LAYERS = 256
MAX_WIDTH = 1 << 14


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


# ----------------------------------------------------------------------------- model config

def param_count(c):
    """Parameters of a GPT with config dict c (the vocabulary padded to 64, as jfmini.model does)."""
    d, padded = c["d_model"], math.ceil(c["vocab_size"] / 64) * 64
    return padded * d + c["n_layer"] * (12 * d * d + 2 * d) + d


def model_config_problem(c, prefix="model_config "):
    """What is wrong with a model config dict (a phrase), or None. Exact keys: a missing n_head must not
    quietly become the default and load a different model. Sizes are refused before anything is
    allocated. `prefix` names a key in the message: "model_config " for a file, "--" for train.py's flags."""
    from jfmini.model import GPTConfig
    from jfmini.runtime.data import TOKENIZERS, full_vocab
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    if not isinstance(c, dict):
        return f"model_config is a {type(c).__name__}, not a dict"
    if "tokenizer" not in c and set(c) == set(fields) - {"tokenizer"}:
        c = {**c, "tokenizer": "gpt2"}                     # older models name no tokenizer: they used GPT-2's
    if set(c) != set(fields):
        missing, extra = sorted(set(fields) - set(c), key=str), sorted(set(c) - set(fields), key=str)
        return "model_config " + "; ".join(filter(None, [missing and f"lacks {', '.join(map(str, missing))}",
                                                         extra and f"has unknown keys {', '.join(map(str, extra))}"]))
    for k in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
        if not _is_int(c[k]):
            return f"{prefix}{k} is {c[k]!r}, not an integer"
    for k, lo, hi in (("vocab_size", 257, MAX_VOCAB), ("seq_len", 1, MAX_SEQ_LEN), ("n_layer", 1, MAX_LAYERS),
                      ("d_model", 2, MAX_WIDTH), ("n_head", 1, c["d_model"])):
        if not lo <= c[k] <= hi:
            return f"{prefix}{k} is {c[k]}, outside {lo}..{hi}"
    if c["d_model"] % c["n_head"] or (c["d_model"] // c["n_head"]) % 2:
        return f"{prefix}d_model {c['d_model']} does not split into n_head={c['n_head']} heads of an even size"
    if c["tokenizer"] not in TOKENIZERS:
        return f"{prefix}tokenizer is {c['tokenizer']!r}, not one of {', '.join(TOKENIZERS)}"
    if c["vocab_size"] > full_vocab(c["tokenizer"]):
        return f"{prefix}vocab_size {c['vocab_size']} is more than the {c['tokenizer']} tokenizer has"
    rope = c["rope_base"]
    if not _is_number(rope) or not math.isfinite(rope) or rope <= 1:
        return f"{prefix}rope_base is {rope!r}, not a finite number above 1"
    need, have = 4 * param_count(c), memory_bytes()
    if need > have // 2:
        return (f"a model of {param_count(c):,} parameters ({gb(need)} of float32 weights) is more than this "
                f"machine can hold ({gb(have)} of memory)")
    return None


# ----------------------------------------------------------------------------- checkpoints

# What each kind of checkpoint holds: (required keys, optional keys). Any other key is refused.
COMMON = {"model", "model_config", "kind"}
KINDS = {
    "base": (COMMON, {"val_loss", "train_config", "steps"}),
    "jacobi_forcing": (COMMON | {"round", "block_len", "source_sha256"}, {"val_loss", "train_config", "steps"}),
    "pretrain_state": (COMMON | {"optimizer", "step", "train_config", "rng", "world"}, set()),
    "jacobi_forcing_state": (COMMON | {"optimizer", "step", "train_config", "rng", "world", "round", "block_len",
                                       "source_sha256"}, set()),
}


def load_checkpoint(path, device="cpu", flag=None, kinds=("base", "jacobi_forcing", "pretrain_state",
                                                           "jacobi_forcing_state")):
    """The one checkpoint loader: returns (model, checkpoint dict) or raises a UserError that says
    what is wrong with the file and what to do. `flag` is the option that named the file ("--ckpt"),
    so the message says what to pass instead; None for a file a script finds itself (train.py's own).
    `kinds`: the kinds of file the caller takes (a *_state.pt holds a model too: decode.py runs it; train.py
    asks for the kind it continues). The file is read without running code and checked whole (read_checkpoint)."""
    path = Path(path)
    instead = f"pass {flag} with a .pt file written by train.py" if flag else \
        "delete it and run the stage again without --resume" if all(k.endswith("_state") for k in kinds) else \
        "move it away and run the stage of train.py that writes it again"
    if path.is_dir():
        inside = default_checkpoint(path)
        raise UserError(f"{path} is a directory, not a checkpoint; "
                        + (f"pass a file in it, e.g. {flag} {inside}" if flag and Path(inside).is_file() else instead))
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file (a device or a pipe), not a checkpoint; {instead}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found" + (f"; run `python train.py` first or pass {flag} PATH"
                                                           if flag else ""))
    model, ckpt = read_checkpoint(path, instead, kinds)
    return model.to(device).eval(), ckpt


def default_checkpoint(out_dir="out"):
    """The newest Jacobi Forcing round in out_dir, else the base model (what decode.py uses)."""
    rounds = sorted(Path(out_dir).glob("jf[0-9]*.pt"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else -1)
    rounds = [p for p in rounds if p.stem[2:].isdigit()]
    return str(rounds[-1] if rounds else Path(out_dir) / "base.pt")


def read_checkpoint(path, instead, kinds=tuple(KINDS)):
    """torch.load a jfmini checkpoint without running code, and check it whole: its kind (one of
    `kinds`), its keys, its model config (before any allocation), and its weights against the model that
    config builds (names, shapes, float dtypes, finite). `instead` says what to do about a bad file.
    Returns (the model with those weights, on the CPU, the dict)."""
    from jfmini.model import GPT, GPTConfig
    path = Path(path)
    where = f"checkpoint {path}"
    _check_archive(path, instead, where)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"Unsupported[^\n.]*", str(e))
        if "weights only" in str(e).lower():
            what = f" ({found.group(0) if found else 'a Python object'})"
            raise UserError(f"{where} holds Python objects{what}, which could run code when loaded; jfmini refuses "
                            f"them (a crafted file, or one from another program or an older jfmini): {instead}") from None
        raise UserError(f"{where} is unreadable (UnpicklingError); it is truncated or not a jfmini checkpoint: "
                        f"{instead}") from None
    except Exception as e:
        raise UserError(f"{where} is unreadable ({type(e).__name__}); it is truncated or not a jfmini checkpoint: "
                        f"{instead}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a jfmini checkpoint (no model weights inside); {instead}")
    kind = ckpt.get("kind")
    if kind not in KINDS:
        raise UserError(f"{where} has kind {kind!r}, not one jfmini writes ({', '.join(KINDS)}); {instead}")
    if kind not in kinds:
        raise UserError(f"{where} is a {kind} file, not a {' or '.join(kinds)} checkpoint; {instead}")
    required, optional = KINDS[kind]
    missing, extra = required - set(ckpt), set(ckpt) - required - optional
    if missing or extra:
        raise UserError(f"{where} ({kind}) " + "; ".join(filter(None, [
            missing and f"lacks {', '.join(sorted(map(str, missing)))}",
            extra and f"has unknown entries {', '.join(sorted(map(str, extra)))}"])) + f"; {instead}")
    if (bad := model_config_problem(ckpt["model_config"])) is not None:
        raise UserError(f"{where}: {bad}; {instead}")
    if (bad := metadata_problem(ckpt)) is not None:
        raise UserError(f"{where}: {bad}; {instead}")
    model = GPT(GPTConfig(**ckpt["model_config"]))          # the config is sane and fits in memory
    if (bad := weights_problem(ckpt["model"], model.state_dict())) is not None:
        raise UserError(f"{where}: {bad}; {instead}")
    model.load_state_dict(ckpt["model"])                    # names and shapes were checked: this fits
    return model, ckpt


def _check_archive(path, instead, where):
    """A torch.save file is a zip archive that holds a data.pkl; its members' sizes must fit in memory
    (a crafted archive can declare any size). Other zips (.npz trajectories) are refused by name."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        # torch.save has written zip archives since torch 1.6; the older format allocates what it declares
        why = "not a zip archive" if isinstance(e, zipfile.BadZipFile) else type(e).__name__
        raise UserError(f"{where} is unreadable ({why}); it is truncated or not a jfmini checkpoint: "
                        f"{instead}") from None
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise UserError(f"{path} is not a checkpoint (a zip archive without torch's data.pkl: NumPy arrays such as "
                        f"train.py's trajectories, or another program's file); {instead}")
    total = sum(i.file_size for i in infos)
    if total > memory_bytes() // 2:
        raise UserError(f"{where} unpacks to {gb(total)}, more than this machine can hold; {instead}")


def weights_problem(sd, model_sd):
    """What is wrong with a state dict for the model whose own state dict is `model_sd` (a phrase), or
    None: exactly its names and shapes, float dtypes, dense CPU tensors, every value finite."""
    if not isinstance(sd, dict):
        return f"its weights are a {type(sd).__name__}, not a dict of tensors"
    expected = {k: tuple(v.shape) for k, v in model_sd.items()}
    missing, extra = set(expected) - set(sd), set(sd) - set(expected)
    if missing or extra:
        names = sorted(map(str, missing or extra))
        return (f"its weights {'lack' if missing else 'have unknown'} {', '.join(names[:3])}"
                f"{' and more' if len(names) > 3 else ''} for its model_config")
    for k, shape in expected.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu":
            return f"weight {k} is not a plain tensor"
        if tuple(t.shape) != shape:
            return f"weight {k} has shape {tuple(t.shape)}, not {shape} as its model_config needs"
        if not t.is_floating_point():
            return f"weight {k} is {str(t.dtype).replace('torch.', '')}, not a float tensor"
        if not torch.isfinite(t).all():
            return f"weight {k} holds NaN or infinite values"
    return None


def metadata_problem(ckpt):
    """The entries beside the weights: what they may hold."""
    cfg = ckpt["model_config"]
    checks = {
        "val_loss": lambda v: v is None or _is_number(v),
        "steps": lambda v: _is_int(v) and 0 <= v <= 10**9,
        "step": lambda v: _is_int(v) and 0 <= v <= 10**9,
        "world": lambda v: _is_int(v) and 1 <= v <= 1 << 16,
        "round": lambda v: _is_int(v) and 1 <= v <= 9,
        "block_len": lambda v: _is_int(v) and 2 <= v <= cfg["seq_len"],
        "source_sha256": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "train_config": train_config_ok,
        "optimizer": optimizer_shape_ok,
        "rng": rng_ok,
    }
    for k, ok in checks.items():
        if k in ckpt and not ok(ckpt[k]):
            return f"its {k} entry is malformed"
    return None


def train_config_ok(tc):
    """train.py's flags: a dict of flag names to plain values (a corpus jfmini knows)."""
    from jfmini.runtime.data import CORPORA
    if not isinstance(tc, dict) or len(tc) > 500:
        return False
    for k, v in tc.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (bool, int, float, str))):
            return False
        if isinstance(v, str) and len(v) > 10_000:
            return False
    return tc.get("corpus") is None or tc["corpus"] in CORPORA


def optimizer_shape_ok(sd):
    """The outline of an optimizer's state_dict; load_optimizer_state checks it against the model."""
    return isinstance(sd, dict) and set(sd) == {"state", "param_groups"} and isinstance(sd["state"], dict) \
        and isinstance(sd["param_groups"], list) and all(isinstance(g, dict) for g in sd["param_groups"])


def optimizer_problem(sd, opt):
    """What is wrong with a saved AdamW state_dict for the live optimizer `opt` (a phrase), or None: the
    same groups over the same parameters, and per parameter a step count and exp_avg, exp_avg_sq of its
    shape (float, finite; exp_avg_sq >= 0)."""
    live = opt.state_dict()["param_groups"]
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(sd["param_groups"]) != len(live):
        return f"{len(sd['param_groups'])} parameter groups, not {len(live)}"

    def plain(v):
        if isinstance(v, (tuple, list)):
            return all(_is_number(x) and math.isfinite(x) for x in v)
        return v is None or isinstance(v, bool) or _is_number(v) and math.isfinite(v)
    for g, want in zip(sd["param_groups"], live):
        if set(g) != set(want) or g["params"] != want["params"]:
            return "parameter groups of another optimizer or model"
        if not all(plain(v) for k, v in g.items() if k != "params"):
            return "an optimizer setting that is not a finite number"
    for i, s in sd["state"].items():
        if not _is_int(i) or not 0 <= i < len(params) or not isinstance(s, dict) \
                or set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            return "state for parameters this model does not have"
        for k in ("exp_avg", "exp_avg_sq"):
            t = s[k]
            if not isinstance(t, torch.Tensor) or t.shape != params[i].shape or not t.is_floating_point() \
                    or not torch.isfinite(t).all() or (k == "exp_avg_sq" and (t < 0).any()):
                return f"an {k} that does not fit parameter {i}"
        step = s["step"].item() if isinstance(s["step"], torch.Tensor) and s["step"].numel() == 1 else s["step"]
        if not _is_number(step) or not math.isfinite(step) or step < 0:
            return f"a step count of {s['step']!r}"
    return None


def load_optimizer_state(opt, sd, path):
    """Load a saved AdamW state into `opt` once optimizer_problem finds nothing. The settings that belong to
    the device (fused, foreach, capturable) stay opt's: a state saved on a GPU resumes on a CPU."""
    if (bad := optimizer_problem(sd, opt)) is not None:
        raise UserError(f"{path}: its optimizer state holds {bad}; delete it and run the stage again without "
                        f"--resume")
    device_settings = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in opt.param_groups]
    opt.load_state_dict(sd)
    for g, keep in zip(opt.param_groups, device_settings):
        g.update(keep)


def rng_state():
    """The global RNGs' state as tensors and plain types (np.random.get_state() holds an ndarray)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                      "pos": int(pos), "has_gauss": int(has_gauss),
                                                      "cached_gaussian": float(gauss)}}


def rng_ok(r):
    if not isinstance(r, dict) or set(r) != {"torch", "numpy"}:
        return False
    t, n = r["torch"], r["numpy"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != torch.get_rng_state().shape:
        return False
    if not isinstance(n, dict) or set(n) != {"name", "keys", "pos", "has_gauss", "cached_gaussian"}:
        return False
    keys = n["keys"]
    return (n["name"] == "MT19937" and isinstance(keys, torch.Tensor) and keys.dtype == torch.int64
            and keys.shape == (624,) and bool(((keys >= 0) & (keys < 2**32)).all()) and _is_int(n["pos"])
            and 0 <= n["pos"] <= 624 and n["has_gauss"] in (0, 1) and _is_number(n["cached_gaussian"]))


def set_rng_state(r):
    """Put back what rng_state() returned (checked by rng_ok when its file was read)."""
    torch.set_rng_state(r["torch"])
    n = r["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


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
