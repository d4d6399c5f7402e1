"""The conformance suite every storage kind passes, as a test-case class
(Optuna's ``optuna/testing/pytest_storages.py`` style).

A storage kind gets the whole suite by subclassing ``StorageConformance`` in
the tests with a ``storage_url`` fixture (a new, empty storage, as a user
would pass it to ``--storage``). The studies run on the simulator, small.

The crash contract: a trial whose backend cannot measure it is stored
COMPLETE with outcome ``crashed``, its reason, objective 0 and both
constraints violated; a trial interrupted, or whose backend raised, or whose
worker died, is stored FAIL with its outcome, its reason and both
constraints. None is ever left RUNNING, none is feasible (Optuna counts a
trial without constraints as feasible), none is the study's best. And a
study's seed fixes its trials: the same seed samples and measures the same.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autotune.backends import Backend, ProgressFn, make_backend, no_progress
from autotune.results import StudyResult
from autotune.slo import CONSTRAINT_KEYS, CRASH_VIOLATION, SloSpec
from autotune.storage import OWNER_ATTR, fail_abandoned, open_storage, owner_tag
from autotune.study import StudyConfig, run_study
from autotune.trial import Outcome, TrialResult, TrialSpec

#: What ``FaultyBackend`` does at a trial number.
FAULTS = ("crash", "interrupt", "raise")
CRASH_REASON = "trainer out of memory (injected)"
BUG_REASON = "a bug in the backend (injected)"


class FaultyBackend(Backend):
    """The simulator, except at the study's trial numbers in ``faults``: there
    it returns a crash, raises ``KeyboardInterrupt`` or raises ``RuntimeError``."""

    name = "faulty-sim"

    def __init__(self, faults: dict[int, str] | None = None) -> None:
        assert all(f in FAULTS for f in (faults or {}).values()), faults
        self.faults = dict(faults or {})
        self.inner = make_backend("sim")

    @property
    def hardware(self) -> str:
        return self.inner.hardware

    def run_trial(self, spec: TrialSpec, progress: ProgressFn = no_progress) -> TrialResult:
        fault = self.faults.get(spec.number) if spec.number is not None else None
        if fault == "crash":
            return TrialResult.crash(CRASH_REASON)
        if fault == "interrupt":
            raise KeyboardInterrupt
        if fault == "raise":
            raise RuntimeError(BUG_REASON)
        return self.inner.run_trial(spec, progress)

    def close(self) -> None:
        self.inner.close()


class StorageConformance:
    """Subclass with a ``storage_url`` fixture."""

    @pytest.fixture
    def storage_url(self, tmp_path) -> str:
        raise NotImplementedError("a subclass provides the storage_url fixture")

    def config(self, storage_url: str, runs_dir: Path, seed: int = 0, name: str | None = None) -> StudyConfig:
        return StudyConfig(system="vllm-torchtune", figure="fig8a", rate_req_s=4.0, num_prompts=20,
                           sampler="random", seed=seed, storage=storage_url, runs_dir=runs_dir,
                           study_name=name or f"conformance-{uuid.uuid4().hex[:8]}",
                           slo=SloSpec(ttft_ratio=5.0, tpot_ratio=5.0))

    def run(self, config: StudyConfig, n_trials: int, faults: dict[int, str] | None = None) -> optuna.Study:
        with FaultyBackend(faults) as backend:
            try:
                run_study(config, backend, n_trials=n_trials)
            except (KeyboardInterrupt, RuntimeError):
                pass  # the study is read back below, as the next run would
        return optuna.load_study(study_name=config.study_name, storage=open_storage(config.storage))

    @staticmethod
    def assert_never_feasible(t: optuna.trial.FrozenTrial) -> None:
        assert t.state is not TrialState.RUNNING, f"trial {t.number} left RUNNING"
        assert set(t.constraints) == set(CONSTRAINT_KEYS), f"trial {t.number} constraints {t.constraints}"
        assert all(c > 0 for c in t.constraints.values()), f"trial {t.number} counted feasible: {t.constraints}"

    def test_a_crash_is_stored_complete_infeasible_with_its_reason(self, storage_url, tmp_path):
        study = self.run(self.config(storage_url, tmp_path), 3, faults={1: "crash"})
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
        crashed = study.trials[1]
        self.assert_never_feasible(crashed)
        assert crashed.constraints == {k: CRASH_VIOLATION for k in CONSTRAINT_KEYS}
        assert crashed.value == 0.0
        assert crashed.user_attrs["outcome"] == Outcome.CRASHED and crashed.user_attrs["error"] == CRASH_REASON
        best = StudyResult.of(study).best
        assert best.number != 1
        assert best.number == study.best_trial.number  # one answer: Optuna's feasibility-aware best trial

    @pytest.mark.parametrize("fault, outcome, reason", [("interrupt", Outcome.INTERRUPTED, "interrupted (Ctrl-C)"),
                                                        ("raise", Outcome.FAILED, f"RuntimeError: {BUG_REASON}")])
    def test_a_trial_that_ends_the_study_is_stored_failed_with_its_reason(self, storage_url, tmp_path, fault,
                                                                          outcome, reason):
        study = self.run(self.config(storage_url, tmp_path), 3, faults={1: fault})
        assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
        failed = study.trials[1]
        self.assert_never_feasible(failed)
        assert failed.user_attrs["outcome"] == outcome and failed.user_attrs["error"] == reason

    @pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
    def test_a_dead_workers_trial_is_stored_failed_with_its_reason(self, storage_url, tmp_path):
        config = self.config(storage_url, tmp_path)
        study = self.run(config, 1)
        trial = study.ask()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        trial.set_user_attr(OWNER_ATTR, owner_tag(dead.pid))
        assert fail_abandoned(open_storage(storage_url), config.study_name) == [trial.number]
        failed = optuna.load_study(study_name=config.study_name, storage=open_storage(storage_url)).trials[1]
        assert failed.state is TrialState.FAIL
        self.assert_never_feasible(failed)
        assert failed.user_attrs["outcome"] == Outcome.FAILED
        assert "ended without finishing it" in failed.user_attrs["error"]

    def test_the_same_seed_samples_and_measures_the_same(self, storage_url, tmp_path):
        def trials(seed: int) -> list[tuple[dict, float]]:
            study = self.run(self.config(storage_url, tmp_path / f"seed{seed}-{uuid.uuid4().hex[:4]}", seed), 3)
            return [(t.params, t.value) for t in study.trials]

        first = trials(0)
        assert trials(0) == first
        assert trials(1)[1:] != first[1:]  # the first trial is the system's defaults, whatever the seed
