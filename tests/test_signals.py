"""pipeline.signals: a signal held over a commit reaches, after it, what would have taken it at once."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import pytest

from pipeline.signals import (StoppedAfterCommit, join_thread, queue_get, queue_put, raise_deferred, signals_deferred,
                              signals_held, stopped_after_commit)


@pytest.fixture
def own_sigterm_handler():
    """A caller's SIGTERM handler that asks for a graceful stop instead of raising (a served loop, Prefect)."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_a_held_signal_goes_to_the_callers_own_handler_after_the_commit(own_sigterm_handler):
    committed = []
    with signals_held():
        signal.raise_signal(signal.SIGTERM)
        committed.append("scores and summary")
        assert own_sigterm_handler == []  # held while the output is committed
    # It used to become StoppedAfterCommit, and the caller's handler never saw the signal.
    assert own_sigterm_handler == [signal.SIGTERM] and committed == ["scores and summary"]


def test_an_interrupt_the_callers_handler_raises_is_named_as_after_the_commit():
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(StoppedAfterCommit) as stopped:
            with signals_held():
                signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_held_over_the_commit_raises_stopped_after_commit():
    with pytest.raises(StoppedAfterCommit) as stopped:
        with signals_held():
            signal.raise_signal(signal.SIGINT)
    assert stopped.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("when", ["during the inner block", "after the inner block", "as the inner block fails"])
def test_nested_holds_stop_after_the_outer_commit(when):
    """A commit made of commits: a signal during any part of it waits for the outer block to end.
    Held by an inner block, it goes, when that block ends, to the outer block's hold. It used to be
    dropped when the inner block failed, as a failed commit drops it: but the outer block may catch
    that error and commit all the same, and the signal was lost."""
    steps = []
    with pytest.raises(StoppedAfterCommit) as stopped:
        with signals_held():
            try:
                with signals_held():
                    if when != "after the inner block":
                        signal.raise_signal(signal.SIGINT)
                    steps.append("inner")
                    if when == "as the inner block fails":
                        raise OSError("a step the outer commit can do without")
            except OSError:
                steps.append("caught")
            if when == "after the inner block":
                signal.raise_signal(signal.SIGINT)
            steps.append("outer")
    assert stopped.value.signum == signal.SIGINT
    assert steps == ["inner", *(["caught"] if when == "as the inner block fails" else []), "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failed_commit_drops_its_signal_and_its_error_goes_on():
    with pytest.raises(OSError):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def stopped_by(error: BaseException, committed: bool = True) -> BaseException:
    """What ``error``, raised in a stopped_after_commit block, leaves it as."""
    try:
        with stopped_after_commit(lambda: committed):
            raise error
    except BaseException as raised:  # noqa: BLE001 - the point of the test
        return raised


def test_a_signal_after_the_commit_is_a_stop_after_it_whatever_raised_it():
    """Ctrl-C, the CLI's SIGTERM (a KeyboardInterrupt with its number) and, inside a Prefect flow,
    Prefect's TerminationSignal: each said "no output was written" in the steps after the commit."""
    from prefect.exceptions import TerminationSignal

    from pipeline.cli import Terminated

    for error, signum in ((KeyboardInterrupt(), signal.SIGINT), (Terminated(signal.SIGTERM), signal.SIGTERM),
                          (TerminationSignal(signal.SIGTERM), signal.SIGTERM)):
        stopped = stopped_by(error)
        assert type(stopped) is StoppedAfterCommit and stopped.signum == signum and stopped.__cause__ is error


def test_before_the_commit_and_for_errors_nothing_changes():
    from prefect.exceptions import TerminationSignal

    already = StoppedAfterCommit(signal.SIGINT)
    for error, committed in ((KeyboardInterrupt(), False), (TerminationSignal(signal.SIGTERM), False),
                             (OSError("disk full"), True), (already, True)):
        assert stopped_by(error, committed) is error


def test_a_deferred_signal_is_raised_where_the_block_says_it_is_safe():
    """A handler's exception lands wherever the main thread is: inside a queue's condition it left the
    queue broken, and a run that was stopped there hung. Deferred, it waits for a safe point."""
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("went on")
            raise_deferred()
            steps.append("not reached")
    assert steps == ["went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_deferred_signal_is_raised_when_the_block_ends_at_the_latest():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            with signals_deferred():  # part of the block around it
                signal.raise_signal(signal.SIGINT)
                steps.append("inner")
            steps.append("outer")
    assert steps == ["inner", "outer"]
    raise_deferred()  # nothing left over


def test_a_deferred_signal_goes_to_the_callers_own_handler(own_sigterm_handler):
    with signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        assert own_sigterm_handler == []
        raise_deferred()
        assert own_sigterm_handler == [signal.SIGTERM]


def test_a_signal_while_the_block_fails_stops_the_run_and_is_raised_once():
    with pytest.raises(KeyboardInterrupt) as stopped:
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            raise OSError("disk full")
    assert isinstance(stopped.value.__context__, OSError)
    with pytest.raises(KeyboardInterrupt) as stopped:
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            raise KeyboardInterrupt("the first")
    assert stopped.value.args == ("the first",) and stopped.value.__context__ is None


def test_a_commit_inside_a_deferred_block_still_says_the_output_was_kept():
    with pytest.raises(StoppedAfterCommit) as stopped:
        with signals_deferred():
            with signals_held():
                signal.raise_signal(signal.SIGINT)
            pytest.fail("the commit's end is where the run stops")
    assert stopped.value.signum == signal.SIGINT
    with pytest.raises(StoppedAfterCommit):  # and the other way round: held, then stopped after the commit
        with signals_held():
            with signals_deferred():
                signal.raise_signal(signal.SIGINT)
                raise_deferred()


def test_a_wait_on_a_queue_is_stopped_by_a_signal_and_leaves_the_queue_working():
    slots: queue.Queue = queue.Queue(maxsize=1)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        queue_get(slots, alive=lambda: True)  # nothing ever comes
    assert time.monotonic() - started < 5
    assert queue_put(slots, "chunk") and queue_get(slots, alive=lambda: True) == "chunk"
    assert queue_get(slots, alive=lambda: False, gone="gone") == "gone"
    slots.put("chunk")
    assert queue_put(slots, "another", alive=lambda: False) is False  # full, and no one takes from it


def test_a_bounded_join_gives_up_and_a_signal_does_not_cut_it_short():
    """A bounded join is part of a stop (a worker on its way out): a second Ctrl-C must not leave the
    worker inside pyarrow as the process exits, which crashed it."""
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=True)
    worker.start()
    assert join_thread(worker, limit=0.2) is False
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # raised once the wait is over, not during it
        join_thread(worker, limit=0.5)
    assert time.monotonic() - started >= 0.5
    release.set()
    assert join_thread(worker)
