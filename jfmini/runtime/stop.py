"""What a user keeps: a completion of a function prompt ends where the function ends.

The rule, defined here once and used by every decoder, bench.py, train.py's evaluation and the quality
metrics: the kept text ends just before the first line that

- starts in the completion (a line the prompt began is the user's),
- is a new line of code: it does not start inside a string (a docstring with dedented text, a string
  spanning lines) or after a backslash continuation,
- is not blank (spaces, tabs, form feeds and carriage returns only), and
- is indented at or left of the prompt's last `def` (tabs to multiples of 8, as Python counts them).

At top level this is HumanEval's stop sequences ("\\ndef", "\\nclass", "\\nif", "\\nprint", "\\n#") and every
other line at column 0; for a method it is the next line at the method's indentation or left of it. A
prompt without a `def` has no function end. A prompt cut from the middle of a file may begin inside a
docstring: it is read so that its last `def` line is code and, where possible, its own docstring is closed
at its end. A completion also ends at end-of-text and at the token limit;
those are the decoders' own stops. Brackets are not tracked: a dedented line inside an unclosed bracket
still ends the function (a small model leaves brackets open often, and a stop that one stray bracket can
switch off keeps loops).

Only ASCII characters steer the rule, so it reads a UTF-8 byte string decoded as Latin-1 (one character
per byte: the decoders' view, where a cut is a byte offset) exactly as it reads the decoded text.

    prompt     def f(x):
                   \"\"\"Doc.\"\"\"
    completion     return x           kept
                                      kept (a blank line)
               def g():               the first line at the def's indentation: the kept text ends before it
"""
import bisect
import re

SPACE = " \t\f\r"
DEF = re.compile(r"[ \t\f]*(?:async[ \t]+)?def[ \t]")
# A first line that is plainly code, never the inside of a docstring: a def, class or import at column 0.
CODE_LINE = re.compile(r"(?:(?:async[ \t]+)?def|class|import|from)[ \t]|@|#")
# What matters outside a string: a string opening, a comment, a backslash, a line end.
OUTSIDE = re.compile(r"'''|\"\"\"|['\"#\\\n]")
# Inside a string: an escape, its closing quote, and (single-quoted strings) the line end; in a comment
# (state '#'), the line end.
INSIDE = {q: re.compile(re.escape(q) + r"|\\" + ("" if len(q) == 3 else r"|\n")) for q in ("'", '"', "'''", '"""')}
INSIDE["#"] = re.compile(r"\n")


def lex(text, i, quote, end):
    """Lex text[i:end] from state `quote` (None: code; '#': a comment; else the open string's quote). Returns
    (offsets just after line ends, whether each starts a new line of code, the state at `end`). Line ends
    inside a triple-quoted string are not reported; one after a backslash is, as no new line of code."""
    starts, code = [], []
    while i < end:
        m = (OUTSIDE if quote is None else INSIDE[quote]).search(text, i, end)
        if m is None:
            break
        tok, i = m.group(), m.end()
        if tok == "\n":                               # a line end in code, or one that ends a ' or " string
            starts.append(i)
            code.append(True)
            quote = None
        elif tok == "\\":                             # an escape, or (in code) a line continued
            if i < end and text[i] == "\n":
                starts.append(i + 1)
                code.append(False)
            i += 1
        elif tok == "#":                              # a comment runs to the line end
            quote = "#"
        elif quote is None:
            quote = tok
        elif tok == quote:
            quote = None
    return starts, code, quote


