"""The one place that builds a study's storage, and the trials its workers left behind.

Storages, by URL:

- ``sqlite:///FILE`` (the default, under ``--runs-dir``) and
  ``postgresql://...`` (several machines; ``pip install 'autotune[postgres]'``)
  are Optuna ``RDBStorage``\\ s with heartbeats: a worker's trial in flight
  beats every ``HEARTBEAT_INTERVAL_S`` seconds, and one silent for
  ``GRACE_PERIOD_S`` is failed and run again once by a live worker.
- ``FILE.log`` / ``.journal`` / ``.jsonl`` is a journal file (Optuna's
  ``JournalStorage``), for several processes of one machine. It has no
  heartbeats: its dead workers' trials are found by their owner tag (host,
  process id, process start time) and failed at the next start, or at once by
  the ``--workers`` parent that saw the worker end.

Workers starting at once on a new storage race to create its tables (SQLite:
"UNIQUE constraint failed: alembic_version.version_num"; PostgreSQL:
"pg_type_typname_nsp_index"): a SQLite file is created under a lock on its
folder, and the known races are retried.

Every trial a worker runs carries its owner tag (user attribute
``worker``). A trial failed here gets both constraints (never met), the
outcome ``failed`` and the reason, like any other failed trial.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from autotune.errors import EnvironmentFailure, UserError, os_error
from autotune.slo import CONSTRAINT_KEYS, CRASH_VIOLATION
from autotune.trial import Outcome

#: A worker's trial in flight records a heartbeat this often, s (RDB storages).
HEARTBEAT_INTERVAL_S = 5
#: A RUNNING trial without a heartbeat (or, on a journal, without an owner)
#: for this long is failed and run again, s.
GRACE_PERIOD_S = 20
#: How often a failed trial of a dead worker is run again.
MAX_RERUNS = 1
#: The user attribute naming the worker that runs a trial: "host:pid:start".
OWNER_ATTR = "worker"
#: Creating a new storage's tables: attempts, and the first wait between them (s, doubling).
CREATE_ATTEMPTS = 8
CREATE_BACKOFF_S = 0.05
#: The driver's words for two workers creating the same tables or rows at once.
_CREATION_RACES = ("unique constraint failed", "already exists", "duplicate key value",
                   "uniqueviolation", "database is locked", "pg_type_typname_nsp_index")
#: SQLite: how long a writer waits for another's lock, s.
SQLITE_BUSY_TIMEOUT_S = 60
#: PostgreSQL: how long to wait for the server to answer, s.
PG_CONNECT_TIMEOUT_S = 10
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
POSTGRES_HINT = "pip install 'autotune[postgres]'"


def open_storage(url: str, *, heartbeat_interval_s: int = HEARTBEAT_INTERVAL_S,
                 grace_period_s: int = GRACE_PERIOD_S) -> optuna.storages.BaseStorage:
    """An Optuna storage, or a one-line error naming what is wrong with the
    URL (exit 2) or with the machine or server (exit 1)."""
    if url.endswith(JOURNAL_SUFFIXES) and "://" not in url:
        return _journal(url)
    engine_kwargs: dict = {}
    given = url  # what messages name: the user's URL, password hidden
    if url.startswith("sqlite:///"):
        path = _check_sqlite_file(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        if path is not None:
            with folder_lock(path.parent):  # one creator of the tables at a time
                return _rdb(url, given, engine_kwargs, heartbeat_interval_s, grace_period_s)
    elif url.split("://", 1)[0] in ("postgresql", "postgresql+psycopg2", "postgresql+psycopg", "postgres"):
        url = postgres_url(url)
        engine_kwargs = {"connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S}}
    return _rdb(url, given, engine_kwargs, heartbeat_interval_s, grace_period_s)


def _check_sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, checked (None: in memory)."""
    path = Path(url.removeprefix("sqlite:///"))
    if str(path) in ("", ":memory:"):
        return None
    if path.exists() and not path.is_file():
        raise UserError(f"storage {url}: {path} is not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"storage {url}: cannot create {path.parent}") from None
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise UserError(f"storage {url}: {path} is not an SQLite database")
    return path


def postgres_url(url: str) -> str:
    """A PostgreSQL URL naming a driver that is installed: a plain
    ``postgresql://`` takes psycopg (3) or else psycopg2 (SQLAlchemy's own
    default changed between releases); neither is a one-line error saying to
    install the ``postgres`` extra."""
    scheme, rest = url.split("://", 1)
    if scheme == "postgres":
        raise UserError(f"storage {hide_password(url)}: write postgresql://, not postgres://")
    drivers = {"postgresql+psycopg": ("psycopg",), "postgresql+psycopg2": ("psycopg2",),
               "postgresql": ("psycopg", "psycopg2")}[scheme]
    for driver in drivers:
        try:
            __import__(driver)
        except ImportError:
            continue
        return f"postgresql+{driver}://{rest}"
    raise UserError(f"storage {hide_password(url)}: no PostgreSQL driver ({' or '.join(drivers)}) is installed; "
                    f"{POSTGRES_HINT}")


def hide_password(url: str) -> str:
    """The URL as it may be printed: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _journal(path: str) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"storage {path}: folder {folder} does not exist")
    try:
        return JournalStorage(JournalFileBackend(path))
    except OSError as e:
        raise os_error(e, f"storage {path}: cannot open it") from None


def _rdb(url: str, given: str, engine_kwargs: dict, heartbeat_interval_s: int,
         grace_period_s: int) -> optuna.storages.RDBStorage:
    """An ``RDBStorage`` with heartbeats; the creation races of workers that
    start at once are tried again. ``given``: the URL as the user wrote it."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval_s,
                    grace_period=grace_period_s, heartbeat_stale_trial_callback=rerun_stale_trial)
        except Exception as e:  # noqa: BLE001  (SQLAlchemy and drivers raise many kinds)
            if is_creation_race(e) and attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(CREATE_BACKOFF_S * 2**attempt)
                continue
            if is_storage_failure(e):  # the URL is fine; the disk or the server is not
                raise EnvironmentFailure(f"storage {hide_password(given)}: {storage_reason(e)}") from None
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"unusable storage URL {hide_password(given)!r}: {msg}") from None
    raise AssertionError("unreachable")


