"""``--workers N``: each worker's GPUs, port, MPS folder and logs; and N
workers of one simulator study on SQLite, a journal and PostgreSQL, one
killed with SIGKILL in the middle of a trial, or the command stopped with
Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autotune.errors import UserError
from autotune.storage import OWNER_ATTR, open_storage, owner_alive
from autotune.testing.faults import command, run_study_with_fault, tally
from autotune.workers import SERVER_BASE_PORT, plan_workers, visible_devices

POSTGRES_ENV = "AUTOTUNE_TEST_POSTGRES_URL"
TRIALS = 24
WORKERS = 3
PROMPTS = 100  # about a second a trial on the simulator: time to hit one in flight
KILL_ATTEMPTS = 3  # runs until a SIGKILL lands in the middle of a trial (a short trial may end first)


# ---------------------------------------------------------------- the plan


def test_gpu_workers_each_get_their_own_gpus_port_mps_folder_runs_folder_and_log(tmp_path):
    slots = plan_workers(2, "gpu", {"gpus": 2, "runs_dir": tmp_path, "use_mps": True}, "study", tmp_path,
                         devices=["0", "1", "2", "3"], parent_pid=4242)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    assert [s.backend_options["server_port"] for s in slots] == [SERVER_BASE_PORT, SERVER_BASE_PORT + 1]
    assert [str(s.backend_options["mps_dir"]) for s in slots] == ["/tmp/autotune-mps-4242-w0",
                                                                  "/tmp/autotune-mps-4242-w1"]
    assert [s.backend_options["runs_dir"] for s in slots] == [tmp_path / "workers" / "worker-0",
                                                              tmp_path / "workers" / "worker-1"]
    assert [s.log_path.name for s in slots] == ["study-worker-0.log", "study-worker-1.log"]
    assert all(s.backend_options["gpus"] == 2 and s.backend_options["use_mps"] for s in slots)


def test_gpu_workers_take_the_gpus_this_process_may_use(tmp_path):
    devices = visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5,7"}, gpu_count=8)
    slots = plan_workers(3, "gpu", {"gpus": 1}, "s", tmp_path, devices=devices)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5", "7"]
    assert visible_devices({}, gpu_count=2) == ["0", "1"]


def test_more_gpu_workers_than_gpus_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--workers 3 x --gpus 1 needs 3 GPUs; this machine shows 2"):
        plan_workers(3, "gpu", {"gpus": 1}, "s", tmp_path, devices=["0", "1"])


def test_simulator_workers_share_the_options_and_have_their_own_logs(tmp_path):
    slots = plan_workers(3, "sim", {"noise": 0.0}, "s", tmp_path)
    assert [dict(s.env) for s in slots] == [{}, {}, {}]
    assert len({s.log_path for s in slots}) == 3


def test_zero_workers_is_bad_input(tmp_path):
    done = subprocess.run([sys.executable, "-m", "autotune", "llmstation", "--workers", "0", "--runs-dir",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "autotune: error: --workers must be at least 1, got 0"


# ---------------------------------------------------------------- faults


def _storage(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    if kind == "journal":
        return str(tmp_path / "studies.log")
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/run starts a PostgreSQL server and sets it)")
    return url


def _run(kind: str, fault: str, tmp_path: Path, workers: int = WORKERS):
    """A study with the fault injected into a trial in flight. On a loaded machine the watcher
    can miss every trial's first moments (it looks for one just started); then the study ran
    to its end unhurt, and it runs again in a new folder, up to ``KILL_ATTEMPTS`` times."""
    for attempt in range(KILL_ATTEMPTS):
        folder = tmp_path / f"attempt-{attempt}"
        folder.mkdir()
        storage = _storage(kind, folder)
        name = f"workers-{kind}-{fault}-{uuid.uuid4().hex[:8]}"  # new on a server the tests share
        argv = command("llmstation", storage, name, folder, trials=TRIALS, workers=workers, num_prompts=PROMPTS)
        run = run_study_with_fault(argv, storage, name, fault)
        assert "Traceback" not in run.stdout + run.stderr
        if run.hurt_pid is not None:
            return storage, name, run
    pytest.fail(f"in {KILL_ATTEMPTS} runs no trial was seen in flight to hurt: {run.stdout[-500:]} {run.stderr[-500:]}")


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_a_worker_killed_in_the_middle_of_a_trial_has_it_run_again(kind, tmp_path):
    for attempt in range(KILL_ATTEMPTS):
        folder = tmp_path / f"run-{attempt}"
        folder.mkdir()
        storage, name, run = _run(kind, "sigkill-worker", folder)
        # the study comes out whole wherever the kill landed
        assert run.exit_code == 0, run.stderr
        assert "ended by signal SIGKILL" in run.stdout
        t = tally(storage, name, TRIALS)
        assert (t.complete, t.lost, t.duplicated, t.running) == (TRIALS, 0, 0, 0)
        assert t.repeated_settings == 0
        assert t.failed_without_constraints == 0 and t.failed_feasible == 0
        if run.hurt_trial is None:  # it landed between two trials: nothing to run again
            assert (t.failed, t.rerun) == (0, 0) and "failed and queued" not in run.stdout
            continue
        assert f"trial {run.hurt_trial} failed and queued" in run.stdout
        assert (t.failed, t.rerun) == (1, 1)  # the killed trial, failed and run again
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
        killed = study.trials[run.hurt_trial]
        assert killed.state == TrialState.FAIL and "ended without finishing it" in killed.user_attrs["error"]
        return
    pytest.fail(f"in {KILL_ATTEMPTS} runs every SIGKILL landed between two trials")


@pytest.mark.parametrize("workers", [1, WORKERS])
@pytest.mark.parametrize("fault, code, signal_name", [("sigint", 130, "Ctrl-C"), ("sigterm", 143, "SIGTERM")])
def test_an_interrupt_ends_every_worker_and_leaves_no_trial_running(fault, code, signal_name, workers, tmp_path):
    storage, name, run = _run("sqlite", fault, tmp_path, workers)
    assert run.exit_code == code
    assert run.stderr.strip().splitlines() == ["autotune: interrupted; the study keeps every finished trial"]
    t = tally(storage, name, TRIALS)
    assert t.running == 0 and t.failed_without_constraints == 0 and t.failed_feasible == 0
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    # the trial in flight is stored whole (the signal came as it was being stored) or interrupted
    assert study.trials[run.hurt_trial].state in (TrialState.COMPLETE, TrialState.FAIL)
    interrupted = [x for x in study.trials if x.state == TrialState.FAIL]
    assert all(x.user_attrs["error"] == f"interrupted ({signal_name})" for x in interrupted)
    owners = {x.user_attrs[OWNER_ATTR] for x in study.trials if OWNER_ATTR in x.user_attrs}
    assert len(owners) == workers and not any(owner_alive(o) for o in owners)  # no worker left behind


def test_machines_started_together_on_postgresql_stop_at_the_studys_trial_count(tmp_path):
    """Two machines (runs folders of their own: no folder lock between them), two workers each,
    one PostgreSQL study: the study's turn is the server's, so they end with --trials COMPLETE
    trials in all, not one more per machine."""
    storage = _storage("postgresql", tmp_path)
    name = f"machines-{uuid.uuid4().hex[:8]}"
    trials = 8
    procs = []
    for machine in ("a", "b"):
        folder = tmp_path / machine
        folder.mkdir()
        argv = command("chunked", storage, name, folder, trials=trials, workers=2, num_prompts=20)
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    t = tally(storage, name, trials)
    assert (t.complete, t.running, t.repeated_settings) == (trials, 0, 0)
