"""The real scripts, run as subprocesses: bad input, interruption, corrupt files, NaN, determinism, DDP.

Every bad input must end with exit code 2, one line on stderr naming the problem and the fix, no
traceback, and no half-written file left behind.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_model
from jfmini.runtime.writes import atomic_save
from jfmini.runtime.checkpoints import load_checkpoint
from jfmini.model import GPT, GPTConfig

pytestmark = pytest.mark.slow
PY = sys.executable
# How long a child may take before a test calls it hung: a bound for a child that is stuck, never a
# deadline for one that is merely slow on a loaded machine (a subprocess here takes seconds when idle).
LONG = 1800
# A tiny pretraining run: seconds on one CPU core.
TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "16", "--seq_len", "32", "--batch_size", "2",
        "--eval_batches", "1", "--eval_every", "1000", "--corpus", "stdlib", "--device", "cpu"]


def run(script, *args, cwd=None, timeout=LONG, stdin=None, **env):
    """Run a script; stdin: bytes for its standard input (else none); env: extra environment variables."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    res = subprocess.run([PY, str(ROOT / script), *map(str, args)], capture_output=True, input=stdin or b"",
                         cwd=cwd, timeout=timeout, env=env)
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode("utf-8", "replace"),
                                       res.stderr.decode("utf-8", "replace"))


