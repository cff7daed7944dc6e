"""Issue #13: bad input to the real scripts, the defaults that let the quick-start commands run on a
small model, and --help that teaches.

Every bad input ends with exit code 2, one line on stderr that says what to do, no traceback, and no
half-written file. The table below runs each one through the real script (a subprocess on CPU);
the unit tests beside it pin the helpers (disk full, writability probe, checkpoint messages, --help)
in-process, without timing or random moments.
"""
import dataclasses
import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from jfmini.runtime.errors import UserError
from jfmini.runtime.cli import field, parse_config
from jfmini.runtime.writes import atomic_save, atomic_write, check_writable
from jfmini.runtime.checkpoints import load_checkpoint
from test_scripts import TINY, assert_clean_failure, no_temp_files, run, tiny_base

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small GPT-2-vocabulary checkpoint (context 64), a trajectories-like .npz, a prompts file, a plain file."""
    d = tmp_path_factory.mktemp("files")
    tiny_base(d / "base.pt")
    np.savez(d / "traj_r1.npz", states=np.zeros((4, 8), dtype=np.int32), fixed=np.zeros((1, 2, 8), dtype=np.int32))
    (d / "good.jsonl").write_text('{"task_id": "t", "prompt": "def f(x):\\n"}\n')
    (d / "afile").write_text("not a folder\n")
    return d


# The common flags of each script; a row's own flags come after them (argparse: the last one wins).
DEC = ["decode.py", "--prompt", "def f(x):", "--ckpt", "{d}/base.pt", "--device", "cpu"]
BENCH = ["bench.py", "--ckpt", "{d}/base.pt", "--base_ckpt", "{d}/base.pt", "--prompts", "{d}/good.jsonl",
         "--device", "cpu", "--sweep_file", "{tmp}/sweep.json"]
TRAIN = ["train.py", "--out_dir", "{tmp}/out", "--device", "cpu"]
has_sysfs = pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs (mkdir is refused there)")

# (command, words the one stderr line must hold, words it must not hold)
BAD = [
    # sizes against the model's context, checked before the decoder allocates its cache
    ([*DEC, "--max_new_tokens", "100000000"], ["--max_new_tokens 100000000", "context of 64", "at most 59"], []),
    ([*DEC, "--max_new_tokens", "1000000"], ["--max_new_tokens 1000000", "context of 64", "at most 59"], []),
    ([*DEC, "--block_len", "5000"], ["--block_len 5000", "longer than the model's context"], []),
    ([*DEC, "--num_blocks", "100"], ["--num_blocks 100", "tokens per forward", "lower"], []),
    ([*DEC, "--pool_size", "1000"], ["--pool_size 1000", "tokens per forward", "lower"], []),
    ([*DEC, "--method", "jacobi", "--block_len", "65"], ["--block_len 65", "context of 64"], []),
    # size flags that --method ar would ignore
    ([*DEC, "--method", "ar", "--block_len", "8"], ["--method ar", "--block_len 8", "jacobi"], []),
    ([*DEC, "--method", "ar", "--pool_size", "4"], ["--method ar", "--pool_size 4"], []),
    # device names
    ([*DEC, "--device", "gpu"], ["--device 'gpu'", "cpu", "cuda:N"], []),
    ([*BENCH, "--device", "gpu"], ["--device 'gpu'", "cpu", "cuda:N"], []),
    ([*TRAIN, "--device", "gpu"], ["--device 'gpu'", "cpu", "cuda:N"], []),
    ([*TRAIN, "--device", "cuda:x"], ["--device 'cuda:x'"], []),
    # checkpoints: a directory, a trajectories file, the flag that named a missing file
    ([*DEC, "--ckpt", "{d}"], ["is a directory", "--ckpt {d}/base.pt"], []),
    ([*BENCH, "--ckpt", "{d}"], ["is a directory", "--ckpt {d}/base.pt"], []),
    ([*DEC, "--ckpt", "{d}/traj_r1.npz"], ["not a checkpoint", "pass --ckpt", ".pt file written by train.py"],
     ["delete"]),
    ([*BENCH, "--ckpt", "{d}/traj_r1.npz"], ["not a checkpoint", "pass --ckpt"], ["delete"]),
    ([*BENCH, "--base_ckpt", "{d}/traj_r1.npz"], ["not a checkpoint", "pass --base_ckpt"], ["delete"]),
    # train.py names its own stages, not a --ckpt flag it does not have
    ([*TRAIN, "--stage", "round1"], ["base.pt not found", "--stage pretrain"], [" --ckpt"]),
    ([*TRAIN, "--stage", "round2"], ["jf1.pt not found", "--stage round1"], [" --ckpt"]),
    # places that cannot be written, refused before any work
    ([*TRAIN, "--out_dir", "{d}/afile"], ["--out_dir", "is a file, not a folder"], []),
    ([*TRAIN, "--out_dir", "{d}/afile/sub"], ["--out_dir", "afile is a file, not a folder"], []),
    pytest.param([*TRAIN, "--out_dir", "/sys/jfmini_out"], ["--out_dir /sys/jfmini_out", "cannot be written"], [],
                 marks=has_sysfs),
    ([*BENCH, "--sweep", "--sweep_file", "{d}/afile/sweep.json"], ["--sweep_file", "afile is a file"], ["sweep:"]),
    ([*BENCH, "--sweep", "--sweep_file", "{d}"], ["--sweep_file", "is a folder"], ["sweep:"]),
    pytest.param([*BENCH, "--sweep", "--sweep_file", "/sys/jfmini/sweep.json"], ["--sweep_file", "cannot be written"],
                 [], marks=has_sysfs),
    # the GPU preset on a CPU
    ([*TRAIN, "--preset", "gpu"], ["--preset gpu needs a CUDA GPU", "--preset cpu"], []),
    ([*TRAIN, "--preset", "gpu-long"], ["--preset gpu-long needs a CUDA GPU", "--preset cpu"], []),
]




def row_id(command):
    """'decode.py --block_len 5000': the script and the row's own flags."""
    base = {"decode.py": DEC, "bench.py": BENCH, "train.py": TRAIN}[command[0]]
    return " ".join([command[0], *command[len(base):]]).replace("{d}", "D")


