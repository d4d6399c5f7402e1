"""The study's storage: many workers creating it at once, PostgreSQL URLs and
drivers, and the trials of dead workers (failed with constraints and reason,
run again once)."""

from __future__ import annotations

import builtins
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from autotune.errors import EnvironmentFailure, UserError
from autotune.slo import CONSTRAINT_KEYS, CRASH_VIOLATION
from autotune.storage import (MAX_RERUNS, OWNER_ATTR, StudyTurn, create_study, fail_abandoned, hide_password, open_storage,
                              owner_alive, owner_tag, postgres_url)

#: Set by .ci/run (a PostgreSQL server it starts); the PostgreSQL tests skip without it.
POSTGRES_ENV = "AUTOTUNE_TEST_POSTGRES_URL"
WORKERS_AT_ONCE = 6


def _open_and_create(url: str, name: str, barrier) -> str:
    barrier.wait()  # every process at once
    try:
        storage = open_storage(url)
        create_study(storage, name, optuna.samplers.RandomSampler(seed=0), ["maximize"])
        return "ok"
    except Exception as e:  # noqa: BLE001  (reported to the test)
        return f"{type(e).__name__}: {e}"


def _all_at_once(url: str) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(WORKERS_AT_ONCE)
        with ctx.Pool(WORKERS_AT_ONCE) as pool:
            return pool.starmap(_open_and_create, [(url, "one-study", barrier)] * WORKERS_AT_ONCE)


def test_many_workers_starting_at_once_on_a_new_sqlite_file_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert _all_at_once(url) == ["ok"] * WORKERS_AT_ONCE
    assert optuna.get_all_study_names(open_storage(url)) == ["one-study"]


def test_many_workers_starting_at_once_on_a_new_journal_all_succeed(tmp_path):
    path = str(tmp_path / "new.log")
    assert _all_at_once(path) == ["ok"] * WORKERS_AT_ONCE
    assert optuna.get_all_study_names(open_storage(path)) == ["one-study"]


