"""Plumbing shared by the scripts: config dataclasses as flags, atomic files, one-line errors for bad
input, signals that save instead of kill, and the out_dir lock."""
import argparse
import dataclasses
import errno
import fcntl
import functools
import hashlib
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input: the scripts print the message on one line and exit with code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's `kill`) or SIGHUP (the terminal closed) as an exception, so
    that training can save its state on the way out. `note` is the line cli() prints (what was saved)."""

    def __init__(self, signum=signal.SIGINT, note=None):
        super().__init__(note)
        self.signum, self.note = signum, note


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class signals_deferred:
    """A stop signal that arrives inside this block waits until the block is done, then is raised: a
    checkpoint is never cut in half (torch's zip writer, interrupted mid-write, raises its own
    RuntimeError over the KeyboardInterrupt). While an interruption is already being handled (the save
    on the way out), a second signal is dropped: the run is stopping anyway."""
    depth, pending = 0, None

    def __enter__(self):
        signals_deferred.depth += 1

    def __exit__(self, kind, value, tb):
        signals_deferred.depth -= 1
        if signals_deferred.depth or signals_deferred.pending is None:
            return
        signum, signals_deferred.pending = signals_deferred.pending, None
        handling = sys.exc_info()[1]                 # the exception being handled around this block, if any
        if kind is None and not isinstance(handling, KeyboardInterrupt):
            raise Interrupted(signum)


def _on_stop_signal(signum, frame):
    if signals_deferred.depth:
        signals_deferred.pending = signals_deferred.pending or signum
    else:
        raise Interrupted(signum)


@contextmanager
def stop_signals_raise():
    """Inside: SIGINT, SIGTERM and SIGHUP raise Interrupted. A signal this process was started with
    ignored stays ignored (`nohup` ignores SIGHUP; a background job of a script ignores SIGINT). The
    previous handlers come back afterwards (main() called from a test)."""
    if threading.current_thread() is not threading.main_thread():     # only the main thread may set handlers
        yield
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def interrupted(e, note):
    """The Interrupted to raise after saving, for the signal of `e` (a plain KeyboardInterrupt is SIGINT)."""
    return Interrupted(getattr(e, "signum", signal.SIGINT), note)


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
    no permission, the file size limit) becomes a UserError that says so. Stop signals wait until the
    file is whole (signals_deferred)."""
    path = Path(path)
    tmp = None
    try:
        with signals_deferred():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())         # mkstemp makes 0600: a model file others may read
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


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_failed(path, e):
    """The one-line message for an OSError while writing `path`."""
    kept = f"the last good {Path(path).name} is kept" if Path(path).is_file() else "nothing was written"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full: could not write {path}; {kept}; free some space and run again"
    if e.errno == errno.EFBIG:
        return (f"could not write {path}: it would pass the file size limit (`ulimit -f`); {kept}; raise the "
                f"limit or pass a place without one")
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
    probe = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        # a new file (never one planted under a known name), named like a temp: swept if we are killed here
        fd, probe = tempfile.mkstemp(dir=where, prefix=f".write_probe.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(b"probe")
    except OSError as e:
        full = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise UserError(f"{flag} {path} cannot be written ({full}); pass a place you can write to") from None
    finally:
        try:
            if probe is not None:
                Path(probe).unlink(missing_ok=True)
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
    given a file name, torch's own writer reports it as an obscure RuntimeError instead. Even so, torch's
    zip writer, finishing the archive while that OSError (or a KeyboardInterrupt) unwinds, raises
    "RuntimeError ... unexpected pos" over it: the first exception is the one that says what happened."""
    with open(name, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, (OSError, KeyboardInterrupt)):
                raise e.__context__ from None
            raise
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


@contextmanager
def out_dir_lock(out, master=True, who="train.py"):
    """One run per --out_dir (train.py, ablate.py): an exclusive flock on out_dir/train.lock, which holds
    the pid, removed when the run ends (errors and signals included). The kernel drops the flock when
    its process dies, so a lock file left by a killed run (its pid dead) is simply taken over. The lock
    never follows a symbolic link (O_NOFOLLOW) and is only ever a regular file of one name: a planted
    link would have us truncate the file it points to. Other ranks of a torchrun (master False) skip it."""
    if not master:
        yield
        return
    path = Path(out) / "train.lock"
    fix = "remove it (no jfmini run uses it), or pass another --out_dir"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            what = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a directory"}.get(e.errno)
            if what:
                raise UserError(f"{path} {what}, not a lock file; {fix}") from None
            raise UserError(f"cannot open the lock file {path} ({e.strerror}); pass an --out_dir you can write "
                            f"to") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else "has other names (a hard link)"
            raise UserError(f"{path} {what}, not a lock file; {fix}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"another {who} (pid {pid}) is using --out_dir {out}; wait for it to finish, "
                            f"or pass another --out_dir") from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):  # not one just removed
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


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
