"""pipeline.signals: a signal held over a commit reaches, after it, what would have taken it at once."""

from __future__ import annotations

import signal

import pytest

from pipeline.signals import StoppedAfterCommit, signals_held


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
