"""``--workers N``: N worker processes of one study on this machine.

The parent creates (or resumes) the study and makes its reference runs, so
the workers find both made; then it starts the workers and shows the study
as they fill it. Each worker is a process of its own (its own process group:
Ctrl-C reaches the parent, which passes it on once), writes its lines to
``RUNS/logs/STUDY-worker-W.log``, seeds its sampler from the study's seed
and its worker id, and runs trials until the study has ``--trials`` more
COMPLETE trials than it had at the start: ``--trials`` is the study's, not
each worker's.

On the GPU backend each worker has its own GPUs (``CUDA_VISIBLE_DEVICES``:
``--gpus`` of them, in order), its own vLLM server port, its own MPS pipe
folder and its own runs folder for its servers' and trainers' logs
(``plan_workers``).

A worker that dies (SIGKILL, out of memory) is noticed by the parent at once:
its trial in flight is failed with its reason and constraints and queued to
run again once, and the others run it. Ctrl-C or SIGTERM: every worker marks
its trial in flight interrupted and ends; one that does not within
``STOP_GRACE_S`` is killed, and its trial failed; none is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autotune.backends import make_backend
from autotune.confirm import confirm
from autotune.errors import EnvironmentFailure, Interrupted, UserError, raise_interrupted
from autotune.interrupts import InterruptGate
from autotune.live import PlainReporter
from autotune.storage import OWNER_ATTR, fail_abandoned
from autotune.study import prepare, run_references, run_study

#: How often the parent reads the study and looks at its workers, s.
POLL_INTERVAL_S = 0.5
#: How long workers have to record their trial in flight after Ctrl-C or SIGTERM, s.
STOP_GRACE_S = 60.0
#: GPU backend: worker W's vLLM server listens on SERVER_BASE_PORT + W.
SERVER_BASE_PORT = 18100
#: GPU backend: worker W's MPS pipe and log folders (short: the pipe is a Unix socket, 108 bytes).
MPS_DIR_TEMPLATE = "/tmp/autotune-mps-{parent_pid}-w{worker_id}"


@dataclass(frozen=True)
class WorkerSlot:
    """What is one worker's own."""

    worker_id: int
    env: Mapping[str, str]  # set in the worker's environment (CUDA_VISIBLE_DEVICES)
    backend_options: Mapping[str, Any]
    log_path: Path


def visible_devices(env: Mapping[str, str], gpu_count: int) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, or all
    ``gpu_count`` of the machine."""
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        return [str(i) for i in range(gpu_count)]
    return [d.strip() for d in devices.split(",") if d.strip()]


def plan_workers(n_workers: int, backend: str, options: Mapping[str, Any], study_name: str, runs_dir: Path,
                 devices: Sequence[str] = (), parent_pid: int | None = None) -> list[WorkerSlot]:
    """Each worker's GPUs, server port, MPS folder, runs folder and log.
    ``devices``: the GPUs there are (``visible_devices``; GPU backend only)."""
    if n_workers < 1:
        raise UserError(f"--workers must be at least 1, got {n_workers}")
    logs = Path(runs_dir) / "logs"
    slots = []
    if backend != "gpu":
        for w in range(n_workers):
            slots.append(WorkerSlot(w, {}, dict(options), logs / f"{study_name}-worker-{w}.log"))
        return slots
    per_worker = int(options.get("gpus") or 1)
    if n_workers * per_worker > len(devices):
        raise UserError(f"--workers {n_workers} x --gpus {per_worker} needs {n_workers * per_worker} GPUs; "
                        f"this machine shows {len(devices)}")
    parent_pid = os.getpid() if parent_pid is None else parent_pid
    for w in range(n_workers):
        own = devices[w * per_worker:(w + 1) * per_worker]
        slot_options = {**options, "runs_dir": Path(options.get("runs_dir", runs_dir)) / "workers" / f"worker-{w}",
                        "server_port": SERVER_BASE_PORT + w,
                        "mps_dir": Path(MPS_DIR_TEMPLATE.format(parent_pid=parent_pid, worker_id=w))}
        slots.append(WorkerSlot(w, {"CUDA_VISIBLE_DEVICES": ",".join(own)}, slot_options,
                                logs / f"{study_name}-worker-{w}.log"))
    return slots


@dataclass(frozen=True)
class WorkerJob:
    """One worker's part: picklable, for a spawned process."""

    slot: WorkerSlot
    config: Any  # StudyConfig (confirmation left to the parent)
    backend: str
    until_complete: int  # COMPLETE trials the study should reach
    parent_pid: int = field(default_factory=os.getpid)


