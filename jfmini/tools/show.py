"""What decode.py prints: the completion streamed as far as it is sure (`Stream`, the decoder's on_step),
the trajectory iteration by iteration (`render`, with --show), and the closing line of counts."""
import sys

from jfmini.runtime.engine import finish

COLOR = {"new": "\033[1;32m", "good": "\033[30;43m", "bad": "\033[2;31m", "end": "\033[0m"}
PLAIN = {"new": ("[", "]"), "good": ("{", "}"), "bad": ("", "")}


def piece(enc, tok):
    return enc.decode([tok]).replace("\n", "\\n").replace("\t", "\\t")


def render(enc, frames, final, prompt_len, color):
    """One line per iteration (the paper's Figure 4): tokens committed by this forward, then the drafts,
    marked where they already equal the final output (a correct guess not yet verified) or not."""
    def mark(kind, text):
        return f"{COLOR[kind]}{text}{COLOR['end']}" if color else f"{PLAIN[kind][0]}{text}{PLAIN[kind][1]}"
    legend = (f"{mark('new', 'committed now')} {mark('good', 'correct guess')} {mark('bad', 'wrong guess')}")
    lines = [f"trajectory ({legend}):"]
    prev_m = prompt_len
    for it, (m, draft) in enumerate(frames):
        m = min(m, prompt_len + len(final))   # the last forward may commit past the cut at max_new_tokens
        new = [mark("new", piece(enc, t)) for t in final[prev_m - prompt_len:m - prompt_len]]
        guesses = []
        for i, t in enumerate(draft):
            at = m - prompt_len + i
            ok = at < len(final) and final[at] == t
            guesses.append(mark("good" if ok else "bad", piece(enc, t)))
        lines.append(f"{it:4d} +{m - prev_m:<3d}" + "".join(new) + " | " + " ".join(guesses))
        prev_m = m
    return "\n".join(lines)


def streamable(text, final):
    """What of the text decoded so far can be shown for sure: all of it once final; before that, not an
    unfinished UTF-8 character, nor a last line of only spaces (the stop rule may yet end the function
    there)."""
    if final:
        return text
    text = text.rstrip("\ufffd")
    tail = text[text.rfind("\n") + 1:]
    return text if tail.strip(" \t\f\r") else text[:len(text) - len(tail)]


class Stream:
    """on_step for Jacobi.generate: `header` (to stderr) once the prompt is accepted; then the prompt and the
    completion streamed to stdout as far as it is sure, or with `show` each iteration kept as a frame
    (the committed length, the drafts in flight) for `render`."""

    def __init__(self, enc, text, prompt_len, header, show, max_new_tokens, stop):
        self.enc, self.text, self.prompt_len, self.header = enc, text, prompt_len, header
        self.show, self.max_new_tokens, self.stop = show, max_new_tokens, stop
        self.frames, self.shown = [], None

    def __call__(self, j, kept):
        if not self.frames and self.shown is None:  # the first iteration: the prompt was accepted
            print(self.header, file=sys.stderr)
        m = int(j.state.length[0])
        tokens = j.state.text[0, self.prompt_len:m].tolist()
        if self.show:
            self.frames.append((m, j.state.draft[0, :int(j.state.in_flight[0])].tolist()))
        else:
            if self.shown is None:  # the prompt was accepted: echo it, then stream
                sys.stdout.write(self.text)
                self.shown = self.text
            eot = self.enc.eot_token
            tokens = finish(tokens if kept is None else tokens[:kept], self.max_new_tokens, eot)
            final = kept is not None or bool(j.state.done[0]) or self.stop is None
            new = streamable(self.enc.decode([t for t in tokens if t != eot]), final)
            sys.stdout.write(new[len(self.shown) - len(self.text):])
            sys.stdout.flush()
            self.shown = self.text + new


def summary(tokens, stats, eot, max_new_tokens, graph_enabled):
    """The closing line: tokens kept, where they ended, forwards, TPF, tokens/s, prefill."""
    ended = "end-of-text" if tokens and tokens[-1] == eot else \
        f"--max_new_tokens {max_new_tokens}" if len(tokens) == max_new_tokens else "the function's end"
    capture = " including the one-off CUDA graph capture" if graph_enabled else ""
    return (f"\n# {stats.new_tokens} tokens to {ended} in {stats.forwards} forwards: {stats.tokens_per_forward:.2f} "
            f"tokens per forward, {stats.tokens_per_s:,.0f} tokens/s{capture} (prefill {stats.prefill_s * 1e3:.1f} ms)")
