"""Issue #20: every file jfmini reads is untrusted input.

A fuzz table of crafted files and bad inputs, run through the scripts' own main(argv) in-process (fast:
the tiny files are built once per module). Every case must end with exit code 2 and exactly one line
on stderr (no traceback), run no code from any file (the crafted pickles would create a marker file),
touch no file outside the case's out_dir, and keep every file already in out_dir (the last good
checkpoint included) byte for byte.
"""
import importlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT
from jfmini.runtime.cli import parse_config
from jfmini.runtime.writes import file_sha256
from jfmini.runtime import training
from jfmini.runtime.checkpoints import load_checkpoint
from test_scripts import LONG, PY, TINY, fake_token_cache, no_temp_files, tiny_base

sys.path.insert(0, str(ROOT))
import train  # noqa: E402

# The flags of each kind of run; a case's own flags come after them (argparse: the last one wins).
PRE = ["--stage", "pretrain", *TINY, "--tokenizer", "gpt2", "--steps", "4", "--ckpt_every", "1"]
ROUND = ["--stage", "round1", "--device", "cpu", "--traj_prompts", "6", "--traj_tokens", "32", "--traj_batch", "6",
         "--distill_steps", "1", "--distill_batch", "2", "--probe", "0", "--max_repeat", "0"]
DEC = ["--prompt", "def f(x):", "--device", "cpu", "--max_new_tokens", "4"]
BENCH = ["--ckpt", "{lab}/base.pt", "--base_ckpt", "{lab}/base.pt", "--prompts", "{lab}/good.jsonl",
         "--max_new_tokens", "4", "--device", "cpu", "--sweep_file", "{out}/sweep.json", "--eager_limit", "1"]
ABLATE = ["--variants", "a: --lam 2", "--results", "{out}/ablate.jsonl", "--rounds", "1", "--no-diagnose",
          "--train_args", shlex.join(["--out_dir", "{out}", *ROUND[2:]])]


class Payload:
    """Unpickling this runs `touch marker` (what a crafted checkpoint's __reduce__ can do: anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The good files every case starts from: a tiny base model, a round-1 model and its trajectories
    (made by a real round), resumable states of pretraining and of round 1, a token cache, prompts."""
    d = tmp_path_factory.mktemp("lab")
    tiny_base(d / "base.pt")
    (d / "round").mkdir()
    shutil.copy(d / "base.pt", d / "round" / "base.pt")
    train.main(["--out_dir", str(d / "round"), *ROUND])                     # a real round 1: jf1.pt, traj_n16_*.npz
    (traj,) = (d / "round").glob("traj_n16_*.npz")
    fake_token_cache(d / "cache")
    pre_cfg = train.with_preset(parse_config(train.TrainConfig, ["--out_dir", "x", *PRE]), cuda=False)
    model = train.GPT(train.GPTConfig(vocab_size=4096, seq_len=32, n_layer=1, n_head=2, d_model=16))
    training.save_state(d / "pretrain_state.pt", model, training.make_optimizer(model, 1e-3, 0.1, False), 1, pre_cfg,
                        {"kind": "pretrain_state", "world": 1})
    round_cfg = train.with_preset(parse_config(train.TrainConfig, ["--out_dir", "x", *ROUND]), cuda=False)
    base, _ = load_checkpoint(d / "base.pt")
    training.save_state(d / "jf1_state.pt", base, training.make_optimizer(base, 1e-4, 0.0, False), 0, round_cfg,
                        {"kind": "jacobi_forcing_state", "round": 1, "source_sha256": file_sha256(d / "base.pt"),
                         "block_len": 16, "world": 1})
    (d / "good.jsonl").write_text('{"task_id": "t", "prompt": "def f(x):\\n"}\n')
    return SimpleNamespace(dir=d, traj=traj, jf1=d / "round" / "jf1.pt")


# ----------------------------------------------------------------------------- crafting

def load(path):
    return torch.load(path, weights_only=True)


def craft(src, dst, **changes):
    """torch.save a copy of checkpoint `src` with entries replaced: a value, or a function of the old one
    (None removes the entry)."""
    ckpt = load(src)
    for k, v in changes.items():
        v = v(ckpt.get(k)) if callable(v) else v
        if v is None:
            ckpt.pop(k, None)
        else:
            ckpt[k] = v
    torch.save(ckpt, dst)


def weights(fn):
    """A change of the state dict: fn(dict of tensors) -> the new dict."""
    return lambda sd: fn(dict(sd))


def first_weight(sd):
    return next(iter(sd))


def poisoned(value):
    def fn(sd):
        k = first_weight(sd)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = value
        return sd
    return weights(fn)


def craft_traj(src, dst, **arrays):
    """Rewrite a trajectories .npz with some arrays replaced (keeps its source, so its name still fits)."""
    with np.load(src) as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    np.savez(dst, **data)