# ---------------------------------------------------------------- in a worker


def worker_main(job: WorkerJob) -> None:
    """A worker process: the study's trials until it has enough. Exit code 0
    (done), 1 or 2 (an error, its line last in the log), 128 + signal."""
    os.setpgid(0, 0)  # Ctrl-C at the terminal reaches the parent only; it passes it on once
    _end_with_parent(job.parent_pid)
    signal.signal(signal.SIGTERM, raise_interrupted)
    os.environ.update(job.slot.env)
    job.slot.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(job.slot.log_path, "a", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        optuna.logging.disable_default_handler()
        logging.getLogger("optuna").addHandler(logging.StreamHandler(log))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sys.exit(_work(job, log))


def _work(job: WorkerJob, log) -> int:
    print(f"== worker {job.slot.worker_id} (pid {os.getpid()}): until {job.until_complete} COMPLETE trials; "
          f"{dict(job.slot.env) or 'no environment of its own'}", file=log)
    try:
        with make_backend(job.backend, **job.slot.backend_options) as backend:
            run_study(job.config, backend, 0, PlainReporter(log), worker_id=job.slot.worker_id,
                      until_complete=job.until_complete)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stopped by {signal.Signals(signum).name}: the trial in flight is recorded as interrupted", file=log)
        return 128 + signum
    except EnvironmentFailure as e:
        print(f"autotune: error: {e}", file=log)
        return 1
    except UserError as e:
        print(f"autotune: error: {e}", file=log)
        return 2
    except Exception:
        traceback.print_exc(file=log)
        print(f"autotune: error: worker {job.slot.worker_id} failed (traceback above)", file=log)
        return 1
    print("done", file=log)
    return 0


def _end_with_parent(parent_pid: int) -> None:
    """SIGTERM when the parent ends, however it ends (Linux), so that no
    worker outlives a parent killed with SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- the parent


@dataclass
class WorkerState:
    job: WorkerJob
    process: Any  # multiprocessing.Process
    ended: bool = False

    @property
    def worker_id(self) -> int:
        return self.job.slot.worker_id


def run_workers(config, backend_name: str, options: Mapping[str, Any], n_trials: int, n_workers: int,
                observer, devices: Sequence[str] = (), say=print):
    """The study with ``n_workers`` worker processes adding ``n_trials``
    COMPLETE trials to it; its context once they are done (confirmation, if
    asked for, made here after them)."""
    with make_backend(backend_name, **options) as backend:  # released before the workers take the GPUs
        ctx = prepare(config, backend)
        observer.on_start(ctx, n_trials)
        run_references(ctx, observer)
    study = ctx.study
    target = _count(study, TrialState.COMPLETE) + n_trials
    slots = plan_workers(n_workers, backend_name, options, study.study_name, config.runs_dir, devices)
    jobs = [WorkerJob(slot, replace(config, study_name=study.study_name, confirm_workloads=0), backend_name, target)
            for slot in slots]
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    spawn = multiprocessing.get_context("spawn")
    workers = [WorkerState(job, spawn.Process(target=worker_main, args=(job,), name=f"worker-{i}"))
               for i, job in enumerate(jobs)]
    gate = InterruptGate()  # Ctrl-C lands in the sleep, never inside a read of the storage (SQLite: a lock kept)
    try:
        with gate.installed():
            for w in workers:
                w.process.start()
            _supervise(ctx, observer, workers, seen, target, gate, say)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        _stop(ctx, workers, signum)
        _show(ctx, observer, seen, target, workers)
        raise Interrupted(signum=signum) from None  # the CLI's one line: the study keeps every finished trial
    _show(ctx, observer, seen, target, workers)
    if _count(study, TrialState.COMPLETE) < target and not any(w.process.exitcode == 0 for w in workers):
        raise _failure(workers)
    if config.confirm_workloads:
        with make_backend(backend_name, **options) as backend:
            ctx.backend = backend
            confirm(ctx, config.confirm_workloads, observer)
    observer.on_end(ctx)
    return ctx


def _supervise(ctx, observer, workers: Sequence[WorkerState], seen: set[int], target: int, gate: InterruptGate,
               say) -> None:
    """Until every worker has ended: a dead one's trial failed and queued again, the study shown."""
    while not all(w.ended for w in workers):
        with gate.open():
            time.sleep(POLL_INTERVAL_S)
        for w in workers:
            if not w.ended and not w.process.is_alive():
                w.process.join()
                w.ended = True
                _worker_ended(ctx, w, say)
        _show(ctx, observer, seen, target, workers)


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _show(ctx, observer, seen: set[int], target: int, workers: Sequence[WorkerState]) -> None:
    """Newly finished trials to the observer, and where the study stands."""
    trials = ctx.study.get_trials(deepcopy=True)
    for t in trials:
        if t.state.is_finished() and t.number not in seen:
            seen.add(t.number)
            observer.on_trial_end(ctx, t)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    alive = sum(not w.ended for w in workers)
    observer.on_progress(min(1.0, complete / target) if target else 1.0,
                         f"{complete}/{target} trials complete; {alive} workers; running: "
                         f"{', '.join(map(str, running)) or 'none'}")


def _worker_ended(ctx, w: WorkerState, say) -> None:
    """A worker that ended: one that died has its trial failed (here, or
    already by another worker) and queued to run again."""
    code = w.process.exitcode
    if code == 0:
        return
    fail_abandoned(ctx.storage, ctx.study.study_name)
    failed = [t.number for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.user_attrs.get(OWNER_ATTR, "").split(":")[1:2] == [str(w.process.pid)]]
    how = f"by signal {signal.Signals(-code).name}" if code < 0 else f"with exit code {code}"
    trials = f"; trial {', '.join(map(str, failed))} failed and queued to run again" if failed else ""
    say(f"worker {w.worker_id} ended {how} (log: {w.job.slot.log_path}){trials}")


def _stop(ctx, workers: Sequence[WorkerState], signum: int) -> None:
    """Pass the signal on once; wait for the workers to record their trials;
    kill any that does not end in ``STOP_GRACE_S``; fail what they left."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        live = [w for w in workers if w.process.is_alive()]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signum)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in live:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in live:
            if w.process.is_alive():
                w.process.kill()
            w.process.join()
            w.ended = True
        with contextlib.suppress(Exception):
            fail_abandoned(ctx.storage, ctx.study.study_name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _failure(workers: Sequence[WorkerState]) -> UserError:
    """No worker finished: the first one's error line from its log."""
    for w in workers:
        code = w.process.exitcode
        try:
            lines = w.job.slot.log_path.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        message = next((ln.removeprefix("autotune: error: ") for ln in reversed(lines)
                        if ln.startswith("autotune: error: ")), None)
        if message is not None:
            return UserError(message) if code == 2 else EnvironmentFailure(message)
    codes = ", ".join(str(w.process.exitcode) for w in workers)
    return EnvironmentFailure(f"every worker ended before the study was done (exit codes {codes}; "
                              f"logs under {workers[0].job.slot.log_path.parent})")
