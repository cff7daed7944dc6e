"""Plumbing shared by the scripts: config dataclasses as flags, atomic files, the one checkpoint
loader, and one-line errors for bad input."""
import argparse
import dataclasses
import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""


def cli(main):
    """Run main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapped


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block: 'train.py: error: ... (see --help)', exit code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(cls, argv=None, description=None, checks=None):
    """Turn a @dataclass into --field flags (same spelling as the code), with help from the field's
    `doc` metadata. argparse reports unknown flags and wrong types itself (one line, exit code 2)."""
    parser = Parser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else eval(f.type)  # annotations may be strings
        help_ = f.metadata.get("doc", "")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_, choices=choices)
    args = parser.parse_args(argv)
    cfg = cls(**vars(args))
    for ok, msg in (checks(cfg) if checks else []):
        if not ok:
            parser.error(msg)
    return cfg


def field(default, doc, choices=None):
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # it exists, owned by someone else
        return True
    return True


def _remove_dead_temps(folder):
    """Delete our temp files in `folder` whose writer no longer runs: a run killed mid-write leaves
    its temp behind, and the next write into that folder removes it."""
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name[:-len(".tmp")].rsplit(".", 2)          # ".<name>", "<pid>", "<random>"
        if len(parts) == 3 and parts[1].isdigit():
            pid = int(parts[1])
            if pid != os.getpid() and not _pid_alive(pid):
                tmp.unlink(missing_ok=True)


def _atomic(path, write):
    """write(tmp_name) into a temp file beside `path` (named after this process), then rename it over
    `path`: readers never see half a file, and a crash leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:                # Ctrl-C included: never leave a temp behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _remove_dead_temps(path.parent)


def atomic_write(path, data: bytes):
    """Write bytes atomically (temp file + fsync + rename)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def atomic_save(obj, path):
    """torch.save atomically (temp file + rename)."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path):
    """Hex digest of a file's bytes (read in 1 MB pieces): identifies the model a derived file came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path, device="cpu"):
    """The one checkpoint loader: returns (model, checkpoint dict) or raises a UserError that says
    what is wrong with the file and what to do."""
    from jfmini.model import GPT, GPTConfig
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; run `python train.py` first or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); it is truncated or not a "
                        f"jfmini checkpoint: delete it and train again") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a jfmini checkpoint (no model weights inside); pass a file written by train.py")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path} holds weights that do not fit its own model config; it is corrupt: train again") from None
    return model.to(device).eval(), ckpt


def default_checkpoint(out_dir="out"):
    """The newest Jacobi Forcing round in out_dir, else the base model (what decode.py uses)."""
    rounds = sorted(Path(out_dir).glob("jf[0-9]*.pt"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else -1)
    rounds = [p for p in rounds if p.stem[2:].isdigit()]
    return str(rounds[-1] if rounds else Path(out_dir) / "base.pt")


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name.startswith("cuda:"):
        # graph capture, streams and synchronize() use the current device: make it this one
        try:
            torch.cuda.set_device(torch.device(name))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--device {name}: {str(e).splitlines()[0]}; "
                            f"this machine has {torch.cuda.device_count()} GPU(s)") from None
    return name
