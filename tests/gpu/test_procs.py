import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autotune.gpu.procs import ProcessRegistry, group_members, is_alive, start_group, terminate_group

# A child that starts a grandchild, writes the grandchild's pid, prints, and waits.
_PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(str(g.pid))
    print("child up", flush=True)
    time.sleep(600)
""")


def _start(tmp_path: Path, name: str, mode: str = "plain", registry: ProcessRegistry | None = None):
    pid_file = tmp_path / f"{name}.pid"
    argv = [sys.executable, "-c", _PARENT, str(pid_file), mode]
    log = tmp_path / f"{name}.log"
    proc = registry.start(argv, log, grace_s=0.5) if registry else start_group(argv, log)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc, int(pid_file.read_text()), log


def test_child_is_own_group_and_logs_to_file(tmp_path):
    proc, grandchild, log = _start(tmp_path, "a")
    try:
        assert os.getpgid(proc.pid) == proc.pid != os.getpgrp()
        assert sorted(group_members(proc.pid)) == sorted([proc.pid, grandchild])
    finally:
        terminate_group(proc, grace_s=5)
    text = log.read_text()
    assert text.startswith("$ ") and "child up" in text


def test_terminate_group_ends_child_and_grandchild(tmp_path):
    proc, grandchild, _ = _start(tmp_path, "b")
    code = terminate_group(proc, grace_s=5)
    assert code == -15  # SIGTERM
    assert not is_alive(proc.pid) and not is_alive(grandchild)
    assert group_members(proc.pid) == []


def test_sigkill_after_grace_when_term_is_ignored(tmp_path):
    proc, grandchild, _ = _start(tmp_path, "c", mode="ignore-term")
    code = terminate_group(proc, grace_s=0.3)
    assert code == -9  # SIGKILL
    assert not is_alive(proc.pid) and not is_alive(grandchild)


def test_registry_ends_everything_on_exception_in_reverse_order(tmp_path):
    order = []
    with pytest.raises(RuntimeError):
        with ProcessRegistry() as reg:
            reg.callback(lambda: order.append("daemon quit"))
            p1, g1, _ = _start(tmp_path, "d", registry=reg)
            p2, g2, _ = _start(tmp_path, "e", mode="ignore-term", registry=reg)
            reg.callback(lambda: order.append(("after procs", p1.poll() is None, p2.poll() is None)))
            raise RuntimeError("trial crashed")
    # The callback registered last ran first (both children still up), the daemon last.
    assert order == [("after procs", True, True), "daemon quit"]
    assert not any(is_alive(pid) for pid in (p1.pid, g1, p2.pid, g2))
    assert reg.running == []


def test_registry_ends_everything_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ProcessRegistry() as reg:
            proc, grandchild, _ = _start(tmp_path, "f", registry=reg)
            raise KeyboardInterrupt
    assert not is_alive(proc.pid) and not is_alive(grandchild)


def test_registry_terminate_one_and_keep_others(tmp_path):
    with ProcessRegistry() as reg:
        p1, g1, _ = _start(tmp_path, "g", registry=reg)
        p2, g2, _ = _start(tmp_path, "h", registry=reg)
        reg.terminate(p1)
        assert not is_alive(p1.pid) and not is_alive(g1)
        assert reg.running == [p2] and is_alive(g2)
    assert not is_alive(p2.pid) and not is_alive(g2)


def test_registry_runs_all_cleanups_even_if_one_fails():
    ran = []
    reg = ProcessRegistry()
    reg.callback(lambda: ran.append("first"))
    reg.callback(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        reg.close()
    assert ran == ["first"]
