"""Errors the user can act on.

A ``UserError`` carries a one-line message that names the problem; the CLI
prints it and exits with code 2, without a traceback. An
``EnvironmentFailure`` is the machine's fault, not the input's (no
permission, a read-only or full disk, a server that does not answer): one
line too, and exit code 1.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input: an unknown name, a malformed file, an impossible range."""

    def __init__(self, message: str) -> None:
        assert "\n" not in message, "user errors are one line"
        super().__init__(message)


class EnvironmentFailure(UserError):
    """The environment failed: a folder that cannot be written, a full disk, a
    storage server that does not answer. Exit code 1.

    A subclass of ``UserError`` so that whoever catches user errors (one
    line, no traceback) catches it too; the CLI tells them apart by class.
    """


#: OSErrors that say the path itself is wrong (missing, a file where a folder
#: should be, or the reverse): the user's to fix.
_BAD_PATH = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})


def os_error(e: OSError, what: str) -> UserError:
    """The one-line error for ``e``, met while doing ``what`` ("cannot write X"):
    a path that names nothing usable is bad input; anything else (no
    permission, a read-only or full disk, an I/O error) is an ``EnvironmentFailure``."""
    reason = e.strerror or str(e) or type(e).__name__
    message = " ".join(f"{what}: {reason}".split())
    return UserError(message) if e.errno in _BAD_PATH else EnvironmentFailure(message)


class TrialCrash(Exception):
    """A trial that could not produce measurements (OOM, dead server, ...).

    Backends raise it, or return a ``TrialResult`` with ``error`` set; the
    study records the trial as infeasible with this reason.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: a ``KeyboardInterrupt`` that knows its
    signal, so that the CLI exits with 128 + its number (130, 143)."""

    def __init__(self, message: str = "", signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


def raise_interrupted(signum: int, frame: object) -> None:
    """A signal handler: SIGTERM (or SIGINT) raised as ``Interrupted``."""
    raise Interrupted(signum=signum)