def tiny_base(path):
    """A small GPT-2-vocabulary base checkpoint (context 64) at path."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, seq_len=64, n_layer=1, n_head=2, d_model=16))
    atomic_save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "kind": "base",
                 "val_loss": 10.0}, path)


def fake_token_cache(out, vocab=4096, tokens=4096, seed=0, corpus="stdlib"):
    """A token cache of random ids that prepare_corpus takes as already built (its meta.json matches), so
    that a TINY pretraining run starts at once instead of tokenizing the corpus first."""
    from jfmini.runtime.corpus import SPLITS, token_cache
    d = token_cache(out, corpus, vocab)
    d.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(seed).integers(0, vocab - 1, tokens).astype(np.uint16)
    for split in ("train", "val"):
        (d / f"{split}.bin").write_bytes(ids.tobytes())
    (d / "meta.json").write_text(json.dumps({"corpus": corpus, "vocab": vocab, "splits": json.dumps(SPLITS)}))
    return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small GPT-2-vocabulary checkpoint, a corrupt and a foreign file, prompts files."""
    d = tmp_path_factory.mktemp("files")
    tiny_base(d / "base.pt")
    blob = (d / "base.pt").read_bytes()
    (d / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    (d / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": [1, 2, 3]}, d / "foreign.pt")
    (d / "good.jsonl").write_text('{"task_id": "t", "prompt": "def f(x):\\n"}\n')
    (d / "badline.jsonl").write_text('{"task_id": "t", "prompt": "def f(x):\\n"}\nnot json\n')
    (d / "empty.jsonl").write_text("\n")
    (d / "empty.py").write_text("")
    (d / "prompt.py").write_text("import os\n\ndef f(root):\n")
    return d


def assert_clean_failure(res, *words):
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout[-500:], err[-2000:])
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower(), err


def no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*.tmp")]


DECODE_BAD = [
    (["--prompt", "x", "--bogus", "1"], ["unrecognized"]),
    (["--prompt", "x", "--block_len", "abc"], ["invalid int"]),
    (["--prompt", "x", "--block_len", "0"], ["block_len"]),
    (["--prompt", "x", "--num_blocks", "-1"], ["num_blocks"]),
    (["--prompt", "x", "--pool_size", "-2"], ["pool_size"]),
    (["--prompt", "x", "--activation_ratio", "0"], ["activation_ratio"]),
    (["--prompt", "x", "--activation_ratio", "1.5"], ["activation_ratio"]),
    (["--prompt", "x", "--max_new_tokens", "0"], ["max_new_tokens"]),
    (["--prompt", "x", "--method", "fast"], ["invalid choice"]),
    ([], ["--prompt"]),
    (["--prompt", ""], ["empty prompt"]),
    (["--prompt", "x " * 100], ["context"]),
    (["--prompt", "x", "--max_new_tokens", "80"], ["context"]),
    (["--prompt", "x", "--ckpt", "{d}/missing.pt"], ["not found"]),
    (["--prompt", "x", "--ckpt", "{d}/truncated.pt"], ["truncated"]),
    (["--prompt", "x", "--ckpt", "{d}/random.pt"], ["unreadable"]),
    (["--prompt", "x", "--ckpt", "{d}/foreign.pt"], ["not a jfmini checkpoint"]),
]


@pytest.mark.parametrize("args,words", DECODE_BAD)
def test_decode_bad_input(files, args, words):
    args = [a.replace("{d}", str(files)) for a in args]
    if "--ckpt" not in args:
        args += ["--ckpt", files / "base.pt"]
    assert_clean_failure(run("decode.py", *args, "--device", "cpu"), *words)
    assert no_temp_files(files)


STOP_PROMPT_BAD = [
    (["--prompt_file", "{d}/missing.py"], None, ["does not exist"]),
    (["--prompt_file", "{d}"], None, ["is a directory"]),
    (["--prompt_file", "{d}/random.pt"], None, ["not utf-8"]),
    (["--prompt_file", "{d}/empty.py"], None, ["empty prompt"]),
    (["--prompt", "-"], b"", ["empty prompt"]),
    (["--prompt", "-"], b"def f(\x00):", ["not utf-8", "offset 6"]),
    (["--prompt", "-"], b"def \xff():", ["not utf-8"]),
    (["--prompt", "x", "--prompt_file", "{d}/prompt.py"], None, ["not both"]),
    (["--prompt", "x", "--stop", "never"], None, ["invalid choice"]),
]


@pytest.mark.parametrize("args, stdin, words", STOP_PROMPT_BAD)
def test_decode_stop_prompt_file_and_stdin_bad_input(files, args, stdin, words):
    args = [a.replace("{d}", str(files)) for a in args]
    assert_clean_failure(run("decode.py", *args, "--ckpt", files / "base.pt", "--device", "cpu", stdin=stdin), *words)


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_decode_stop_reads_a_multiline_prompt_from_a_file_or_stdin(files, how):
    args = ["--prompt_file", files / "prompt.py"] if how == "file" else ["--prompt", "-"]
    res = run("decode.py", *args, "--ckpt", files / "base.pt", "--max_new_tokens", "8", "--device", "cpu",
              stdin=(files / "prompt.py").read_bytes())
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("import os\n\ndef f(root):\n") and "tokens per forward" in res.stderr


@pytest.mark.parametrize("prompt", ["def f(x):", "def f(x):\n    x = 1\n\n"])
def test_decode_stops_at_the_function_end_and_stop_none_runs_on(files, prompt):
    """The default output is what the rule keeps of the --stop none output (plus the rest of a last token
    that straddles the end), and the closing line names where it ended. The tiny random model never ends
    the first function; after the second prompt it writes at column 0 at once (an empty body)."""
    from jfmini.runtime.stop import kept_text
    args = ["--prompt", prompt, "--ckpt", files / "base.pt", "--max_new_tokens", "40", "--device", "cpu"]
    stopped, full = run("decode.py", *args), run("decode.py", *args, "--stop", "none")
    assert stopped.returncode == 0 and full.returncode == 0, stopped.stderr + full.stderr
    a, b = stopped.stdout[len(prompt):], full.stdout[len(prompt):]
    kept = kept_text(prompt, b)
    assert b.startswith(a) and a.startswith(kept) and not a[len(kept):].strip(" \t\f\r\n"), (a, b)
    ended = "the function's end" if len(kept) < len(b) else "--max_new_tokens 40"
    assert f"tokens to {ended} in" in stopped.stderr and "tokens to --max_new_tokens 40 in" in full.stderr
    assert (len(kept) < len(b)) == (prompt != "def f(x):")          # both paths really ran


def test_decode_stop_prints_any_prompt_under_an_ascii_terminal(files):
    res = run("decode.py", "--prompt", "def gr\u00fc\u00dfe(x):  # \u03bb", "--ckpt", files / "base.pt",
              "--max_new_tokens", "4", "--device", "cpu", PYTHONIOENCODING="ascii")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def gr\\xfc\\xdfe(x):  # \\u03bb")


def test_decode_works_with_a_base_checkpoint(files):
    res = run("decode.py", "--prompt", "def f(x):", "--ckpt", files / "base.pt", "--max_new_tokens", "8",
              "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def f(x):") and "tokens per forward" in res.stderr


BENCH_BAD = [
    (["--bogus"], ["unrecognized"]),
    (["--limit", "-1"], ["limit"]),
    (["--batch", "0,4"], ["--batch", "1,4,16,64"]),
    (["--top_k", "3"], ["--temperature"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--max_new_tokens", "x"], ["invalid int"]),
    (["--ckpt", "{d}/missing.pt"], ["not found"]),
    (["--ckpt", "{d}/truncated.pt"], ["truncated"]),
    (["--base_ckpt", "{d}/random.pt"], ["unreadable"]),
    (["--prompts", "{d}/badline.jsonl"], ["badline.jsonl:2"]),
    (["--prompts", "{d}/missing.jsonl"], ["does not exist"]),
    (["--prompts", "{d}/empty.jsonl"], ["no prompts"]),
    (["--max_new_tokens", "200"], ["context"]),
]


@pytest.mark.parametrize("args,words", BENCH_BAD)
def test_bench_bad_input(files, args, words):
    args = [a.replace("{d}", str(files)) for a in args]
    base = ["--ckpt", files / "base.pt", "--base_ckpt", files / "base.pt", "--prompts", files / "good.jsonl",
            "--max_new_tokens", "8", "--device", "cpu", "--sweep_file", files / "sweep.json"]
    assert_clean_failure(run("bench.py", *base, *args), *words)
    assert no_temp_files(files)


def test_bench_runs_and_prints_a_json_line(files):
    res = run("bench.py", "--ckpt", files / "base.pt", "--base_ckpt", files / "base.pt", "--prompts",
              files / "good.jsonl", "--max_new_tokens", "8", "--device", "cpu", "--sweep_file", files / "s.json",
              "--profile")
    assert res.returncode == 0, res.stderr
    record = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    assert {(r["row"], r["model"]) for r in record["rows"]} >= {("AR eager", "base"), ("AR fast", "base"),
                                                                ("Jacobi", "base"), ("n-gram", "base"),
                                                                ("Jacobi", "jf"), ("n-gram", "jf"), ("MR", "jf")}
    assert all(r["lossless"] == 1.0 for r in record["rows"])
    assert all(r["mismatches"] == 0 and r["tie_gaps"] == [] and r["lossless_ties_aside"] == 1.0 for r in record["rows"])
    profile = res.stdout.split("verified/step", 1)[1].splitlines()        # --profile: one line per row after the JSON
    mr = next(line for line in profile if line.startswith("MR"))
    assert mr.split()[-4] == "192"                                        # n=64 K=2 + 4 pool rows of 16
    assert len([line for line in profile if line.split() and line.split()[0] in ("AR", "Jacobi", "n-gram", "MR")]) \
        == len(record["rows"])


@pytest.mark.parametrize("settings", [dict(block_len=1), dict(block_len=32), dict(block_len=16, ngram=2, cand_len=8),
                                      dict(block_len=64, num_blocks=2, pool_size=4, cand_len=16),
                                      dict(block_len=32, pool_size=4, ngram=2, cand_len=16),
                                      dict(block_len=8, pool_size=2, ngram=1)])
def test_bench_counts_the_tokens_a_step_verifies(settings):
    """--profile's tokens verified per step is the length of the input one Jacobi iteration feeds the model."""
    from jfmini.tools import rows
    from jfmini.jacobi import Jacobi
    jac = Jacobi(tiny_model(), graph=False, compile=False, max_len=64, **settings)
    assert rows.verified_per_step(settings) == len(jac.offs)


def test_bench_tie_analysis_helpers():
    from jfmini.tools import lossless
    assert lossless.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert lossless.first_divergence([1, 2], [1, 2, 3]) is None       # a length difference is no token choice
    assert lossless.first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    model = tiny_model()
    model.new_cache(1, 16)                                             # ignored: tie_gap passes no slots
    prompt, ref = [5, 6, 7], [8, 9, 10, 11]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:2]]), torch.arange(5))[0, -1]
    gap, step = lossless.tie_gap(model, prompt, ref, 2, 42, torch.bfloat16)
    assert gap == pytest.approx((logits[10] - logits[42]).item(), abs=1e-5)
    top = max(abs(logits[10].item()), abs(logits[42].item()))
    assert step == 2.0 ** -7 * 2.0 ** math.floor(math.log2(top))      # bf16 spacing at that magnitude
    assert lossless.tie_gap(model, prompt, ref, 2, ref[2], torch.float32)[0] == 0.0