@slow
@pytest.mark.parametrize("command,words,absent", BAD, ids=[row_id(r.values[0] if hasattr(r, "values") else r[0])
                                                             for r in BAD])
def test_bad_input_is_one_line_and_exit_code_2(files, tmp_path, command, words, absent):
    fill = lambda a: a.replace("{d}", str(files)).replace("{tmp}", str(tmp_path))
    res = run(*map(fill, command))
    assert_clean_failure(res, *map(fill, words))
    for w in absent:
        assert w not in res.stderr, res.stderr
    assert no_temp_files(files) and no_temp_files(tmp_path)
    assert not (tmp_path / "sweep.json").exists() and not (tmp_path / "out" / "train.lock").exists()


@slow
def test_bench_from_another_folder_names_the_missing_base_flag(files, tmp_path):
    res = run("bench.py", "--ckpt", files / "base.pt", "--prompts", files / "good.jsonl", "--device", "cpu",
              cwd=tmp_path)
    assert_clean_failure(res, "out/base.pt not found", "--base_ckpt")
    assert " --ckpt" not in res.stderr


@slow
def test_second_train_in_the_same_out_dir_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / "train.lock", os.O_RDWR | os.O_CREAT)     # this test plays the running train.py
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        res = run("train.py", "--out_dir", out, "--stage", "pretrain", *TINY, "--steps", "2")
        assert_clean_failure(res, f"another train.py (pid {os.getpid()})", "--out_dir")
        assert (out / "train.lock").read_text() == f"{os.getpid()}\n"     # the owner's lock is left alone
        assert not (out / "base.pt").exists() and not (out / "data_stdlib").exists()
    finally:
        os.close(fd)


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@slow
def test_stale_lock_is_taken_over_and_pretraining_leaves_only_base_pt(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.lock").write_text(f"{dead_pid()}\n")                # left by a killed run
    res = run("train.py", "--out_dir", out, "--stage", "pretrain", *TINY, "--steps", "3", "--ckpt_every", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    _, final = load_checkpoint(out / "base.pt")
    assert final["steps"] == 3
    assert not (out / "pretrain_state.pt").exists()                   # base.pt holds it all
    assert not (out / "train.lock").exists() and no_temp_files(out)


@slow
def test_disk_full_during_pretraining_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import train
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):             # two checkpoints fit on the disk, the third does not
        calls.append(1)
        if len(calls) > 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(["--out_dir", str(out), "--stage", "pretrain", *TINY, "--steps", "6", "--ckpt_every", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "disk is full" in err and "the last good pretrain_state.pt is kept" in err, err
    monkeypatch.undo()
    _, state = load_checkpoint(out / "pretrain_state.pt")
    assert state["step"] == 2
    assert not (out / "base.pt").exists() and not (out / "train.lock").exists() and no_temp_files(out)


# ----------------------------------------------------------------------------- defaults that fit the model

@slow
def test_decode_max_new_tokens_defaults_to_what_the_context_leaves(files):
    res = run("decode.py", "--prompt", "def f(x):", "--ckpt", files / "base.pt", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "# --max_new_tokens 59: what the model's context of 64 leaves after the prompt" in res.stderr
    new = int(res.stderr.split("\n# ")[-1].split(" tokens to ")[0])
    assert 1 <= new <= 59


@slow
def test_bench_max_new_tokens_defaults_to_a_quarter_of_the_context(files, tmp_path):
    res = run("bench.py", "--ckpt", files / "base.pt", "--base_ckpt", files / "base.pt", "--prompts",
              files / "good.jsonl", "--device", "cpu", "--sweep_file", tmp_path / "s.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--max_new_tokens 16: a quarter of the models' context of 64 tokens" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["config"]["max_new_tokens"] == 16


def test_decode_checks_sizes_before_building_the_decoder(files, monkeypatch, capsys):
    """The decoder allocates its cache when built: a refused size must never get that far."""
    sys.path.insert(0, str(ROOT))
    import decode

    def never(*a, **k):
        raise AssertionError("the decoder was built")
    monkeypatch.setattr(decode, "Jacobi", never)
    for flags in (["--max_new_tokens", "1000000"], ["--block_len", "5000"], ["--num_blocks", "100"]):
        with pytest.raises(SystemExit) as e:
            decode.main(["--prompt", "def f(x):", "--ckpt", str(files / "base.pt"), "--device", "cpu", *flags])
        assert e.value.code == 2 and flags[0] in capsys.readouterr().err


# ----------------------------------------------------------------------------- helpers, in-process

def test_disk_full_save_is_a_user_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    atomic_save({"step": 1}, target)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="disk is full.*the last good state.pt is kept"):
        atomic_save({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1 and no_temp_files(tmp_path)

    def no_room(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", no_room)
    with pytest.raises(UserError, match="disk is full.*nothing was written"):
        atomic_write(tmp_path / "new.bin", b"x")
    monkeypatch.undo()
    assert not (tmp_path / "new.bin").exists() and no_temp_files(tmp_path)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_real_full_disk_reaches_the_save_helper_as_enospc():
    """torch.save given a file name reports a full disk as an opaque RuntimeError; atomic_save writes
    through a Python file, so the OSError(ENOSPC) that the one-line message needs comes through."""
    from jfmini.runtime.writes import _torch_save
    with pytest.raises(OSError) as e:
        _torch_save({"x": torch.zeros(1 << 16)}, "/dev/full")
    assert e.value.errno == errno.ENOSPC


def test_check_writable_refuses_files_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "afile", "--out_dir")
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "sub", "--out_dir")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path, "--sweep_file", folder=False)
    check_writable(tmp_path / "new" / "deep", "--out_dir")               # created, probe removed
    check_writable(tmp_path / "other" / "sweep.json", "--sweep_file", folder=False)
    assert (tmp_path / "new" / "deep").is_dir() and not (tmp_path / "other" / "sweep.json").exists()
    assert no_temp_files(tmp_path)


def test_checkpoint_messages_say_what_to_pass(files, tmp_path):
    with pytest.raises(UserError) as e:
        load_checkpoint(files / "traj_r1.npz", flag="--ckpt")
    assert "not a checkpoint" in str(e.value) and "delete" not in str(e.value)
    with pytest.raises(UserError, match=r"is a directory.*--base_ckpt .*base\.pt"):
        load_checkpoint(files, flag="--base_ckpt")
    with pytest.raises(UserError, match="pass --base_ckpt PATH"):
        load_checkpoint(tmp_path / "missing.pt", flag="--base_ckpt")
    with pytest.raises(UserError) as e:                             # a file train.py looks for itself
        load_checkpoint(tmp_path / "missing.pt")
    assert "pass" not in str(e.value)
    (tmp_path / "cut.pt").write_bytes((files / "base.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated.*pass --ckpt"):
        load_checkpoint(tmp_path / "cut.pt", flag="--ckpt")


# ----------------------------------------------------------------------------- --help

def help_text(module, capsys):
    sys.path.insert(0, str(ROOT))
    mod = __import__(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", ["decode", "bench", "train"])
def test_help_shows_examples_and_real_defaults(script, capsys):
    text = " ".join(help_text(script, capsys).split())                       # argparse wraps lines
    assert f"python {script}.py" in text.split("options:")[0]                  # the usage examples
    assert "(default: None)" not in text and "(required) (default" not in text
    assert "DESIGN" not in text
    assert "TPF (tokens per forward" in text
    if script != "train":
        assert "rejection recycling + multi-block" in text and "blocks in flight" in text


def test_train_help_lists_both_presets(capsys):
    text = " ".join(help_text("train", capsys).split())                     # argparse wraps lines
    assert "(gpu preset: 1500, cpu preset: 1000)" in text
    assert "(gpu preset: stdlib+torch+deps, cpu preset: stdlib)" in text
    assert "(default: 10.0)" in text and "(default: off)" in text


def test_help_works_for_any_dataclass_field(capsys):
    @dataclasses.dataclass
    class Cfg:
        new_flag: int = field(3, "a flag added later")
        unset: float = field(None, "resolved at run time")
        shown: str = field(None, "resolved from a table")
        percent: float = field(0.5, "a share in % of the total")
        on: bool = field(True, "a switch")

    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"], description="Title.\n\n    python x.py --new_flag 4   # an example\n",
                     defaults={"shown": "table: 7"})
    text = " ".join(capsys.readouterr().out.split())
    assert "python x.py --new_flag 4 # an example" in text
    assert "a flag added later (default: 3)" in text and "resolved at run time --shown" in text
    assert "resolved from a table (table: 7)" in text and "in % of the total (default: 0.5)" in text
    assert "a switch (default: on)" in text and "None" not in text
    assert parse_config(Cfg, ["--new_flag", "4", "--no-on"]) == Cfg(new_flag=4, on=False)


def test_show_counts_only_the_tokens_it_shows():
    """--show: the last forward may commit past the cut at max_new_tokens; its line counts what it shows."""
    from jfmini.tools import show

    class Letters:
        def decode(self, tokens):
            return "".join(chr(ord("a") + t) for t in tokens)
    final = [1, 2, 3, 4, 5]                          # 5 new tokens after a 3-token prompt
    frames = [(3 + 2, [3, 9]), (3 + 8, [0])]         # 2 committed, then 6 more of which 3 survive the cut
    lines = show.render(Letters(), frames, final, 3, color=False).splitlines()
    assert lines[1].startswith("   0 +2  [b][c] | {d} j")
    assert lines[2].startswith("   1 +3  [d][e][f] |")