def npz_with_header(src, dst, name, shape):
    """A trajectories file whose member `name` declares `shape` in its .npy header over the same bytes."""
    with np.load(src) as z:
        data = {k: z[k] for k in z.files}
    with zipfile.ZipFile(dst, "w") as out:
        for k, a in data.items():
            header = {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                      "shape": shape if k == name else a.shape}
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            out.writestr(f"{k}.npy", buf.getvalue() + a.tobytes())


def traj_of_block_len(lab, dst, n):
    """Internally consistent trajectories of block length n, under the n=16 file's name and source."""
    from conftest import tiny_model
    from jfmini.forcing import collect_trajectories
    with np.load(lab.traj) as z:
        source = str(z["source"])
    model = tiny_model(vocab=50257, seq_len=64, n_layer=1, d_model=16)
    traj = collect_trajectories(model, [[1, 2, 3], [4, 5, 6, 7]], n, 2, 2, eot=None, log=lambda *a: None,
                                source=source)
    Path(dst).write_bytes(traj.to_bytes())


# ----------------------------------------------------------------------------- the cases

def put(name, src=None):
    """Setup step: copy lab file `src` (default: the same name) into out_dir as `name`."""
    def step(c):
        from_ = {"traj": c.lab.traj, "jf1": c.lab.jf1}.get(src or name) or c.lab.dir / (src or name)
        target = c.out / (c.lab.traj.name if name == "traj" else name)
        if Path(from_).is_dir():
            shutil.copytree(from_, target)
        else:
            shutil.copy(from_, target)
    return step


def crafted(name, src="base.pt", **changes):
    return lambda c: craft(c.lab.dir / src, c.out / name, **changes)


def payload(name, src="base.pt", key="val_loss"):
    """A real checkpoint with the code-running object as one of its values (os.system returns 0, so a
    loader that ran it would go on as if nothing happened)."""
    return lambda c: craft(c.lab.dir / src, c.out / name, **{key: Payload(c.marker)})


def cache(fn):
    """Setup step: the lab's token cache in out_dir, then fn(cache folder)."""
    def step(c):
        shutil.copytree(c.lab.dir / "cache", c.out, dirs_exist_ok=True)
        fn(c.out / "data_stdlib_v4096")
    return step


def traj(**arrays):
    return lambda c: craft_traj(c.lab.traj, c.out / c.lab.traj.name, **arrays)


def env(**values):
    def step(c):
        for k, v in values.items():
            c.monkeypatch.setenv(k, v)
    return step


def write(name, text):
    return lambda c: (c.out / name).write_text(text)


def symlink(name, target="victim.txt"):
    return lambda c: os.symlink(c.outside / target, c.out / name)


ROUND_FILES = [put("base.pt"), put("traj")]
RESUME_ROUND = [*ROUND_FILES, put("jf1_state.pt")]
RESUME_PRE = [cache(lambda d: None), put("pretrain_state.pt")]
KEPT = "ablate/a_s1337/jf1.pt"


def kept(step):
    def make(c):
        (c.out / "ablate" / "a_s1337").mkdir(parents=True)
        step(c)
    return make


