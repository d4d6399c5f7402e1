"""Child processes of the GPU backend: each in its own process group, its
output in a log file, and a registry that ends them all.

A server, a trainer or a daemon started here never shares the terminal's
process group, so Ctrl-C reaches only the backend; the backend's
``ProcessRegistry`` then ends every group it started (SIGTERM, then SIGKILL
after a grace period) and runs its clean-up callbacks (quitting the MPS
daemon), on a normal end, an exception or ``KeyboardInterrupt`` alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

_POLL_S = 0.05  # how often a group is checked while it shuts down


def start_group(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of a new session (so a new process group
    whose id is its pid), stdin closed, stdout and stderr appended to ``log_path``."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
        )


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):  # it ended while we looked
            continue
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def _wait_group(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Reap the leader and wait for the rest of its group; True when all ended."""
    while True:
        proc.poll()
        if proc.returncode is not None and not group_members(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int | None:
    """End ``proc``'s whole process group: SIGTERM, then SIGKILL whatever is
    left after ``grace_s`` seconds. Returns the leader's exit code."""
    pgid = proc.pid  # start_group made the child a session leader
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group(proc, time.monotonic() + grace_s):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group(proc, time.monotonic() + 5.0)
    return proc.returncode


class ProcessRegistry:
    """Owns the process groups and clean-ups of one backend.

    ``close()`` (also ``with``'s exit, whatever ended the block) ends the groups
    and runs the callbacks, last registered first.
    """

    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        # Each entry ends one thing: a process group or a callback.
        self._cleanups: list[tuple[subprocess.Popen[bytes] | None, Callable[[], object]]] = []

    def start(self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, grace_s: float | None = None) -> subprocess.Popen[bytes]:
        proc = start_group(argv, log_path, env=env, cwd=cwd)
        grace = self.grace_s if grace_s is None else grace_s
        self._cleanups.append((proc, lambda: terminate_group(proc, grace)))
        return proc

    def terminate(self, proc: subprocess.Popen[bytes]) -> int | None:
        """End one group started here now (and forget it)."""
        for i, (p, cleanup) in enumerate(self._cleanups):
            if p is proc:
                del self._cleanups[i]
                cleanup()
                return proc.returncode
        raise ValueError(f"process {proc.pid} was not started by this registry")

    def callback(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on close (e.g. quit the MPS daemon)."""
        self._cleanups.append((None, fn))

    @property
    def running(self) -> list[subprocess.Popen[bytes]]:
        return [p for p, _ in self._cleanups if p is not None and p.poll() is None]

    def close(self) -> None:
        """End everything, last started first; one failing clean-up does not stop the rest."""
        first_error: BaseException | None = None
        while self._cleanups:
            _, cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception as e:  # noqa: BLE001 - keep cleaning, raise the first at the end
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    def __enter__(self) -> ProcessRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
