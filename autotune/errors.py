"""Errors the user can act on.

A ``UserError`` carries a one-line message that names the problem; the CLI
prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: an unknown name, a malformed file, an impossible range."""

    def __init__(self, message: str) -> None:
        assert "\n" not in message, "user errors are one line"
        super().__init__(message)


class TrialCrash(Exception):
    """A trial that could not produce measurements (OOM, dead server, ...).

    Backends raise it, or return a ``TrialResult`` with ``error`` set; the
    study records the trial as infeasible with this reason.
    """
