"""Ctrl-C during a search: acted on between steps of the loop, never in the middle of a write."""

from __future__ import annotations

import contextlib
import signal
import threading

import optuna


class StopFlag:
    requested = False


@contextlib.contextmanager
def graceful_ctrl_c():
    """The first Ctrl-C sets a flag the loop checks between steps; a second one interrupts at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals can only be handled in the main thread
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def end_open_transactions(study: optuna.Study) -> None:
    """A Ctrl-C that landed inside a database read leaves its transaction open, and SQLite then
    refuses every write ("database is locked"): roll it back before writing again."""
    backend = getattr(study._storage, "_backend", study._storage)
    scoped = getattr(backend, "scoped_session", None)
    if scoped is not None:
        try:
            scoped.remove()
        except Exception:
            pass
