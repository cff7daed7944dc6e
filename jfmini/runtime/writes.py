"""Files written whole: atomic writes (a temp file renamed over the old one, temps of killed runs swept),
a writable place checked at start-up, file hashes, and the out_dir lock."""
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from jfmini.runtime.errors import UserError
from jfmini.runtime.signals import signals_deferred


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