# (id, script, flags, setup steps, words the one stderr line must hold)
CASES = [
    # code in a checkpoint: refused in one line by every script that loads one
    ("decode --ckpt payload", "decode", [*DEC, "--ckpt", "{out}/evil.pt"], [payload("evil.pt")],
     ["evil.pt", "python objects", "posix.system"]),
    ("bench --ckpt payload", "bench", [*BENCH, "--ckpt", "{out}/evil.pt"], [payload("evil.pt")], ["evil.pt", "--ckpt"]),
    ("bench --base_ckpt payload", "bench", [*BENCH, "--base_ckpt", "{out}/evil.pt"], [payload("evil.pt")],
     ["evil.pt", "--base_ckpt"]),
    ("train round1 planted base.pt", "train", ROUND, [payload("base.pt")], ["base.pt", "python objects"]),
    ("train round2 planted jf1.pt", "train", [*ROUND[:1], "round2", *ROUND[2:]],
     [put("base.pt"), payload("jf1.pt", src="round/jf1.pt")], ["jf1.pt", "python objects"]),
    ("train --resume pretrain_state payload", "train", [*PRE, "--resume"],
     [cache(lambda d: None), payload("pretrain_state.pt", src="pretrain_state.pt", key="step")],
     ["pretrain_state.pt", "python objects", "without --resume"]),
    ("train --resume jf1_state payload", "train", [*ROUND, "--resume"],
     [*ROUND_FILES, payload("jf1_state.pt", src="jf1_state.pt", key="step")], ["jf1_state.pt", "python objects"]),
    ("ablate planted base.pt", "ablate", ABLATE, [payload("base.pt")], ["base.pt", "python objects"]),
    ("ablate kept jf1.pt payload", "ablate", [*ABLATE, "--keep"],
     [put("base.pt"), kept(payload(KEPT, src="round/jf1.pt"))], ["jf1.pt", "python objects"]),
    # model config: sizes refused before allocating, exact keys, sane values
    ("n_layer 10**6", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "n_layer": 10**6})], ["x.pt", "n_layer"]),
    ("d_model 10**7", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "d_model": 10**7})], ["d_model"]),
    ("vocab 10**6", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "vocab_size": 10**6})], ["vocab_size"]),
    ("huge but in range", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "n_layer": 256, "d_model": 16384, "n_head": 16})],
     ["more than this machine can hold"]),
    ("n_head 0", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model_config=lambda c: {**c, "n_head": 0})],
     ["n_head"]),
    ("n_head 7", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model_config=lambda c: {**c, "n_head": 7})],
     ["n_head=7"]),
    ("odd head size", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "n_head": 16})], ["even size"]),
    ("n_head missing", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {k: v for k, v in c.items() if k != "n_head"})], ["lacks n_head"]),
    ("model_config extra key", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "dropout": 0.1})], ["unknown keys dropout"]),
    ("n_head a string", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "n_head": "2"})], ["not an integer"]),
    ("n_layer a bool", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "n_layer": True})], ["not an integer"]),
    ("rope_base NaN", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model_config=lambda c: {**c, "rope_base": float("nan")})], ["rope_base"]),
    ("model_config a list", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model_config=[1, 2])],
     ["not a dict"]),
    # weights
    ("NaN weight", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model=poisoned(float("nan")))],
     ["nan or infinite"]),
    ("inf weight", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model=poisoned(float("inf")))],
     ["nan or infinite"]),
    ("int64 weights", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model=weights(lambda sd: {k: v.long() for k, v in sd.items()}))], ["int64", "not a float"]),
    ("missing weight", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model=weights(lambda sd: {k: v for k, v in list(sd.items())[1:]}))], ["lack"]),
    ("extra weight", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model=weights(lambda sd: {**sd, "lm_head.weight": torch.zeros(2)}))], ["unknown", "lm_head"]),
    ("wrong weight shape", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [crafted("x.pt", model=weights(lambda sd: {**sd, "norm.weight": torch.ones(17)}))], ["norm.weight", "shape"]),
    ("weights a list", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", model=[torch.zeros(1)])],
     ["not a dict"]),
    # the rest of a checkpoint
    ("unknown entry", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", notes="hi")], ["unknown entries notes"]),
    ("unknown kind", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", kind="lora")], ["kind 'lora'"]),
    ("val_loss a string", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [crafted("x.pt", val_loss="low")], ["val_loss"]),
    ("unknown corpus", "train", ROUND, [crafted("base.pt", train_config={"corpus": "../../etc"})],
     ["train_config"]),
    ("top level a list", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [lambda c: torch.save([1, 2], c.out / "x.pt")],
     ["not a jfmini checkpoint"]),
    ("truncated", "decode", [*DEC, "--ckpt", "{out}/x.pt"],
     [lambda c: (c.out / "x.pt").write_bytes((c.lab.dir / "base.pt").read_bytes()[:5000])], ["truncated"]),
    ("empty file", "decode", [*DEC, "--ckpt", "{out}/x.pt"], [write("x.pt", "")], ["unreadable"]),
    ("a device as --ckpt", "decode", [*DEC, "--ckpt", "/dev/null"], [], ["not a regular file"]),
    ("trajectories as --ckpt", "decode", [*DEC, "--ckpt", "{out}/t.npz"], [lambda c: shutil.copy(c.lab.traj, c.out / "t.npz")],
     ["not a checkpoint"]),
    ("a state where base.pt belongs", "train", ROUND, [put("base.pt", src="jf1_state.pt")],
     ["jacobi_forcing_state file", "not a base or jacobi_forcing"]),
    # resumable states: checked whole, and against what this run asks
    ("pretrain --resume other --lr", "train", [*PRE, "--resume", "--lr", "0.001"], RESUME_PRE, ["--lr 0.001", "(it has 0.003)"]),
    ("pretrain --resume other --batch_size", "train", [*PRE, "--resume", "--batch_size", "3"], RESUME_PRE,
     ["--batch_size 3"]),
    ("pretrain --resume other --seed", "train", [*PRE, "--resume", "--seed", "7"], RESUME_PRE, ["--seed 7"]),
    ("pretrain --resume other --d_model", "train", [*PRE, "--resume", "--d_model", "32"], RESUME_PRE, ["--d_model 32"]),
    ("pretrain state past --steps", "train", [*PRE, "--resume"],
     [cache(lambda d: None), crafted("pretrain_state.pt", src="pretrain_state.pt", step=100)], ["past --steps"]),
    ("pretrain state step -1", "train", [*PRE, "--resume"],
     [cache(lambda d: None), crafted("pretrain_state.pt", src="pretrain_state.pt", step=-1)], ["step entry"]),
    ("pretrain state numpy rng", "train", [*PRE, "--resume"],
     [cache(lambda d: None), crafted("pretrain_state.pt", src="pretrain_state.pt",
                                     rng=lambda r: {**r, "numpy": {**r["numpy"], "keys": torch.zeros(3)}})],
     ["rng entry"]),
    ("pretrain state bad exp_avg", "train", [*PRE, "--resume"],
     [cache(lambda d: None), crafted("pretrain_state.pt", src="pretrain_state.pt", optimizer=lambda o: {
         **o, "state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}})],
     ["optimizer state", "exp_avg"]),
    ("pretrain state of a round", "train", [*PRE, "--resume"], [cache(lambda d: None), put("pretrain_state.pt", "jf1_state.pt")],
     ["not a pretrain_state"]),
    ("round --resume, base.pt replaced", "train", [*ROUND, "--resume"],
     [*ROUND_FILES, crafted("jf1_state.pt", src="jf1_state.pt", source_sha256="0" * 64)], ["source model sha256"]),
    ("round --resume, other block length", "train", [*ROUND, "--resume"],
     [*ROUND_FILES, crafted("jf1_state.pt", src="jf1_state.pt", block_len=8)], ["block length 16 (it has 8)"]),
    ("round --resume other --distill_lr", "train", [*ROUND, "--resume", "--distill_lr", "0.001"], RESUME_ROUND,
     ["--distill_lr 0.001"]),
    ("round --resume other --seed", "train", [*ROUND, "--resume", "--seed", "7"], RESUME_ROUND, ["--seed 7"]),
    ("round --resume other --lam", "train", [*ROUND, "--resume", "--lam", "3"], RESUME_ROUND, ["--lam 3"]),
    ("round --resume other processes", "train", [*ROUND, "--resume"],
     [*ROUND_FILES, crafted("jf1_state.pt", src="jf1_state.pt", world=2)], ["processes 1 (it has 2)"]),
    # trajectories
    ("trajectory ids >= vocab", "train", ROUND, [*ROUND_FILES[:1], lambda c: craft_traj(
        c.lab.traj, c.out / c.lab.traj.name, prompts=np.full(len(np.load(c.lab.traj)["prompts"]), 60000, np.int64))],
     ["outside the model's vocabulary"]),
    ("n=8 trajectories under the n=16 name", "train", ROUND,
     [*ROUND_FILES[:1], lambda c: traj_of_block_len(c.lab, c.out / c.lab.traj.name, 8)], ["n=8", "n=16"]),
    ("trajectories with a pickled object", "train", ROUND,
     [*ROUND_FILES[:1], lambda c: craft_traj(c.lab.traj, c.out / c.lab.traj.name,
                                             prompts=np.array([Payload(c.marker)], dtype=object))],
     [".npz", "prompts", "object"]),
    ("trajectories header claims 10**12", "train", ROUND,
     [*ROUND_FILES[:1], lambda c: npz_with_header(c.lab.traj, c.out / c.lab.traj.name, "states", (10**12, 16))],
     ["claims shape"]),
    ("trajectories extra member", "train", ROUND, [*ROUND_FILES[:1], traj(extra=np.zeros(3, np.int64))],
     ["not jfmini's arrays"]),
    ("trajectories float states", "train", ROUND,
     [*ROUND_FILES[:1], lambda c: craft_traj(c.lab.traj, c.out / c.lab.traj.name,
                                             states=np.load(c.lab.traj)["states"].astype(np.float32))], ["states"]),
    # the token cache
    ("meta.json truncated", "train", PRE, [cache(lambda d: (d / "meta.json").write_text('{"corpus": "std'))],
     ["meta.json", "delete the folder"]),
    ("meta.json a list", "train", PRE, [cache(lambda d: (d / "meta.json").write_text("[]"))], ["not a json object"]),
    ("train.bin empty", "train", PRE, [cache(lambda d: (d / "train.bin").write_bytes(b""))], ["empty", "delete the folder"]),
    ("train.bin odd length", "train", PRE, [cache(lambda d: (d / "train.bin").write_bytes(b"abc"))], ["cut mid-token"]),
    ("val.bin out of vocabulary", "train", PRE,
     [cache(lambda d: (d / "val.bin").write_bytes(np.full(100, 5000, np.uint16).tobytes()))],
     ["5000", "vocabulary of 4096", "delete the folder"]),
    ("--seq_len longer than the corpus", "train", [*PRE, "--seq_len", "8192"], [cache(lambda d: None)], ["lower --seq_len"]),
    # the sweep file
    ("sweep file truncated", "bench", BENCH, [write("sweep.json", '{"best": {"block_')], ["sweep.json", "unreadable"]),
    ("sweep file a list", "bench", BENCH, [write("sweep.json", "[1, 2]")], ["not a json object"]),
    ("sweep file unknown key", "bench", BENCH, [write("sweep.json", '{"best": {"block_len": 16}, "bset": 1}')],
     ["unknown keys bset"]),
    ("sweep best unknown setting", "decode", [*DEC, "--ckpt", "{lab}/base.pt", "--method", "best", "--sweep_file",
                                              "{out}/s.json"], [write("s.json", '{"best": {"block_len": 16, "turbo": 1}}')],
     ["unknown setting 'turbo'"]),
    ("sweep best block_len a string", "decode", [*DEC, "--ckpt", "{lab}/base.pt", "--method", "best", "--sweep_file",
                                                 "{out}/s.json"], [write("s.json", '{"best": {"block_len": "16"}}')],
     ["block_len '16'"]),
    ("sweep results NaN", "bench", BENCH,
     [write("sweep.json", '{"best": {"block_len": 16}, "results": {"jf": [{"block_len": 16, "tokens_per_s": NaN}]}}')],
     ["results"]),
    # prompts
    ("prompts line not an object", "bench", [*BENCH, "--prompts", "{out}/p.jsonl"], [write("p.jsonl", "[1]\n")], ["p.jsonl:1"]),
    ("prompts empty prompt", "bench", [*BENCH, "--prompts", "{out}/p.jsonl"], [write("p.jsonl", '{"prompt": ""}\n')],
     ["p.jsonl:1"]),
    # the lock
    ("train.lock a symlink", "train", PRE, [symlink("train.lock")], ["train.lock is a symbolic link"]),
    ("train.lock a directory", "train", PRE, [lambda c: (c.out / "train.lock").mkdir()], ["train.lock is a directory"]),
    ("train.lock a fifo", "train", PRE, [lambda c: os.mkfifo(c.out / "train.lock")], ["not a regular file"]),
    ("train.lock a hard link", "train", PRE, [lambda c: os.link(c.outside / "victim.txt", c.out / "train.lock")],
     ["hard link"]),
    ("ablate: train.lock a symlink", "ablate", ABLATE, [symlink("train.lock")], ["symbolic link"]),
    # ablate.py
    ("ablate variant ../", "ablate", [*ABLATE, "--variants", "../../outside: --lam 2"], [], ["variant name"]),
    ("ablate variant a/b", "ablate", [*ABLATE, "--variants", "a/b: --lam 2"], [], ["variant name"]),
    ("ablate unbalanced quotes in --variants", "ablate", [*ABLATE, "--variants", "a: --lam '2"], [],
     ["--variants a", "balance its quotes"]),
    ("ablate unbalanced quotes in --train_args", "ablate", [*ABLATE, "--train_args", "--lam '2"], [],
     ["--train_args", "balance its quotes"]),
    ("ablate --seeds 1,x", "ablate", [*ABLATE, "--seeds", "1,x"], [], ["--seeds"]),
    ("ablate --block_lens 32,x", "ablate", [*ABLATE, "--block_lens", "32,x"], [], ["--block_lens"]),
    ("ablate --results under a file", "ablate", [*ABLATE, "--results", "{out}/afile/r.jsonl"], [write("afile", "x")],
     ["--results", "afile is a file"]),
    ("ablate kept jf1.pt with other flags", "ablate", [*ABLATE, "--keep"], [put("base.pt"), kept(put(KEPT, "jf1"))],
     ["distilled differently", "--lam 2.0 (it has 10.0)"]),
    ("ablate: out_dir/ablate a symlink", "ablate", ABLATE, [put("base.pt"), lambda c: os.symlink(c.outside, c.out / "ablate")],
     ["symbolic link"]),
    # distributed-run variables
    ("RANK not a number", "train", PRE, [env(RANK="x", WORLD_SIZE="1", MASTER_ADDR="h", MASTER_PORT="1")], ["RANK='x'"]),
    ("RANK without MASTER_ADDR", "train", PRE, [env(RANK="0", WORLD_SIZE="1")], ["MASTER_ADDR", "torchrun"]),
    ("RANK past WORLD_SIZE", "train", PRE, [env(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="29500")],
     ["RANK=2, WORLD_SIZE=2"]),
    ("WORLD_SIZE garbage", "train", PRE, [env(RANK="0", WORLD_SIZE="two", MASTER_ADDR="h", MASTER_PORT="1")],
     ["WORLD_SIZE='two'"]),
    # flags
    ("--seed -1", "train", [*PRE, "--seed", "-1"], [], ["--seed"]),
    ("--seed 2**70", "train", [*PRE, "--seed", str(2**70)], [], ["--seed"]),
    ("--lr inf", "train", [*PRE, "--lr", "inf"], [], ["--lr"]),
    ("--weight_decay nan", "train", [*PRE, "--weight_decay", "nan"], [], ["--weight_decay"]),
    ("--lam inf", "train", [*PRE, "--lam", "inf"], [], ["--lam"]),
    ("--n_layer 10**5", "train", [*PRE, "--n_layer", "100000"], [], ["--n_layer"]),
    ("--d_model 16384 --n_layer 256", "train", [*PRE, "--d_model", "16384", "--n_layer", "256", "--n_head", "16"], [],
     ["more than this machine can hold"]),
    ("--batch_size 10**7", "train", [*PRE, "--batch_size", str(10**7)], [], ["--batch_size", "memory"]),
    ("--seq_len 10**8", "train", [*PRE, "--seq_len", str(10**8)], [], ["--seq_len"]),
]


@pytest.fixture
def case(lab, tmp_path, monkeypatch):
    """A fresh out_dir, a folder outside it with a file the crafted inputs aim at, and the marker path the
    payloads would create."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me\n")
    (outside / "victim_dir").mkdir()
    (outside / "victim_dir" / "data.txt").write_text("keep me too\n")
    return SimpleNamespace(lab=lab, out=out, outside=outside, marker=tmp_path / "PWNED", monkeypatch=monkeypatch)


def snapshot(*folders):
    """Every path under the folders: its kind and, for a file, its bytes."""
    shot = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            shot[p] = ("link", os.readlink(p)) if p.is_symlink() else \
                ("file", p.read_bytes()) if p.is_file() else ("other", None)
    return shot


@pytest.mark.parametrize("name,script,flags,setup,words", CASES, ids=[c[0] for c in CASES])
def test_untrusted_input_is_refused_in_one_line(case, capsys, name, script, flags, setup, words):
    for step in setup:
        step(case)
    argv = [a.replace("{out}", str(case.out)).replace("{lab}", str(case.lab.dir)) for a in flags]
    if script == "train":
        argv = ["--out_dir", str(case.out), *argv]
    kept_before = snapshot(case.out)                      # the last good checkpoint and every other file
    outside_before = snapshot(case.outside, case.lab.dir)
    top_before = sorted(os.listdir(ROOT)), sorted(os.listdir(ROOT / "results"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "error: " in err, err
    for w in words:
        assert w.lower() in err.lower(), (w, err)
    assert not case.marker.exists(), "code from a file ran"
    after = snapshot(case.out)
    assert {p: v for p, v in after.items() if p in kept_before} == kept_before, "a file in out_dir changed"
    assert snapshot(case.outside, case.lab.dir) == outside_before, "a file outside out_dir changed"
    assert (sorted(os.listdir(ROOT)), sorted(os.listdir(ROOT / "results"))) == top_before
    lock = case.out / "train.lock"
    assert no_temp_files(case.out) and (lock in kept_before or not os.path.lexists(lock))   # the lock let go


def test_the_table_is_large_and_every_script_is_in_it():
    assert len(CASES) >= 40
    assert {c[1] for c in CASES} == {"train", "decode", "bench", "ablate"}
    loads = {c[1] for c in CASES if "python objects" in c[4] or "payload" in c[0]}
    assert loads == {"train", "decode", "bench", "ablate"}         # every script that loads a checkpoint


def test_the_payload_is_real(lab, tmp_path):
    """The crafted file runs its code when unpickled the old way (weights_only=False), so the table's
    'no marker' proves the loader refused it, not that the payload was harmless."""
    marker = tmp_path / "PWNED"
    craft(lab.dir / "base.pt", tmp_path / "evil.pt", val_loss=Payload(marker))
    assert not marker.exists()
    ckpt = torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists() and ckpt["val_loss"] == 0             # ran, then looked like a normal checkpoint


# ----------------------------------------------------------------------------- beyond the table

def test_good_files_still_load_and_resume(lab, tmp_path, capsys):
    """The validator takes what jfmini writes: a base model, a round model, both states (resumed for real)."""
    for name in ("base.pt", "pretrain_state.pt", "jf1_state.pt"):
        load_checkpoint(lab.dir / name)
    load_checkpoint(lab.jf1)
    out = tmp_path / "out"
    shutil.copytree(lab.dir / "cache", out)
    shutil.copy(lab.dir / "pretrain_state.pt", out)
    train.main(["--out_dir", str(out), *PRE, "--resume"])
    assert f"resuming from {out / 'pretrain_state.pt'} at step 1" in capsys.readouterr().out
    assert load_checkpoint(out / "base.pt")[1]["steps"] == 4


def test_a_real_block_length_change_on_resume_is_refused(lab, tmp_path, capsys):
    """--block_lens 8,32 with an n=16 state of round 1: trajectories at n=8 are collected, then the state
    is refused (it used to continue at n=8)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("base.pt", "jf1_state.pt"):
        shutil.copy(lab.dir / name, out)
    before = (out / "jf1_state.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(["--out_dir", str(out), *ROUND, "--resume", "--block_lens", "8,32"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "block length 8 (it has 16)" in err, err
    assert (out / "jf1_state.pt").read_bytes() == before


def test_a_finished_round_made_with_other_flags_is_reused_with_a_warning(lab, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for f in (lab.dir / "base.pt", lab.jf1, lab.traj):
        shutil.copy(f, out)
    train.main(["--out_dir", str(out), *ROUND, "--lam", "3"])
    log = capsys.readouterr().out
    assert "warning: jf1.pt was distilled with other flags (--lam 3.0 (it has 10.0))" in log, log
    assert (out / "jf1.pt").read_bytes() == lab.jf1.read_bytes()


def test_ablate_runs_keeps_and_reuses_its_own_variant(lab, tmp_path, capsys):
    """The checks refuse only what is wrong: a plain ablation runs, and --keep's folder is reused by the
    same variant (same flags, same base model)."""
    import ablate
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(lab.dir / "base.pt", out)
    argv = [a.replace("{out}", str(out)) for a in ABLATE] + ["--keep", "--variants", "a: --lam 2; b-1.x: --lam 3"]
    ablate.main(argv)
    first = capsys.readouterr().out
    assert "b-1.x" in first and (out / "ablate" / "b-1.x_s1337" / "jf1.pt").exists()
    ablate.main(argv)
    assert "jf1.pt exists, reusing it" in capsys.readouterr().out
    assert len((out / "ablate.jsonl").read_text().splitlines()) == 6 and not (out / "train.lock").exists()


def test_an_ignored_signal_stays_ignored():
    """`nohup` starts a run with SIGHUP ignored, a script's background job with SIGINT ignored: cli()'s
    handlers leave those alone, and put every handler back afterwards."""
    import signal
    from jfmini.runtime.signals import _on_stop_signal, stop_signals_raise
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is _on_stop_signal
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_the_sweep_file_bench_writes_passes_the_check(tmp_path):
    """read_sweep refuses what bench.py --sweep could never write, and takes all it does write."""
    from jfmini.tools import rows
    from jfmini.runtime.files import read_sweep
    row = {"tokens_per_forward": 1.5, "tokens_per_s": 900.0}
    saved = {"device": "cpu", "best": rows.SWEEP[-1], "base_best": rows.SWEEP_BASE[0],
             "results": {"jf": [{**s, **row, "compiled_tokens_per_s": 1000.0} for s in rows.SWEEP],
                         "base": [{**s, **row} for s in rows.SWEEP_BASE]}}
    (tmp_path / "sweep.json").write_text(json.dumps(saved))
    assert read_sweep(tmp_path / "sweep.json", "--sweep_file") == saved


def test_rng_state_round_trips_as_plain_types():
    from jfmini.runtime.states import rng_ok, rng_state, set_rng_state
    np.random.seed(5)
    torch.manual_seed(5)
    state = rng_state()
    assert rng_ok(state) and isinstance(state["numpy"]["keys"], torch.Tensor)
    a = (np.random.rand(3), torch.rand(3))
    set_rng_state(state)
    assert np.array_equal(np.random.rand(3), a[0]) and torch.equal(torch.rand(3), a[1])


@pytest.mark.slow
def test_a_real_file_size_limit_during_a_save_keeps_the_last_good_state(lab, tmp_path):
    """A real write failure, not a patched torch.save: the resumed run saves under `ulimit -f` (SIGXFSZ
    ignored, so the write fails with EFBIG and torch's zip writer raises its RuntimeError over it). One
    line, exit code 2, the previous pretrain_state.pt kept byte for byte."""
    out = tmp_path / "out"
    shutil.copytree(lab.dir / "cache", out)
    shutil.copy(lab.dir / "pretrain_state.pt", out)
    before = (out / "pretrain_state.pt").read_bytes()
    limit = 100_000                                          # the state is ~0.9 MB; the token cache is smaller
    assert len(before) > limit > max(p.stat().st_size for p in out.rglob("*.bin"))
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    res = subprocess.run([PY, "-c", code, str(ROOT / "train.py"), "--out_dir", str(out), *PRE, "--resume"],
                         capture_output=True, text=True, timeout=LONG, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "file size limit" in err and "the last good pretrain_state.pt is kept" in err, err
    assert (out / "pretrain_state.pt").read_bytes() == before and no_temp_files(out)
    assert not (out / "train.lock").exists()


def test_file_size_limit_in_the_save_helper(tmp_path):
    """The same real failure at the helper: EFBIG under RuntimeError('unexpected pos') becomes the
    one-line UserError."""
    code = ("import resource, signal, sys, torch; sys.path.insert(0, sys.argv[2]); "
            "from jfmini.runtime.errors import UserError; from jfmini.runtime.writes import atomic_save; "
            "atomic_save({'x': torch.zeros(10)}, sys.argv[1]); "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))\n"
            "try:\n    atomic_save({'x': torch.zeros(100000)}, sys.argv[1])\n"
            "except UserError as e:\n    print(e)")
    res = subprocess.run([PY, "-c", code, str(tmp_path / "s.pt"), str(ROOT)], capture_output=True, text=True,
                         timeout=LONG)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "file size limit" in res.stdout and "the last good s.pt is kept" in res.stdout
    assert torch.load(tmp_path / "s.pt", weights_only=True)["x"].numel() == 10 and no_temp_files(tmp_path)


def test_the_lock_never_writes_through_a_link(tmp_path):
    from jfmini.runtime.errors import UserError
    from jfmini.runtime.writes import out_dir_lock
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / "train.lock")
    with pytest.raises(UserError, match="symbolic link"):
        with out_dir_lock(out):
            pass
    assert victim.read_text() == "keep me\n" and (out / "train.lock").is_symlink()
    (out / "train.lock").unlink()
    with out_dir_lock(out):
        assert (out / "train.lock").read_text() == f"{os.getpid()}\n"
    assert not (out / "train.lock").exists()


def test_a_write_probe_never_follows_a_planted_link(tmp_path):
    """check_writable makes a new file of a random name (O_EXCL): a link planted under a guessable name is
    never written through."""
    from jfmini.runtime.writes import check_writable
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / f".write_probe.{os.getpid()}.0.tmp")
    check_writable(out, "--out_dir")
    assert victim.read_text() == "keep me\n"


def test_training_goes_on_when_its_log_has_no_reader(lab, tmp_path, monkeypatch, capsys):
    """`python train.py | head`: once head has gone, the log's writes fail (EPIPE); training goes on,
    unlogged, and finishes its stage."""
    class GoneReader:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise OSError("not a real stream")          # quiet_stdout has no descriptor to point elsewhere
    out = tmp_path / "out"
    shutil.copytree(lab.dir / "cache", out)
    monkeypatch.setattr(sys, "stdout", GoneReader())
    train.main(["--out_dir", str(out), *PRE])
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    assert load_checkpoint(out / "base.pt")[1]["steps"] == 4 and not (out / "train.lock").exists()


def test_ablate_table_with_probe_off():
    from jfmini.tools import ablation
    text = ablation.table([{"variant": "base"}, {"variant": "a", "seed": 1, "train_s": 3.0}], (32,))
    assert text.splitlines()[2].split()[:2] == ["base", "-"] and "a" in text.splitlines()[3]


@pytest.mark.slow
def test_output_that_goes_nowhere(lab, tmp_path):
    """stdout's reader gone (`| head` that has read enough), stdout closed, stdout on a full disk: no
    traceback. A gone reader is a quiet exit 141 (as SIGPIPE would make it); a full disk is one error line."""
    args = [PY, str(ROOT / "decode.py"), "--prompt", "def f(x):", "--ckpt", str(lab.dir / "base.pt"), "--device", "cpu",
            "--max_new_tokens", "4"]
    r, w = os.pipe()
    proc = subprocess.Popen(args, stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    os.close(r)                                    # the reader is gone before the first write: EPIPE, always
    _, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err
    closed = subprocess.run(" ".join(map(shlex.quote, args)) + " >&-", shell=True, capture_output=True, text=True,
                            timeout=LONG)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            res = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=LONG)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert last.startswith("error: could not write the output to stdout") and "No space left" in last


def test_a_later_round_left_from_an_earlier_run_is_named(lab, tmp_path, capsys):
    """decode.py and bench.py take the highest jf<r>.pt: a run with fewer rounds says which files would
    shadow its own last round."""
    out = tmp_path / "out"
    out.mkdir()
    for f in (lab.dir / "base.pt", lab.jf1, lab.traj):
        shutil.copy(f, out)
    shutil.copy(lab.jf1, out / "jf2.pt")
    train.main(["--out_dir", str(out), *ROUND, "--block_lens", "16"])
    log = capsys.readouterr().out
    assert f"note: jf2.pt in {out} came from an earlier run with more rounds" in log, log
    assert f"--ckpt {out / 'jf1.pt'}" in log
    (out / "jf2.pt").unlink()
    train.main(["--out_dir", str(out), *ROUND, "--block_lens", "16"])
    assert "note:" not in capsys.readouterr().out
