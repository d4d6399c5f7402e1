"""No setting twice: the sampler wrapper, the workers' seeds, the count of repeats."""

from __future__ import annotations

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from autotune.distinct import DistinctSampler, repeated_settings, sampler_seed

SPACE = {"mps_active_thread_pct": IntDistribution(10, 100, step=10)}  # 10 settings


def _study(inner: optuna.samplers.BaseSampler) -> optuna.Study:
    return optuna.create_study(sampler=DistinctSampler(inner, SPACE, seed=0), direction="maximize")


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_int("mps_active_thread_pct", 10, 100, step=10) / 100


def test_no_setting_is_repeated_until_the_space_is_used_up():
    study = _study(optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    study.optimize(_objective, n_trials=10)
    assert sorted(t.params["mps_active_thread_pct"] for t in study.trials) == list(range(10, 101, 10))
    study.optimize(_objective, n_trials=2)  # nothing new is left: a repeat, not an error
    assert repeated_settings(study.trials) == 2


class OneSetting(optuna.samplers.RandomSampler):
    """A sampler that always proposes 50 %."""

    def sample_independent(self, study, trial, param_name, param_distribution):
        return 50


def test_a_setting_another_worker_is_running_now_is_not_proposed():
    study = _study(OneSetting(seed=0))
    running = study.ask()
    running.suggest_int("mps_active_thread_pct", 10, 100, step=10)  # 50: RUNNING, not finished
    assert running.params["mps_active_thread_pct"] == 50
    study.optimize(_objective, n_trials=1)
    assert study.trials[-1].params["mps_active_thread_pct"] != 50


def test_a_queued_setting_is_kept():
    study = _study(OneSetting(seed=0))
    study.optimize(_objective, n_trials=1)
    study.enqueue_trial({"mps_active_thread_pct": 50})  # e.g. a dead worker's trial run again
    study.optimize(_objective, n_trials=1)
    assert [t.params["mps_active_thread_pct"] for t in study.trials] == [50, 50]


def test_worker_zero_keeps_the_one_process_seed_and_workers_differ():
    assert sampler_seed(7, 0, 3) == 3007
    seeds = {sampler_seed(7, w, 3) for w in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**32 for s in seeds)
    assert sampler_seed(7, 1, 3) == sampler_seed(7, 1, 3)


def test_repeats_count_complete_trials_only():
    dist = {"a": optuna.distributions.FloatDistribution(0, 2)}
    trials = [optuna.trial.create_trial(params={"a": 1.0}, distributions=dist, value=0.0),
              optuna.trial.create_trial(params={"a": 1.0}, distributions=dist, state=TrialState.FAIL),
              optuna.trial.create_trial(params={"a": 1.0}, distributions=dist, value=1.0)]
    assert repeated_settings(trials) == 1
