"""Ctrl-C and SIGTERM around the moment a run's output becomes real.

A run's output is committed in a few file operations: the scores renamed into place, then their
summary; a precision variant moved in, then listed in the manifest. A signal between two of them
left a half-committed result (scores with no summary, a bundle without the variant it had) while
the CLI said that no output was written. Held over the commit, the signal waits until the output
is whole, and then stops the run with ``StoppedAfterCommit`` so the message can say so. A signal
in the steps after the commit (a report) is named so as well (``stopped_after_commit``).

While a run hands chunks between threads, a signal is raised only where that is safe
(``signals_deferred``): Python raises a handler's exception wherever the main thread is, and
inside a queue.Queue or threading.Condition it left them broken (a chunk the writer thread was
never woken for: the run hung at its end, forever), and inside onnxruntime or pyarrow it crashed
the process. The waits of those threads (``queue_put``, ``queue_get``, ``join_thread``) are made
of short ones, so that a deferred signal is raised within a fraction of a second of coming.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

# How long one of the short waits lasts: a deferred signal waits at most this long to be raised.
POLL_SECONDS = 0.1


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


class _Deferral(_Hold):
    """The handler a signals_deferred block puts in place: it notes the signals it receives, for the
    block to raise where that is safe."""

    def __init__(self, previous: dict[int, Callable]) -> None:
        super().__init__()
        self.previous = previous  # the Python handlers it stands in for: SIG_DFL and SIG_IGN stay in place

    def deliver(self) -> None:
        """Hands the first signal caught to the handler it was deferred from (which raises, as a rule)."""
        if self.caught:
            signum = self.caught[0]
            self.caught.clear()  # the run stops for the first; more of them say nothing new
            self.previous[signum](signum, None)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM in the block are raised only at ``raise_deferred()``, which the block calls
    between two steps and while it waits (the waits below), and when it ends.

    They go then to the handler that was in place, as they would have at once: for the CLI, it
    raises KeyboardInterrupt or Terminated. One that came while the block failed goes to it as
    well, unless a signal is what it failed with. A block inside one is part of it: it changes
    nothing. A SIGTERM left to its default (no `vaeguard` handler) ends the process at once, as
    before: it runs no Python code, so it leaves nothing half-done in it. Signals reach Python
    code only in the main thread, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    current = {signum: signal.getsignal(signum) for signum in SIGNALS}
    if any(isinstance(handler, _Deferral) for handler in current.values()):
        yield
        return
    deferral = _Deferral({signum: handler for signum, handler in current.items() if callable(handler)})
    for signum in deferral.previous:
        signal.signal(signum, deferral)
    try:
        yield
    except BaseException as exc:
        _restore(deferral.previous)
        if stop_signal(exc) is None:
            deferral.deliver()
        raise
    _restore(deferral.previous)
    deferral.deliver()


def _restore(handlers: dict[int, Callable]) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def raise_deferred() -> None:
    """A point where it is safe to stop: a signal that the signals_deferred block around it caught
    is raised here (handed to the handler it was deferred from)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            handler = signal.getsignal(signum)
            if isinstance(handler, _Deferral):
                handler.deliver()
                return


def queue_put(slots: queue.Queue, item: Any, alive: Callable[[], bool] = lambda: True) -> bool:
    """Puts ``item`` into ``slots`` once there is room, with signals deferred meanwhile and raised
    between short waits; False, with ``item`` left out, once ``alive()`` says the taker is gone."""
    with signals_deferred():
        while True:
            try:
                slots.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                if not alive():
                    return False
            raise_deferred()


def queue_get(slots: queue.Queue, alive: Callable[[], bool], gone: Any = None) -> Any:
    """The next item of ``slots``, with signals deferred meanwhile and raised between short waits;
    ``gone`` once ``alive()`` says the giver is gone and nothing is left."""
    with signals_deferred():
        while True:
            try:
                return slots.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not alive():
                    try:
                        return slots.get_nowait()  # put just before it went
                    except queue.Empty:
                        return gone
            raise_deferred()


def join_thread(thread: threading.Thread, limit: float | None = None) -> bool:
    """Waits for ``thread`` to end, with signals deferred. Without ``limit`` a signal is raised
    between short waits. With one, the wait is part of a stop (a worker on its way out after a
    signal or an error), which another signal must not cut short, and it gives up after ``limit``
    seconds: False."""
    deadline = None if limit is None else time.monotonic() + limit
    with signals_deferred():
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            if deadline is None:
                raise_deferred()
            elif time.monotonic() > deadline:
                return not thread.is_alive()
    return True


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
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    previous = {signum: handler for signum, handler in previous.items() if handler is not None}  # None: set in C
    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    except BaseException:
        if hold.caught and isinstance(previous.get(hold.caught[0]), _Hold):  # a block around it, of either kind
            previous[hold.caught[0]](hold.caught[0], None)
        raise
    finally:
        _restore(previous)
    if not hold.caught or previous.get(hold.caught[0]) in (signal.SIG_IGN, None):
        return
    signum, handler = hold.caught[0], previous[hold.caught[0]]
    if isinstance(handler, _Deferral):
        handler = handler.previous[signum]  # the end of a commit is a safe point to stop at
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
