"""Checkpoints and their model configs, read as untrusted input (files.py says why), and the one loader
that builds the model a checkpoint describes.

- Checkpoints and *_state.pt files are read with torch.load(weights_only=True): tensors, numbers,
  strings and plain containers only. Python objects are refused, never built: a pickle's __reduce__
  could run any code. Optimizer and RNG state are stored as tensors and plain types for that reason
  (states.py).
- Before anything is allocated, a checkpoint's listing is checked against what it claims (an archive's
  declared sizes against the machine's memory; a model config's parameter count likewise).
- Then its contents: the exact keys of its kind, types, shapes, dtypes, value ranges, finiteness.
"""
import dataclasses
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.files import _is_int, _is_number, gb, memory_bytes
from jfmini.runtime.states import optimizer_shape_ok, rng_ok

# Sane bounds of a model config (this project's models are far inside them). The largest vocabulary is
# the p50k-style code tokenizer's (GPT-2's 50,257 tokens plus 24 whitespace runs); token files are uint16.
MAX_VOCAB = 50281
MAX_SEQ_LEN = 1 << 16
MAX_LAYERS = 256
MAX_WIDTH = 1 << 14


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
    from jfmini.runtime.tokenizers import TOKENIZERS, full_vocab
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
    from jfmini.runtime.corpus import CORPORA
    if not isinstance(tc, dict) or len(tc) > 500:
        return False
    for k, v in tc.items():
        if not isinstance(k, str) or not (v is None or isinstance(v, (bool, int, float, str))):
            return False
        if isinstance(v, str) and len(v) > 10_000:
            return False
    return tc.get("corpus") is None or tc["corpus"] in CORPORA
