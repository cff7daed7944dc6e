"""Atomic files: a finished write replaces the file whole, and temp files of dead writers are swept."""
import os
import subprocess
import sys

import pytest
import torch

from jfmini.runtime.writes import atomic_save, atomic_write


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_temp_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".state.pt.{dead_pid()}.abc123.tmp"       # what a SIGKILL mid-save leaves
    stale.write_bytes(b"half a checkpoint")
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".other.pt.{live_writer.pid}.xyz789.tmp"  # another run still writing: keep it
        live.write_bytes(b"in progress")
        foreign = tmp_path / ".notes.tmp"                            # not our naming: keep it
        foreign.write_bytes(b"x")
        atomic_save({"x": torch.ones(2)}, tmp_path / "base.pt")
        assert not stale.exists()
        assert live.exists() and foreign.exists()
        assert torch.load(tmp_path / "base.pt")["x"].tolist() == [1.0, 1.0]
    finally:
        live_writer.kill()
        live_writer.wait()


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "b.pt"
    atomic_save({"v": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"v": Unpicklable()}, target)
    assert torch.load(target)["v"] == 1
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
