"""Plumbing shared by the scripts: main() run as a script (one-line errors for bad input, exit codes,
stdout), config dataclasses as flags, and the process (torchrun's environment, the device)."""
import argparse
import dataclasses
import errno
import functools
import os
import re
import signal
import sys

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.signals import stop_signals_raise


class OutputError(OSError):
    """Writing stdout failed: its reader went away (`| head`) or its disk is full (`> /dev/full`)."""


class _Stdout:
    """sys.stdout as cli() runs a script: the same stream, with a failed write raised as OutputError, so
    that it is told apart from a failure to write a checkpoint."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            raise OutputError(e.errno, e.strerror) from None

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputError(e.errno, e.strerror) from None

    def __getattr__(self, name):
        return getattr(self.stream, name)


def quiet_stdout(stream=None):
    """Point stdout's descriptor at /dev/null: what is still buffered, and the interpreter's own flush at
    exit, go there instead of failing again (one more "Exception ignored ... BrokenPipeError")."""
    stream = stream or sys.stdout
    stream = stream.stream if isinstance(stream, _Stdout) else stream
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _standard_streams():
    """A script started with stdin, stdout or stderr closed (`>&-`) gets /dev/null there: otherwise the next
    file opened takes that descriptor, and output meant for the terminal lands in a checkpoint."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)               # the lowest free descriptor: this one
    for name in ("stdin", "stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "r" if name == "stdin" else "w"))


def cli(main):
    """Run main() as a script. A UserError becomes one line on stderr and exit code 2. SIGINT, SIGTERM and
    SIGHUP become one line (what was saved, if anything) and exit code 128 + the signal number (130, 143,
    129). A reader of stdout that went away (`| head`) ends the run quietly with 141, as SIGPIPE would;
    a stdout that cannot be written otherwise (a full disk) is one line and exit code 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        _standard_streams()
        stdout = sys.stdout
        sys.stdout = _Stdout(stdout)
        try:
            with stop_signals_raise():
                result = main(*args, **kwargs)
                sys.stdout.flush()
                return result
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            print(getattr(e, "note", None) or f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
            sys.exit(128 + signum)
        except OutputError as e:
            quiet_stdout(stdout)
            if e.errno == errno.EPIPE:
                sys.exit(128 + signal.SIGPIPE)
            print(f"error: could not write the output to stdout ({e.strerror}); send it somewhere with room",
                  file=sys.stderr)
            sys.exit(2)
        finally:
            if isinstance(sys.stdout, _Stdout):
                sys.stdout = sys.stdout.stream
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


def distributed_env():
    """(rank, world size, local rank) from torchrun's environment variables, or None without RANK. Values
    that are not what torchrun sets are refused in one line, before any process group waits on them."""
    if "RANK" not in os.environ:
        return None
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    fix = "launch with `torchrun --nproc_per_node=N train.py ...`, or unset RANK for a single process"
    env = {k: os.environ.get(k, "").strip() for k in names}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if not env[k]:
            raise UserError(f"RANK is set ({env['RANK']!r}) but {k} is not: a distributed run needs RANK, WORLD_SIZE, "
                            f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT; {fix}")
    env["LOCAL_RANK"] = env["LOCAL_RANK"] or "0"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if not env[k].isdigit():
            raise UserError(f"{k}={os.environ[k]!r} is not a whole number; {fix}")
    rank, world, local, port = (int(env[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
    if not (1 <= world <= 1 << 16 and rank < world and local < world and 1 <= port <= 65535):
        raise UserError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}, MASTER_PORT={port} do not fit "
                        f"together (0 <= RANK < WORLD_SIZE, a port 1..65535); {fix}")
    return rank, world, local


def world_size():
    """Processes of this run: WORLD_SIZE under torchrun (checked), else 1."""
    env = distributed_env()
    return env[1] if env else 1


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