def test_bench_kept_length_difference_is_judged_where_the_full_outputs_part(monkeypatch):
    """A kept text that stops where AR's goes on differs at the token that decided the stop: the tie analysis
    measures the gap where the full-length outputs part. Kept texts that differ while the full outputs agree
    stay a failure."""
    from jfmini.tools import lossless
    model = tiny_model()
    monkeypatch.setattr(lossless, "load_checkpoint", lambda path, device: (model, None))
    speed = {f"{p}{k}": 1.0 for p in ("", "kept_") for k in ("chars_per_s", "tokens_per_s")}
    results = [dict(row="AR eager", model="jf", **speed), dict(row="AR fast", model="jf", **speed),
               dict(row="MR", model="jf", **speed)]
    prompts = [[5, 6, 7], [5, 6, 7]]
    ar_kept, ar_full = [[8, 9, 10], [8, 9, 10]], [[8, 9, 10, 11], [8, 9, 10, 11]]
    mr_kept, mr_full = [[8, 9], [8, 9]], [[8, 9, 42, 11], [8, 9, 10, 11]]
    outputs = {"kept": [ar_kept, ar_kept, mr_kept], "full": [ar_full, ar_full, mr_full]}
    refs = {"kept": {"jf": ar_kept}, "full": {"jf": ar_full}}
    lossless.check_lossless(results, outputs, refs, prompts, {"jf": "unused"}, "cpu", torch.bfloat16)
    gap, step = lossless.tie_gap(model, prompts[0], ar_full[0], 2, 42, torch.bfloat16)
    mr = results[2]
    assert mr["kept_mismatches"] == 2 and mr["mismatches"] == 1
    assert mr["kept_tie_gaps"] == [[round(gap, 4), round(abs(gap) / step, 2)], None]
    assert mr["tie_gaps"] == [[round(gap, 4), round(abs(gap) / step, 2)]]
    assert mr["kept_lossless_ties_aside"] <= 0.5                    # the second prompt is no tie

