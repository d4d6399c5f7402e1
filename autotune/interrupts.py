"""Where Ctrl-C and SIGTERM may land during a study.

A trial is stored whole or failed: an interrupt that arrives while Optuna
samples, stores a trial's results or marks it finished would leave it RUNNING,
or FAIL with a feasible outcome. ``InterruptGate`` holds SIGINT and SIGTERM
back everywhere except inside ``gate.open()`` (the trial's measurement, where
the study records an interrupted trial as such); one held back is raised at
the next ``open()`` or ``check()``. A second signal while one is held raises
at once (a storage that hangs can still be left).

Only the main thread receives signals, and only handlers that are Python's
default or autotune's own are taken over: a caller that handles signals
itself (``autotune figure``) keeps them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from autotune.errors import Interrupted, raise_interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ours(handler: object) -> bool:
    return handler in (signal.default_int_handler, signal.SIG_DFL, raise_interrupted)


class InterruptGate:
    def __init__(self) -> None:
        self.pending: int | None = None  # the signal held back
        self._open = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._open or self.pending is not None:
            raise Interrupted(signum=signum)
        self.pending = signum

    @contextmanager
    def installed(self) -> Iterator[InterruptGate]:
        """Hold signals back while inside (main thread, our handlers only)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if _ours(signal.getsignal(sig)):
                    self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()

    def check(self) -> None:
        """Raise the signal held back, if any."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum=signum)

    @contextmanager
    def open(self) -> Iterator[None]:
        """Let signals through at once while inside."""
        self.check()
        self._open = True
        try:
            yield
        finally:
            self._open = False
