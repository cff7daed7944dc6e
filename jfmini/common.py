"""Plumbing shared by the scripts: config dataclasses as flags, atomic files, the one checkpoint
loader, and one-line errors for bad input."""
import argparse
import dataclasses
import errno
import functools
import hashlib
import os
import re
import sys
import tempfile
import zipfile
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


def parse_config(cls, argv=None, description=None, checks=None, defaults=None):
    """Turn a @dataclass into --field flags (same spelling as the code), with help from the field's
    `doc` metadata. argparse reports unknown flags and wrong types itself (one line, exit code 2).

    --help shows `description` as written (the module docstring: its usage examples keep their lines)
    and each flag's default. A field whose default is None is resolved later (from the model, a preset);
    `defaults` maps its name to the text shown instead, e.g. "gpu preset: 1500, cpu preset: 220"."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else eval(f.type)  # annotations may be strings
        value = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        shown = (defaults or {}).get(f.name, None if f.default is None else f"default: {value}")
        help_ = " ".join(filter(None, [f.metadata.get("doc", ""), shown and f"({shown})"])).replace("%", "%%")
        if kind is bool:
            action = parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else {int: "N", float: "X"}.get(kind)
            action = parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=choices, metavar=metavar)
        action.help = help_              # set afterwards: some Pythons append their own "(default: ...)"
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
    `path`: readers never see half a file, and a crash leaves `path` as it was. An OSError (disk full,
    no permission) becomes a UserError that says so."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:           # Ctrl-C included: never leave a temp behind
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(write_failed(path, e)) from None
        raise
    _remove_dead_temps(path.parent)


def write_failed(path, e):
    """The one-line message for an OSError while writing `path`."""
    kept = f"the last good {Path(path).name} is kept" if Path(path).is_file() else "nothing was written"
    if e.errno == errno.ENOSPC:
        return f"the disk is full: could not write {path}; {kept}; free some space and run again"
    return f"could not write {path} ({e.strerror or e}); {kept}; pass a place you can write to"


def check_writable(path, flag, folder=True):
    """Fail at start-up, not at the first save: create the folder `path` (or the folder of the file
    `path`) if missing, then write and remove a probe file in it. `flag` names the option in the message."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass a folder (it is created if missing)")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name, e.g. {path / 'sweep.json'}")
    where = path if folder else path.parent
    above = next(p for p in (where, *where.parents) if p.exists())
    if not above.is_dir():
        raise UserError(f"{flag} {path} cannot be written: {above} is a file, not a folder; pass another path")
    probe = where / f".write_probe.{os.getpid()}.0.tmp"      # a temp name: swept if we are killed here
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as e:
        full = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise UserError(f"{flag} {path} cannot be written ({full}); pass a place you can write to") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write(path, data: bytes):
    """Write bytes atomically (temp file + fsync + rename)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def _torch_save(obj, name):
    """torch.save through a Python file: a failed write raises OSError (ENOSPC when the disk is full);
    given a file name, torch's own writer reports it as an obscure RuntimeError instead."""
    with open(name, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj, path):
    """torch.save atomically (temp file + fsync + rename)."""
    _atomic(path, lambda tmp: _torch_save(obj, tmp))


def file_sha256(path):
    """Hex digest of a file's bytes (read in 1 MB pieces): identifies the model a derived file came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path, device="cpu", flag=None):
    """The one checkpoint loader: returns (model, checkpoint dict) or raises a UserError that says
    what is wrong with the file and what to do. `flag` is the option that named the file ("--ckpt"),
    so the message says what to pass instead; None for a file a script finds itself (train.py's own)."""
    from jfmini.model import GPT, GPTConfig
    path = Path(path)
    instead = f"pass {flag} with a .pt file written by train.py" if flag else \
        "move it away and run the stage of train.py that writes it again"
    if path.is_dir():
        inside = default_checkpoint(path)
        raise UserError(f"{path} is a directory, not a checkpoint; "
                        + (f"pass a file in it, e.g. {flag} {inside}" if flag and Path(inside).is_file() else instead))
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found" + (f"; run `python train.py` first or pass {flag} PATH"
                                                           if flag else ""))
    if _foreign_zip(path):
        raise UserError(f"{path} is not a checkpoint (a zip archive without torch's data.pkl: NumPy arrays such as "
                        f"train.py's trajectories, or another program's file); {instead}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); it is truncated or not a "
                        f"jfmini checkpoint: " + (instead if flag else "delete it and train again")) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a jfmini checkpoint (no model weights inside); {instead}")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"{path} holds weights that do not fit its own model config; it is corrupt: train again") from None
    return model.to(device).eval(), ckpt


def _foreign_zip(path):
    """Is this a zip archive (an .npz, say) that is not torch.save's format (which zips a data.pkl)?"""
    try:
        with zipfile.ZipFile(path) as z:
            return not any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False                     # not a whole zip: torch.load reports it


def default_checkpoint(out_dir="out"):
    """The newest Jacobi Forcing round in out_dir, else the base model (what decode.py uses)."""
    rounds = sorted(Path(out_dir).glob("jf[0-9]*.pt"), key=lambda p: int(p.stem[2:]) if p.stem[2:].isdigit() else -1)
    rounds = [p for p in rounds if p.stem[2:].isdigit()]
    return str(rounds[-1] if rounds else Path(out_dir) / "base.pt")


def check_device(name):
    """Refuse a --device this code cannot use, before anything is loaded."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N (N = the GPU's index)")


def pick_device(name="auto"):
    check_device(name)
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