TRAIN_BAD = [
    (["--bogus"], ["unrecognized"]),
    (["--steps", "abc"], ["invalid int"]),
    (["--steps", "0"], ["steps"]),
    (["--lr", "-1"], ["lr"]),
    (["--probe", "-1"], ["probe"]),
    (["--block_lens", "16,x"], ["block_lens"]),
    (["--stage", "round7"], ["round"]),
    (["--stage", "warmup"], ["stage"]),
    (["--d_model", "30", "--n_head", "4"], ["d_model"]),
    (["--preset", "tpu"], ["invalid choice"]),
    (["--stage", "round1"], ["base.pt not found"]),
    (["--stage", "round1", "--traj_prompts", "4"], ["--traj_prompts 4", "--distill_batch"]),
]


@pytest.mark.parametrize("args,words", TRAIN_BAD)
def test_train_bad_input(tmp_path, args, words):
    assert_clean_failure(run("train.py", "--out_dir", tmp_path, "--device", "cpu", *args), *words)
    assert no_temp_files(tmp_path)


def test_train_corrupt_state_and_trajectories(tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pretrain_state.pt").write_bytes(os.urandom(1000))
    res = run("train.py", "--out_dir", out, "--stage", "pretrain", "--resume", *TINY, "--steps", "2")
    assert_clean_failure(res, "pretrain_state.pt")
    (out / "base.pt").write_bytes((files / "base.pt").read_bytes())
    args = ["--out_dir", out, "--stage", "round1", "--device", "cpu", "--corpus", "stdlib", "--traj_prompts", "6",
            "--traj_tokens", "16", "--traj_batch", "6", "--distill_steps", "1", "--distill_batch", "2", "--probe", "0",
            "--max_repeat", "0"]
    assert run("train.py", *args).returncode == 0
    (traj,) = out.glob("traj_*.npz")
    traj.write_bytes(b"PK\x03\x04 truncated")
    (out / "jf1.pt").unlink()
    assert_clean_failure(run("train.py", *args), traj.name, "delete")
    assert no_temp_files(out)


def test_round_reuses_only_trajectories_of_the_same_source(tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "base.pt").write_bytes((files / "base.pt").read_bytes())
    args = ["--out_dir", out, "--stage", "round1", "--device", "cpu", "--corpus", "stdlib", "--traj_prompts", "6",
            "--traj_tokens", "16", "--traj_batch", "6", "--distill_steps", "1", "--distill_batch", "2",
            "--probe", "0", "--block_lens", "4,8", "--max_repeat", "0"]
    first = run("train.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "trajectories: 6 mixed prompts" in first.stdout
    (out / "jf1.pt").unlink()
    again = run("train.py", *args)                                    # same base: the file is reused
    assert again.returncode == 0 and "trajectories: reusing 6" in again.stdout, again.stderr[-2000:]
    torch.manual_seed(1)                                              # another base model, same shapes
    model = GPT(GPTConfig(vocab_size=50257, seq_len=64, n_layer=1, n_head=2, d_model=16))
    atomic_save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "kind": "base",
                 "val_loss": 10.0}, out / "base.pt")
    stale = run("train.py", *args)                                    # jf1.pt kept, with a warning
    assert stale.returncode == 0 and "warning: jf1.pt was distilled from an earlier base.pt" in stale.stdout
    (out / "jf1.pt").unlink()
    fresh = run("train.py", *args)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "trajectories: 6 mixed prompts" in fresh.stdout and "reusing" not in fresh.stdout
    from jfmini.runtime.writes import file_sha256
    from jfmini.runtime.trajectories import Trajectories
    made = [Trajectories.load(p) for p in out.glob("traj_*.npz")]
    assert len(made) == 2 and all(t.problem() is None for t in made)
    assert file_sha256(out / "base.pt") in {json.loads(t.source)["sha256"] for t in made}
    assert no_temp_files(out)


