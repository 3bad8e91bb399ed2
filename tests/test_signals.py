"""pipeline.signals: a signal held over a commit reaches, after it, what would have taken it at once."""

from __future__ import annotations

import signal

import pytest

from pipeline.signals import StoppedAfterCommit, signals_held, stopped_after_commit


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
