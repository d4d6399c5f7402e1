"""Ctrl-C and SIGTERM reach a study only where it can record them."""

from __future__ import annotations

import os
import signal

import pytest

from autotune.errors import Interrupted
from autotune.interrupts import InterruptGate


@pytest.fixture(autouse=True)
def default_handlers():
    """The handlers an interactive run starts with, whatever started pytest: a
    job sent to the background (``cmd &``, nohup) starts with SIGINT ignored,
    and the gate rightly leaves an ignored signal alone."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_an_ignored_signal_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gate = InterruptGate()
    with gate.installed():
        os.kill(os.getpid(), signal.SIGINT)
        assert gate.pending is None
        gate.check()  # nothing held: the user asked for the signal to be ignored (nohup)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_a_signal_outside_the_open_part_is_held_until_check():
    gate = InterruptGate()
    with gate.installed():
        os.kill(os.getpid(), signal.SIGINT)  # e.g. while Optuna stores a trial
        assert gate.pending == signal.SIGINT
        with pytest.raises(Interrupted) as e:
            gate.check()
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_held_signal_is_raised_when_the_trial_opens():
    gate = InterruptGate()
    with gate.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted) as e:
            with gate.open():
                pass
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_inside_the_open_part_a_signal_raises_at_once():
    gate = InterruptGate()
    with gate.installed(), pytest.raises(KeyboardInterrupt):
        with gate.open():
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)  # give the handler its turn
    assert gate.pending is None


def test_a_second_signal_while_one_is_held_raises_at_once():
    gate = InterruptGate()
    with gate.installed(), pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)


def test_a_callers_own_handler_is_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. autotune figure's workers
    try:
        with InterruptGate().installed():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
