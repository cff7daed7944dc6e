"""Signals that save instead of kill: SIGINT, SIGTERM and SIGHUP raised as an exception (so that
training saves its state on the way out), and held back while a file is being written."""
import signal
import sys
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's `kill`) or SIGHUP (the terminal closed) as an exception, so
    that training can save its state on the way out. `note` is the line cli() prints (what was saved)."""

    def __init__(self, signum=signal.SIGINT, note=None):
        super().__init__(note)
        self.signum, self.note = signum, note


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class signals_deferred:
    """A stop signal that arrives inside this block waits until the block is done, then is raised: a
    checkpoint is never cut in half (torch's zip writer, interrupted mid-write, raises its own
    RuntimeError over the KeyboardInterrupt). While an interruption is already being handled (the save
    on the way out), a second signal is dropped: the run is stopping anyway."""
    depth, pending = 0, None

    def __enter__(self):
        signals_deferred.depth += 1

    def __exit__(self, kind, value, tb):
        signals_deferred.depth -= 1
        if signals_deferred.depth or signals_deferred.pending is None:
            return
        signum, signals_deferred.pending = signals_deferred.pending, None
        handling = sys.exc_info()[1]                 # the exception being handled around this block, if any
        if kind is None and not isinstance(handling, KeyboardInterrupt):
            raise Interrupted(signum)


def _on_stop_signal(signum, frame):
    if signals_deferred.depth:
        signals_deferred.pending = signals_deferred.pending or signum
    else:
        raise Interrupted(signum)


@contextmanager
def stop_signals_raise():
    """Inside: SIGINT, SIGTERM and SIGHUP raise Interrupted. A signal this process was started with
    ignored stays ignored (`nohup` ignores SIGHUP; a background job of a script ignores SIGINT). The
    previous handlers come back afterwards (main() called from a test)."""
    if threading.current_thread() is not threading.main_thread():     # only the main thread may set handlers
        yield
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def interrupted(e, note):
    """The Interrupted to raise after saving, for the signal of `e` (a plain KeyboardInterrupt is SIGINT)."""
    return Interrupted(getattr(e, "signum", signal.SIGINT), note)