@pytest.fixture
def new_postgres_database():
    """A new, empty database on the CI's server (dropped afterwards)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a PostgreSQL server and sets it)")
    import sqlalchemy

    name = f"autotune_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield base.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_many_workers_starting_at_once_on_a_new_postgresql_database_all_succeed(new_postgres_database):
    assert _all_at_once(new_postgres_database) == ["ok"] * WORKERS_AT_ONCE


def test_a_plain_postgresql_url_without_a_driver_says_to_install_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_drivers(name, *args, **kwargs):
        if name in ("psycopg", "psycopg2"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_drivers)
    with pytest.raises(UserError, match=r"no PostgreSQL driver \(psycopg or psycopg2\) is installed; "
                                        r"pip install 'autotune\[postgres\]'") as e:
        open_storage("postgresql://me:secret@127.0.0.1/db")
    assert "secret" not in str(e.value)


def test_an_unreachable_postgresql_server_is_one_line_and_an_environment_failure():
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EnvironmentFailure) as e:
        open_storage(f"postgresql://me:secret@127.0.0.1:{port}/db")
    assert "\n" not in str(e.value) and "secret" not in str(e.value)
    assert f"127.0.0.1:{port}" in str(e.value)


def test_a_password_is_never_printed():
    assert hide_password("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert hide_password("sqlite:///a.db") == "sqlite:///a.db"


def test_a_plain_url_names_an_installed_driver():
    pytest.importorskip("psycopg")
    assert postgres_url("postgresql://h/db") == "postgresql+psycopg://h/db"
    with pytest.raises(UserError, match="write postgresql://"):
        postgres_url("postgres://h/db")


# ---------------------------------------------------------------- dead workers


def _ended_process_tag() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return owner_tag(proc.pid)


def test_owner_tags_tell_live_ended_and_foreign_processes():
    assert owner_alive(owner_tag()) is True
    assert owner_alive(_ended_process_tag()) is False
    assert owner_alive(f"another-host.example:{os.getpid()}:1") is None


def _study_with_running_trial(tmp_path, tag: str | None, **storage_kw):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", **storage_kw)
    study = create_study(storage, "s", optuna.samplers.RandomSampler(seed=0), ["maximize"])
    trial = study.ask()
    trial.suggest_int("mps_active_thread_pct", 10, 100, step=5)
    if tag is not None:
        trial.set_user_attr(OWNER_ATTR, tag)
    return storage, study, trial


def test_a_dead_workers_trial_is_failed_with_constraints_and_reason_and_run_again_once(tmp_path):
    storage, study, trial = _study_with_running_trial(tmp_path, _ended_process_tag())
    assert fail_abandoned(storage, "s") == [trial.number]
    failed = study.trials[trial.number]
    assert failed.state == TrialState.FAIL
    assert failed.constraints == {k: CRASH_VIOLATION for k in CONSTRAINT_KEYS}
    assert failed.user_attrs["outcome"] == "failed"
    assert "ended without finishing it" in failed.user_attrs["error"]
    rerun = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(rerun) == 1 and rerun[0].params == failed.params and rerun[0].constraints == {}
    assert "outcome" not in rerun[0].user_attrs
    # the re-run dies too: failed, not run a third time
    again = study.ask()
    assert again.params == failed.params
    again.set_user_attr(OWNER_ATTR, _ended_process_tag())
    assert fail_abandoned(storage, "s") == [again.number]
    assert MAX_RERUNS == 1 and not [t for t in study.trials if t.state == TrialState.WAITING]
    assert fail_abandoned(storage, "s") == []  # nothing left RUNNING


def test_a_live_workers_trial_is_left_running(tmp_path):
    storage, study, trial = _study_with_running_trial(tmp_path, owner_tag())
    assert fail_abandoned(storage, "s") == []
    assert study.trials[trial.number].state == TrialState.RUNNING


def test_a_trial_without_heartbeat_for_the_grace_period_is_failed(tmp_path):
    # another host's worker: only its heartbeat can tell it is gone
    storage, study, trial = _study_with_running_trial(tmp_path, "another-host.example:1:1",
                                                      heartbeat_interval_s=1, grace_period_s=1)
    storage.record_heartbeat(trial._trial_id)
    assert fail_abandoned(storage, "s") == []  # beat just now
    deadline = time.monotonic() + 30
    while not (failed := fail_abandoned(storage, "s")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert failed == [trial.number]
    assert "sent no heartbeat for 1 s" in study.trials[trial.number].user_attrs["error"]


def test_a_study_turn_on_postgresql_is_one_worker_at_a_time_across_machines(new_postgres_database, tmp_path):
    """Two machines (two runs folders: their folder locks are apart) share one study's turn
    through the server; another study's turn is its own; a dead session frees its turn."""
    storage = open_storage(new_postgres_database)
    machines = [tmp_path / "machine-a", tmp_path / "machine-b", tmp_path / "machine-c"]
    for folder in machines:
        folder.mkdir()
    first, second = (StudyTurn(folder, storage, "one-study") for folder in machines[:2])
    other = StudyTurn(machines[2], open_storage(new_postgres_database), "another-study")
    first.acquire()
    got = threading.Event()
    waiter = threading.Thread(target=lambda: (second.acquire(), got.set()))
    waiter.start()
    assert not got.wait(1.0)  # the other machine waits for the turn
    with other:  # another study: no wait
        pass
    first.release()
    first.release()  # twice is harmless
    assert got.wait(10.0)
    waiter.join()
    second.release()
    # a worker that dies holding the turn: its session ends, and so does the lock
    code = ("import sys; from pathlib import Path; from autotune.storage import StudyTurn, open_storage; "
            "StudyTurn(Path(sys.argv[2]), open_storage(sys.argv[1]), 'one-study').acquire(); "
            "print('held', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, new_postgres_database, str(machines[0])],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=lambda: (first.acquire(), got.set()))
        got.clear()
        waiter.start()
        assert not got.wait(1.0)
        proc.kill()
        assert got.wait(20.0)
        waiter.join()
    finally:
        proc.kill()
        proc.wait()
    first.release()


def test_a_study_turn_elsewhere_is_this_machines_folder_lock(tmp_path):
    turn = StudyTurn(tmp_path, open_storage(f"sqlite:///{tmp_path / 'studies.db'}"), "one-study")
    with turn:
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
        held = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert held.returncode != 0 and "BlockingIOError" in held.stderr
