"""Ctrl-C and SIGTERM around the moment a run's output becomes real.

A run's output is committed in a few file operations: the scores renamed into place, then their
summary; a precision variant moved in, then listed in the manifest. A signal between two of them
left a half-committed result (scores with no summary, a bundle without the variant it had) while
the CLI said that no output was written. Held over the commit, the signal waits until the output
is whole, and then stops the run with ``StoppedAfterCommit`` so the message can say so. A signal
in the steps after the commit (a report) is named so as well (``stopped_after_commit``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class StoppedAfterCommit(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that came while an output was committed: raised once it was whole."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Hold:
    """The handler a signals_held block puts in place: it keeps the signals it receives."""

    def __init__(self) -> None:
        self.caught: list[int] = []

    def __call__(self, signum: int, frame) -> None:
        self.caught.append(signum)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends; one that came then raises StoppedAfterCommit.

    A handler of the caller's that was in place gets the signal then, as it would have at once.
    If the block fails, its error goes on and the held signal is dropped: the run is ending anyway.
    Blocks nest: an inner block hands what it held to the outer one when it ends, failed or not (the
    outer one may catch its error and commit all the same), and the outer one acts on it at its end.
    Signals reach Python code only in the main thread, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hold = _Hold()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: handler for signum, handler in previous.items() if handler is not None}  # None: set in C
    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    except BaseException:
        if hold.caught and isinstance(previous.get(hold.caught[0]), _Hold):
            previous[hold.caught[0]](hold.caught[0], None)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not hold.caught or previous.get(hold.caught[0]) in (signal.SIG_IGN, None):
        return
    signum, handler = hold.caught[0], previous[hold.caught[0]]
    if callable(handler) and handler is not signal.default_int_handler:
        # The caller's own handler (a flag that asks for a graceful stop, Prefect's TerminationSignal, the
        # hold of a block around this one) decides what the signal means; only an interrupt it raises is
        # named as one after the commit.
        try:
            handler(signum, None)
        except KeyboardInterrupt as exc:
            raise StoppedAfterCommit(signum) from exc
        return
    raise StoppedAfterCommit(signum)


def stop_signal(error: BaseException) -> int | None:
    """The signal that ``error`` stops the run for (SIGINT, SIGTERM), or None: an error, not a stop.

    Inside a Prefect flow SIGTERM raises Prefect's TerminationSignal. Its class is looked up only
    where Prefect is loaded: the library does not import Prefect, and without it none is raised."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, unless it says (the CLI's Terminated)
        return getattr(error, "signum", signal.SIGINT)
    prefect = sys.modules.get("prefect.exceptions")
    if prefect is not None and isinstance(error, prefect.TerminationSignal):
        return error.signal
    return None


@contextlib.contextmanager
def stopped_after_commit(committed: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """A signal in the block, once ``committed()`` says the output is whole, stops the run with
    StoppedAfterCommit: the steps after the commit (the report) must not say no output was written.

    Prefect's TerminationSignal is one too: only for a run whose caller says how it stopped (the
    CLI). A served flow run needs it as it is, to tell a cancellation from a crash."""
    try:
        yield
    except BaseException as exc:
        signum = None if isinstance(exc, StoppedAfterCommit) or not committed() else stop_signal(exc)
        if signum is None:
            raise
        raise StoppedAfterCommit(signum) from exc