def is_creation_race(e: BaseException) -> bool:
    """Whether ``e`` is another worker creating the same tables or rows first."""
    while e is not None:
        text = f"{type(e).__name__} {e} {getattr(e, 'orig', '')}".lower()
        if any(race in text for race in _CREATION_RACES):
            return True
        e = e.__cause__ or e.__context__
    return False


def is_storage_failure(e: BaseException) -> bool:
    """A storage that could not read or write (full or read-only disk, lost
    connection, a server that does not answer), as Optuna and SQLAlchemy report it."""
    if isinstance(e, optuna.exceptions.StorageInternalError):
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:
        return False
    return isinstance(e, OperationalError)


def storage_reason(e: BaseException) -> str:
    """The driver's own words, first line ("database or disk is full")."""
    if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
        e = e.__cause__
    orig = getattr(e, "orig", None)  # SQLAlchemy keeps the driver's exception here
    text = str(orig if orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def create_study(storage: optuna.storages.BaseStorage, name: str, sampler: optuna.samplers.BaseSampler,
                 directions: list[str]) -> optuna.Study:
    """Create the study or load it; workers that create it at once all get it."""
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                       load_if_exists=True)
        except Exception as e:  # noqa: BLE001
            if not is_creation_race(e) or attempt + 1 == CREATE_ATTEMPTS:
                raise
            time.sleep(CREATE_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


class FolderLock:
    """An exclusive lock between processes, on ``folder`` itself (no lock
    file left behind); without ``fcntl`` (not POSIX) no lock. ``release`` may
    come from another function than ``acquire`` (a study's loop hands it to
    the trial), and twice."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:
            return
        if self._fd is None:
            fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing releases the lock

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def folder_lock(folder: Path) -> FolderLock:
    return FolderLock(folder)


class StudyTurn:
    """A study's turn to decide, ask and sample, one worker at a time: on this
    machine a ``FolderLock`` on the runs folder; on PostgreSQL also between
    machines, a session-level advisory lock keyed by the study's name, on a
    connection of its own (a worker that dies ends its session, and the lock
    with it). So machines started together stop at the study's trial count
    exactly, as this machine's workers do. ``release`` may come twice."""

    def __init__(self, folder: Path, storage: optuna.storages.BaseStorage, study_name: str) -> None:
        self._local = FolderLock(folder)
        engine = getattr(storage, "engine", None)
        self._engine = engine if engine is not None and engine.dialect.name == "postgresql" else None
        digest = hashlib.sha256(f"autotune study {study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # advisory locks take a bigint
        self._conn = None

    def acquire(self) -> None:
        self._local.acquire()
        if self._engine is None or self._conn is not None:
            return
        import sqlalchemy  # only on PostgreSQL: SQLAlchemy costs start-up otherwise (about 0.13 s)

        conn = self._engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
            conn.commit()
        except BaseException:
            conn.close()
            self._local.release()
            raise
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            import sqlalchemy

            conn, self._conn = self._conn, None
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
                conn.commit()
                conn.close()
            except Exception:  # noqa: BLE001  (the session may be gone: then so is its lock)
                conn.invalidate()  # never back into the pool still holding the lock
        self._local.release()

    def __enter__(self) -> StudyTurn:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- owners


def owner_tag(pid: int | None = None) -> str:
    """"host:pid:start" of a process (this one by default): the start time
    tells a reused process id apart."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process a tag names still runs; None where it ran on
    another host (this one cannot tell)."""
    try:
        host, pid, start = tag.rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    return _start_ticks(pid_number) == start


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat
    field 22), "-" without /proc; None if it has ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        if not Path("/proc/self/stat").exists():  # no /proc: alive or not is all we learn
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return "-"
        return None
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # comm may hold spaces: [state, ppid, ...]
    if fields[0] == b"Z":
        return None
    return fields[19].decode()


# ---------------------------------------------------------------- abandoned trials


def abandon(trial: optuna.Trial, outcome: Outcome, error: str) -> None:
    """Both constraints (never met, unless the trial measured them already),
    the outcome and the reason, on a trial about to be recorded FAIL: as much
    of it as the storage takes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna keeps a constraint already set, and says so
            for key in CONSTRAINT_KEYS:
                trial.set_constraint(key, CRASH_VIOLATION)
        trial.set_user_attr("outcome", outcome.value)
        trial.set_user_attr("error", error)
    except Exception:  # noqa: BLE001  (a failing storage: the caller reports the failure)
        pass


def abandoned_reason(trial: optuna.trial.FrozenTrial, stale: bool, now: datetime.datetime,
                     grace_period_s: float) -> str | None:
    """Why a RUNNING trial is abandoned, or None while it may be alive.
    ``stale``: the storage saw no heartbeat for the grace period."""
    tag = trial.user_attrs.get(OWNER_ATTR)
    if tag is not None and owner_alive(tag) is False:
        return f"its worker ({tag}) ended without finishing it"
    if stale:
        return f"its worker ({tag or 'unknown'}) sent no heartbeat for {grace_period_s:g} s"
    start = trial.datetime_start
    if tag is None and start is not None and (now - start).total_seconds() > grace_period_s:
        return f"no worker claimed it for {grace_period_s:g} s"
    return None


def heartbeats_on(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps heartbeats (our RDB storages; not a journal)."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return interval is not None and interval() is not None


def fail_abandoned(storage: optuna.storages.BaseStorage, study_name: str) -> list[int]:
    """Fail the study's RUNNING trials whose worker is gone (dead process on
    this host, no heartbeat, or no owner for the grace period), each with both
    constraints and its reason, and run each again once. The numbers failed."""
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=0))  # samples nothing
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return []
    study_id = storage.get_study_id_from_name(study_name)
    stale_ids: set[int] = set()
    grace_period_s = float(GRACE_PERIOD_S)
    if heartbeats_on(storage):
        # BaseHeartbeat's own query (the one Optuna's fail_stale_trials makes),
        # so the trial can get its constraints before it is failed.
        stale_ids = set(storage._get_stale_trial_ids(study_id))  # type: ignore[attr-defined]
        grace_period_s = float(getattr(storage, "grace_period", None) or GRACE_PERIOD_S)
    now = datetime.datetime.now()
    failed = []
    for t in running:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        reason = abandoned_reason(t, trial_id in stale_ids, now, grace_period_s)
        if reason is not None and _fail(study, storage, trial_id, reason):
            failed.append(t.number)
    return failed


def _fail(study: optuna.Study, storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Record one trial FAIL with its constraints and reason, and run it again
    once; False where another worker failed it first, or where the storage
    did not take the constraints (it stays RUNNING for the next pass: a FAIL
    without constraints would count as feasible)."""
    abandon(optuna.trial.Trial(study, trial_id), Outcome.FAILED, reason)
    try:
        if set(storage.get_trial(trial_id).constraints) != set(CONSTRAINT_KEYS):
            return False
        if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    rerun_once(study, storage.get_trial(trial_id))
    return True


def rerun_once(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> int | None:
    """Queue a failed trial's settings to run again (WAITING), unless it is a
    re-run itself ``MAX_RERUNS`` times over; the history in Optuna's own
    ``failed_trial`` / ``retry_history`` attributes. The queued trial carries
    no constraint and no outcome of the failed one."""
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    if len(history) > MAX_RERUNS:
        return None
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        system_attrs={"failed_trial": failed.system_attrs.get("failed_trial", failed.number),
                      "retry_history": history}))
    return failed.number


def rerun_stale_trial(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """The storages' heartbeat callback: where Optuna's own check failed a
    trial first (before ``fail_abandoned`` could), its settings still run again once."""
    rerun_once(study, failed)