def width(text, i, end):
    """(indentation of the line from offset i: spaces count 1, a tab to the next multiple of 8, a form
    feed restarts; the offset of its first other character, or `end`)."""
    w = 0
    while i < end and text[i] in SPACE:
        w = 0 if text[i] == "\f" else (w // 8 + 1) * 8 if text[i] == "\t" else w + (text[i] == " ")
        i += 1
    return w, i


class FunctionEnd:
    """The rule for one prompt. `find(completion)` may be called again and again as the completion grows
    (each text extending the last): it lexes only what is new, and answers once the end is certain."""

    def __init__(self, prompt):
        # A prompt cut from the middle of a file may begin inside a docstring. Unless its first line is
        # plainly code, read it from each state it may begin in (code, or inside a triple-quoted string) and
        # keep the first reading that finds a def line of code and ends in code (the prompt's own docstring
        # closed), else the first that finds one.
        first = next((line for line in prompt.split("\n") if line.strip(SPACE)), "")
        code_first = CODE_LINE.match(first) is not None
        readings = [self._read(prompt, start) for start in ((None,) if code_first else (None, '"""', "'''"))]
        found = [r for r in readings if r[0] is not None]
        self.indent, self.def_start, self.quote, at_line_start = next(
            (r for r in found if r[2] is None), (found or readings)[0])   # indent None: no function to end
        self.pending = [0] if at_line_start else []   # line starts of the completion still to be decided
        self.pos, self.cut = 0, None

    @staticmethod
    def _read(prompt, start):
        """Lex the prompt from string state `start`: (the last def line's indentation or None, where that
        line starts, the string state at the prompt's end, whether the completion begins a new line)."""
        starts, code, quote = lex(prompt, 0, start, len(prompt))
        indent, def_start = None, 0
        for s in ([0] if start is None else []) + [s for s, c in zip(starts, code) if c]:
            if DEF.match(prompt, s):
                indent, def_start = width(prompt, s, len(prompt))[0], s
        return indent, def_start, quote, bool(starts) and starts[-1] == len(prompt) and code[-1]

    def find(self, completion):
        """Offset in `completion` where the kept text ends, once it is certain; None while it is not (or
        never, at the end of the text: then everything is kept)."""
        if self.cut is not None or self.indent is None:
            return self.cut
        end = completion.rfind("\n") + 1              # lex whole lines only: nothing in them can change
        starts, code, self.quote = lex(completion, self.pos, self.quote, max(end, self.pos))
        self.pos = max(end, self.pos)
        candidates, self.pending = self.pending + [s for s, c in zip(starts, code) if c], []
        for s in candidates:
            w, j = width(completion, s, len(completion))
            if j == len(completion):                  # only spaces so far (a form feed may yet reset them)
                self.pending = [s]
                continue
            if completion[j] != "\n" and w <= self.indent:
                self.cut = s
                return s
        return None


def kept_text(prompt, completion):
    """The part of `completion` a user keeps (see the module docstring)."""
    cut = FunctionEnd(prompt).find(completion)
    return completion if cut is None else completion[:cut]


def token_pieces(enc):
    """token id -> its bytes (end-of-text: none), memoised: what the decoders' stop checks read."""
    cache = {enc.eot_token: b""}

    def piece(t):
        b = cache.get(t)
        if b is None:
            b = cache[t] = enc.decode_single_token_bytes(t)
        return b
    return piece


class StopAtFunctionEnd:
    """The rule on token ids, for a decoder: `kept(tokens)` is the number of the completion's tokens a user
    keeps (those that start before the function's end) once that is certain, else None. Called with the
    committed tokens so far, again and again; only new tokens are read, and none after end-of-text (`eot`:
    the text ends there, and the decoder with it). piece(token) -> bytes."""

    def __init__(self, prompt_tokens, piece, eot=None):
        self.piece, self.eot = piece, eot
        self.rule = FunctionEnd(b"".join(map(piece, prompt_tokens)).decode("latin-1"))
        self.text, self.starts, self.ended = "", [], False

    def kept(self, tokens):
        for t in tokens[len(self.starts):]:
            if self.ended or t == self.eot:
                self.ended = True
                break
            self.starts.append(len(self.text))
            self.text += self.piece(t).decode("latin-1")
        cut = self.rule.find(self.text)
        return None if cut is None else bisect.bisect_left(self.starts, cut)


def function_stops(enc, prompts):
    """One stop per prompt (token lists) for the decoders."""
    piece = token_pieces(enc)
    return [StopAtFunctionEnd(p, piece, enc.eot_token) for p in prompts]
