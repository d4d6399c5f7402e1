"""Run ``autotune --workers N`` as a user would, hurt it, and count what the
study kept: the reliability tests and ``benchmarks/reliability.py`` both use it.

``run_study_with_fault`` starts the command in a process of its own, and for
the fault ``"sigkill-worker"`` waits until a worker is in the middle of a
trial (a RUNNING trial, its owner a live process, past ``kill_after``
COMPLETE trials) and kills that worker with SIGKILL. A trial may end between
the read and the kill (a short one), and the kill then lands between two
trials: the run's ``hurt_trial`` is then None, a miss, not a trial in
flight (the study must come out whole either way). For ``"sigint"`` or
``"sigterm"`` it sends that signal to the command instead. ``tally`` then
reads the study and counts.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autotune.distinct import repeated_settings
from autotune.storage import OWNER_ATTR, open_storage, owner_alive

FAULTS = ("none", "sigkill-worker", "sigint", "sigterm")
#: How often the storage is read while waiting for a trial to hurt, s.
WATCH_INTERVAL_S = 0.05
#: A trial is hurt only this soon after it started, s (so that it is still in flight).
FRESH_S = 0.3
#: The longest a run (and the wait for a trial to hurt) may take, s.
RUN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class FaultRun:
    exit_code: int
    stdout: str
    stderr: str
    hurt_trial: int | None  # the trial in flight when the fault struck (None: none was)
    hurt_pid: int | None  # the process the signal went to
    wall_s: float


@dataclass(frozen=True)
class Tally:
    """What a study holds after a run."""

    complete: int  # COMPLETE trials
    lost: int  # short of the trials asked for
    duplicated: int  # COMPLETE re-runs of a trial that was itself COMPLETE (work done twice)
    failed: int  # FAIL trials
    rerun: int  # FAIL trials whose settings a later trial ran again to COMPLETE
    running: int  # trials left RUNNING (a crash that was not cleaned up)
    repeated_settings: int  # COMPLETE trials with a setting an earlier COMPLETE trial had
    failed_without_constraints: int  # FAIL trials lacking a constraint or the reason
    failed_feasible: int  # FAIL trials whose stored outcome says feasible


def command(system: str, storage: str, study_name: str, runs_dir: Path, trials: int, workers: int,
            num_prompts: int, seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "autotune", system, "--figure", "fig8a", "--trials", str(trials),
            "--workers", str(workers), "--num-prompts", str(num_prompts), "--seed", str(seed),
            "--storage", storage, "--study-name", study_name, "--runs-dir", str(runs_dir), "--plain"]


def run_study_with_fault(argv: list[str], storage: str, study_name: str, fault: str,
                         kill_after: int = 3) -> FaultRun:
    assert fault in FAULTS, fault
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    hurt_trial = hurt_pid = None
    try:
        if fault != "none":
            hurt_trial, owner_pid = _wait_for_trial_in_flight(proc, storage, study_name, kill_after)
            if hurt_trial is not None:
                if fault == "sigkill-worker":
                    hurt_pid = owner_pid
                    os.kill(owner_pid, signal.SIGKILL)
                else:
                    hurt_pid = proc.pid
                    proc.send_signal(signal.SIGINT if fault == "sigint" else signal.SIGTERM)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if fault == "sigkill-worker" and hurt_pid is not None:  # the trial it held when it died, if any
        hurt_trial = next(iter(_trials_of(storage, study_name, hurt_pid)), None)
    return FaultRun(proc.returncode, out, err, hurt_trial, hurt_pid, time.monotonic() - t0)


def _trials_of(storage: str, study_name: str, pid: int) -> list[int]:
    """The trials a worker process held when it died: FAIL (another worker
    or the parent failed them) or still RUNNING (nobody has yet)."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                              sampler=optuna.samplers.RandomSampler(seed=0))
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.RUNNING))
            if t.user_attrs.get(OWNER_ATTR, "").split(":")[1:2] == [str(pid)]]


def _wait_for_trial_in_flight(proc: subprocess.Popen, storage: str, study_name: str,
                              kill_after: int) -> tuple[int | None, int]:
    """A RUNNING trial whose owner is a live process, once ``kill_after``
    trials are COMPLETE: (its number, its owner's pid); (None, 0) if the run
    ended first."""
    backing = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(WATCH_INTERVAL_S)
        try:
            backing = backing or open_storage(storage)
            study = optuna.load_study(study_name=study_name, storage=backing,
                                      sampler=optuna.samplers.RandomSampler(seed=0))
            trials = study.get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001  (not made yet)
            continue
        if sum(t.state == TrialState.COMPLETE for t in trials) < kill_after:
            continue
        now = datetime.datetime.now()
        for t in trials:
            tag = t.user_attrs.get(OWNER_ATTR)
            just_started = t.datetime_start is not None and (now - t.datetime_start).total_seconds() < FRESH_S
            if t.state == TrialState.RUNNING and t.params and tag and owner_alive(tag) and just_started:
                return t.number, int(tag.rsplit(":", 2)[1])
    return None, 0


def tally(storage: str, study_name: str, trials_asked: int) -> Tally:
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                              sampler=optuna.samplers.RandomSampler(seed=0))
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    states = Counter(t.state for t in trials)
    reruns = [t for t in trials if "failed_trial" in t.system_attrs]
    rerun_complete = {t.system_attrs["failed_trial"] for t in reruns if t.state == TrialState.COMPLETE}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    duplicated = sum(by_number[t.system_attrs["failed_trial"]].state == TrialState.COMPLETE
                     for t in reruns if t.state == TrialState.COMPLETE)
    return Tally(
        complete=states[TrialState.COMPLETE],
        lost=max(0, trials_asked - states[TrialState.COMPLETE]),
        duplicated=duplicated,
        failed=len(failed),
        rerun=sum(t.number in rerun_complete for t in failed),
        running=states[TrialState.RUNNING],
        repeated_settings=repeated_settings(trials),
        failed_without_constraints=sum(len(t.constraints) < 2 or "error" not in t.user_attrs for t in failed),
        failed_feasible=sum(t.user_attrs.get("outcome") in ("feasible", "infeasible") for t in failed),
    )