def wait_for(path, proc, timeout=LONG):
    """Until the child has written `path`; the bound only stops a hung child (a loaded machine is slow,
    never wrong)."""
    t0 = time.time()
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} not written in {timeout} s"
        time.sleep(0.1)


STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_ready():
    """preexec_fn of a child that receives stop signals as a terminal's user sends them: a shell without
    job control starts background jobs with SIGINT ignored, and a child inherits both that disposition
    and a blocked signal mask; reset both."""
    for s in STOP:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)


def test_sigkill_then_resume_reaches_the_same_final_step(tmp_path):
    out = tmp_path / "out"
    fake_token_cache(out)
    args = [PY, ROOT / "train.py", "--out_dir", out, "--stage", "pretrain", *TINY, "--steps", "400",
            "--ckpt_every", "5"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(out / "pretrain_state.pt", proc)
    proc.kill()                                                 # mid-run: writing or training, whichever it is at
    proc.wait()
    assert not (out / "base.pt").exists()
    _, state = load_checkpoint(out / "pretrain_state.pt")      # what was left loads
    assert 5 <= state["step"] < 400
    res = run("train.py", "--out_dir", out, "--stage", "pretrain", *TINY, "--steps", "400", "--ckpt_every", "5",
              "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {out / 'pretrain_state.pt'} at step {state['step']}" in res.stdout
    model, final = load_checkpoint(out / "base.pt")
    assert final["steps"] == 400 and final["kind"] == "base"
    assert no_temp_files(out)


@pytest.mark.parametrize("sig", STOP, ids=lambda s: signal.Signals(s).name)
def test_ctrl_c_sigterm_sighup_save_and_exit_cleanly(tmp_path, sig):
    """Ctrl-C, a scheduler's SIGTERM, a closed terminal's SIGHUP: the state is saved, one line says to
    --resume, the exit code is 128 + the signal. The child is signal-ready before it is signalled: its
    handlers are installed when main() starts, so its first checkpoint on disk is the readiness marker.
    From then on any moment works, mid-save included (the save finishes first): nothing here races a
    clock, and the waits have generous bounds only against a hung child."""
    out = tmp_path / "out"
    fake_token_cache(out)
    args = [PY, ROOT / "train.py", "--out_dir", out, "--stage", "pretrain", *TINY, "--steps", "100000",
            "--ckpt_every", "5"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=signal_ready, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for(out / "pretrain_state.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "saved" in err and "--resume" in err, err
    _, state = load_checkpoint(out / "pretrain_state.pt")
    assert state["kind"] == "pretrain_state" and state["step"] >= 5
    assert not (out / "base.pt").exists() and not (out / "train.lock").exists() and no_temp_files(out)


@pytest.mark.parametrize("sig", STOP, ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_save_finishes_that_save_then_exits(tmp_path, monkeypatch, capsys, sig):
    """The signal lands inside torch.save, between two writes of the zip archive (where torch's writer
    used to replace the KeyboardInterrupt with 'RuntimeError: unexpected pos'): the save completes, then
    the run saves once more and exits 128 + the signal. In-process and deterministic."""
    import train
    real_save, saves = torch.save, []

    class SignalMidWrite:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), sig)      # delivered now: our handler runs at the next bytecode
            return self.f.write(b)

        def flush(self):
            return self.f.flush()

    def save(obj, f, *a, **k):
        saves.append(obj["step"])
        return real_save(obj, SignalMidWrite(f) if len(saves) == 2 else f, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    fake_token_cache(out)
    before = signal.signal(sig, signal.SIG_DFL)   # a run under nohup or as a background job inherits SIG_IGN,
    try:                                          # which train.py respects; this test needs the signal handled
        with pytest.raises(SystemExit) as e:
            train.main(["--out_dir", str(out), "--stage", "pretrain", *TINY, "--steps", "50", "--ckpt_every", "1"])
    finally:
        restored = signal.getsignal(sig)
        signal.signal(sig, before)
    assert e.value.code == 128 + sig
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted at step 2: saved {out / 'pretrain_state.pt'}; continue with --resume", err
    assert saves == [1, 2, 2]                  # the one cut by the signal, then the save on the way out
    monkeypatch.undo()
    _, state = load_checkpoint(out / "pretrain_state.pt")
    assert state["step"] == 2 and no_temp_files(out) and not (out / "train.lock").exists()
    assert restored == signal.SIG_DFL                                       # main() put the handlers back


def test_a_keyboard_interrupt_inside_torch_save_stays_one(tmp_path, monkeypatch):
    """Without cli()'s handlers (jfmini as a library), Ctrl-C inside torch.save surfaces as
    KeyboardInterrupt, not torch's 'unexpected pos' RuntimeError, and the old file is kept."""
    target = tmp_path / "state.pt"
    atomic_save({"step": 1}, target)
    before = target.read_bytes()
    real_save = torch.save

    class CtrlC:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise KeyboardInterrupt

        def flush(self):
            return self.f.flush()
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, CtrlC(f), *a, **k))
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "x": torch.zeros(100)}, target)
    assert target.read_bytes() == before and no_temp_files(tmp_path)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    import train
    real_ce = train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):                 # finite for 12 steps, then NaN
        calls["n"] += 1
        loss = real_ce(*a, **k)
        return loss * float("nan") if calls["n"] > 12 else loss
    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(["--out_dir", str(out), "--stage", "pretrain", *TINY, "--steps", "40", "--ckpt_every", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "pretrain_state.pt" in err and "kept" in err
    model, state = load_checkpoint(out / "pretrain_state.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "base.pt").exists()


def losses(stdout):
    return [line.split("loss ")[1].split(",")[0] for line in stdout.splitlines() if "pretrain step" in line
            and "loss" in line]


def test_same_seed_same_losses_twice(tmp_path):
    runs = [run("train.py", "--out_dir", tmp_path / f"o{i}", "--stage", "pretrain", *TINY, "--steps", "40")
            for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert losses(runs[0].stdout) == losses(runs[1].stdout) and len(losses(runs[0].stdout)) >= 3


def test_same_seed_same_trajectories_twice():
    from conftest import tiny_model
    from jfmini.forcing import collect_trajectories
    from jfmini.tools.paper import pack
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a, b = (collect_trajectories(tiny_model(seed=2), prompts, 4, 3, 2, None, log=lambda *_: None) for _ in range(2))
    assert np.array_equal(a.states, b.states) and np.array_equal(a.fixed, b.fixed)
    pa, pb = (pack(a, [0, 1], 64, "random", np.random.default_rng(7), 256) for _ in range(2))
    assert np.array_equal(pa.tokens, pb.tokens)


def test_ranks_split_each_epoch_without_overlap():
    sys.path.insert(0, str(ROOT))
    from train import row_batches
    num_rows, B, world = 64, 8, 2
    ranks = [row_batches(num_rows, B, rank, world, np.random.default_rng(5)) for rank in range(world)]
    for epoch in range(3):
        seen = [np.concatenate([next(g) for _ in range(num_rows // (B * world))]) for g in ranks]
        both = np.concatenate(seen)
        assert len(both) == num_rows and len(np.unique(both)) == num_rows     # every row once per epoch


def test_torchrun_two_ranks_gloo_identical_weights(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
                          str(ROOT / "train.py"),
                          "--out_dir", str(out), "--stage", "pretrain", *TINY, "--steps", "2"],
                         capture_output=True, text=True, timeout=LONG, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world 2" in res.stdout and "weights identical on all 2 ranks" in res.stdout
    _, final = load_checkpoint(out / "base.pt")
    assert final["steps"] == 2


ROUND = ["--stage", "round1", "--device", "cpu", "--corpus", "stdlib+torch", "--traj_prompts", "6", "--traj_tokens",
         "16", "--traj_batch", "6", "--distill_batch", "2", "--probe", "0", "--eval_batches", "1", "--max_repeat", "0"]


def replay_setup(out, files):
    """A tiny base whose train_config names the stdlib corpus, and a token cache of random text."""
    cache = out / "data_stdlib"
    cache.mkdir(parents=True, exist_ok=True)
    blob = torch.load(files / "base.pt", weights_only=True)
    atomic_save({**blob, "train_config": {"corpus": "stdlib"}}, out / "base.pt")
    tokens = np.random.default_rng(0).integers(0, 50256, 4096).astype(np.uint16)
    for split in ("train", "val"):
        (cache / f"{split}.bin").write_bytes(tokens.tobytes())


def round_with_replay(tmp_path, files, *args, setup=True):
    """Round 1 on replay_setup's base and token cache."""
    out = tmp_path / "out"
    if setup:
        replay_setup(out, files)
    res = run("train.py", "--out_dir", out, *ROUND, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res


def replay_at(res, step, steps):
    line = next(line for line in res.stdout.splitlines() if f"round 1 step {step}/{steps}" in line)
    return float(line.split("replay ")[1].split(",")[0])


def term_at(res, name, step, steps):
    """A loss term from the log line of a round's step: '... (consistency a, AR b, replay c, truth d) ...'."""
    line = next(line for line in res.stdout.splitlines() if f"round 1 step {step}/{steps}" in line)
    return float(line.split(f"{name} ")[1].split(",")[0].split(")")[0])


def test_anchored_ar_term_starts_at_zero_and_the_truth_term_trains_on_real_code(tmp_path, files):
    """--ar_target anchor (the default): the AR term is the KL divergence from the base on the clean
    stream, so it is zero at round 1's first step (the model is still the base); --ar_target greedy is
    cross-entropy to the greedy tokens, positive. --truth 1 --truth_target ce adds cross-entropy on the
    real code that follows each trajectory prompt (positive); --truth_target anchor (the default) makes it
    the KL divergence from the base there: zero at the first step, positive once the model has moved."""
    _, anchored = round_with_replay(tmp_path / "a", files, "--distill_steps", "2", "--truth", "1",
                                    "--truth_target", "ce")
    _, greedy = round_with_replay(tmp_path / "g", files, "--distill_steps", "2", "--ar_target", "greedy",
                                  "--truth", "1", "--truth_target", "anchor", "--distill_lr", "0.05")
    assert term_at(anchored, "AR", 1, 2) == 0.0 and term_at(greedy, "AR", 1, 2) > 0.5
    assert term_at(anchored, "truth", 1, 2) > 1.0
    assert term_at(greedy, "truth", 1, 2) == 0.0 and term_at(greedy, "truth", 2, 2) > 0.0


@pytest.mark.parametrize("anchor", ["kl", "ce"])
def test_replay_anchor(tmp_path, files, anchor):
    """--anchor kl: the replay term is the KL divergence from the round's starting model, so it is zero at
    the first step (the model is still that model); --anchor ce: cross-entropy on the corpus text. The
    round reads the base model's corpus and records it for later rounds."""
    out, res = round_with_replay(tmp_path, files, "--distill_steps", "2", "--anchor", anchor)
    replay = replay_at(res, 1, 2)
    assert (replay == 0.0) == (anchor == "kl") and (anchor == "kl" or replay > 5)
    assert load_checkpoint(out / "jf1.pt")[1]["train_config"]["corpus"] == "stdlib"


def test_resumed_round_keeps_its_starting_model_as_the_kl_anchor(tmp_path, files):
    import train
    from jfmini.runtime import training
    from jfmini.runtime.cli import parse_config
    from jfmini.runtime.writes import file_sha256
    out = tmp_path / "out"
    replay_setup(out, files)
    model, _ = load_checkpoint(files / "base.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))                  # a half-distilled model, far from the base
    flags = ["--out_dir", str(out), *ROUND, "--distill_steps", "3", "--resume"]
    cfg = train.with_preset(parse_config(train.TrainConfig, flags), cuda=False)   # the flags the run will have
    training.save_state(out / "jf1_state.pt", model, training.make_optimizer(model, 1e-4, 0.0, False), 1, cfg,
                        {"kind": "jacobi_forcing_state", "round": 1, "source_sha256": file_sha256(out / "base.pt"),
                         "block_len": 16, "world": 1})
    _, res = round_with_replay(tmp_path, files, "--distill_steps", "3", "--resume", setup=False)
    assert "resuming from" in res.stdout
    assert replay_at(res, 3, 3) > 0.001                        # measured against base.pt, not the resumed state


def test_bench_charts_scale_bars_and_read_the_last_json_line(tmp_path):
    from jfmini.tools import report
    rows = [{"row": "AR fast", "model": "base", "decoder": "n=1", "tokens_per_s": 1000.0, "tokens_per_forward": 1.0},
            {"row": "Jacobi", "model": "jf", "decoder": "n=32", "tokens_per_s": 4000.0, "tokens_per_forward": 4.5}]
    sweep = {"jf": [{"block_len": n, "num_blocks": 1, "pool_size": 0, "ngram": 0, "cand_len": None,
                     "tokens_per_s": 100.0 * n, "tokens_per_forward": n / 8} for n in (64, 16)]}
    log = tmp_path / "bench.log"
    log.write_text("a table line\n" + json.dumps({"device": "X", "prompts": 2, "rows": rows, "sweep": sweep}) + "\n")
    text = report.charts(report.read_record(log))
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    full = "\u2588"
    assert lines["Jacobi (jf, n=32)"].count(full) == 32 and lines["AR fast (base, n=1)"].count(full) == 8
    assert "TPF 4.50" in lines["Jacobi (jf, n=32)"]
    assert text.index("n=16 ") < text.index("n=64 ")                 # block lengths in order
    assert lines["n=16"].count(full) == 8 and lines["n=64"].count(full) == 32
    res = run("bench.py", "--chart", log)
    assert res.returncode == 0 and res.stdout.strip() == text
    bad = {"plain.txt": "no json here\n", "empty_sweep.json": json.dumps({"results": {"jf": []}}),
           "rows_without_keys.json": json.dumps({"rows": [{"row": "x"}]}), "rows_text.json": '{"rows": "abc"}'}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.pt").write_bytes(bytes(range(256)))
    for name in [*bad, "binary.pt", ""]:
        assert_clean_failure(run("bench.py", "--chart", tmp_path / name if name else ""), "--chart", "sweep_file")


def test_prefetched_batches_equal_the_plain_ones():
    """On a GPU a thread packs the next batch during a step; it must yield exactly what the CPU path does."""
    import dataclasses
    import types
    import train
    from jfmini.forcing import collect_trajectories, row_length
    traj = collect_trajectories(tiny_model(), [[1 + i, 2, 3, 4 + i] for i in range(6)], 4, 3, 6, eot=None,
                                log=lambda *a: None, truth=[[5, 6, 7]] * 6)
    cfg = train.TrainConfig(distill_batch=2, traj_prompts=6)
    L = row_length(int(np.diff(traj.prompt_offsets).max()), 12, 4, cfg.cons_window)
    for step, rank, world in ((0, 0, 1), (3, 1, 2)):
        got = {}
        for cuda in (False, True):
            run_ = types.SimpleNamespace(cuda=cuda, rank=rank, world=world)
            batches = train.packed_batches(cfg, run_, traj, 1, step, L, 256, True)
            try:
                got[cuda] = [next(batches) for _ in range(7)]
            finally:
                batches.close()
        for a, b in zip(got[False], got[True]):
            for f in dataclasses.fields(a):
                assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name
